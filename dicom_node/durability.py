"""Making acknowledged instances durable in their final form, in the background and in groups.

An instance is acknowledged once its journal record is on disk (`journal`), its file renamed into
the archive and its index rows committed, neither of those two waiting for the disk. This thread
then, every `interval` seconds, fsyncs the files and folders of everything acknowledged since its
last round (many at once, so the disk merges them), makes the database's commits durable
(`Database.make_durable`) and only then lets the journal drop those records. A crash before that
loses nothing: the journal is replayed at start (`replay`).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from db.session import Database
from dicom_node.archive import fsync_dir, fsync_file
from dicom_node.journal import Journal, Record

log = logging.getLogger("radai.node")


class Durability:
    """Background fsyncs of files, folders and the index; then the journal forgets."""

    def __init__(
        self, db: Database, journal: Journal, *, interval: float = 0.05, threads: int = 8
    ) -> None:
        self.db = db
        self.journal = journal
        self.interval = interval
        self._pending: list[tuple[Record, Path | None]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="radai-fsync")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="radai-durability", daemon=True)
        self._thread.start()

    def add(self, record: Record, path: Path | None) -> None:
        """`record` is filed at `path` (None: nothing new was filed) and indexed, not yet synced."""
        with self._cond:
            self._pending.append((record, path))
            if len(self._pending) >= 1024:
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._stop:
                    self._cond.wait(self.interval)
                stopping = self._stop
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - e.g. the database restarting: the journal keeps all
                log.exception("could not make acknowledged instances durable; retrying")
                with self._cond:
                    if not self._stop:
                        self._cond.wait(min(2.0, self.interval * 20))
            if stopping:
                return

    def flush(self) -> None:
        """Make everything added so far durable, then drop it from the journal."""
        with self._cond:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            files = {path for _, path in batch if path is not None}
            list(self._pool.map(_fsync_if_there, files))
            list(self._pool.map(fsync_dir, {path.parent for path in files}))
            self.db.make_durable()
        except BaseException:
            with self._cond:
                self._pending[:0] = batch
            raise
        self.journal.applied([record for record, _ in batch])

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - what is left is replayed from the journal at start
            log.exception("could not make the last instances durable; the journal keeps them")
        self._pool.shutdown(wait=True)


def _fsync_if_there(path: Path) -> None:
    try:
        fsync_file(path)
    except FileNotFoundError:
        # Filed again since (a retried conflict): that later copy has its own entry.
        pass
