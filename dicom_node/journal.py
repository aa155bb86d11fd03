"""The ingest journal: an append-only log of received instances, bytes included, so that an
instance is durable after one fdatasync and can be acknowledged before it is filed and indexed.

Each record is a header (magic, lengths, CRC-32), a small JSON description (who sent it, when)
and the instance's encoded bytes. Records go into numbered segment files; a segment is deleted
once every instance in it has been filed and indexed (`applied`). Appends from concurrent
associations share fdatasyncs (group commit): an appender whose record was covered by another
thread's sync does not sync again. At start, `open` returns every record of the segments left
behind, in order; a record cut short by a crash (its sync never returned, so it was never
acknowledged) ends its segment's replay.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("radai.journal")

_MAGIC = b"RJ01"
_HEAD = struct.Struct("<4sIQI")  # magic, description length, data length, CRC-32 of both
_SUFFIX = ".journal"
_REUSE_BYTES = 1024 * 1024


@dataclass(eq=False)
class Record:
    """One journalled instance: its description, its bytes, and the segment that holds it."""

    meta: dict
    data: bytes
    segment: int = field(repr=False)


def _write_all(fd: int, parts: list[bytes]) -> None:
    # One writev, without joining (a copy of the instance's bytes); loops only on short writes.
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_segment(path: Path, seq: int) -> list[Record]:
    records: list[Record] = []
    with open(path, "rb") as fh:
        while True:
            head = fh.read(_HEAD.size)
            if len(head) < _HEAD.size:
                if head:
                    log.warning("journal %s ends in a torn record header; ignored", path.name)
                return records
            magic, meta_len, data_len, crc = _HEAD.unpack(head)
            if magic != _MAGIC:
                log.warning("journal %s has a damaged record; the rest is ignored", path.name)
                return records
            meta_bytes = fh.read(meta_len)
            data = fh.read(data_len)
            if (
                len(meta_bytes) < meta_len
                or len(data) < data_len
                or zlib.crc32(data, zlib.crc32(meta_bytes)) != crc
            ):
                log.warning("journal %s ends in a torn record; ignored", path.name)
                return records
            records.append(Record(json.loads(meta_bytes), data, seq))


class Journal:
    """Segments `<folder>/<seq>.journal`; append, then `applied` once filed and indexed."""

    def __init__(self, folder: Path, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()  # the current segment, its size, the counters
        self._sync_lock = threading.Lock()  # one fdatasync at a time; rotation holds it too
        self._fd = -1
        self._seq = 0
        self._size = 0
        self._written = 0  # bytes appended since open, over all segments
        self._synced = 0  # of those, bytes known to be durable
        self._outstanding: dict[int, int] = {}  # segment -> records not yet applied
        self._lock_fd = -1
        self._old_bytes = 0  # held by segments before the current one
        self._sizes: dict[int, int] = {}

    def open(self) -> list[Record]:
        """Read what earlier runs left (to replay), then start a fresh segment for appends."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # One node per journal: another would replay (and delete) records still in flight here.
        self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise RuntimeError(
                f"another node is running on this archive (its journal {self.folder} is locked)"
            ) from None
        found = sorted(
            (int(p.stem), p) for p in self.folder.glob(f"*{_SUFFIX}") if p.stem.isdigit()
        )
        records: list[Record] = []
        for seq, path in found:
            got = _read_segment(path, seq)
            self._outstanding[seq] = len(got)
            self._sizes[seq] = path.stat().st_size
            self._old_bytes += self._sizes[seq]
            records += got
        with self._sync_lock, self._lock:
            self._start_segment((found[-1][0] if found else 0) + 1)
        for seq, _ in found:
            if self._outstanding[seq] == 0:
                self._delete(seq)
        return records

    def _path(self, seq: int) -> Path:
        return self.folder / f"{seq:012d}{_SUFFIX}"

    def _start_segment(self, seq: int) -> None:
        # Callers hold both locks.
        if self._fd >= 0:
            os.fdatasync(self._fd)
            self._synced = self._written
            os.close(self._fd)
            self._sizes[self._seq] = self._size
            self._old_bytes += self._size
            if self._outstanding.get(self._seq, 0) == 0:
                self._delete(self._seq)
        self._seq = seq
        self._fd = os.open(self._path(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._outstanding.setdefault(seq, 0)
        _fsync_dir(self.folder)  # the segment's name must survive a crash as well as its data

    def append(self, meta: dict, data: bytes) -> Record:
        """Write one record and return once it is durable (its own or a shared fdatasync)."""
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        crc = zlib.crc32(data, zlib.crc32(meta_bytes))
        head = _HEAD.pack(_MAGIC, len(meta_bytes), len(data), crc)
        if self._size >= self.segment_bytes:
            with self._sync_lock, self._lock:
                if self._size >= self.segment_bytes:
                    self._start_segment(self._seq + 1)
        with self._lock:
            if self._fd < 0:
                raise RuntimeError("the journal is closed")
            try:
                _write_all(self._fd, [head, meta_bytes, data])
            except OSError:
                # A record cut short (a full disk) would end the segment's replay there and hide
                # the records after it: cut it off again before anything else is appended.
                os.ftruncate(self._fd, self._size)
                raise
            self._size += _HEAD.size + len(meta_bytes) + len(data)
            self._written += _HEAD.size + len(meta_bytes) + len(data)
            end = self._written
            seq = self._seq
            self._outstanding[seq] += 1
        self._sync(end)
        return Record(meta, b"", seq)  # the caller holds the bytes; the journal need not

    def _sync(self, end: int) -> None:
        with self._sync_lock:
            if self._synced >= end:
                return  # another appender's sync covered this record
            with self._lock:
                fd, target = self._fd, self._written
            os.fdatasync(fd)
            self._synced = max(self._synced, target)

    def applied(self, records: list[Record]) -> None:
        """These records are filed and indexed durably: drop segments nothing else needs."""
        with self._lock:
            for record in records:
                self._outstanding[record.segment] -= 1
            done = [seq for seq, n in self._outstanding.items() if n == 0 and seq != self._seq]
            for seq in done:
                self._delete(seq)
            if self._outstanding.get(self._seq) == 0 and self._size >= _REUSE_BYTES:
                # Nothing in the current segment is needed any more: start it again from empty,
                # so that the journal holds little more than what is in flight. Not synced: a
                # crash that undoes this only replays records already applied.
                os.ftruncate(self._fd, 0)
                self._size = 0

    def _delete(self, seq: int) -> None:
        # No fsync: a deletion lost in a crash only replays records already applied (idempotent).
        self._outstanding.pop(seq, None)
        self._old_bytes -= self._sizes.pop(seq, 0)
        self._path(seq).unlink(missing_ok=True)

    def free_mb_beside(self, free_mb: Callable[[], float]) -> float:
        """`free_mb()` plus what the journal's segments hold (transient: they go once applied),
        measured together: a segment emptied between the two would be counted twice or not."""
        with self._lock:
            return free_mb() + (self._size + self._old_bytes) / 1e6

    def outstanding(self) -> int:
        with self._lock:
            return sum(self._outstanding.values())

    def close(self) -> None:
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                os.fdatasync(self._fd)
                os.close(self._fd)
                self._fd = -1
                if self._outstanding.get(self._seq, 0) == 0:
                    self._delete(self._seq)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1
