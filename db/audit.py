"""The append-only audit trail: each entry carries the hash of the one before it.

`append` serialises writers (PostgreSQL advisory lock; SQLite's write lock is already taken by
BEGIN IMMEDIATE) so the chain never forks; `verify` recomputes the chain and names the first entry
where it breaks, which is how an edited or deleted row is found.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.models import AuditEntry, utcnow

GENESIS = "0" * 64
_LOCK_KEY = 0x7261646169  # "radai": the advisory lock that orders audit appends


def _canonical_time(at: datetime) -> str:
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(timespec="microseconds")


def entry_hash(
    prev_hash: str,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    study_uid: str | None,
    detail: dict[str, Any],
) -> str:
    body = json.dumps(
        [prev_hash, seq, _canonical_time(at), actor, action, study_uid, detail],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def append(
    session: Session,
    actor: str,
    action: str,
    study_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add one entry to the chain inside the caller's transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    detail = json.loads(json.dumps(detail or {}, default=str))
    at = utcnow()
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        study_uid=study_uid,
        detail=detail,
        prev_hash=prev,
        entry_hash=entry_hash(prev, seq, at, actor, action, study_uid, detail),
    )
    session.add(entry)
    session.flush()
    return entry


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    entries: int
    broken_at_seq: int | None = None
    problem: str | None = None


def verify(session: Session) -> ChainReport:
    """Walk the chain in order; report the first missing, reordered or altered entry."""
    prev, expected_seq, count = GENESIS, 1, 0
    rows = session.execute(select(AuditEntry).order_by(AuditEntry.seq)).scalars()
    for row in rows:
        count += 1
        if row.seq != expected_seq:
            return ChainReport(False, count, expected_seq, f"entry {expected_seq} is missing")
        if row.prev_hash != prev:
            return ChainReport(False, count, row.seq, "does not follow the entry before it")
        recomputed = entry_hash(
            prev, row.seq, row.at, row.actor, row.action, row.study_uid, row.detail
        )
        if recomputed != row.entry_hash:
            return ChainReport(False, count, row.seq, "its content was altered")
        prev, expected_seq = row.entry_hash, expected_seq + 1
    return ChainReport(True, count)
