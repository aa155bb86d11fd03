"""Read models shared by the command line and the dashboard."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.findings import Findings, FindingsError
from db.flags import flags_of
from db.models import Job, Study


def study_summaries(session: Session, limit: int | None = None) -> list[dict[str, Any]]:
    """One dict per study (newest first), in the shape of `radai studies --json`."""
    query = (
        select(Study)
        .options(selectinload(Study.jobs).selectinload(Job.outputs))
        .order_by(Study.first_received_at.desc(), Study.id.desc())
    )
    if limit:
        query = query.limit(limit)
    out = []
    for study in session.execute(query).scalars():
        current = [j for j in study.jobs if not j.superseded]
        job = current[-1] if current else None
        # The findings in today's shape whatever schema wrote them; a row no schema reads is
        # reported beside the others rather than ending the listing.
        findings, findings_error = None, None
        if job is not None:
            try:
                parsed = Findings.from_json(job.findings)
            except FindingsError as exc:
                findings_error = str(exc)
            else:
                findings = parsed.to_json() if parsed else None
        out.append(
            {
                "study_uid": study.study_uid,
                "state": study.state,
                "instances": study.instance_count,
                "modalities": [m for m in study.modalities.split("\\") if m],
                "priority": study.priority,
                "flagged": study.flagged,
                "flag_reason": study.flag_reason,
                # Every flag, oldest first: {"kind", "reason", "at"} (db/flags.py).
                "flags": flags_of(study),
                "hold_reason": study.hold_reason,
                "first_received_at": study.first_received_at.isoformat(),
                "last_instance_at": study.last_instance_at.isoformat(),
                "state_changed_at": study.state_changed_at.isoformat(),
                "findings": findings,
                "findings_error": findings_error,
                "outputs": [
                    {"modality": o.modality, "path": o.path, "sop_instance_uid": o.sop_instance_uid}
                    for o in (job.outputs if job else [])
                ],
                "model_versions": job.model_versions if job else None,
                "error": study.error,
                "attempts": study.attempts,
            }
        )
    return out
