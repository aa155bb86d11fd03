"""The audit chain: appends link up and are keyed, verification finds edits, deletions and
rebuilt chains (against signed checkpoints kept outside the database), and the database itself
refuses UPDATE and DELETE."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from db import AuditEntry, audit, audit_checkpoints
from db.audit_keys import AuditKeyError, AuditKeys
from db.session import Database
from dicom_node.archive import Archive
from dicom_node.server import NodeConfig
from dicom_node.service import NodeService
from tests.conftest import PG_DSN, PG_URL_BASE, RecordingPublisher, wait_for


def _fill(db, n: int = 5) -> None:
    for i in range(n):
        with db.session() as s:
            audit.append(s, "tester", "thing.happened", f"1.2.{i}", {"i": i, "note": "ü"})


def test_chain_links_and_verifies(database, audit_key):
    _fill(database)
    with database.session() as s:
        rows = list(s.query(AuditEntry).order_by(AuditEntry.seq))
        report = audit.verify(s)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.entry_hash for a, b in zip(rows, rows[1:], strict=False))
    assert {(r.scheme, r.key_id) for r in rows} == {("hmac-sha256", audit_key.key_id)}
    assert report.ok and report.entries == 5 and report.keyed == 5 and report.unkeyed == 0


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


# --- keyed entries and signed checkpoints (security issue #16) ------------------------------


@pytest.fixture
def checkpointed(audit_key: AuditKeys, tmp_path: Path) -> Iterator[AuditKeys]:
    """The session's keys with a checkpoint folder of this test's own, configured for append."""
    keys = dataclasses.replace(audit_key, checkpoint_dir=tmp_path / "checkpoints")
    audit.configure(keys)
    yield keys
    audit.configure(audit_key)


def _checkpoint(db: Database) -> audit_checkpoints.Checkpoint | None:
    with db.session() as s:
        return audit.write_checkpoint(s)


def _verify(db: Database, keys: AuditKeys | None = None) -> audit.ChainReport:
    with db.session() as s:
        return audit.verify(s) if keys is None else audit.verify(s, keys)


def _rows(db: Database) -> list[AuditEntry]:
    with db.session() as s:
        return list(s.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars())


def _rewrite_unkeyed(
    db: Database, edit_seq: int, *, as_unkeyed: bool, last_seq: int | None = None
) -> None:
    """The attack of the finding: edit one row, then recompute every later hash (and link) with
    the public, unkeyed `entry_hash`, up to `last_seq` (default the newest); with `as_unkeyed`
    also mark each row as unkeyed."""
    rows = _rows(db)
    prev = rows[edit_seq - 2].entry_hash if edit_seq > 1 else audit.GENESIS
    statements = []
    for row in rows[edit_seq - 1 : last_seq]:
        actor = "mallory" if row.seq == edit_seq else row.actor
        digest = audit.entry_hash(
            prev, row.seq, row.at, actor, row.action, row.study_uid, row.detail
        )
        scheme = ", scheme = NULL, key_id = NULL" if as_unkeyed else ""
        statements.append(
            f"UPDATE audit_log SET actor = '{actor}', prev_hash = '{prev}', "
            f"entry_hash = '{digest}'{scheme} WHERE seq = {row.seq}"
        )
        prev = digest
    with db.engine.begin() as conn:
        if db.is_sqlite:
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
        else:
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        for sql in statements:
            conn.execute(text(sql))


def test_deleting_the_newest_rows_is_found_against_the_checkpoint(database, checkpointed):
    _fill(database, 5)
    first = _checkpoint(database)
    _fill(database, 2)
    latest = _checkpoint(database)
    assert (first.seq, latest.seq) == (5, 7)
    assert _verify(database).ok
    _bypass_triggers(database, "DELETE FROM audit_log WHERE seq >= 6")
    report = _verify(database)
    assert not report.ok and report.broken_at_seq == 6
    assert "entries 6 to 7 are missing" in report.problem
    # nor will the node sign over the gap
    with pytest.raises(audit.AuditTampered, match="6 to 7 are missing"):
        _checkpoint(database)


def test_an_edit_recomputed_with_the_unkeyed_hash_is_found(database, checkpointed):
    _fill(database, 5)
    _rewrite_unkeyed(database, 3, as_unkeyed=False)
    report = _verify(database)
    assert not report.ok and report.broken_at_seq == 3 and "altered" in report.problem


def test_a_chain_rebuilt_as_unkeyed_is_found_against_the_checkpoint(database, checkpointed):
    _fill(database, 5)
    _checkpoint(database)
    _rewrite_unkeyed(database, 1, as_unkeyed=True)  # every row now passes the unkeyed check
    report = _verify(database)
    assert not report.ok and report.broken_at_seq == 5 and "rewritten" in report.problem


def test_an_inserted_unkeyed_entry_is_found(database):
    # INSERT is what the triggers allow: a writer appends an entry with a correct unkeyed hash.
    _fill(database, 3)
    last = _rows(database)[-1]
    at = last.at
    digest = audit.entry_hash(last.entry_hash, 4, at, "admin", "user.added", None, {})
    with database.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_log (seq, at, actor, action, detail, prev_hash, entry_hash) "
                "VALUES (4, :at, 'admin', 'user.added', '{}', :prev, :hash)"
            ),
            {"at": at, "prev": last.entry_hash, "hash": digest},
        )
    report = _verify(database)
    assert not report.ok and report.broken_at_seq == 4 and "unkeyed" in report.problem


def test_a_forged_checkpoint_is_found(database, checkpointed):
    _fill(database, 3)
    real = _checkpoint(database)
    _bypass_triggers(database, "DELETE FROM audit_log WHERE seq = 3")
    path = checkpointed.checkpoint_file
    # The writer moves the checkpoint back to match the truncated table, keeping the signature...
    moved = dataclasses.replace(real, seq=2, head=_rows(database)[-1].entry_hash)
    path.write_text(moved.to_json() + "\n")
    report = _verify(database)
    assert not report.ok and "signature does not verify" in report.problem
    # ... or signs it with a key of their own.
    mallory = dataclasses.replace(checkpointed, signing_key=Ed25519PrivateKey.generate())
    forged = audit_checkpoints.sign(mallory, 2, _rows(database)[-1].entry_hash)
    path.write_text(forged.to_json() + "\n")
    report = _verify(database)
    assert not report.ok and "not the configured key" in report.problem
    with pytest.raises(audit.AuditTampered, match="not the configured key"):
        _checkpoint(database)


def test_entries_under_another_key_or_none_are_refused_and_found(database, audit_key, tmp_path):
    _fill(database, 2)
    other = AuditKeys.load(tmp_path / "other" / "audit.key")
    report = _verify(database, other)
    assert (
        not report.ok and report.broken_at_seq == 1 and "not the configured key" in report.problem
    )
    with database.session() as s:
        with pytest.raises(AuditKeyError, match="same RADAI_AUDIT_KEY_FILE"):
            audit.check_keys(s, other)
    audit.configure(other)
    try:
        with pytest.raises(AuditKeyError, match="keyed with key"):
            _fill(database, 1)
        audit.configure(None)
        with pytest.raises(AuditKeyError, match="no audit key"):
            _fill(database, 1)
    finally:
        audit.configure(audit_key)
    assert _verify(database).ok and _verify(database).entries == 2


def test_key_files_are_created_0600_once_and_never_by_a_verifier(tmp_path):
    key_file = tmp_path / "keys" / "audit.key"
    with pytest.raises(AuditKeyError, match="does not exist"):
        AuditKeys.load(key_file, create=False)
    assert not key_file.exists()
    keys = AuditKeys.load(key_file, tmp_path / "cp")
    for name in ("audit.key", "audit-signing.key"):
        assert stat.S_IMODE((key_file.parent / name).stat().st_mode) == 0o600
    again = AuditKeys.load(key_file, create=False)
    assert again.hmac_key == keys.hmac_key and again.signing_key_id == keys.signing_key_id
    assert len(keys.hmac_key) == 32 and (key_file.parent / "audit-signing.pub").exists()


def test_checkpoints_survive_a_torn_line(tmp_path, audit_key):
    keys = dataclasses.replace(audit_key, checkpoint_dir=tmp_path)
    good = audit_checkpoints.sign(keys, 3, "a" * 64)
    audit_checkpoints.append(keys.checkpoint_file, good)
    with keys.checkpoint_file.open("a") as fh:
        fh.write('{"seq": 4, "he')  # a crash in the middle of a write
    assert [c.seq for c in audit_checkpoints.read(keys.checkpoint_file)] == [3]
    audit_checkpoints.append(keys.checkpoint_file, audit_checkpoints.sign(keys, 5, "b" * 64))
    read = audit_checkpoints.read(keys.checkpoint_file)
    assert [c.seq for c in read] == [3, 5]
    for cp in read:
        audit_checkpoints.check_signature(cp, keys)


@pytest.fixture(params=["sqlite", "postgresql"])
def blank_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database of each kind, not migrated."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'old.sqlite'}")
        yield db
        db.dispose()
        return
    request.getfixturevalue("pg_template")  # skips (or fails in CI) without PostgreSQL
    name = f"radai_old_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db = Database(f"{PG_URL_BASE}/{name}")
    yield db
    db.dispose()
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_entries_from_before_keying_are_kept_and_sealed(blank_database, checkpointed):
    db = blank_database
    db.upgrade("0004")
    prev = audit.GENESIS
    with db.engine.begin() as conn:  # what revision 0004's code wrote: unkeyed entries
        for seq in (1, 2, 3):
            at = audit.utcnow()
            digest = audit.entry_hash(prev, seq, at, "old", "thing.happened", None, {"i": seq})
            conn.execute(
                text(
                    "INSERT INTO audit_log (seq, at, actor, action, detail, prev_hash, "
                    "entry_hash) VALUES (:seq, :at, 'old', 'thing.happened', :detail, :prev, "
                    ":hash)"
                ),
                {
                    "seq": seq,
                    "at": at,
                    "detail": json.dumps({"i": seq}),
                    "prev": prev,
                    "hash": digest,
                },
            )
            prev = digest
    db.upgrade()
    with pytest.raises(DBAPIError, match="append-only"):  # the triggers survived 0006
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE audit_log SET actor = 'mallory'"))
    _fill(db, 2)
    report = _verify(db)
    assert report.ok and (report.unkeyed, report.keyed) == (3, 2), report
    assert [r.scheme for r in _rows(db)] == [None, None, None, "hmac-sha256", "hmac-sha256"]
    # The first keyed entry's HMAC covers the old entries' head: rewriting them is found.
    _rewrite_unkeyed(db, 2, as_unkeyed=True, last_seq=3)
    db_report = _verify(db)
    assert not db_report.ok and db_report.broken_at_seq == 4
    assert "does not follow" in db_report.problem


def test_the_node_signs_checkpoints_on_its_interval_and_when_it_stops(
    sqlite_db, checkpointed, tmp_path
):
    service = NodeService(
        sqlite_db,
        Archive(tmp_path / "archive", tmp_path / "quarantine"),
        NodeConfig(host="127.0.0.1", port=0),
        stable_seconds=1.0,
        publish=RecordingPublisher(),
        poll_seconds=0.05,
        checkpoint_seconds=0.2,
    )
    service.start()
    try:
        _fill(sqlite_db, 3)

        def latest_seq() -> int:
            return max(
                (c.seq for c in audit_checkpoints.read(checkpointed.checkpoint_file)), default=0
            )

        wait_for(lambda: latest_seq() == 3, timeout=10)
        _fill(sqlite_db, 2)
        service.checkpoint_seconds = 3600.0  # only the stop signs the newest entries now
        time.sleep(0.5)
    finally:
        service.stop()
    assert latest_seq() == 5
    with sqlite_db.session() as s:
        assert audit.write_checkpoint(s) is None  # nothing new to sign
    assert _verify(sqlite_db).checkpoints >= 2


RADAI = [sys.executable, "-m", "radai"]


def _radai(args: list[str], home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env["RADAI_HOME"] = str(home)  # its own key and checkpoints, created on first use
    return subprocess.run(
        RADAI + args, env=env, input=stdin, capture_output=True, text=True, timeout=120
    )


def test_radai_audit_verify_exit_codes(tmp_path):
    home = tmp_path / "home"
    assert "audit" in _radai(["--help"], home).stdout
    missing = _radai(["audit", "verify"], home)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    for name in ("alice", "bob", "carol"):
        added = _radai(
            ["user", "add", name, "--role", "auditor", "--password-stdin"],
            home,
            "Audit-test-passphrase-2026\n",
        )
        assert added.returncode == 0, added.stderr
    assert stat.S_IMODE((home / "audit.key").stat().st_mode) == 0o600
    signed = _radai(["audit", "checkpoint"], home)
    assert signed.returncode == 0 and "checkpoint signed: entry 3" in signed.stdout, signed.stderr
    ok = _radai(["audit", "verify"], home)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact: 3 entries (3 keyed" in ok.stdout and "1 signed checkpoint verified" in ok.stdout

    conn = sqlite3.connect(home / "radai.sqlite")  # a database writer, without the key files
    conn.execute("DROP TRIGGER audit_log_no_delete")
    conn.execute("DELETE FROM audit_log WHERE seq = 3")
    conn.commit()
    conn.close()
    broken = _radai(["audit", "verify", "--json"], home)
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert report["ok"] is False and report["broken_at_seq"] == 3
    assert "missing" in report["problem"]
    text_out = _radai(["audit", "verify"], home)
    assert text_out.returncode == 1 and "BROKEN at entry 3" in text_out.stdout


def test_the_writer_reads_only_the_ends_of_a_long_checkpoint_file(tmp_path, audit_key):
    keys = dataclasses.replace(audit_key, checkpoint_dir=tmp_path)
    seqs = [*range(1, 400), 401, 400]  # two hosts' writers may land out of order
    with keys.checkpoint_file.open("w") as fh:
        for seq in seqs:
            fh.write(audit_checkpoints.sign(keys, seq, f"{seq:064x}").to_json() + "\n")
    assert keys.checkpoint_file.stat().st_size > 65536
    first, latest = audit_checkpoints.read_ends(keys.checkpoint_file)
    assert (first.seq, latest.seq, latest.head) == (1, 401, f"{401:064x}")
    audit_checkpoints.check_signature(latest, keys)
    assert [c.seq for c in audit_checkpoints.read(keys.checkpoint_file)] == seqs
