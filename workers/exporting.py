"""Export bookkeeping: one job's outputs to one destination, retried with capped backoff.

Each export is its own task on the I/O queue, so a destination that is down delays only its own
exports, never processing or other destinations. Outcomes are recorded in `exports` and the audit
trail; a transient failure returns the delay before the next attempt.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from sqlalchemy import select

from db import Export, Output, audit
from db.audit_actions import AuditAction
from db.models import utcnow
from db.own_results import result_file
from db.session import Database
from dicom_io.backoff import backoff_delay
from dicom_io.cstore import StoreError, send_files
from dicom_io.destinations import Destination
from workers.deidentify import deidentify_file, load_salt

log = logging.getLogger("radai.export")

ACTOR = "exporter"


def run_export(
    db: Database,
    export_id: int,
    destinations: dict[str, Destination],
    *,
    calling_aet: str,
    timeout: float = 10.0,
    max_attempts: int = 8,
    backoff_base: float = 5.0,
    backoff_cap: float = 300.0,
    deidentified: frozenset[str] | set[str] = frozenset(),
    home: Path | None = None,
) -> float | None:
    """Try one export once; return seconds until the next try, or None when it is settled.

    A destination named in `deidentified` gets de-identified copies, made in a temporary folder
    with the salt kept in `home`; the stored outputs are never changed.
    """
    with db.session() as s:
        export = s.get(Export, export_id)
        if export is None or export.state != "PENDING":
            return None
        paths = [
            Path(result_file(s, p, sop))
            for p, sop in s.execute(
                select(Output.path, Output.sop_instance_uid)
                .where(Output.job_id == export.job_id)
                .order_by(Output.id)
            )
        ]
        name = export.destination
    destination = destinations.get(name)
    deid = name in deidentified
    error: str | None = None
    permanent = False
    if destination is None:
        error, permanent = f"{name} is no longer a configured destination", True
    elif deid and home is None:
        # Sending the originals instead would leak exactly what the setting is there to protect.
        error, permanent = "de-identification needs the home folder (salt) and none was given", True
    else:
        try:
            if deid:
                _send_deidentified(paths, destination, home, calling_aet, timeout)
            else:
                send_files(paths, destination, calling_aet=calling_aet, timeout=timeout)
        except StoreError as exc:
            error, permanent = exc.reason, exc.permanent
        except OSError as exc:
            error, permanent = f"cannot read outputs: {exc}", True

    with db.session() as s:
        export = s.get(Export, export_id, with_for_update=True)
        export.attempts += 1
        export.updated_at = utcnow()
        study_uid = export.job.study.study_uid if export.job else None
        if error is None:
            export.state, export.last_error = "SENT", None
            detail = {"to": name, "files": len(paths)}
            if deid:
                detail["deidentified"] = True
            audit.append(s, ACTOR, AuditAction.EXPORT_SENT, study_uid, detail)
            log.info(
                "export %d to %s: sent %d file(s)%s",
                export_id,
                name,
                len(paths),
                " de-identified" if deid else "",
            )
            return None
        export.last_error = error[:2000]
        if permanent or export.attempts >= max_attempts:
            export.state = "FAILED"
            audit.append(
                s,
                ACTOR,
                AuditAction.EXPORT_FAILED,
                study_uid,
                {"to": name, "reason": error[:500], "attempts": export.attempts},
            )
            log.warning("export %d to %s failed for good: %s", export_id, name, error)
            return None
        delay = backoff_delay(export.attempts, base=backoff_base, cap=backoff_cap)
    log.info("export %d to %s failed (%s); retry in %.0f s", export_id, name, error, delay)
    return delay


def _send_deidentified(
    paths: list[Path], destination: Destination, home: Path, calling_aet: str, timeout: float
) -> None:
    with tempfile.TemporaryDirectory(prefix="radai-deid-") as tmp:
        copies = []
        try:
            salt = load_salt(home)
            for index, path in enumerate(paths):
                copy = Path(tmp) / f"{index:04d}.dcm"
                deidentify_file(path, copy, salt=salt)
                copies.append(copy)
        except Exception as exc:
            # Whatever goes wrong here, nothing may leave: a retry would fail the same way.
            reason = f"de-identification failed: {type(exc).__name__}: {exc}"
            raise StoreError(destination, reason, True) from exc
        send_files(copies, destination, calling_aet=calling_aet, timeout=timeout)
