"""Redoing what a crash may have cut short: every record the ingest journal still holds is filed
and indexed again, durably, before the node listens.

A record stays in the journal until its file, folder and index rows were synced, so after a
crash some records were fully applied, some partly (the rows committed but not yet on disk, the
file renamed but its folder not synced) and some not at all. Replaying is idempotent: an
instance already on record with the same content is a duplicate and only its file is checked
(and rewritten from the journal's copy when missing or different); a conflicting copy already on
record is not flagged twice. A record that the node refused when it arrived is refused again by
the same checks and skipped: it was never acknowledged.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from db import Instance
from db.session import Database
from dicom_node import recording
from dicom_node.archive import Archive, sha256, write_durably
from dicom_node.inspection import inspect_received
from dicom_node.journal import Record
from dicom_node.statuses import Refusal

log = logging.getLogger("radai.node")


def _holds(path: Path, digest: str) -> bool:
    try:
        return sha256(path.read_bytes()) == digest
    except FileNotFoundError:
        return False


def replay(db: Database, archive: Archive, records: list[Record], *, actor: str) -> dict[str, int]:
    """File and index each record (one durable transaction each); counts by outcome."""
    counts: dict[str, int] = {}
    for record in records:
        meta, data = record.meta, record.data
        try:
            obj = inspect_received(data, meta["sop_class"], meta["sop_instance"])
        except Refusal:
            counts["refused"] = counts.get("refused", 0) + 1
            continue
        digest = sha256(data)

        def put(outcome: recording.Outcome, obj=obj, digest=digest, data=data) -> str:  # noqa: ANN001
            if outcome == recording.Outcome.CONFLICT:
                target = archive.conflict_path(
                    obj.study_uid, obj.series_uid, obj.sop_instance_uid, digest
                )
            else:
                target = archive.instance_path(obj.study_uid, obj.series_uid, obj.sop_instance_uid)
            if not _holds(target, digest):
                write_durably(target, data)
            return str(target)

        with db.session() as s:
            outcome = recording.record_in_session(
                s,
                obj,
                digest=digest,
                size=len(data),
                calling_ae=meta["calling_ae"],
                actor=actor,
                place=put,
                now=datetime.fromisoformat(meta["received_at"]),
                replay=True,
            )
            if outcome == recording.Outcome.DUPLICATE:
                held = s.execute(
                    select(Instance.archive_path).where(
                        Instance.sop_instance_uid == obj.sop_instance_uid
                    )
                ).scalar_one()
                if not _holds(Path(held), digest):
                    write_durably(Path(held), data)
        counts[outcome.value] = counts.get(outcome.value, 0) + 1
    return counts
