"""Recording received instances in the database: studies, series, duplicates and conflicts.

Each function is one transaction. A study that receives an instance after it was declared stable
(or processed, or held) is reopened: back to RECEIVING (db/lifecycle.py), so it is assembled and
queued again. A study whose instances name different patients (Patient ID) is kept whole,
flagged and held (HELD, not analysed) until a person releases it; a later instance of another
patient holds it again. Values the node altered to record them (db/flags.py, inspection.py) flag
the study and are audited per instance, by attribute, never with the value itself.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from db import (
    IngestFailure,
    Instance,
    InstanceConflict,
    Series,
    Study,
    StudyState,
    audit,
    lifecycle,
)
from db.audit_actions import AuditAction
from db.flags import FlagKind, add_flag
from db.models import utcnow
from db.own_results import is_own_result
from db.session import Database
from dicom_node.inspection import ReceivedObject


class Outcome(enum.StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


def _insert_ignore(session: Session, table, **values) -> bool:  # noqa: ANN001
    """INSERT unless the unique key exists (safe against a concurrent insert); True if inserted."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(table.__table__).values(**values).on_conflict_do_nothing()
    return session.execute(stmt.returning(table.__table__.c.id)).first() is not None


Place = Callable[[Outcome], str]

MIXED_PATIENTS = (
    "instances of more than one patient under one Study Instance UID (their Patient ID "
    "differs); all are kept, and the study is held until a person releases it"
)

# Built once: this path runs for every instance received, and building statements per call costs
# more than executing them.
_I = Instance.__table__
_S = Study.__table__
_SE = Series.__table__
_FIND = select(_I.c.sha256).where(_I.c.sop_instance_uid == bindparam("sop"))
_TOUCH = (
    update(_S)
    .where(_S.c.study_uid == bindparam("uid"), _S.c.state == StudyState.RECEIVING)
    .values(last_instance_at=bindparam("now"))
)
_STUDY_ROW = (
    select(_S.c.id, _S.c.state, _S.c.modalities, _S.c.patient_id, _S.c.hold_reason)
    .where(_S.c.study_uid == bindparam("uid"))
    .with_for_update()
)
_SERIES_ID = select(_SE.c.id).where(_SE.c.series_uid == bindparam("uid"))
_INSERT_INSTANCE = _I.insert()
# A new instance counts in its study and series: each counted and read back in one statement.
_BUMP_STUDY = (
    update(_S)
    .where(_S.c.study_uid == bindparam("uid"))
    .values(instance_count=_S.c.instance_count + 1, last_instance_at=bindparam("now"))
    .returning(_S.c.id, _S.c.state, _S.c.modalities, _S.c.patient_id, _S.c.hold_reason)
)
_BUMP_SERIES = (
    update(_SE)
    .where(_SE.c.series_uid == bindparam("uid"))
    .values(instance_count=_SE.c.instance_count + 1)
    .returning(_SE.c.id)
)


# The common case as plain SQL on the driver's own connection: SQLAlchemy's statement and
# session machinery costs several times what the database spends executing these four
# statements, and this runs for every instance received. The columns and their encodings are the
# models' (a time goes through the column type's own bind processor for that dialect), so the rows
# are the same as the general path writes (tests/unit/dicom_node/test_plain_recording.py).
_INSTANCE_COLUMNS = (
    "study_id",
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "instance_number",
    "archive_path",
    "sha256",
    "size",
    "transfer_syntax",
    "calling_ae",
    "received_at",
)


@dataclass(frozen=True)
class _PlainSQL:
    begin: str | None  # None: the driver opens the transaction itself (psycopg)
    find: str
    bump_study: str
    bump_series: str
    insert: str
    time: Callable[[datetime], object]


def _plain_sql(dialect: Dialect, mark: str, begin: str | None) -> _PlainSQL:
    to_db = _I.c.received_at.type.dialect_impl(dialect).bind_processor(dialect)
    return _PlainSQL(
        begin=begin,
        find=f"SELECT 1 FROM {_I.name} WHERE sop_instance_uid = {mark}",
        bump_study=(
            f"UPDATE {_S.name} SET instance_count = instance_count + 1, "
            f"last_instance_at = {mark} WHERE study_uid = {mark} "
            "RETURNING id, state, modalities, patient_id"
        ),
        bump_series=(
            f"UPDATE {_SE.name} SET instance_count = instance_count + 1 "
            f"WHERE series_uid = {mark} RETURNING id"
        ),
        insert=(
            f"INSERT INTO {_I.name} ({', '.join(_INSTANCE_COLUMNS)}) "
            f"VALUES ({', '.join([mark] * len(_INSTANCE_COLUMNS))})"
        ),
        time=to_db or (lambda value: value),
    )


# SQLite's connections run in autocommit mode (`db.session`): the transaction takes the write
# lock at its start. psycopg opens a transaction at the first statement; the study's row lock
# orders concurrent writers of one study.
_PLAIN = {
    "sqlite": _plain_sql(sqlite_dialect.dialect(), "?", "BEGIN IMMEDIATE"),
    "postgresql": _plain_sql(psycopg_dialect.dialect(), "%s", None),
}


def record_plain(
    connection: Any,
    dialect: str,
    obj: ReceivedObject,
    *,
    digest: str,
    size: int,
    calling_ae: str,
    place: Place,
    now: datetime,
    lock_across_processes: bool = False,
) -> Outcome | None:
    """`record_in_session` for the common case, on the driver's own connection (sqlite3 or
    psycopg, `Database.deferred_driver_connection`): a new instance of a series already on
    record, in a study that is receiving, of the same patient and a modality it already lists,
    with nothing altered. Anything else returns None with nothing written, for the general path
    to decide. The caller keeps two writers of one SOP Instance UID apart (the node's lock), so
    the instance checked absent is still absent when `place` files it.
    """
    if obj.alterations:
        return None
    sql = _PLAIN[dialect]
    cur = connection.cursor()
    try:
        if sql.begin:
            cur.execute(sql.begin)
        if lock_across_processes and dialect == "postgresql":
            cur.execute(_PG_LOCK_UID, (obj.sop_instance_uid,))
        if cur.execute(sql.find, (obj.sop_instance_uid,)).fetchone() is not None:
            connection.rollback()
            return None
        row = cur.execute(sql.bump_study, (sql.time(now), obj.study_uid)).fetchone()
        if row is None or not _plain_study(obj, *row[1:]):
            connection.rollback()
            return None
        series = cur.execute(sql.bump_series, (obj.series_uid,)).fetchone()
        if series is None:
            connection.rollback()
            return None
        cur.execute(
            sql.insert,
            (
                row[0],
                series[0],
                obj.sop_instance_uid,
                obj.sop_class_uid,
                obj.instance_number,
                place(Outcome.NEW),
                digest,
                size,
                obj.transfer_syntax,
                calling_ae,
                sql.time(now),
            ),
        )
        connection.commit()
    except BaseException:
        with contextlib.suppress(Exception):  # a lost connection cannot roll back; say why not
            connection.rollback()
        raise
    finally:
        cur.close()
    return Outcome.NEW


# A transaction lock on the UID's hash: two node processes recording one SOP Instance UID take
# turns, as two threads of one process do on the node's own lock. A hash collision only makes
# two unrelated instances wait for each other.
_PG_LOCK_UID = "SELECT pg_advisory_xact_lock(hashtext(%s))"


def lock_uid_across_processes(session: Session, sop_instance_uid: str) -> None:
    """On PostgreSQL, hold this SOP Instance UID's lock until the session's transaction ends
    (several node processes on one port); SQLite's write lock already covers it."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().exec_driver_sql(_PG_LOCK_UID, (sop_instance_uid,))


def _plain_study(obj: ReceivedObject, state: str, modalities: str, patient_id: str | None) -> bool:
    if state != StudyState.RECEIVING:
        return False  # reopened: a transition, audited
    if obj.modality and obj.modality not in modalities.split("\\"):
        return False  # the study's list of modalities grows
    # Another patient's instance flags and holds the study.
    return not (obj.patient_id and patient_id and obj.patient_id != patient_id)


def record_instance(
    db: Database,
    obj: ReceivedObject,
    *,
    digest: str,
    size: int,
    calling_ae: str,
    actor: str,
    place: Place,
) -> Outcome:
    """Decide new/duplicate/conflict and record it, in one transaction.

    `place(outcome)` moves the staged file to where that outcome keeps it and returns the path;
    it runs inside the transaction, so a file is never filed as primary for an instance whose
    primary copy another sender recorded first.
    """
    with db.session() as s:
        return record_in_session(
            s, obj, digest=digest, size=size, calling_ae=calling_ae, actor=actor, place=place
        )


def record_in_session(
    s: Session,
    obj: ReceivedObject,
    *,
    digest: str,
    size: int,
    calling_ae: str,
    actor: str,
    place: Place,
    now: datetime | None = None,
    replay: bool = False,
) -> Outcome:
    """`record_instance` inside the caller's transaction, so that many instances share one commit.

    `now` is when the instance was received (acknowledged), not when it is indexed. With
    `replay`, the instance comes from the ingest journal after a crash and may have been recorded
    before: a conflicting copy already on record is not flagged and audited a second time.
    """
    now = now or utcnow()
    conn = s.connection()
    known = conn.execute(_FIND, {"sop": obj.sop_instance_uid}).scalar()
    if known == digest:
        conn.execute(_TOUCH, {"uid": obj.study_uid, "now": now})
        return Outcome.DUPLICATE
    if known is None:
        row = conn.execute(_BUMP_STUDY, {"uid": obj.study_uid, "now": now}).first()
        if row is None:
            _upsert_study(s, obj, now, actor)
            row = conn.execute(_BUMP_STUDY, {"uid": obj.study_uid, "now": now}).one()
        study_id, state, modalities, patient_id, hold_reason = row
    else:
        study_id, state, modalities, patient_id, hold_reason = _upsert_study(s, obj, now, actor)
    _record_alterations(s, obj, study_id, calling_ae, actor, now)
    if known is not None:
        _record_conflict(
            s,
            obj,
            study_id,
            place(Outcome.CONFLICT),
            digest,
            size,
            calling_ae,
            now,
            actor,
            replay=replay,
        )
        return Outcome.CONFLICT
    series_id = conn.execute(_BUMP_SERIES, {"uid": obj.series_uid}).scalar()
    if series_id is None:
        _upsert_series(s, obj, study_id)
        series_id = conn.execute(_BUMP_SERIES, {"uid": obj.series_uid}).scalar_one()
    conn.execute(
        _INSERT_INSTANCE,
        {
            "study_id": study_id,
            "series_id": series_id,
            "sop_instance_uid": obj.sop_instance_uid,
            "sop_class_uid": obj.sop_class_uid,
            "instance_number": obj.instance_number,
            "archive_path": place(Outcome.NEW),
            "sha256": digest,
            "size": size,
            "transfer_syntax": obj.transfer_syntax,
            "calling_ae": calling_ae,
            "received_at": now,
        },
    )
    values: dict = {}
    present = [m for m in modalities.split("\\") if m]
    if obj.modality and obj.modality not in present:
        values["modalities"] = "\\".join([*present, obj.modality])
    # A result of ours stored back into the study (STOW-RS) is kept but is not new input.
    own = is_own_result(obj.sop_class_uid, obj.series_description)
    if state != StudyState.RECEIVING and not own:
        lifecycle.transition_where(
            s, study_id, obj.study_uid, AuditAction.STUDY_REOPENED, state, actor=actor, now=now
        )
    mixed = obj.patient_id and patient_id and obj.patient_id != patient_id
    if mixed and hold_reason is None:
        # Which instance, never which patients: the audit trail holds no patient data.
        add_flag(
            s,
            study_id,
            obj.study_uid,
            FlagKind.PATIENTS_MIXED,
            MIXED_PATIENTS,
            actor=actor,
            action=AuditAction.STUDY_PATIENTS_MIXED,
            detail={"sop_instance_uid": obj.sop_instance_uid, "calling_ae": calling_ae},
            hold=True,
            once=False,  # held again after a release: a new flag with its own time
            now=now,
        )
    if values:
        conn.execute(update(_S).where(_S.c.id == study_id).values(**values))
    return Outcome.NEW


def _record_conflict(
    s: Session,
    obj: ReceivedObject,
    study_id: int,
    path: str,
    digest: str,
    size: int,
    calling_ae: str,
    now: datetime,
    actor: str,
    *,
    replay: bool = False,
) -> None:
    inserted = _insert_ignore(
        s,
        InstanceConflict,
        study_id=study_id,
        sop_instance_uid=obj.sop_instance_uid,
        archive_path=path,
        sha256=digest,
        size=size,
        calling_ae=calling_ae,
        received_at=now,
    )
    if replay and not inserted:
        return  # recorded, flagged and audited before the crash that left it in the journal
    reason = (
        f"SOP Instance UID {obj.sop_instance_uid} was received again with different content; "
        "both versions are kept"
    )
    add_flag(s, study_id, obj.study_uid, FlagKind.INSTANCE_CONFLICT, reason, actor=actor, now=now)
    # Every conflicting copy is audited, also a third version of a UID already flagged.
    audit.append(
        s,
        actor,
        AuditAction.INSTANCE_CONFLICT,
        obj.study_uid,
        {"sop_instance_uid": obj.sop_instance_uid, "sha256": digest, "calling_ae": calling_ae},
    )


def _record_alterations(
    s: Session, obj: ReceivedObject, study_id: int, calling_ae: str, actor: str, now: datetime
) -> None:
    """Flag the study once per kind of alteration and attribute; audit each altered instance."""
    if not obj.alterations:
        return
    for change in obj.alterations:
        add_flag(s, study_id, obj.study_uid, change.flag_kind, change.reason, actor=actor, now=now)
    audit.append(
        s,
        actor,
        AuditAction.INSTANCE_VALUES_ALTERED,
        obj.study_uid,
        {
            "sop_instance_uid": obj.sop_instance_uid,
            "calling_ae": calling_ae,
            "changes": [c.to_detail() for c in obj.alterations],
        },
    )


def _upsert_study(
    session: Session, obj: ReceivedObject, now: datetime, actor: str
) -> tuple[int, str, str, str | None, str | None]:
    """(id, state, modalities, patient ID, hold reason) of the study, created if new."""
    conn = session.connection()
    row = conn.execute(_STUDY_ROW, {"uid": obj.study_uid}).first()
    if row is not None:
        return tuple(row)  # type: ignore[return-value]
    created = _insert_ignore(
        session,
        Study,
        study_uid=obj.study_uid,
        state=lifecycle.INITIAL,
        patient_id=obj.patient_id,
        patient_name=obj.patient_name,
        accession_number=obj.accession_number,
        study_date=obj.study_date,
        study_description=obj.study_description,
        modalities="",
        flagged=False,
        instance_count=0,
        first_received_at=now,
        last_instance_at=now,
        state_changed_at=now,
        attempts=0,
    )
    if created:
        audit.append(session, actor, AuditAction.STUDY_RECEIVED, obj.study_uid, {})
    row = conn.execute(_STUDY_ROW, {"uid": obj.study_uid}).one()
    return tuple(row)  # type: ignore[return-value]


def _upsert_series(session: Session, obj: ReceivedObject, study_id: int) -> int:
    found = session.connection().execute(_SERIES_ID, {"uid": obj.series_uid}).scalar()
    if found is not None:
        return found
    _insert_ignore(
        session,
        Series,
        study_id=study_id,
        series_uid=obj.series_uid,
        modality=obj.modality,
        series_number=obj.series_number,
        series_description=obj.series_description,
        body_part=obj.body_part,
        instance_count=0,
    )
    return session.execute(
        select(Series.id).where(Series.series_uid == obj.series_uid)
    ).scalar_one()


def record_refusal(
    db: Database,
    *,
    status: int,
    reason: str,
    calling_ae: str,
    peer: str | None,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    study_uid: str | None,
    quarantine_path: str | None,
    size: int | None,
    actor: str,
) -> None:
    with db.session() as s:
        s.add(
            IngestFailure(
                calling_ae=calling_ae[:16],
                peer=peer,
                status=status,
                reason=reason,
                sop_class_uid=(sop_class_uid or None) and sop_class_uid[:128],
                sop_instance_uid=(sop_instance_uid or None) and sop_instance_uid[:128],
                study_uid=(study_uid or None) and study_uid[:128],
                quarantine_path=quarantine_path,
                size=size,
            )
        )
        audit.append(
            s,
            actor,
            AuditAction.INSTANCE_REFUSED,
            study_uid if study_uid and len(study_uid) <= 64 else None,
            {"status": f"0x{status:04X}", "reason": reason, "calling_ae": calling_ae},
        )
