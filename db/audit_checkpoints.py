"""Signed checkpoints of the audit trail, kept outside the database.

A checkpoint says "the trail had `seq` entries and its newest entry's hash was `head` at `at`",
signed with the Ed25519 key of `db.audit_keys` (as a certificate-transparency log signs its tree
heads). They are appended, one JSON object a line, to `checkpoints.jsonl` in the checkpoint
folder on the application host. A database writer can delete the newest rows or rebuild the
chain, but cannot make it agree with a checkpoint it cannot sign: `db.audit.verify` compares
every checkpoint with the rows. This module reads, signs and writes them; it imports only `db`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from db.audit_keys import AuditKeys

_DOMAIN = b"radai-audit-checkpoint-v1\n"


class CheckpointError(ValueError):
    """A checkpoint line that is not a checkpoint, or whose signature does not verify."""

    def __init__(self, line: int, message: str) -> None:
        where = f"line {line}" if line else "near the end of the file"
        super().__init__(f"checkpoint at {where}: {message}")
        self.line = line


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head: str
    at: str  # ISO 8601, UTC, with a Z
    key_id: str  # the signing key's id
    signature: str  # base64 Ed25519 over _signed_bytes
    line: int = 0  # where it was read from (1-based; 0: near the end), for messages

    def to_json(self) -> str:
        return json.dumps(
            {
                "seq": self.seq,
                "head": self.head,
                "at": self.at,
                "key_id": self.key_id,
                "sig": self.signature,
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def _signed_bytes(seq: int, head: str, at: str, key_id: str) -> bytes:
    body = json.dumps(
        {"seq": seq, "head": head, "at": at, "key_id": key_id},
        sort_keys=True,
        separators=(",", ":"),
    )
    return _DOMAIN + body.encode()


def sign(keys: AuditKeys, seq: int, head: str, at: datetime | None = None) -> Checkpoint:
    when = (at or datetime.now(UTC)).astimezone(UTC)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    key_id = keys.signing_key_id
    sig = keys.signing_key.sign(_signed_bytes(seq, head, stamp, key_id))
    return Checkpoint(seq, head, stamp, key_id, base64.b64encode(sig).decode())


def check_signature(checkpoint: Checkpoint, keys: AuditKeys) -> None:
    """Raise CheckpointError unless `keys`' signing key signed exactly this checkpoint."""
    if checkpoint.key_id != keys.signing_key_id:
        raise CheckpointError(
            checkpoint.line,
            f"signed by key {checkpoint.key_id}, not the configured key {keys.signing_key_id}",
        )
    try:
        sig = base64.b64decode(checkpoint.signature, validate=True)
        keys.public_key.verify(
            sig,
            _signed_bytes(checkpoint.seq, checkpoint.head, checkpoint.at, checkpoint.key_id),
        )
    except (InvalidSignature, ValueError):
        raise CheckpointError(checkpoint.line, "its signature does not verify") from None


def _parse(line_no: int, text: str) -> Checkpoint:
    try:
        obj = json.loads(text)
        cp = Checkpoint(
            seq=obj["seq"],
            head=obj["head"],
            at=obj["at"],
            key_id=obj["key_id"],
            signature=obj["sig"],
            line=line_no,
        )
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(line_no, "not a checkpoint (bad JSON or missing fields)") from None
    if not (
        isinstance(cp.seq, int)
        and cp.seq >= 1
        and all(isinstance(v, str) for v in (cp.head, cp.at, cp.key_id, cp.signature))
    ):
        raise CheckpointError(line_no, "not a checkpoint (fields of the wrong type)")
    return cp


def read(path: Path | None) -> list[Checkpoint]:
    """The checkpoints in `path`, in file order; none when it does not exist.

    A last line without its newline is a write cut short by a crash and is skipped; any other
    line that is not a checkpoint raises CheckpointError. Signatures are not checked here."""
    if path is None:
        return []
    try:
        data = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    complete = data.split("\n")[:-1]  # the last piece is "" or a line torn by a crash
    return [_parse(n, text) for n, text in enumerate(complete, start=1) if text.strip()]


def read_ends(path: Path | None, tail_bytes: int = 65536) -> tuple[Checkpoint, Checkpoint] | None:
    """(the first checkpoint, the one of highest seq among the last ones), without reading the
    whole file: what the periodic writer needs, in constant time however long the file grows.
    Signatures are not checked here; None when there is no checkpoint."""
    if path is None:
        return None
    try:
        fh = Path(path).open("rb")
    except FileNotFoundError:
        return None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        first_line = fh.readline()
        if not first_line.endswith(b"\n"):
            return None  # empty, or only a torn line
        first = _parse(1, first_line.decode("utf-8", "replace"))
        start = max(0, size - tail_bytes)
        fh.seek(start)
        pieces = fh.read().split(b"\n")[:-1]  # the last piece is b"" or a torn line
    if start > 0:
        pieces = pieces[1:]  # the first piece may be the end of a line cut by the seek
    # Writers on several hosts may append out of order: take the highest seq near the end.
    tail = [_parse(0, p.decode("utf-8", "replace")) for p in pieces if p.strip()]
    return first, max(tail, key=lambda c: c.seq, default=first)


def append(path: Path, checkpoint: Checkpoint) -> None:
    """Append one line durably; writers on this host take turns through an exclusive lock."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _drop_torn_tail(fd)
        os.write(fd, checkpoint.to_json().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


def _drop_torn_tail(fd: int) -> None:
    # A line a crash cut short has no newline and can only be the last: remove it, or the next
    # line would be glued to it. (One small os.write with O_APPEND is all-or-nothing in practice.)
    size = os.fstat(fd).st_size
    if not size:
        return
    tail = os.pread(fd, min(size, 4096), max(0, size - 4096))
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    os.ftruncate(fd, size - len(tail) + cut + 1 if cut >= 0 else size - len(tail))
