"""Stable studies reach real brokers (Redis, the embedded SQLite broker) exactly as queued, and
none is lost while the broker is down."""

from __future__ import annotations

import uuid

from kombu import Connection

from db import OutboxMessage, StudyState
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import RecordingPublisher, storescu, wait_for
from tests.helpers import outbox, study_state

LUNG1 = sample_study_uid("lung1")


def _drain(broker_url: str, queue: str, expected: int, timeout: float = 10) -> list[dict]:
    """Consume what the broker holds on `queue` with a plain kombu consumer (no radai code)."""
    bodies: list[dict] = []
    with Connection(broker_url) as conn:
        q = conn.SimpleQueue(queue)
        try:
            while len(bodies) < expected:
                msg = q.get(timeout=timeout)
                bodies.append({"headers": msg.headers, "body": msg.decode()})
                msg.ack()
        finally:
            q.close()
    return bodies


def test_broker_down_loses_nothing(database, node_factory, samples):
    publisher = RecordingPublisher()
    publisher.down = True
    node = node_factory(database, publish=publisher, stable_seconds=0.5)
    assert storescu(node.port, samples["lung1"]).returncode == 0
    wait_for(lambda: study_state(database, LUNG1) == StudyState.STABLE)
    wait_for(lambda: outbox(database)[0].attempts >= 2)
    assert study_state(database, LUNG1) == StudyState.STABLE
    assert "broker down" in outbox(database)[0].last_error
    publisher.down = False
    wait_for(lambda: study_state(database, LUNG1) == StudyState.QUEUED, timeout=15)
    assert publisher.sent == [("radai.process_study", {"study_uid": LUNG1, "instances": 48})]
    assert outbox(database)[0].published_at is not None


def test_redis_down_then_back(sqlite_db, node_factory, samples, redis_server):
    from tests.conftest import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    node = node_factory(sqlite_db, publish=celery_publisher(url, queue), stable_seconds=0.5)
    assert storescu(node.port, samples["lung1"]).returncode == 0
    wait_for(lambda: outbox(sqlite_db) and outbox(sqlite_db)[0].attempts >= 1, timeout=20)
    assert study_state(sqlite_db, LUNG1) == StudyState.STABLE
    redis_server(port)
    wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.QUEUED, timeout=30)
    [msg] = _drain(url, queue, 1)
    assert msg["headers"]["task"] == "radai.process_study"
    args, kwargs, _ = msg["body"]
    assert kwargs == {"study_uid": LUNG1, "instances": 48}


def test_embedded_sqlite_broker(database, node_factory, samples, tmp_path):
    url = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    node = node_factory(database, publish=celery_publisher(url, "radai.pipeline"))
    assert storescu(node.port, samples["lung1"][:5]).returncode == 0
    wait_for(lambda: study_state(database, LUNG1) == StudyState.QUEUED, timeout=20)
    [msg] = _drain(url, "radai.pipeline", 1)
    assert msg["body"][1] == {"study_uid": LUNG1, "instances": 5}


def test_outdated_message_is_dropped_when_study_reopens(sqlite_db, node_factory, samples):
    publisher = RecordingPublisher()
    publisher.down = True
    node = node_factory(sqlite_db, publish=publisher, stable_seconds=0.5)
    assert storescu(node.port, samples["lung1"][:10]).returncode == 0
    wait_for(lambda: outbox(sqlite_db) and outbox(sqlite_db)[0].attempts >= 1)
    assert storescu(node.port, samples["lung1"][10:]).returncode == 0
    publisher.down = False
    wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.QUEUED, timeout=20)
    first, second = outbox(sqlite_db)
    assert first.dropped_reason and first.published_at is None
    assert second.published_at is not None
    assert publisher.sent == [("radai.process_study", {"study_uid": LUNG1, "instances": 48})]
    assert isinstance(first, OutboxMessage)


def test_only_the_newest_message_of_a_study_is_published(sqlite_db):
    from db import Study
    from db.models import utcnow
    from dicom_node.dispatcher import OutboxDispatcher

    now = utcnow()
    with sqlite_db.session() as s:
        s.add(
            Study(
                study_uid="1.2.3",
                state=StudyState.STABLE,
                first_received_at=now,
                last_instance_at=now,
                state_changed_at=now,
            )
        )
        for n in (10, 20):
            s.add(
                OutboxMessage(
                    task="radai.process_study",
                    payload={"study_uid": "1.2.3", "instances": n},
                    study_uid="1.2.3",
                    next_attempt_at=now,
                )
            )
    publisher = RecordingPublisher()
    assert OutboxDispatcher(sqlite_db, publisher).run_once() == 1
    assert publisher.sent == [("radai.process_study", {"study_uid": "1.2.3", "instances": 20})]
    old, new = outbox(sqlite_db)
    assert old.dropped_reason.startswith("superseded") and new.published_at is not None
    assert study_state(sqlite_db, "1.2.3") == StudyState.QUEUED


def test_messages_are_typed_and_an_unknown_task_is_dropped_not_published(sqlite_db):
    from db.models import utcnow
    from db.outbox_tasks import ExportOutput, ProcessStudy, payload_of
    from dicom_node.dispatcher import OutboxDispatcher

    now = utcnow()
    with sqlite_db.session() as s:
        s.add(ExportOutput(7).message(now, "1.2.3"))
        s.add(OutboxMessage(task="radai.delete_everything", payload={}, next_attempt_at=now))
        s.add(OutboxMessage(task="radai.export_output", payload={"x": 1}, next_attempt_at=now))
    publisher = RecordingPublisher()
    assert OutboxDispatcher(sqlite_db, publisher).run_once() == 1
    assert publisher.sent == [("radai.export_output", {"export_id": 7})]
    _, unknown, malformed = outbox(sqlite_db)
    assert unknown.published_at is None and "unknown outbox task" in unknown.dropped_reason
    assert malformed.published_at is None and "bad payload" in malformed.dropped_reason
    assert payload_of("radai.process_study", {"study_uid": "1.2", "instances": 3}) == ProcessStudy(
        "1.2", 3
    )
