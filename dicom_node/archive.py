"""The on-disk archive: files appear whole or not at all.

A file is written under a temporary name in its final folder, fsynced, renamed into place and the
folder fsynced, so that neither a crash nor a reader ever sees a half-written instance. Refused
objects are kept too, in quarantine, so that nothing a sender gave us is lost.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(folder: Path) -> None:
    """Create `folder` and missing parents, making each new directory entry durable."""
    if folder.is_dir():
        return
    ensure_dir(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    _fsync_dir(folder.parent)


def stage(folder: Path, data: bytes, *, sync: bool = True) -> Path:
    """Write `data` durably under a temporary name in `folder`; `place` gives it its name.

    With `sync=False` the caller makes it durable later (`fsync_file`), e.g. many files at once.
    """
    ensure_dir(folder)
    tmp = folder / f".{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def place(staged: Path, path: Path, *, sync: bool = True) -> None:
    """Rename a staged file into place (same filesystem: atomic) and make the rename durable.

    With `sync=False` the caller fsyncs the folder later (`fsync_dir`), once for many renames.
    """
    ensure_dir(path.parent)
    os.replace(staged, path)
    if sync:
        _fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync_dir(path)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (temp file, fsync, rename, fsync dir)."""
    place(stage(path.parent, data), path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def free_mb(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 1e6


class Archive:
    """Where instances live: `<root>/<study>/<series>/<sop>.dcm`, UIDs already validated."""

    def __init__(self, root: Path, quarantine: Path) -> None:
        self.root = root
        self.quarantine = quarantine
        # Incoming data is written here while it is being checked, then renamed into place.
        self.staging = root / ".staging"

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def conflict_path(self, study_uid: str, series_uid: str, sop_uid: str, digest: str) -> Path:
        return self.root / study_uid / series_uid / f"{sop_uid}.conflict-{digest[:16]}.dcm"

    def quarantine_path(self, digest: str) -> Path:
        # Named by content, never by anything the sender chose: a hostile UID can't pick a path.
        return self.quarantine / digest[:2] / f"{digest}.dcm"

    def keep_refused(self, data: bytes) -> Path:
        digest = sha256(data)
        path = self.quarantine_path(digest)
        if not path.exists():
            write_durably(path, data)
        return path

    def remove_partials(self) -> int:
        """Delete temp files a crash left behind; they were never acknowledged or recorded."""
        removed = 0
        for base in (self.root, self.quarantine):
            if base.exists():
                for tmp in base.rglob(".*.partial"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed
