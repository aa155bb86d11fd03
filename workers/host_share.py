"""The worker processes that run on this host, so that each takes its share of the cores.

Every worker process that runs the pipeline registers itself in a host-local folder (by default
`$TMPDIR/radai-workers-<uid>`, `RADAI_WORKER_RUN_DIR`): one file per process, named by its pid,
which it holds under an exclusive `flock` for as long as it lives. The kernel drops the lock when
the process ends, however it ends (SIGKILL, OOM, a crash), so a file whose lock can be taken
belongs to a dead process: it does not count, and the counter removes it.

A process registers under a temporary name and takes the lock before renaming the file into
place, so a counter never sees a live process's file unlocked. A process forked from a registered
one (a prefork pool child) does not inherit a place in the count: `ensure` closes the parent's
descriptor in the child (the parent's lock stays, it is the parent's) and registers the child.

Only this host's processes share the folder's file system when it is host-local (`/tmp`, `/run`);
containers that should share a count need the folder mounted in each. Imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from pathlib import Path

SUFFIX = ".worker"


def default_dir() -> Path:
    """Host-local and per user: workers of one service account on one host see each other."""
    return Path(tempfile.gettempdir()) / f"radai-workers-{os.getuid()}"


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset limits)."""
    return len(os.sched_getaffinity(0))


class HostRegistry:
    """This process's place among the registered worker processes of a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self._pid: int | None = None  # the process that holds `_fd`'s registration
        self._lock = threading.Lock()

    @property
    def registered(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def ensure(self) -> None:
        """Register this process unless it already is (idempotent; safe after a fork)."""
        with self._lock:
            if self.registered:
                return
            if self._fd is not None:  # inherited from the process this one was forked from
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            pid = os.getpid()
            fd, tmp = tempfile.mkstemp(prefix=f".{pid}-", suffix=".tmp", dir=self.folder)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(fd, f"{pid}\n".encode())
                os.replace(tmp, self.folder / f"{pid}{SUFFIX}")
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._fd, self._pid = fd, pid

    def leave(self) -> None:
        """Deregister this process (a process that ends leaves by itself)."""
        with self._lock:
            if self._fd is None:
                return
            if self._pid == os.getpid():
                with contextlib.suppress(OSError):
                    os.unlink(self.folder / f"{self._pid}{SUFFIX}")
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = self._pid = None

    def live(self) -> int:
        """Worker processes registered and alive on this host now (this one included when it
        is registered). Files of dead processes are removed on the way."""
        count = 0
        try:
            entries = list(self.folder.glob(f"*{SUFFIX}"))
        except OSError:
            entries = []
        for path in entries:
            if self.registered and path.name == f"{self._pid}{SUFFIX}":
                count += 1  # our own file: flock from a second descriptor would fail, rightly
                continue
            count += _held(path)
        return count


def _held(path: Path) -> int:
    """1 when a live process holds the file's lock; 0 (and the file removed) when none does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0  # removed meanwhile: its owner left
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 1
    except OSError:
        return 0
    else:
        # Still holding the lock, remove the file unless a new process of the same pid has
        # replaced it meanwhile (its file is another inode).
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        return 0
    finally:
        os.close(fd)
