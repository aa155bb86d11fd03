"""A study's life: every state, every event that moves it, and the one way to change the state.

In the spirit of pynetdicom's `fsm.py`, the whole state machine is one table, `TRANSITIONS`:
event -> (the states it may happen in, the state it leads to). Events are audit actions, and a
state change is always recorded by exactly one audit entry of that action, in the same
transaction, with `from_state` and `to_state` in its detail. Nothing else assigns `Study.state`:

    RECEIVING --study.stable--> STABLE --study.queued--> QUEUED --job.started--> PROCESSING
    RECEIVING --study.held--> HELD --study.released--> STABLE
    PROCESSING --job.done | job.not_applicable | job.failed--> DONE | NOT_APPLICABLE | FAILED
    PROCESSING --job.lease_expired--> STABLE   (its worker was lost: queued again, db/leases.py)
    DONE | NOT_APPLICABLE | FAILED --study.retry--> STABLE
    any state but RECEIVING --study.reopened--> RECEIVING   (a late instance)

A study is created in `INITIAL` (audited as "study.received"). `transition` changes a study the
caller has loaded (and locked); `transition_where` is a compare-and-set UPDATE for callers that
must not lose a race (study assembly: an instance that arrives meanwhile keeps the study open).
An event in a state the table does not allow raises `IllegalTransition`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import ColumnElement, CursorResult, update
from sqlalchemy.orm import Session

from db import audit
from db.audit_actions import AuditAction as A
from db.models import Study, StudyState, utcnow

S = StudyState
INITIAL = S.RECEIVING


class Rule(NamedTuple):
    sources: frozenset[StudyState]
    target: StudyState


def _rule(sources: Iterable[StudyState], target: StudyState) -> Rule:
    return Rule(frozenset(sources), target)


# Whoever analyses may find a result for these very instances already there (a redelivered
# message, a study retried unchanged): the study then takes that result's state without a new
# run, which is why job.done and job.not_applicable may also end a STABLE or QUEUED study.
_RUNNABLE = (S.STABLE, S.QUEUED, S.PROCESSING)

TRANSITIONS: dict[A, Rule] = {
    # A late instance: gathered again, assembled and queued (or held) again.
    A.STUDY_REOPENED: _rule(set(S) - {S.RECEIVING}, S.RECEIVING),
    A.STUDY_STABLE: _rule([S.RECEIVING], S.STABLE),
    # Quiet, but something needs a person first (instances of more than one patient).
    A.STUDY_HELD: _rule([S.RECEIVING], S.HELD),
    A.STUDY_RELEASED: _rule([S.HELD], S.STABLE),
    A.STUDY_QUEUED: _rule([S.STABLE], S.QUEUED),
    A.STUDY_RETRY: _rule([S.FAILED, S.NOT_APPLICABLE, S.DONE], S.STABLE),
    A.JOB_STARTED: _rule(_RUNNABLE, S.PROCESSING),
    A.JOB_DONE: _rule(_RUNNABLE, S.DONE),
    A.JOB_NOT_APPLICABLE: _rule(_RUNNABLE, S.NOT_APPLICABLE),
    A.JOB_FAILED: _rule([S.PROCESSING], S.FAILED),
    # The worker's lease lapsed: STABLE with a new outbox message, which the dispatcher
    # publishes (-> QUEUED) as it does any other; the job key keeps the result single.
    A.JOB_LEASE_EXPIRED: _rule([S.PROCESSING], S.STABLE),
    # Queued long ago and never started: the message is presumed lost; published again the same
    # way (a duplicate of a message that was only slow is harmless: the claim and the job key).
    A.STUDY_QUEUE_LOST: _rule([S.QUEUED], S.STABLE),
}

FINISHED = frozenset({S.DONE, S.NOT_APPLICABLE, S.FAILED})
JOB_EVENTS = {S.DONE: A.JOB_DONE, S.NOT_APPLICABLE: A.JOB_NOT_APPLICABLE, S.FAILED: A.JOB_FAILED}


class IllegalTransition(ValueError):
    """An event the table does not allow in the study's current state."""

    def __init__(self, event: A, state: str, study_uid: str | None = None) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[event].sources)) if event in TRANSITIONS else "-"
        where = f"study {study_uid} is" if study_uid else "state"
        super().__init__(f"{event} is not allowed: {where} {state} (allowed in: {allowed})")
        self.event, self.state = event, state


def target(event: A, state: str) -> StudyState:
    """The state `event` leads to from `state`; IllegalTransition where the table has none."""
    rule = TRANSITIONS.get(event)
    if rule is None or state not in rule.sources:
        raise IllegalTransition(event, state)
    return rule.target


def allowed(state: str) -> dict[A, StudyState]:
    """The events possible in `state` and where each leads."""
    return {event: rule.target for event, rule in TRANSITIONS.items() if state in rule.sources}


def transition(
    session: Session,
    study: Study,
    event: A,
    *,
    actor: str,
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> StudyState:
    """Apply `event` to a study loaded in `session` (lock it first: SELECT ... FOR UPDATE)."""
    before = study.state
    try:
        after = target(event, before)
    except IllegalTransition:
        raise IllegalTransition(event, before, study.study_uid) from None
    study.state = after
    study.state_changed_at = now or utcnow()
    _record(session, actor, event, study.study_uid, before, after, detail)
    return after


def transition_where(
    session: Session,
    study_id: int,
    study_uid: str,
    event: A,
    from_state: str,
    *,
    actor: str,
    where: Iterable[ColumnElement[bool]] = (),
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """Apply `event` only if the row is still in `from_state` and `where` holds (one UPDATE).

    True if it changed (and was audited). IllegalTransition if the event cannot happen in
    `from_state` at all. Study objects already loaded in `session` are not refreshed."""
    after = target(event, from_state)
    result = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.state == from_state, *where)
        .values(state=after, state_changed_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult, result).rowcount != 1:
        return False
    _record(session, actor, event, study_uid, from_state, after, detail)
    return True


def _record(
    session: Session,
    actor: str,
    event: A,
    study_uid: str,
    before: str,
    after: str,
    detail: dict[str, Any] | None,
) -> None:
    entry = {"from_state": str(before), "to_state": str(after), **(detail or {})}
    audit.append(session, actor, event, study_uid, entry)
