"""No study left behind when a worker and the broker fail together (db/leases.py), with real
processes: a node (outbox dispatcher and reaper), `radai worker` processes and a private
redis-server run as `scripts/setup.sh` runs Redis, without persistence.

1. A worker is killed with SIGKILL mid-study, then Redis restarts and its queue is gone: nothing
   of the broker remembers the study. The job's lease lapses, the node queues the study again
   through the outbox, a fresh worker completes it: DONE, one job, one SEG and one SR.
2. A remote worker's host vanishes mid-study (its process frozen with SIGSTOP, on PostgreSQL as
   a remote worker would use it): its lease lapses, another worker completes the study; when the
   frozen one comes back (SIGCONT) its late result is refused and audited, still one result.

The broker's visibility timeout stays at its default (900 s), so only the lease brings the study
back within the test.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from db import AuditEntry, Job, OutboxMessage, Output, StudyState
from db.audit_actions import AuditAction
from db.models import utcnow
from db.outbox_tasks import TaskName
from db.session import Database
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import _make_pg, radai_env, storescu, wait_for
from tests.helpers import study_state
from tests.kit.redis import RedisServer

LUNG2 = sample_study_uid("lung2")
LEASE_S = "6"  # renewed every 2 s; a lost worker's study is requeued 6 s after its last renewal


@pytest.fixture
def volatile_redis(tmp_path) -> Iterator[RedisServer]:  # noqa: ANN001
    """A private redis-server without persistence: a restart empties it."""
    redis = RedisServer()
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def pg_db(pg_template: str) -> Iterator[Database]:
    db, drop = _make_pg(pg_template)
    yield db
    drop()


def _audit(db: Database, action: AuditAction) -> list[AuditEntry]:
    with db.session() as s:
        return list(s.execute(select(AuditEntry).where(AuditEntry.action == action)).scalars())


def _assert_one_result(db: Database, attempts: int) -> None:
    assert study_state(db, LUNG2) == StudyState.DONE
    with db.session() as s:
        jobs = list(s.execute(select(Job)).scalars())
        outputs = list(s.execute(select(Output)).scalars())
        published = s.execute(
            select(OutboxMessage.id).where(
                OutboxMessage.task == str(TaskName.PROCESS_STUDY),
                OutboxMessage.published_at.is_not(None),
            )
        ).all()
    assert len(jobs) == 1 and jobs[0].attempts == attempts and jobs[0].state == StudyState.DONE
    assert jobs[0].lease_owner is None and jobs[0].lease_expiries == 1
    assert sorted(o.modality for o in outputs) == ["SEG", "SR"]
    assert len(published) == 2  # the first publication and the reaper's
    assert len(_audit(db, AuditAction.JOB_DONE)) == 1
    expired = _audit(db, AuditAction.JOB_LEASE_EXPIRED)
    assert len(expired) == 1 and expired[0].detail["to_state"] == StudyState.STABLE


def _start(node_factory, db, redis, queue, home):  # noqa: ANN001, ANN202
    node = node_factory(
        db, publish=celery_publisher(redis.url, queue), home=home, stable_seconds=0.5
    )
    node.reap_seconds = 1.0
    return node


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_and_redis_restarted_without_persistence_lose_no_study(
    sqlite_db, node_factory, radai_workers, volatile_redis, samples, tmp_path
):
    db, home = sqlite_db, tmp_path / "home"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    node = _start(node_factory, db, volatile_redis, queue, home)
    env = radai_env(home, db.url, volatile_redis.url, queue, RADAI_LEASE_SECONDS=LEASE_S)
    first = radai_workers(env, "w1")
    assert storescu(node.port, samples["lung2"]).returncode == 0
    wait_for(lambda: study_state(db, LUNG2) == StudyState.PROCESSING, timeout=90, interval=0.05)
    os.kill(first.pid, signal.SIGKILL)
    killed_at = utcnow()
    first.wait(timeout=10)
    volatile_redis.stop()
    volatile_redis.start()  # empty: the unacknowledged task is gone with the queue
    assert study_state(db, LUNG2) == StudyState.PROCESSING
    second = radai_workers(env, "w2")
    wait_for(
        lambda: study_state(db, LUNG2) == StudyState.DONE or second.poll() is not None,
        timeout=180,
        interval=0.5,
    )
    assert second.poll() is None, second.log_path.read_text()[-1500:]
    _assert_one_result(db, attempts=2)
    expired = _audit(db, AuditAction.JOB_LEASE_EXPIRED)[0]
    assert expired.detail["lease_owner"] == f"{socket.gethostname()}:{first.pid}"
    done = _audit(db, AuditAction.JOB_DONE)[0]
    print(
        f"lease {LEASE_S} s: requeued {(expired.at - killed_at).total_seconds():.1f} s after "
        f"the kill, DONE {(done.at - killed_at).total_seconds():.1f} s after it"
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_vanished_worker_host_loses_the_study_and_its_late_result_is_refused(
    pg_db, node_factory, radai_workers, volatile_redis, samples, tmp_path
):
    db, home = pg_db, tmp_path / "home"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    node = _start(node_factory, db, volatile_redis, queue, home)
    env = radai_env(home, db.url, volatile_redis.url, queue, RADAI_LEASE_SECONDS=LEASE_S)
    frozen = radai_workers(env, "w1")
    owner = f"{socket.gethostname()}:{frozen.pid}"  # solo pool: the task runs in this process
    try:
        assert storescu(node.port, samples["lung2"]).returncode == 0
        wait_for(lambda: study_state(db, LUNG2) == StudyState.PROCESSING, timeout=90, interval=0.05)
        os.kill(frozen.pid, signal.SIGSTOP)
        other = radai_workers(env, "w2")
        wait_for(
            lambda: study_state(db, LUNG2) == StudyState.DONE or other.poll() is not None,
            timeout=180,
            interval=0.5,
        )
        assert other.poll() is None, other.log_path.read_text()[-1500:]
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # The frozen worker resumes, finds its lease gone and records nothing.
    wait_for(
        lambda: any(
            e.detail["lease_owner"] == owner for e in _audit(db, AuditAction.JOB_LEASE_LOST)
        ),
        timeout=120,
        interval=0.5,
    )
    assert frozen.poll() is None, frozen.log_path.read_text()[-1500:]
    _assert_one_result(db, attempts=2)
    (lost,) = _audit(db, AuditAction.JOB_LEASE_LOST)
    assert lost.detail["attempt"] == 1 and lost.actor == "worker"
