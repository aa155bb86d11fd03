"""The node's plain SQL path for the common case (`recording.record_plain`, on SQLite and on
PostgreSQL) against the general path (`record_in_session`): the same instances give the same rows,
and every case that is not the common one is left to the general path with nothing written."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update

from db import Study, StudyState
from db.session import Database
from dicom_node import recording
from dicom_node.inspection import TRUNCATED, Alteration, ReceivedObject
from tests.conftest import _make_pg

T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def _obj(n: int, *, study: str = "1.2.3", series: str = "1.2.3.1", **changes) -> ReceivedObject:
    base = ReceivedObject(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.9.{n}",
        study_uid=study,
        series_uid=series,
        transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT",
        series_number=2,
        series_description="AXIAL",
        body_part="CHEST",
        instance_number=n,
        patient_id="P1",
        patient_name="DOE^J",
        accession_number="A1",
        study_date="20261130",
        study_description="CT CHEST",
    )
    return dataclasses.replace(base, **changes)


def _general(db: Database, obj: ReceivedObject, n: int) -> recording.Outcome:
    with db.deferred_session() as s:
        return recording.record_in_session(
            s,
            obj,
            digest=f"{n:064x}",
            size=1000 + n,
            calling_ae="CT1",
            actor="node:T",
            place=lambda outcome: f"/archive/{obj.sop_instance_uid}.{outcome}",
            now=T0 + timedelta(seconds=n),
        )


def _plain(db: Database, obj: ReceivedObject, n: int) -> recording.Outcome | None:
    with db.deferred_driver_connection() as connection:
        return recording.record_plain(
            connection,
            db.engine.dialect.name,
            obj,
            digest=f"{n:064x}",
            size=1000 + n,
            calling_ae="CT1",
            place=lambda outcome: f"/archive/{obj.sop_instance_uid}.{outcome}",
            now=T0 + timedelta(seconds=n),
        )


def _dump(db: Database) -> dict[str, list[tuple]]:
    tables = {
        "studies": "SELECT * FROM studies ORDER BY id",
        "series": "SELECT * FROM series ORDER BY id",
        "instances": "SELECT * FROM instances ORDER BY id",
        "audit": "SELECT action, study_uid, detail FROM audit_log ORDER BY id",
    }
    with db.engine.connect() as conn:
        return {name: [tuple(r) for r in conn.execute(text(sql))] for name, sql in tables.items()}


@pytest.fixture(params=["sqlite", "postgresql"])
def make_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """Migrated, empty databases of one kind, as many as the test asks for."""
    made: list[tuple[Database, Callable[[], None] | None]] = []

    def make() -> Database:
        if request.param == "sqlite":
            db = Database(f"sqlite:///{tmp_path / f'radai{len(made)}.sqlite'}")
            db.upgrade()
            made.append((db, None))
        else:
            db, drop = _make_pg(request.getfixturevalue("pg_template"))
            made.append((db, drop))
        return db

    yield make
    for db, drop in made:
        if drop is None:
            db.dispose()
        else:
            drop()


def test_plain_path_writes_the_rows_the_general_path_writes(make_db):
    general, mixed = make_db(), make_db()
    objects = [_obj(n) for n in range(1, 6)]
    objects.append(_obj(6, series="1.2.3.2"))  # a new series: general path
    objects += [_obj(n, series="1.2.3.2") for n in range(7, 10)]
    used_plain = 0
    for n, obj in enumerate(objects, start=1):
        assert _general(general, obj, n) == recording.Outcome.NEW
        outcome = _plain(mixed, obj, n)
        if outcome is None:
            assert _general(mixed, obj, n) == recording.Outcome.NEW
        else:
            assert outcome == recording.Outcome.NEW
            used_plain += 1
    assert used_plain == 7  # all but the first instance of each series
    assert _dump(mixed) == _dump(general)
    with mixed.session() as s:
        study = s.query(Study).one()
        assert study.instance_count == 9
        assert study.last_instance_at == T0 + timedelta(seconds=9)


def test_every_other_case_is_left_to_the_general_path_untouched(make_db):
    db = make_db()
    assert _plain(db, _obj(1), 1) is None  # no study yet
    assert _general(db, _obj(1), 1) == recording.Outcome.NEW
    assert _plain(db, _obj(2), 2) == recording.Outcome.NEW
    before = _dump(db)
    cases = {
        "duplicate": _obj(2),
        "new series": _obj(3, series="1.2.3.7"),
        "new modality": _obj(4, modality="PT"),
        "another patient": _obj(5, patient_id="P2"),
        "altered value": _obj(6, alterations=(Alteration("StudyDescription", TRUNCATED, 70, 64),)),
        "another study": _obj(7, study="1.2.4"),
    }
    for name, obj in cases.items():
        assert _plain(db, obj, 10) is None, name
    assert _dump(db) == before
    with db.session() as s:
        s.execute(update(Study).values(state=StudyState.STABLE))
    before = _dump(db)
    assert _plain(db, _obj(8), 8) is None, "a study that is not receiving is reopened"
    assert _dump(db) == before
