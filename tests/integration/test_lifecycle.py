"""The study state machine (db/lifecycle.py): the table, illegal events, and one audit entry per
state change, checked by driving a real study through node, dispatcher, worker, retry, hold and
release and replaying the audit trail."""

from __future__ import annotations

import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from db import AuditEntry, Study, StudyState, lifecycle
from db.audit_actions import AuditAction
from db.models import utcnow
from db.requeue import release, request_retry
from tests.conftest import RecordingPublisher, storescu, wait_for
from tests.helpers import count, study_row, study_state
from workers import processing


def test_the_table_reaches_every_state_and_each_event_has_one_target():
    reachable, frontier = {lifecycle.INITIAL}, [lifecycle.INITIAL]
    while frontier:
        for target in lifecycle.allowed(frontier.pop()).values():
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(StudyState)
    # Every state can be left (a late instance reopens even a finished or held study).
    assert all(lifecycle.allowed(state) for state in StudyState)
    assert lifecycle.target(AuditAction.STUDY_HELD, StudyState.RECEIVING) == StudyState.HELD
    assert lifecycle.target(AuditAction.STUDY_RELEASED, StudyState.HELD) == StudyState.STABLE


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (StudyState.DONE, AuditAction.STUDY_QUEUED),
        (StudyState.HELD, AuditAction.JOB_STARTED),
        (StudyState.HELD, AuditAction.STUDY_QUEUED),
        (StudyState.RECEIVING, AuditAction.STUDY_REOPENED),
        (StudyState.QUEUED, AuditAction.STUDY_RELEASED),
        (StudyState.FAILED, AuditAction.JOB_DONE),
        (StudyState.STABLE, AuditAction.USER_LOGIN),  # not a study event at all
    ],
)
def test_illegal_transition_raises_and_changes_nothing(database, state, event):
    now = utcnow()
    with database.session() as s:
        s.add(Study(study_uid="1.2.3", state=state, last_instance_at=now, state_changed_at=now))
    with pytest.raises(lifecycle.IllegalTransition, match=str(state)):
        with database.session() as s:
            study = s.execute(select(Study).where(Study.study_uid == "1.2.3")).scalar_one()
            lifecycle.transition(s, study, event, actor="test")
    with pytest.raises(lifecycle.IllegalTransition):
        with database.session() as s:
            lifecycle.transition_where(s, 1, "1.2.3", event, state, actor="test")
    assert study_state(database, "1.2.3") == state
    assert count(database, AuditEntry) == 0


def test_transition_where_loses_a_race_quietly(database):
    now = utcnow()
    with database.session() as s:
        s.add(Study(study_uid="1.2.4", last_instance_at=now, state_changed_at=now))
    with database.session() as s:
        # The row is no longer in the expected state: nothing changes, nothing is audited.
        assert not lifecycle.transition_where(
            s, 1, "1.2.4", AuditAction.STUDY_QUEUED, StudyState.STABLE, actor="test"
        )
        assert lifecycle.transition_where(
            s, 1, "1.2.4", AuditAction.STUDY_STABLE, StudyState.RECEIVING, actor="test"
        )
    assert study_state(database, "1.2.4") == StudyState.STABLE
    assert count(database, AuditEntry) == 1


def _state_changes(db, study_uid: str) -> list[tuple[str, str, str]]:
    with db.session() as s:
        entries = s.execute(
            select(AuditEntry).where(AuditEntry.study_uid == study_uid).order_by(AuditEntry.seq)
        ).scalars()
        return [
            (e.action, e.detail["from_state"], e.detail["to_state"])
            for e in entries
            if "to_state" in e.detail
        ]


@pytest.mark.timeout(300)
def test_every_state_change_of_a_real_study_is_one_audit_entry(database, node_factory, tmp_path):
    """Node, dispatcher, worker, retry, hold and release: replaying the audit entries that carry
    a state change gives an unbroken chain from RECEIVING to the study's state now."""
    publisher = RecordingPublisher()
    node = node_factory(database, publish=publisher, stable_seconds=0.3)
    mr = tmp_path / "mr.dcm"
    shutil.copy(get_testdata_file("MR_small.dcm"), mr)
    uid = pydicom.dcmread(mr).StudyInstanceUID
    out = tmp_path / "out"

    assert storescu(node.port, [mr]).returncode == 0
    wait_for(lambda: study_state(database, uid) == StudyState.QUEUED)
    assert processing.process_study(database, uid, out).startswith("NOT_APPLICABLE")
    with database.session() as s:
        request_retry(s, uid, actor="test")
    wait_for(lambda: study_state(database, uid) == StudyState.QUEUED)
    # The same instances again: the earlier result is taken over (QUEUED -> NOT_APPLICABLE).
    assert processing.process_study(database, uid, out).startswith("already NOT_APPLICABLE")

    other = pydicom.dcmread(mr)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID + ".7"
    other.PatientID = "ANOTHER-PATIENT"
    late = tmp_path / "late.dcm"
    other.save_as(late)
    assert storescu(node.port, [late]).returncode == 0
    wait_for(lambda: study_state(database, uid) == StudyState.HELD)
    with database.session() as s:
        release(s, uid, actor="test", reason="same patient, re-registered")
    wait_for(lambda: study_state(database, uid) == StudyState.QUEUED)
    assert processing.process_study(database, uid, out).startswith("NOT_APPLICABLE")

    changes = _state_changes(database, uid)
    assert [a for a, _, _ in changes] == [
        "study.stable",
        "study.queued",
        "job.started",
        "job.not_applicable",
        "study.retry",
        "study.queued",
        "job.not_applicable",
        "study.reopened",
        "study.held",
        "study.released",
        "study.queued",
        "job.started",
        "job.not_applicable",
    ]
    state = StudyState.RECEIVING
    for _action, before, after in changes:
        assert before == state
        state = after
    assert state == study_state(database, uid) == StudyState.NOT_APPLICABLE
    study = study_row(database, uid)
    assert study.hold_reason is None and [f["kind"] for f in study.flags] == ["patients_mixed"]
