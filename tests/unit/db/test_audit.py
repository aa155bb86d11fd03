"""The audit chain: appends link up, verification finds edits and deletions, and the database
itself refuses UPDATE and DELETE."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db import AuditEntry, audit


def _fill(db, n: int = 5) -> None:
    for i in range(n):
        with db.session() as s:
            audit.append(s, "tester", "thing.happened", f"1.2.{i}", {"i": i, "note": "ü"})


def test_chain_links_and_verifies(database):
    _fill(database)
    with database.session() as s:
        rows = list(s.query(AuditEntry).order_by(AuditEntry.seq))
        report = audit.verify(s)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.entry_hash for a, b in zip(rows, rows[1:], strict=False))
    assert report.ok and report.entries == 5


def test_database_refuses_update_and_delete(database):
    _fill(database, 2)
    for sql in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"):
            with database.engine.begin() as conn:
                conn.execute(text(sql))
    with database.session() as s:
        assert audit.verify(s).ok


def _bypass_triggers(db, sql: str) -> None:
    """What an attacker with DDL rights could do: disable the guard, tamper, restore it."""
    with db.engine.begin() as conn:
        if db.is_sqlite:
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
            conn.execute(text("DROP TRIGGER audit_log_no_delete"))
            conn.execute(text(sql))
        else:
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
            conn.execute(text(sql))
            conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))


def test_verify_finds_an_edited_row(database):
    _fill(database)
    _bypass_triggers(database, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
    with database.session() as s:
        report = audit.verify(s)
    assert not report.ok and report.broken_at_seq == 3 and "altered" in report.problem


def test_verify_finds_a_deleted_row(database):
    _fill(database)
    _bypass_triggers(database, "DELETE FROM audit_log WHERE seq = 2")
    with database.session() as s:
        report = audit.verify(s)
    assert not report.ok and report.broken_at_seq == 2 and "missing" in report.problem


def test_concurrent_appends_never_fork_the_chain(database):
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(10):
                with database.session() as s:
                    audit.append(s, f"w{k}", "concurrent", None, {"i": i})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with database.session() as s:
        report = audit.verify(s)
    assert report.ok and report.entries == 40
