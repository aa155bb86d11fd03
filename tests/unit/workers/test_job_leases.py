"""The worker's side of job leases on SQLite and PostgreSQL: the claim takes the lease and refuses
a study another worker holds; a worker whose lease lapsed (it was frozen, the study was requeued
and claimed again) has its late end refused and audited; the heartbeat renews and notices a loss."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from db import AuditEntry, Job, Output, Study, StudyState, leases
from db.audit_actions import AuditAction
from db.models import utcnow
from workers.pipeline.claim import JobTicket, claim
from workers.pipeline.heartbeat import Heartbeat, LeaseLost
from workers.pipeline.record import fail, record_end

UID = "1.2.826.0.1.3680043.8.498.2"
VERSION = "test/1"


@pytest.fixture
def queued(database):
    now = utcnow()
    with database.session() as s:
        queued = Study(study_uid=UID, state=StudyState.QUEUED)
        queued.last_instance_at = queued.state_changed_at = now
        s.add(queued)
    return database


def _lapse(db, job_id: int) -> None:
    """The holder stopped renewing long enough ago (frozen, its host gone)."""
    with db.session() as s:
        s.get_one(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)


def _audit(db, action: AuditAction) -> list[dict]:
    with db.session() as s:
        rows = s.execute(select(AuditEntry).where(AuditEntry.action == action)).scalars()
        return [r.detail for r in rows]


def test_the_claim_takes_the_lease_and_refuses_a_second_worker_while_it_lives(queued):
    first = claim(queued, UID, VERSION, owner="host-a:1", lease_seconds=60)
    assert isinstance(first, JobTicket) and first.owner == "host-a:1"
    with queued.session() as s:
        job = s.get_one(Job, first.job_id)
        assert job.lease_owner == "host-a:1"
        assert job.lease_expires_at > utcnow() + timedelta(seconds=50)
    # The broker delivers the message again (visibility timeout) while host-a still runs it.
    second = claim(queued, UID, VERSION, owner="host-b:2", lease_seconds=60)
    assert isinstance(second, str) and "host-a:1" in second
    # Once the lease lapsed, another worker may take the study over: a new attempt, same job.
    _lapse(queued, first.job_id)
    third = claim(queued, UID, VERSION, owner="host-b:2", lease_seconds=60)
    assert isinstance(third, JobTicket)
    assert (third.job_id, third.attempt) == (first.job_id, 2)


def test_a_study_queued_again_meanwhile_is_taken_over_from_a_live_lease(queued):
    old = claim(queued, UID, VERSION, owner="host-a:1", lease_seconds=60)
    assert isinstance(old, JobTicket)
    # A duplicate instance reopened the study; it was assembled and queued again (same key).
    with queued.session() as s:
        s.get_one(Study, old.study_id).state = StudyState.QUEUED
    new = claim(queued, UID, VERSION, owner="host-b:2", lease_seconds=60)
    assert isinstance(new, JobTicket) and new.attempt == 2
    assert not record_end(queued, old, StudyState.DONE)
    assert record_end(queued, new, StudyState.DONE)


def test_a_late_end_of_the_worker_that_lost_its_lease_is_refused(queued):
    old = claim(queued, UID, VERSION, owner="host-a:1", lease_seconds=60)
    assert isinstance(old, JobTicket)
    _lapse(queued, old.job_id)
    assert leases.reap(queued) == {UID: StudyState.STABLE}
    # Refused after the reaper released the job, before anyone claimed it again...
    assert not record_end(queued, old, StudyState.DONE)
    with queued.session() as s:
        s.get_one(Study, old.study_id).state = StudyState.QUEUED  # the dispatcher published it
    new = claim(queued, UID, VERSION, owner="host-b:2", lease_seconds=60)
    assert isinstance(new, JobTicket) and new.attempt == 2
    # ...and after: neither a result nor a failure of the old run is recorded.
    assert not record_end(queued, old, StudyState.DONE)
    assert not record_end(queued, old, StudyState.FAILED, reason="late")
    assert not fail(queued, UID, "retries exhausted", owner="host-a:1")
    with queued.session() as s:
        assert s.get_one(Job, new.job_id).state == "RUNNING"
        assert s.get_one(Study, new.study_id).state == StudyState.PROCESSING
    assert record_end(queued, new, StudyState.DONE)
    with queued.session() as s:
        job = s.get_one(Job, new.job_id)
        assert (job.state, job.lease_owner, job.lease_expires_at) == ("DONE", None, None)
        assert s.get_one(Study, new.study_id).state == StudyState.DONE
        assert s.execute(select(Output)).first() is None
    lost = _audit(queued, AuditAction.JOB_LEASE_LOST)
    assert len(lost) == 3 and {d["lease_owner"] for d in lost} == {"host-a:1"}
    assert len(_audit(queued, AuditAction.JOB_DONE)) == 1


def test_a_retry_after_an_error_may_run_on_any_worker_and_fail_records_for_it(queued):
    first = claim(queued, UID, VERSION, owner="host-a:1", lease_seconds=60)
    assert isinstance(first, JobTicket)
    with queued.session() as s:
        assert leases.release(s, first.lease, grace_seconds=120)
    # Retries exhausted on host-a: the released job's failure is recorded.
    assert fail(queued, UID, "gave up", owner="host-a:1")
    assert _audit(queued, AuditAction.JOB_FAILED)[0]["reason"] == "gave up"


def test_the_heartbeat_renews_and_notices_a_lost_lease(queued):
    ticket = claim(queued, UID, VERSION, owner="host-a:1", lease_seconds=0.6)
    assert isinstance(ticket, JobTicket)
    with Heartbeat(queued, ticket, lease_seconds=0.6) as beat:
        time.sleep(1.5)  # two and a half leases: only renewals keep it
        assert leases.reap(queued) == {}
        beat.confirm()
        with queued.session() as s:
            s.get_one(Job, ticket.job_id).lease_owner = None  # reaped meanwhile
        with pytest.raises(LeaseLost):
            beat.confirm()
    assert beat.lost.is_set()
