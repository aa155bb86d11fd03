"""DICOMweb bearer tokens: only a hash is stored; revoked, expired and disabled users' tokens
stop working; issuing and revoking are audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from db import ApiToken, AuditEntry
from db.api_tokens import check_token, create_token, list_tokens, revoke_token
from db.models import utcnow
from db.users import add_user, set_disabled


@pytest.fixture
def users(sqlite_db):  # noqa: ANN001, ANN201
    with sqlite_db.session() as s:
        add_user(s, "boss", "admin", "password-123", actor="test")
        add_user(s, "rad", "radiologist", "password-123", actor="test")
    return sqlite_db


def test_tokens_name_their_user_and_role_and_only_a_hash_is_stored(users) -> None:  # noqa: ANN001
    with users.session() as s:
        _, own = create_token(s, "rad", actor="cli:test")
        _, worker = create_token(s, "rad", role="worker", days=1, actor="cli:test")
    with users.session() as s:
        assert check_token(s, own).role == "radiologist"  # type: ignore[union-attr]
        assert check_token(s, worker).role == "worker"  # type: ignore[union-attr]
        assert check_token(s, own + "x") is None
        assert check_token(s, "radai_" + "A" * 43) is None
        stored = s.execute(select(ApiToken.token_hash)).scalars().all()
        assert own not in stored and worker not in stored and len(stored) == 2
        actions = s.execute(select(AuditEntry.action)).scalars().all()
        assert actions.count("token.created") == 2
        assert all(own not in str(e.detail) for e in s.execute(select(AuditEntry)).scalars())
        assert [r["user"] for r in list_tokens(s)] == ["rad", "rad"]


def test_revoked_expired_and_disabled_users_tokens_are_refused(users) -> None:  # noqa: ANN001
    with users.session() as s:
        first, revoked = create_token(s, "rad", actor="test")
        _, expiring = create_token(s, "rad", days=1, actor="test")
        _, boss = create_token(s, "boss", actor="test")
    with users.session() as s:
        revoke_token(s, first, actor="test")
        with pytest.raises(ValueError):
            revoke_token(s, first, actor="test")
    with users.session() as s:
        assert check_token(s, revoked) is None
        assert check_token(s, expiring) is not None
        assert check_token(s, expiring, now=utcnow() + timedelta(days=2)) is None
        assert check_token(s, boss) is not None
        add_user(s, "boss2", "admin", "password-123", actor="test")
        set_disabled(s, "boss", True, actor="boss2")
    with users.session() as s:
        assert check_token(s, boss) is None


@pytest.mark.parametrize(
    ("name", "kw"),
    [("nobody", {}), ("rad", {"role": "superuser"}), ("rad", {"days": 0})],
)
def test_bad_requests_for_tokens_are_refused(users, name: str, kw: dict) -> None:  # noqa: ANN001
    with users.session() as s, pytest.raises(ValueError):
        create_token(s, name, actor="test", **kw)


def test_migration_0010_downgrades_and_upgrades(database) -> None:  # noqa: ANN001
    from alembic import command
    from sqlalchemy import inspect

    command.downgrade(database.alembic_config(), "0010")
    command.downgrade(database.alembic_config(), "-1")  # relative: 0010's parent may change
    assert "api_tokens" not in inspect(database.engine).get_table_names()
    database.upgrade()
    assert "api_tokens" in inspect(database.engine).get_table_names()
    with database.session() as s:
        add_user(s, "rad", "radiologist", "password-123", actor="test")
        _, token = create_token(s, "rad", actor="test")
    with database.session() as s:
        assert check_token(s, token) is not None
