"""Recording received instances in the database: studies, series, duplicates and conflicts.

Each function is one transaction. A study that receives an instance after it was declared stable
(or processed) is reopened: back to RECEIVING, so it is assembled and queued again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db import IngestFailure, Instance, InstanceConflict, Series, Study, StudyState, audit
from db.models import utcnow
from db.session import Database
from dicom_node.inspection import ReceivedObject


class Outcome(enum.StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Known:
    sha256: str
    archive_path: str


def find_instance(db: Database, sop_instance_uid: str) -> Known | None:
    with db.session() as s:
        row = s.execute(
            select(Instance.sha256, Instance.archive_path).where(
                Instance.sop_instance_uid == sop_instance_uid
            )
        ).first()
    return Known(row[0], row[1]) if row else None


def _insert_ignore(session: Session, table, **values) -> bool:  # noqa: ANN001
    """INSERT unless the unique key exists (safe against a concurrent insert); True if inserted."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(table.__table__).values(**values).on_conflict_do_nothing()
    return session.execute(stmt.returning(table.__table__.c.id)).first() is not None


def _study_for_update(session: Session, obj: ReceivedObject, now: datetime, actor: str) -> Study:
    created = _insert_ignore(
        session,
        Study,
        study_uid=obj.study_uid,
        state=StudyState.RECEIVING,
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
    study = session.execute(
        select(Study).where(Study.study_uid == obj.study_uid).with_for_update()
    ).scalar_one()
    if created:
        audit.append(session, actor, "study.received", obj.study_uid, {})
    return study


def _touch_study(session: Session, study: Study, obj: ReceivedObject, now: datetime, actor: str):  # noqa: ANN202
    if study.state != StudyState.RECEIVING:
        audit.append(session, actor, "study.reopened", study.study_uid, {"from_state": study.state})
        study.state = StudyState.RECEIVING
        study.state_changed_at = now
    study.last_instance_at = now
    if obj.modality and obj.modality not in study.modalities.split("\\"):
        study.modalities = "\\".join(filter(None, [*study.modalities.split("\\"), obj.modality]))


def record_new(
    db: Database,
    obj: ReceivedObject,
    *,
    archive_path: str,
    digest: str,
    size: int,
    calling_ae: str,
    actor: str,
) -> None:
    now = utcnow()
    with db.session() as s:
        study = _study_for_update(s, obj, now, actor)
        _insert_ignore(
            s,
            Series,
            study_id=study.id,
            series_uid=obj.series_uid,
            modality=obj.modality,
            series_number=obj.series_number,
            series_description=obj.series_description,
            body_part=obj.body_part,
            instance_count=0,
        )
        series_id = s.execute(
            select(Series.id).where(Series.series_uid == obj.series_uid)
        ).scalar_one()
        s.add(
            Instance(
                study_id=study.id,
                series_id=series_id,
                sop_instance_uid=obj.sop_instance_uid,
                sop_class_uid=obj.sop_class_uid,
                instance_number=obj.instance_number,
                archive_path=archive_path,
                sha256=digest,
                size=size,
                transfer_syntax=obj.transfer_syntax,
                calling_ae=calling_ae,
                received_at=now,
            )
        )
        s.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(instance_count=Series.instance_count + 1)
        )
        study.instance_count += 1
        _touch_study(s, study, obj, now, actor)


def record_duplicate(db: Database, obj: ReceivedObject) -> None:
    """An identical resend: nothing new to store, but it still counts as activity."""
    with db.session() as s:
        s.execute(
            update(Study)
            .where(Study.study_uid == obj.study_uid, Study.state == StudyState.RECEIVING)
            .values(last_instance_at=utcnow())
        )


def record_conflict(
    db: Database,
    obj: ReceivedObject,
    *,
    archive_path: str,
    digest: str,
    size: int,
    calling_ae: str,
    actor: str,
) -> None:
    now = utcnow()
    with db.session() as s:
        study = _study_for_update(s, obj, now, actor)
        _insert_ignore(
            s,
            InstanceConflict,
            study_id=study.id,
            sop_instance_uid=obj.sop_instance_uid,
            archive_path=archive_path,
            sha256=digest,
            size=size,
            calling_ae=calling_ae,
            received_at=now,
        )
        study.flagged = True
        study.flag_reason = (
            f"SOP Instance UID {obj.sop_instance_uid} was received again with different content; "
            "both versions are kept"
        )
        audit.append(
            s,
            actor,
            "instance.conflict",
            obj.study_uid,
            {"sop_instance_uid": obj.sop_instance_uid, "sha256": digest, "calling_ae": calling_ae},
        )


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
            "instance.refused",
            study_uid if study_uid and len(study_uid) <= 64 else None,
            {"status": f"0x{status:04X}", "reason": reason, "calling_ae": calling_ae},
        )
