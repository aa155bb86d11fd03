"""Login throttling: progressive delays per account and per source address, never a lock.

An attempt is *throttled* (refused without looking at the password) while the account or the
source address is inside its delay, which grows with the failures counted since that account's
last success (for a source: all failures from it) within WINDOW. A throttled attempt is recorded
but neither counts as a failure nor restarts a delay, so repeating refused attempts cannot keep
an account shut: once the delay has passed, the right password works. Unknown names are
throttled exactly like known ones (their digest is the account key), their attempts cost one
scrypt like a real check (`db.users.check_credentials`), and the answer names neither, so
neither the message nor the timing tells which names exist.

A browser that has logged in to an account before (its device token, the digest of a cookie the
caller reads, was recorded with a success) is a *trusted device* for that account: only its own
failures delay it, so someone guessing from the same address (on a shared workstation, everybody
is 127.0.0.1) cannot keep the owner out. This follows OWASP's "device cookies" scheme.

Names are stored as digests (a name typed in the wrong field may be a password); rows older than
RETENTION are purged on the next attempt. The audit trail (`db.audit`) records each attempt
without the password; this table only drives the delays and the admins' view.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, case, delete, func, select
from sqlalchemy.orm import Session

from db.models import LoginAttempt, User, utcnow
from db.users import check_credentials

FREE_FAILURES = 3  # failures before the first delay
BASE_DELAY = timedelta(seconds=2)  # the first delay; each further failure doubles it
MAX_DELAY = timedelta(minutes=2)
WINDOW = timedelta(minutes=30)  # failures older than this no longer count
RETENTION = timedelta(days=1)
TRUSTED_FOR = timedelta(days=30)  # how long a successful login makes a device trusted
FAILURES = ("wrong password", "unknown user", "disabled")
THROTTLED = "throttled"
NO_SOURCE = "unknown"


def account_key(name: str) -> str:
    """The stored key of a name as typed (a digest: the name may be a mistyped password)."""
    return hashlib.sha256(b"radai-login-name\0" + name.strip().encode("utf-8")).hexdigest()


def delay_after(failures: int) -> timedelta:
    """The wait imposed after `failures` counted failures: none for the first FREE_FAILURES,
    then BASE_DELAY doubling up to MAX_DELAY."""
    if failures < FREE_FAILURES:
        return timedelta(0)
    return min(BASE_DELAY * 2 ** (failures - FREE_FAILURES), MAX_DELAY)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt: the user (None unless "ok"), the outcome ("ok", "wrong
    password", "unknown user", "disabled" or "throttled") and, when throttled, how many seconds
    remain before the next attempt is considered; `known` says whether the name is an
    account's (for the audit trail's actor, never for the answer)."""

    user: User | None
    outcome: str
    retry_after_s: float = 0.0
    known: bool = False


def _counted(session: Session, where, since: datetime) -> tuple[int, datetime | None]:  # noqa: ANN001
    """How many counted failures match `where` after `since`, and when the last one was."""
    count, last = session.execute(
        select(func.count(), func.max(LoginAttempt.at)).where(
            where, LoginAttempt.outcome.in_(FAILURES), LoginAttempt.at > since
        )
    ).one()
    return count, last


def _last_success(session: Session, where) -> datetime | None:  # noqa: ANN001
    return session.execute(
        select(func.max(LoginAttempt.at)).where(where, LoginAttempt.outcome == "ok")
    ).scalar_one()


def _delay_left(
    session: Session,
    where,
    since: datetime,
    now: datetime,  # noqa: ANN001
) -> timedelta:
    count, last = _counted(session, where, since)
    return max(timedelta(0), last + delay_after(count) - now) if last else timedelta(0)


def _account_wait(session: Session, where, now: datetime) -> timedelta:  # noqa: ANN001
    # Failures since the account's last success (a success ends a guessing run), within WINDOW.
    horizon = now - WINDOW
    since = max(horizon, _last_success(session, where) or horizon)
    return _delay_left(session, where, since, now)


def wait_remaining(
    session: Session, name: str, source: str, device: str | None, now: datetime
) -> timedelta:
    """How long this (name, source, device) must still wait before its attempt is checked."""
    mine = LoginAttempt.account == account_key(name)
    if device:
        this_device = and_(mine, LoginAttempt.device == device)
        trusted_at = _last_success(session, this_device)
        if trusted_at is not None and trusted_at > now - TRUSTED_FOR:
            # A trusted device: only its own failures on this account delay it.
            return _account_wait(session, this_device, now)
    return max(
        _account_wait(session, mine, now),
        _delay_left(session, LoginAttempt.source == source, now - WINDOW, now),
    )


def attempt(
    session: Session,
    name: str,
    password: str,
    *,
    source: str | None = None,
    device: str | None = None,
    now: datetime | None = None,
) -> Attempt:
    """Check one login attempt under the throttle and record it (in the caller's transaction).

    `source` is the client's address (None: unknown), `device` a digest of the browser's device
    token (None: it sent none). A throttled attempt does no password check at all, for known and
    unknown names alike, and is answered with the time left.
    """
    now = now or utcnow()
    name = name.strip()
    source = (source or NO_SOURCE)[:64]
    session.execute(delete(LoginAttempt).where(LoginAttempt.at < now - RETENTION))
    wait = wait_remaining(session, name, source, device, now)
    if wait > timedelta(0):
        user_id = session.execute(select(User.id).where(User.name == name)).scalar_one_or_none()
        result = Attempt(None, THROTTLED, wait.total_seconds(), user_id is not None)
    else:
        user, outcome = check_credentials(session, name, password)
        if user is None and outcome != "unknown user":
            user_id = session.execute(select(User.id).where(User.name == name)).scalar_one()
        else:
            user_id = user.id if user is not None else None
        result = Attempt(user, outcome, known=user_id is not None)
    session.add(
        LoginAttempt(
            at=now,
            account=account_key(name),
            user_id=user_id,
            source=source,
            device=device,
            outcome=result.outcome,
        )
    )
    session.flush()
    return result


@dataclass(frozen=True)
class FailureSummary:
    """Recent failed attempts of one account (its name; None: names that are no account) or
    one source address, with the delay it is under now."""

    who: str | None
    failures: int
    throttled: int
    last_at: datetime
    delay_s: float


def recent_failures(
    session: Session, *, now: datetime | None = None, since: timedelta = WINDOW
) -> tuple[list[FailureSummary], list[FailureSummary]]:
    """Failed and throttled attempts within `since`: per account and per source, most first.

    Names that are no account are summed into one row (who None): they are stored only as
    digests, and listing digests would show admins nothing useful.
    """
    now = now or utcnow()
    start = now - since
    refused = (*FAILURES, THROTTLED)
    failed = func.sum(case((LoginAttempt.outcome.in_(FAILURES), 1), else_=0))
    throttled = func.sum(case((LoginAttempt.outcome == THROTTLED, 1), else_=0))
    by_account = session.execute(
        select(User.name, failed, throttled, func.max(LoginAttempt.at))
        .select_from(LoginAttempt)
        .outerjoin(User, User.id == LoginAttempt.user_id)
        .where(LoginAttempt.at > start, LoginAttempt.outcome.in_(refused))
        .group_by(User.name)
    ).all()
    by_source = session.execute(
        select(LoginAttempt.source, failed, throttled, func.max(LoginAttempt.at))
        .where(LoginAttempt.at > start, LoginAttempt.outcome.in_(refused))
        .group_by(LoginAttempt.source)
    ).all()

    def account_delay(user_name: str | None) -> float:
        if user_name is None:
            return 0.0
        where = LoginAttempt.account == account_key(user_name)
        return _account_wait(session, where, now).total_seconds()

    def source_delay(source: str) -> float:
        where = LoginAttempt.source == source
        return _delay_left(session, where, now - WINDOW, now).total_seconds()

    accounts = [
        FailureSummary(who, int(f or 0), int(t or 0), last, account_delay(who))
        for who, f, t, last in by_account
    ]
    sources = [
        FailureSummary(src, int(f or 0), int(t or 0), last, source_delay(src))
        for src, f, t, last in by_source
    ]

    def order(s: FailureSummary) -> tuple:
        return (-s.failures, -s.throttled, s.who or "")

    return sorted(accounts, key=order), sorted(sources, key=order)
