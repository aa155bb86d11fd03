"""The node as a running service: listener, stability monitor and outbox dispatcher together.

Every `reap_seconds` its loop also queues again the studies whose worker was lost (a job lease
that lapsed, `db.leases.reap`): through the outbox, so the dispatcher publishes them in its next
round even when the broker lost its queue.

Its loop also signs the audit trail's checkpoints (`db.audit.write_checkpoint`) every
`checkpoint_seconds` when the trail grew, and once more on a clean stop, when the process has
audit keys with a checkpoint folder (`db.audit.configure`)."""

from __future__ import annotations

import logging
import threading
import time

from db import audit, leases
from db.session import Database
from dicom_node.archive import Archive
from dicom_node.assembly import mark_stable
from dicom_node.dispatcher import OutboxDispatcher, Publisher
from dicom_node.server import DicomNode, NodeConfig

log = logging.getLogger("radai.node")


class NodeService:
    def __init__(
        self,
        db: Database,
        archive: Archive,
        config: NodeConfig,
        *,
        stable_seconds: float,
        publish: Publisher,
        poll_seconds: float = 0.5,
        backoff_cap: float = 30.0,
        checkpoint_seconds: float = 60.0,
        reap_seconds: float = 5.0,
        queued_timeout: float | None = leases.DEFAULT_QUEUED_TIMEOUT,
    ) -> None:
        self.db = db
        self.archive = archive
        self.node = DicomNode(db, archive, config)
        self.stable_seconds = stable_seconds
        self.dispatcher = OutboxDispatcher(
            db, publish, actor=f"dispatcher:{config.ae_title}", backoff_cap=backoff_cap
        )
        self.poll_seconds = poll_seconds
        self.checkpoint_seconds = checkpoint_seconds
        self._next_checkpoint = 0.0  # monotonic time; the first round signs one at once
        self.reap_seconds = reap_seconds
        self.queued_timeout = queued_timeout
        self._next_reap = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.node.port

    def start(self) -> None:
        removed = self.archive.remove_partials()
        if removed:
            log.info("removed %d partial files left by an earlier crash", removed)
        self.node.start()
        self._thread = threading.Thread(target=self._loop, name="radai-assembly", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                mark_stable(self.db, self.stable_seconds, actor=self.node.actor)
                self._reap_when_due()
                self.dispatcher.run_once()
            except Exception:  # noqa: BLE001 - e.g. the database restarting: try again soon
                log.exception("assembly/dispatch round failed; retrying")
                self._stop.wait(min(5.0, self.poll_seconds * 4))
            if time.monotonic() >= self._next_checkpoint:
                self._next_checkpoint = time.monotonic() + self.checkpoint_seconds
                self.checkpoint()
            self._stop.wait(self.poll_seconds)

    def _reap_when_due(self) -> None:
        if time.monotonic() < self._next_reap:
            return
        self._next_reap = time.monotonic() + self.reap_seconds
        requeued = leases.reap(
            self.db,
            actor=f"reaper:{self.node.config.ae_title}",
            queued_timeout=self.queued_timeout,
        )
        for uid, state in requeued.items():
            log.warning("study %s: its worker was lost or its message lost; now %s", uid, state)

    def checkpoint(self) -> None:
        """Sign the audit trail's head; a failure is logged (loudly) and never stops the node."""
        keys = audit.configured_keys()
        if keys is None or keys.checkpoint_dir is None:
            return
        try:
            with self.db.session() as s:
                audit.write_checkpoint(s, keys)
        except audit.AuditTampered as exc:
            log.error("audit trail fails verification, no checkpoint signed: %s", exc)
        except Exception:  # noqa: BLE001 - e.g. the database restarting: next interval
            log.exception("audit checkpoint failed; next try in %.0f s", self.checkpoint_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.node.stop()
        if self._thread is not None:
            self.checkpoint()  # the last entries this node wrote are pinned too

    def wait(self) -> None:
        self._stop.wait()
