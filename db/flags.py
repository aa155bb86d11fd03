"""A study's safety flags: they accumulate, each with its kind and time; none erases another.

A flag says that a person should look at the study before trusting its result: instances of
more than one patient, a second object under a SOP Instance UID already held, a value the node
had to alter to record it. `Study.flags` keeps every one (`{"kind", "reason", "at"}`, oldest
first); `Study.flag_reason` is their reasons joined, for one-line readers. Reasons never carry
patient data (they name attributes and UIDs, not values). A flag with `hold=True` also sets the
study's `hold_reason`: once quiet it goes to HELD instead of STABLE (db/lifecycle.py) until a
person releases it (`db.requeue.release`).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db import audit
from db.audit_actions import AuditAction
from db.models import Study, utcnow


class FlagKind(enum.StrEnum):
    PATIENTS_MIXED = "patients_mixed"
    INSTANCE_CONFLICT = "instance_conflict"
    VALUE_TRUNCATED = "value_truncated"
    CHARACTERS_REMOVED = "characters_removed"
    LEGACY = "legacy"  # a flag_reason written before flags were kept one by one (migration 0005)


def flags_of(study: Study) -> list[dict[str, Any]]:
    """The study's flags, oldest first (a legacy `flag_reason` alone reads as one flag)."""
    if study.flags:
        return list(study.flags)
    if study.flag_reason:
        return [{"kind": FlagKind.LEGACY.value, "reason": study.flag_reason, "at": None}]
    return []


def add_flag(
    session: Session,
    study_id: int,
    study_uid: str,
    kind: FlagKind,
    reason: str,
    *,
    actor: str,
    action: AuditAction | None = None,
    detail: dict[str, Any] | None = None,
    hold: bool = False,
    once: bool = True,
    now: datetime | None = None,
) -> bool:
    """Add a flag (and, with `action`, its audit entry) in the caller's transaction.

    The caller holds the study row (SELECT ... FOR UPDATE) so that concurrent flags queue.
    `once`: skip if a flag of this kind and reason is already there. Returns True if added;
    the audit entry is written only then."""
    now = now or utcnow()
    row = session.execute(select(Study.flags, Study.flag_reason).where(Study.id == study_id)).one()
    current = list(row.flags or [])
    if not current and row.flag_reason:
        current = [{"kind": FlagKind.LEGACY.value, "reason": row.flag_reason, "at": None}]
    if once and any(f["kind"] == kind and f["reason"] == reason for f in current):
        return False
    current.append({"kind": str(kind), "reason": reason, "at": now.isoformat()})
    values: dict[str, Any] = {
        "flags": current,
        "flagged": True,
        "flag_reason": "; ".join(f["reason"] for f in current),
    }
    if hold:
        values["hold_reason"] = reason
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if action is not None:
        audit.append(session, actor, action, study_uid, {"flag": str(kind), **(detail or {})})
    return True
