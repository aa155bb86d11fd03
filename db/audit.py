"""The append-only audit trail: each entry is keyed and carries the hash of the one before it.

Three layers, each against a different attacker:
- database triggers refuse UPDATE and DELETE (against our own code and careless hands);
- each entry's hash is an HMAC-SHA256 under a key kept on the application hosts
  (`db.audit_keys`), so a database writer who edits a row cannot compute a hash that verifies,
  and recomputing the chain with the unkeyed `entry_hash` does not help either;
- signed checkpoints outside the database (`db.audit_checkpoints`, written by `write_checkpoint`)
  pin the number of entries and the newest hash, so deleting the newest rows, or replacing the
  whole chain, disagrees with the latest checkpoint.

Entries written before keying (migrations 0001-0004, scheme NULL or "sha256") keep their plain
SHA-256 hash; they are protected by the first keyed entry (whose HMAC covers their head) and by
checkpoints. Once the trail is keyed (its first keyed entry, or its first checkpoint) every later
entry must be keyed: an unkeyed one there is a database writer's.

The composition root calls `configure` once per process with the keys; `append` then keys each
entry. `append` serialises writers (PostgreSQL advisory lock; SQLite's write lock is already taken
by BEGIN IMMEDIATE) so the chain never forks; `verify` walks the chain and the checkpoints and
names the first entry where they disagree.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db import audit_checkpoints
from db.audit_actions import AuditAction
from db.audit_checkpoints import Checkpoint, CheckpointError
from db.audit_keys import AuditKeyError, AuditKeys
from db.models import AuditEntry, utcnow

log = logging.getLogger("radai.audit")

GENESIS = "0" * 64
SCHEME_UNKEYED = "sha256"  # also what NULL means: entries from before keying
SCHEME_KEYED = "hmac-sha256"
_LOCK_KEY = 0x7261646169  # "radai": the advisory lock that orders audit appends

_keys: AuditKeys | None = None

__all__ = [
    "GENESIS",
    "AuditKeyError",
    "AuditKeys",
    "AuditTampered",
    "ChainReport",
    "append",
    "check_keys",
    "configure",
    "configured_keys",
    "entry_hash",
    "keyed_hash",
    "verify",
    "write_checkpoint",
]


def configure(keys: AuditKeys | None) -> None:
    """Key this process's audit entries (None: unkeyed, only for a trail never keyed)."""
    global _keys
    _keys = keys


def configured_keys() -> AuditKeys | None:
    return _keys


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
    """The unkeyed SHA-256 of entries written before keying (anyone can compute it)."""
    body = _canonical([prev_hash, seq, _canonical_time(at), actor, action, study_uid, detail])
    return hashlib.sha256(body).hexdigest()


def keyed_hash(
    key: bytes,
    key_id: str,
    prev_hash: str,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    study_uid: str | None,
    detail: dict[str, Any],
) -> str:
    """HMAC-SHA256 under the audit key of the entry's canonical body, scheme and key id."""
    body = _canonical(
        [SCHEME_KEYED, key_id, prev_hash, seq, _canonical_time(at), actor, action, study_uid]
        + [detail]
    )
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _canonical(parts: list[Any]) -> bytes:
    """The bytes an entry's hash covers: compact JSON with sorted keys (stable across versions)."""
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()


def _is_keyed(scheme: str | None) -> bool:
    return scheme == SCHEME_KEYED


def append(
    session: Session,
    actor: str,
    action: AuditAction,
    study_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add one entry to the chain inside the caller's transaction.

    Raises AuditKeyError when this process has no key (or another key) while the trail is keyed:
    the entry would look forged forever, so the caller's transaction fails instead."""
    keys = _keys
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.entry_hash, AuditEntry.scheme, AuditEntry.key_id)
        .order_by(AuditEntry.seq.desc())
        .limit(1)
    ).first()
    if last is not None and _is_keyed(last.scheme):
        _check_key_matches(keys, last.seq, last.key_id)
    seq, prev = (last.seq + 1, last.entry_hash) if last else (1, GENESIS)
    detail = json.loads(json.dumps(detail or {}, default=str))
    at = utcnow()
    if keys is None:
        scheme, key_id = SCHEME_UNKEYED, None
        digest = entry_hash(prev, seq, at, actor, action, study_uid, detail)
    else:
        scheme, key_id = SCHEME_KEYED, keys.key_id
        digest = keyed_hash(keys.hmac_key, key_id, prev, seq, at, actor, action, study_uid, detail)
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        study_uid=study_uid,
        detail=detail,
        prev_hash=prev,
        entry_hash=digest,
        scheme=scheme,
        key_id=key_id,
    )
    session.add(entry)
    session.flush()
    return entry


def _check_key_matches(keys: AuditKeys | None, seq: int, key_id: str | None) -> None:
    if keys is None:
        raise AuditKeyError(
            f"the audit trail is keyed (entry {seq}) but this process has no audit key "
            "(RADAI_AUDIT_KEY_FILE)"
        )
    if key_id != keys.key_id:
        raise AuditKeyError(
            f"the audit trail's entry {seq} is keyed with key {key_id}, but this process holds "
            f"key {keys.key_id}: every host needs the same RADAI_AUDIT_KEY_FILE"
        )


def check_keys(session: Session, keys: AuditKeys | None = None) -> None:
    """Fail at start, not at the first entry, when `keys` cannot continue the trail."""
    keys = keys if keys is not None else _keys
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.key_id)
        .where(AuditEntry.scheme == SCHEME_KEYED)
        .order_by(AuditEntry.seq.desc())
        .limit(1)
    ).first()
    if last is not None:
        _check_key_matches(keys, last.seq, last.key_id)


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    entries: int
    broken_at_seq: int | None = None
    problem: str | None = None
    keyed: int = 0  # entries checked with the key
    unkeyed: int = 0  # entries from before keying, checked by their plain hash
    checkpoints: int = 0  # checkpoints whose signature and head were checked
    latest_checkpoint: Checkpoint | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


class AuditTampered(RuntimeError):
    """The trail (or a checkpoint) failed verification; `report` says where."""

    def __init__(self, report: ChainReport) -> None:
        super().__init__(f"audit trail broken at entry {report.broken_at_seq}: {report.problem}")
        self.report = report


@dataclass
class _Walk:
    """The state of a walk along the chain, which can start at a checkpointed entry."""

    keys: AuditKeys | None
    prev: str = GENESIS
    next_seq: int = 1
    keyed_from: int | None = None  # from this seq on, every entry must be keyed
    entries: int = 0
    keyed: int = 0
    unkeyed: int = 0

    def step(self, row: AuditEntry) -> tuple[int, str] | None:
        """Check one row; return (the bad entry's seq, the problem), or None and move on."""
        self.entries += 1
        if row.seq != self.next_seq:
            return self.next_seq, f"entry {self.next_seq} is missing"
        problem = self._check(row)
        if problem is not None:
            return row.seq, problem
        self.prev, self.next_seq = row.entry_hash, row.seq + 1
        return None

    def _check(self, row: AuditEntry) -> str | None:
        if row.prev_hash != self.prev:
            return "does not follow the entry before it"
        if _is_keyed(row.scheme):
            if self.keys is None:
                return "is keyed, but no audit key is configured to check it"
            if row.key_id != self.keys.key_id:
                return f"is keyed with key {row.key_id}, not the configured key {self.keys.key_id}"
            expected = keyed_hash(
                self.keys.hmac_key,
                row.key_id,
                self.prev,
                row.seq,
                row.at,
                row.actor,
                row.action,
                row.study_uid,
                row.detail,
            )
            if not hmac.compare_digest(expected, row.entry_hash):
                return "its content was altered (its keyed hash does not match)"
            self.keyed += 1
            if self.keyed_from is None or row.seq < self.keyed_from:
                self.keyed_from = row.seq
        elif row.scheme in (None, SCHEME_UNKEYED):
            if self.keyed_from is not None and row.seq >= self.keyed_from:
                return (
                    f"is unkeyed, but the trail is keyed from entry {self.keyed_from} on "
                    "(written by someone without the audit key)"
                )
            recomputed = entry_hash(
                self.prev, row.seq, row.at, row.actor, row.action, row.study_uid, row.detail
            )
            if recomputed != row.entry_hash:
                return "its content was altered"
            self.unkeyed += 1
        else:
            return f"has an unknown hash scheme {row.scheme!r}"
        return None


def _signed_checkpoints(keys: AuditKeys | None) -> list[Checkpoint]:
    """The checkpoints of `keys`' folder, each signature checked (CheckpointError if not)."""
    if keys is None or keys.checkpoint_file is None:
        return []
    checkpoints = audit_checkpoints.read(keys.checkpoint_file)
    for cp in checkpoints:
        audit_checkpoints.check_signature(cp, keys)
    return checkpoints


_UNSET: Any = object()


def verify(session: Session, keys: AuditKeys | None = _UNSET) -> ChainReport:
    """Walk the chain in order and hold it against every checkpoint; report the first problem.

    A missing, reordered or altered entry, an unkeyed entry where the trail is keyed, an entry
    under another key, a checkpoint whose signature fails, and rows that disagree with a
    checkpoint (deleted newest entries, a rebuilt chain) each make the report not ok. `keys`
    defaults to the ones given to `configure`."""
    keys = _keys if keys is _UNSET else keys
    notes: list[str] = []
    # Checkpoints first, rows second: rows only grow, so every checkpoint read here is covered.
    try:
        checkpoints = _signed_checkpoints(keys)
    except CheckpointError as exc:
        where = keys.checkpoint_file if keys is not None else "checkpoints"
        return ChainReport(False, 0, None, f"{where}: {exc}")
    pinned: dict[int, list[Checkpoint]] = {}
    for cp in checkpoints:
        pinned.setdefault(cp.seq, []).append(cp)
    walk = _Walk(keys)
    if checkpoints:
        walk.keyed_from = min(pinned) + 1
    rows = session.execute(
        select(AuditEntry).order_by(AuditEntry.seq).execution_options(yield_per=1000)
    ).scalars()
    for row in rows:
        bad = walk.step(row)
        if bad is not None:
            return _report(walk, checkpoints, *bad)
        for cp in pinned.get(row.seq, ()):
            if cp.head != row.entry_hash:
                return _report(
                    walk,
                    checkpoints,
                    row.seq,
                    f"does not match the checkpoint of {cp.at} (line {cp.line}): "
                    "the chain up to here was rewritten",
                )
    last_seq = walk.next_seq - 1
    latest = max(checkpoints, key=lambda c: c.seq, default=None)
    if latest is not None and latest.seq > last_seq:
        return _report(
            walk,
            checkpoints,
            last_seq + 1,
            f"entries {last_seq + 1} to {latest.seq} are missing: the checkpoint of {latest.at} "
            f"(line {latest.line}) recorded {latest.seq} entries",
        )
    if keys is None:
        notes.append("no audit key configured: entries checked by their unkeyed hash only")
    elif keys.checkpoint_file is None:
        notes.append("no checkpoint folder configured: deleted newest entries go unnoticed")
    elif latest is None and walk.entries:
        notes.append("no checkpoint yet: deleted newest entries go unnoticed until one is made")
    return _report(walk, checkpoints, None, None, notes)


def _report(
    walk: _Walk,
    checkpoints: list[Checkpoint],
    seq: int | None,
    problem: str | None,
    notes: list[str] | None = None,
) -> ChainReport:
    return ChainReport(
        ok=problem is None,
        entries=walk.entries,
        broken_at_seq=seq,
        problem=problem,
        keyed=walk.keyed,
        unkeyed=walk.unkeyed,
        checkpoints=len(checkpoints),
        latest_checkpoint=max(checkpoints, key=lambda c: c.seq, default=None),
        notes=tuple(notes or ()),
    )


def write_checkpoint(session: Session, keys: AuditKeys | None = None) -> Checkpoint | None:
    """Sign the trail's current head into the checkpoint file, after checking what is new.

    Only the entries since the latest checkpoint are checked (the latest checkpoint's entry must
    still carry its hash), and only the first and the latest checkpoints' signatures: the cost
    stays flat as the trail grows; `verify` checks everything. A trail that fails raises
    AuditTampered and nothing is signed. Returns
    the new checkpoint, or None when the trail is empty or unchanged since the latest one."""
    keys = keys if keys is not None else _keys
    if keys is None or keys.checkpoint_file is None:
        raise AuditKeyError("no audit keys and checkpoint folder configured")
    try:
        ends = audit_checkpoints.read_ends(keys.checkpoint_file)
        for cp in ends or ():
            audit_checkpoints.check_signature(cp, keys)
    except CheckpointError as exc:
        raise AuditTampered(ChainReport(False, 0, None, f"{keys.checkpoint_file}: {exc}")) from None
    first, anchor = ends if ends is not None else (None, None)
    head = session.execute(
        select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    if head is None:
        if anchor is not None:
            raise AuditTampered(ChainReport(False, 0, 1, f"entries 1 to {anchor.seq} are missing"))
        return None
    walk = _Walk(keys)
    query = select(AuditEntry).where(AuditEntry.seq <= head.seq).order_by(AuditEntry.seq)
    if anchor is not None:
        if anchor.seq == head.seq and anchor.head == head.entry_hash:
            return None
        if anchor.seq > head.seq:
            problem = f"entries {head.seq + 1} to {anchor.seq} are missing"
            raise AuditTampered(ChainReport(False, 0, head.seq + 1, problem))
        start = session.execute(
            select(AuditEntry).where(AuditEntry.seq == anchor.seq)
        ).scalar_one_or_none()
        if start is None or start.entry_hash != anchor.head:
            problem = (
                "is missing"
                if start is None
                else "does not match the latest checkpoint: the chain up to here was rewritten"
            )
            raise AuditTampered(ChainReport(False, 0, anchor.seq, problem))
        walk.prev, walk.next_seq = start.entry_hash, start.seq + 1
        assert first is not None  # the checkpoint file's ends come in pairs
        walk.keyed_from = min(first.seq, anchor.seq) + 1
        if _is_keyed(start.scheme):
            walk.keyed_from = min(walk.keyed_from, start.seq)
        query = query.where(AuditEntry.seq > anchor.seq)
    for row in session.execute(query.execution_options(yield_per=1000)).scalars():
        bad = walk.step(row)
        if bad is not None:
            raise AuditTampered(_report(walk, [c for c in (anchor,) if c], *bad))
    checkpoint = audit_checkpoints.sign(keys, head.seq, head.entry_hash)
    audit_checkpoints.append(keys.checkpoint_file, checkpoint)
    log.info("audit checkpoint: entry %d, head %s", checkpoint.seq, checkpoint.head)
    return checkpoint
