"""Job leases (db/leases.py) on SQLite and PostgreSQL: a lapsed lease queues its study again
through the outbox in one audited transaction; a live one is left alone; a lost holder can
neither renew nor release; a study that keeps losing its worker ends FAILED."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from db import AuditEntry, Job, OutboxMessage, Study, StudyState, leases
from db.audit_actions import AuditAction
from db.models import utcnow
from db.outbox_tasks import TaskName

UID = "1.2.826.0.1.3680043.8.498.1"


def _running(db, *, expires_in: float, owner: str = "host-a:1", attempts: int = 1) -> int:
    """A PROCESSING study with a RUNNING job whose lease ends `expires_in` s from now."""
    now = utcnow()
    with db.session() as s:
        study = Study(
            study_uid=UID,
            state=StudyState.PROCESSING,
            instance_count=3,
            last_instance_at=now,
            state_changed_at=now,
        )
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            pipeline="p",
            pipeline_version="v",
            input_hash="h",
            state=leases.RUNNING,
            attempts=attempts,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=expires_in),
        )
        s.add(job)
        s.flush()
        return job.id


def _state(db) -> str:
    with db.session() as s:
        return s.execute(select(Study.state).where(Study.study_uid == UID)).scalar_one()


def _actions(db) -> list[str]:
    with db.session() as s:
        return list(s.execute(select(AuditEntry.action).order_by(AuditEntry.id)).scalars())


def _lapsed(db) -> list[str]:
    with db.session() as s:
        return leases.lapsed(s)


def test_a_live_lease_is_left_alone(database):
    _running(database, expires_in=30)
    assert _lapsed(database) == []
    assert leases.reap(database) == {}
    assert _state(database) == StudyState.PROCESSING


def test_a_lapsed_lease_queues_the_study_again_through_the_outbox(database):
    job_id = _running(database, expires_in=-1)
    assert leases.reap(database, actor="reaper:test") == {UID: StudyState.STABLE}
    assert _state(database) == StudyState.STABLE
    with database.session() as s:
        job = s.get_one(Job, job_id)
        messages = list(s.execute(select(OutboxMessage)).scalars())
        entry = s.execute(
            select(AuditEntry).where(AuditEntry.action == AuditAction.JOB_LEASE_EXPIRED)
        ).scalar_one()
    # The job is free for the next claim (same key: one result), its lease gone.
    assert (job.state, job.lease_owner, job.lease_expires_at) == ("RUNNING", None, None)
    assert job.lease_expiries == 1
    assert [(m.task, m.payload, m.study_uid) for m in messages] == [
        (str(TaskName.PROCESS_STUDY), {"study_uid": UID, "instances": 3}, UID)
    ]
    assert entry.actor == "reaper:test"
    assert entry.detail["from_state"] == "PROCESSING" and entry.detail["to_state"] == "STABLE"
    assert entry.detail["lease_owner"] == "host-a:1" and entry.detail["outbox_id"] == messages[0].id
    # Reaping again finds nothing: the study is no longer PROCESSING.
    assert leases.reap(database) == {}


def test_the_lost_holder_can_neither_renew_nor_release(database):
    job_id = _running(database, expires_in=-1)
    lease = leases.Lease(job_id, "host-a:1", 1)
    leases.reap(database)
    with database.session() as s:
        assert not leases.renew(s, lease, 60)
        assert not leases.release(s, lease, 60)
        assert not leases.still_held(s, lease)


def test_the_holder_renews_and_a_renewed_lease_is_not_reaped(database):
    job_id = _running(database, expires_in=1)
    lease = leases.Lease(job_id, "host-a:1", 1)
    later = utcnow() + timedelta(seconds=5)  # the lease would have lapsed by then...
    with database.session() as s:
        assert leases.renew(s, lease, 60)  # ...but its holder renewed it
        assert not leases.renew(s, leases.Lease(job_id, "host-b:2", 1), 60)
        assert not leases.renew(s, leases.Lease(job_id, "host-a:1", 2), 60)
    assert leases.reap(database, now=later) == {}
    assert leases.reap(database, now=later + timedelta(seconds=60)) == {UID: StudyState.STABLE}


def test_a_released_lease_waits_its_grace_for_the_retry_then_is_reaped(database):
    job_id = _running(database, expires_in=30)
    with database.session() as s:
        assert leases.release(s, leases.Lease(job_id, "host-a:1", 1), grace_seconds=10)
        job = s.get_one(Job, job_id)
        assert job.lease_owner is None
        assert not leases.held_elsewhere(job, "host-b:2", utcnow())  # any worker may retry it
    assert leases.reap(database) == {}
    assert leases.reap(database, now=utcnow() + timedelta(seconds=11)) == {UID: StudyState.STABLE}


def test_a_study_that_keeps_losing_its_worker_ends_failed(database):
    job_id = _running(database, expires_in=-1)
    with database.session() as s:
        s.get_one(Job, job_id).lease_expiries = leases.MAX_EXPIRIES - 1
    assert leases.reap(database) == {UID: StudyState.FAILED}
    with database.session() as s:
        job = s.get_one(Job, job_id)
        study = s.execute(select(Study).where(Study.study_uid == UID)).scalar_one()
        assert s.execute(select(OutboxMessage)).first() is None
    assert job.state == StudyState.FAILED and "lease expired" in (job.error or "")
    assert study.state == StudyState.FAILED and study.error == job.error
    assert _actions(database)[-1] == AuditAction.JOB_FAILED


def test_held_elsewhere_only_for_another_owners_live_lease(database):
    job_id = _running(database, expires_in=30)
    now = utcnow()
    with database.session() as s:
        job = s.get_one(Job, job_id)
        assert leases.held_elsewhere(job, "host-b:2", now)
        assert not leases.held_elsewhere(job, "host-a:1", now)
        assert not leases.held_elsewhere(job, "host-b:2", now + timedelta(seconds=31))


def test_migration_0008_gives_jobs_running_before_it_the_old_redelivery_time(tmp_path):
    from alembic import command

    from db.session import Database

    db = Database(f"sqlite:///{tmp_path / 'm.sqlite'}")
    config = db.alembic_config()
    command.upgrade(config, "0007")
    with db.engine.begin() as conn:
        now = "2026-11-30 00:00:00"
        conn.exec_driver_sql(
            "INSERT INTO studies (study_uid, state, modalities, instance_count, first_received_at,"
            " last_instance_at, state_changed_at, attempts, flagged, flags)"
            f" VALUES ('{UID}', 'PROCESSING', 'CT', 1, '{now}', '{now}', '{now}', 1, 0, '[]')"
        )
        for state in ("RUNNING", "DONE"):
            conn.exec_driver_sql(
                "INSERT INTO jobs (study_id, pipeline, pipeline_version, input_hash, state,"
                f" attempts, superseded, created_at) VALUES (1, 'p', 'v', '{state}', '{state}',"
                f" 1, 0, '{now}')"
            )
    command.upgrade(config, "0008")
    with db.session() as s:
        jobs = {j.state: j for j in s.execute(select(Job)).scalars()}
    running = jobs["RUNNING"].lease_expires_at
    assert running is not None and running > utcnow() + timedelta(seconds=800)
    assert jobs["DONE"].lease_expires_at is None and jobs["DONE"].lease_expiries == 0
    command.downgrade(config, "0007")
    command.upgrade(config, "head")
    db.dispose()


def _queued(db, *, queued_for: float) -> None:
    """A QUEUED study that no worker has started, queued `queued_for` s ago."""
    then = utcnow() - timedelta(seconds=queued_for)
    with db.session() as s:
        s.add(
            Study(
                study_uid=UID,
                state=StudyState.QUEUED,
                instance_count=4,
                last_instance_at=then,
                state_changed_at=then,
            )
        )


def test_a_study_queued_too_long_unstarted_is_published_again(database):
    # Its message went with a broker that restarted empty: no lease exists to lapse.
    _queued(database, queued_for=120)
    assert leases.reap(database, queued_timeout=300) == {}  # not yet: it may be waiting its turn
    assert _state(database) == StudyState.QUEUED
    assert leases.reap(database, actor="reaper:test", queued_timeout=60) == {UID: StudyState.STABLE}
    with database.session() as s:
        messages = list(s.execute(select(OutboxMessage)).scalars())
        entry = s.execute(
            select(AuditEntry).where(AuditEntry.action == AuditAction.STUDY_QUEUE_LOST)
        ).scalar_one()
    assert [(m.task, m.payload) for m in messages] == [
        (str(TaskName.PROCESS_STUDY), {"study_uid": UID, "instances": 4})
    ]
    assert entry.actor == "reaper:test" and entry.detail["outbox_id"] == messages[0].id
    assert (entry.detail["from_state"], entry.detail["to_state"]) == ("QUEUED", "STABLE")
    # Once STABLE (and, published again, freshly QUEUED) it is not touched again.
    assert leases.reap(database, queued_timeout=60) == {}


def test_queued_timeout_none_leaves_queued_studies_alone(database):
    _queued(database, queued_for=10_000)
    assert leases.reap(database, queued_timeout=None) == {}
    assert _state(database) == StudyState.QUEUED
