"""Login throttling (db.login_throttle through dashboard.store.login) on SQLite and PostgreSQL:
progressive delays per account and per source address that never lock the owner out, the same
answer for known and unknown names, trusted devices, names stored only as digests, and the
admins' summary of recent failures. Time is passed in, so nothing here sleeps."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import select

from dashboard import store
from db import AuditEntry, LoginAttempt
from db import login_throttle as throttle
from db.models import utcnow
from db.users import add_user

PASSWORD = "the right one"


def _alice(database) -> None:  # noqa: ANN001
    with database.session() as s:
        add_user(s, "alice", "radiologist", PASSWORD, actor="test")


def test_the_right_password_works_once_the_delay_has_passed(database):
    _alice(database)
    t = utcnow()
    for i in range(8):  # each one after the previous delay, so each is checked and fails
        result = store.login(database, "alice", f"guess {i}", source="10.0.0.1", now=t)
        assert result.outcome == "wrong password"
        t += throttle.delay_after(i + 1) + timedelta(seconds=0.1)
    t -= timedelta(seconds=0.2)  # just inside the last delay
    refused = store.login(database, "alice", PASSWORD, source="10.0.0.2", now=t)
    assert refused.user is None and refused.outcome == "throttled"
    assert 0 < refused.retry_after_s <= throttle.MAX_DELAY.total_seconds()
    # Hammering during the delay neither extends it nor counts as failures.
    for _ in range(30):
        store.login(database, "alice", "more guessing", source="10.0.0.1", now=t)
    ok = store.login(database, "alice", PASSWORD, source="10.0.0.2", now=t + timedelta(seconds=0.2))
    assert ok.outcome == "ok" and ok.user is not None and ok.user.name == "alice"
    # A success ends the account's guessing run: the next wrong password is not delayed.
    assert store.login(
        database, "alice", "typo", source="10.0.0.2", now=t + timedelta(seconds=1)
    ).outcome == ("wrong password")


def test_known_and_unknown_names_get_the_same_answer_during_the_delay(database):
    _alice(database)
    t = utcnow()
    answers = {}
    # The same timeline for a known and an unknown name, each from its own address.
    for name, source in (("alice", "10.0.0.1"), ("ghost", "10.0.0.9")):
        seen = []
        for i in range(throttle.FREE_FAILURES + 3):
            when = t + timedelta(seconds=i / 2)
            r = store.login(database, name, "guess", source=source, now=when)
            seen.append((r.user, r.outcome == "throttled", r.retry_after_s))
        answers[name] = seen
    assert answers["alice"] == answers["ghost"]
    assert [throttled for _, throttled, _ in answers["alice"]] == [False] * 3 + [True] * 3
    # What the page shows depends only on (outcome == throttled, retry_after_s).
    with database.session() as s:
        audited = list(s.execute(select(AuditEntry.actor, AuditEntry.detail)))
        stored = list(s.execute(select(LoginAttempt.account, LoginAttempt.user_id)))
    text = json.dumps([[a, d] for a, d in audited]) + json.dumps([list(r) for r in stored])
    assert "ghost" not in text and "guess" not in text
    assert {a for a, d in audited if d.get("reason") in ("unknown user", "throttled")} >= {
        "anonymous"
    }
    # Unknown names are kept only as digests, throttled like any other name.
    assert throttle.account_key("ghost") in {account for account, _ in stored}


def test_delays_grow_per_account_and_per_source(database):
    _alice(database)
    t = utcnow()
    # Per account: each failure from a different address, the delay still doubles.
    waits = []
    for i in range(throttle.FREE_FAILURES + 3):
        store.login(database, "alice", "guess", source=f"10.1.0.{i}", now=t)
        with database.session() as s:
            waits.append(
                throttle.wait_remaining(s, "alice", f"10.2.0.{i}", None, t).total_seconds()
            )
        t += timedelta(minutes=5)  # past any delay so far
    assert waits[: throttle.FREE_FAILURES - 1] == [0.0] * (throttle.FREE_FAILURES - 1)
    grown = waits[throttle.FREE_FAILURES - 1 :]
    assert grown == sorted(grown) and len(set(grown)) == len(grown) and grown[0] > 0
    assert grown[1] == 2 * grown[0]

    # Per source: each failure on a different name, the address's delay doubles too.
    t += throttle.WINDOW
    waits = []
    for i in range(throttle.FREE_FAILURES + 3):
        store.login(database, f"name{i}", "guess", source="10.3.0.1", now=t)
        with database.session() as s:
            waits.append(
                throttle.wait_remaining(s, f"other{i}", "10.3.0.1", None, t).total_seconds()
            )
        t += timedelta(minutes=5)
    grown = waits[throttle.FREE_FAILURES - 1 :]
    assert waits[0] == 0.0 and grown[0] > 0 and grown[1] == 2 * grown[0]


def test_a_trusted_device_is_not_delayed_by_guesses_from_its_own_address(database):
    _alice(database)
    t = utcnow()
    ok = store.login(database, "alice", PASSWORD, source="127.0.0.1", device="dev-a", now=t)
    assert ok.outcome == "ok"
    t += timedelta(seconds=1)
    for i in range(10):  # a guesser on the same workstation, without alice's browser cookie
        store.login(database, "alice", f"guess {i}", source="127.0.0.1", now=t)
    assert store.login(database, "alice", PASSWORD, source="127.0.0.1", now=t).outcome == (
        "throttled"
    )
    ok = store.login(database, "alice", PASSWORD, source="127.0.0.1", device="dev-a", now=t)
    assert ok.outcome == "ok"
    # Another browser (device) is not trusted until it has logged in itself.
    other = store.login(database, "alice", PASSWORD, source="127.0.0.1", device="dev-b", now=t)
    assert other.outcome == "throttled"


def test_recent_failures_per_account_and_source(database):
    _alice(database)
    t = utcnow()
    for _ in range(throttle.FREE_FAILURES + 1):
        store.login(database, "alice", "guess", source="10.0.0.1", now=t)
    store.login(database, "ghost", "guess", source="10.0.0.2", now=t)
    store.login(database, "nobody", "guess", source="10.0.0.2", now=t)
    with database.session() as s:
        accounts, sources = throttle.recent_failures(s, now=t)
    by_who = {a.who: a for a in accounts}
    assert by_who["alice"].failures == throttle.FREE_FAILURES
    assert by_who["alice"].throttled == 1 and by_who["alice"].delay_s > 0
    assert by_who[None].failures == 2 and by_who[None].delay_s == 0
    assert [(x.who, x.failures) for x in sources] == [
        ("10.0.0.1", throttle.FREE_FAILURES),
        ("10.0.0.2", 2),
    ]
    # Old attempts are purged by the next one.
    store.login(database, "alice", PASSWORD, source="10.0.0.3", now=t + throttle.RETENTION * 2)
    with database.session() as s:
        assert s.execute(select(LoginAttempt.outcome)).scalars().all() == ["ok"]


def test_migration_0007_downgrades_and_upgrades(database):
    from alembic import command
    from sqlalchemy import inspect

    _alice(database)
    store.login(database, "alice", "guess", source="10.0.0.1")
    # To 0007 first (later migrations sit on top), then one step: 0007's parent may change.
    command.downgrade(database.alembic_config(), "0007")
    command.downgrade(database.alembic_config(), "-1")
    assert "login_attempts" not in inspect(database.engine).get_table_names()
    database.upgrade()
    assert "login_attempts" in inspect(database.engine).get_table_names()
    assert store.login(database, "alice", PASSWORD, source="10.0.0.1").outcome == "ok"
