"""The outbox dispatcher: publishes outbox messages to the Celery broker, at least once.

A message is marked published only after the broker took it; while the broker is unreachable each
message waits with capped exponential backoff and nothing is lost. Delivery can repeat (a crash
between publishing and marking), so the worker side is idempotent by design. A
`radai.process_study` message is published only while its study is STABLE and it is the newest
for that study: a study reopened or held meanwhile has its message dropped, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import select

from db import OutboxMessage, Study, StudyState, audit, lifecycle
from db.audit_actions import AuditAction
from db.models import utcnow
from db.outbox_tasks import ExportOutput, ProcessStudy, TaskName, payload_of
from db.session import Database
from dicom_io.backoff import backoff_delay

log = logging.getLogger("radai.dispatcher")

Publisher = Callable[[str, dict], None]


def celery_publisher(
    broker_url: str, queue: str, routes: dict[str, str] | None = None
) -> Publisher:
    """Publish by task name, so the node needs no worker code; fail fast when the broker is down.

    `routes` maps task names to queues other than `queue` (exports go to the I/O queue)."""
    routes = routes or {}
    app = Celery("radai-node", broker=broker_url)
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_timeout = 3
    if broker_url.startswith(("redis://", "rediss://")):
        app.conf.broker_transport_options = {"max_retries": 1, "socket_connect_timeout": 3}

    def publish(task: str, payload: dict) -> None:
        app.send_task(
            str(task),
            kwargs=payload,
            queue=routes.get(task, queue),
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
        )

    return publish


class OutboxDispatcher:
    def __init__(
        self,
        db: Database,
        publish: Publisher,
        *,
        actor: str = "dispatcher",
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        batch: int = 100,
    ) -> None:
        self.db = db
        self.publish = publish
        self.actor = actor
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.batch = batch

    def run_once(self, now: datetime | None = None) -> int:
        """Publish every due message; return how many were published."""
        now = now or utcnow()
        with self.db.session() as s:
            due = s.execute(
                select(OutboxMessage.id, OutboxMessage.task, OutboxMessage.payload)
                .where(
                    OutboxMessage.published_at.is_(None),
                    OutboxMessage.dropped_reason.is_(None),
                    OutboxMessage.next_attempt_at <= now,
                )
                .order_by(OutboxMessage.id)
                .limit(self.batch)
            ).all()
        published = 0
        for msg_id, task, payload in due:
            try:
                typed = payload_of(task, payload)
            except ValueError as exc:
                self._drop(msg_id, str(exc))
                continue
            if isinstance(typed, ProcessStudy) and not self._still_stable(msg_id, typed):
                continue
            try:
                self.publish(task, payload)
            except Exception as exc:  # noqa: BLE001 - any broker failure means: try later
                self._postpone(msg_id, exc)
                continue
            self._mark_published(msg_id, typed)
            published += 1
        return published

    def _drop(self, msg_id: int, reason: str) -> None:
        with self.db.session() as s:
            s.get(OutboxMessage, msg_id).dropped_reason = reason
        log.warning("dropped outbox message %d: %s", msg_id, reason)

    def _still_stable(self, msg_id: int, payload: ProcessStudy) -> bool:
        # A late instance reopened the study: this message describes an outdated instance set;
        # the study is declared stable again with a newer message, which is the one to publish.
        # A held study is published only after a person releases it (with a newer message).
        with self.db.session() as s:
            state = s.execute(
                select(Study.state).where(Study.study_uid == payload.study_uid)
            ).scalar()
            newer = s.execute(
                select(OutboxMessage.id).where(
                    OutboxMessage.study_uid == payload.study_uid,
                    OutboxMessage.task == str(TaskName.PROCESS_STUDY),
                    OutboxMessage.id > msg_id,
                )
            ).first()
            if state == StudyState.STABLE and newer is None:
                return True
            msg = s.get(OutboxMessage, msg_id)
            msg.dropped_reason = (
                "superseded by a newer message for the same study"
                if newer
                else f"study was {state} when the message came due"
            )
        log.info("dropped outbox message %d for study %s", msg_id, payload.study_uid)
        return False

    def _postpone(self, msg_id: int, exc: Exception) -> None:
        with self.db.session() as s:
            msg = s.get(OutboxMessage, msg_id)
            msg.attempts += 1
            delay = backoff_delay(msg.attempts, base=self.backoff_base, cap=self.backoff_cap)
            msg.next_attempt_at = utcnow() + timedelta(seconds=delay)
            msg.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
        log.warning("broker unavailable for message %d, retry in %.0f s: %s", msg_id, delay, exc)

    def _mark_published(self, msg_id: int, payload: ProcessStudy | ExportOutput) -> None:
        now = utcnow()
        with self.db.session() as s:
            msg = s.get(OutboxMessage, msg_id)
            msg.published_at = now
            if not isinstance(payload, ProcessStudy):
                return
            study = s.execute(
                select(Study).where(Study.study_uid == payload.study_uid).with_for_update()
            ).scalar_one()
            detail = {"outbox_id": msg_id}
            if study.state == StudyState.STABLE:
                lifecycle.transition(
                    s, study, AuditAction.STUDY_QUEUED, actor=self.actor, detail=detail, now=now
                )
            else:
                # A worker took the study between publishing and now: the publication is
                # audited, the state (already further on) stays.
                audit.append(
                    s,
                    self.actor,
                    AuditAction.STUDY_QUEUED,
                    payload.study_uid,
                    {**detail, "state": str(study.state)},
                )
