"""Keep a claimed job's lease (db/leases.py) while its study runs: a thread renews it every third
of the lease, so a live worker never loses it to two missed renewals.

Takes the `JobTicket` and the lease length; `confirm()` renews at once and raises `LeaseLost` when
the lease is gone (the worker was frozen or cut off long enough for the study to be queued
again), so a worker that lost its study stops before writing results.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from db import leases
from db.session import Database
from workers.pipeline.claim import JobTicket

log = logging.getLogger("radai.worker")


class LeaseLost(RuntimeError):
    """The job's lease lapsed and was reaped or taken over: this run's result is not wanted."""


class Heartbeat:
    def __init__(self, db: Database, ticket: JobTicket, lease_seconds: float) -> None:
        if ticket.lease is None:
            raise ValueError("a heartbeat needs a ticket with a lease owner")
        self.db = db
        self.lease: leases.Lease = ticket.lease
        self.study_uid = ticket.study_uid
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radai-lease", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self.lease_seconds)

    def _renew(self) -> bool:
        with self.db.session() as s:
            kept = leases.renew(s, self.lease, self.lease_seconds)
        if not kept and not self.lost.is_set():
            self.lost.set()
            log.warning("study %s: lease of job %d lost", self.study_uid, self.lease.job_id)
        return kept

    def _run(self) -> None:
        every = leases.renew_every(self.lease_seconds)
        while not self._stop.wait(every) and not self.lost.is_set():
            try:
                self._renew()
            except Exception:  # noqa: BLE001 - the database restarting: next renewal may succeed
                log.warning("study %s: lease renewal failed", self.study_uid, exc_info=True)

    def confirm(self) -> None:
        """Renew now; LeaseLost if the lease is no longer this worker's."""
        if self.lost.is_set() or not self._renew():
            raise LeaseLost(f"lease of job {self.lease.job_id} lapsed; the study was queued again")

    def release(self, grace_seconds: float) -> None:
        """Hand the job to a retry: any worker may claim it. Quiet: we are leaving on an error."""
        self._stop.set()
        try:
            with self.db.session() as s:
                leases.release(s, self.lease, grace_seconds)
        except Exception:  # noqa: BLE001 - the lease then simply lapses and is reaped
            log.warning("study %s: lease release failed", self.study_uid, exc_info=True)
