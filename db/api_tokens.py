"""Bearer tokens for DICOMweb: issued to a dashboard user (for scripts) or as a "worker" token,
checked on every request; only a SHA-256 of each token is stored, so the table leaks nothing
usable. Tokens are 256 random bits, so a fast hash is enough (no guessing to slow down).

Issuing and revoking are audited; a token answers for its user: a disabled user's tokens stop
working at once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import audit
from db.audit_actions import AuditAction
from db.models import ApiToken, User, UserRole, utcnow

WORKER_ROLE = "worker"
TOKEN_ROLES = frozenset({*UserRole, WORKER_ROLE})
_PREFIX = "radai_"


@dataclass(frozen=True)
class TokenOwner:
    """Who a valid token speaks for and what it may do."""

    token_id: int
    user: str
    role: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    session: Session,
    user_name: str,
    *,
    role: str | None = None,
    days: float | None = None,
    actor: str,
) -> tuple[int, str]:
    """(id, token) of a new token for `user_name`; the token itself is shown once, never stored.

    `role` defaults to the user's own; ValueError for an unknown or disabled user or role."""
    user = session.execute(select(User).where(User.name == user_name)).scalar_one_or_none()
    if user is None:
        raise ValueError(f"no user {user_name!r}")
    if user.disabled:
        raise ValueError(f"user {user_name!r} is disabled")
    role = role or user.role
    if role not in TOKEN_ROLES:
        raise ValueError(f"role must be one of {', '.join(sorted(TOKEN_ROLES))}, not {role!r}")
    if days is not None and days <= 0:
        raise ValueError("a token's lifetime must be positive")
    token = _PREFIX + secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(days=days) if days is not None else None
    row = ApiToken(user_id=user.id, token_hash=_digest(token), role=role, expires_at=expires)
    session.add(row)
    session.flush()
    audit.append(
        session,
        actor,
        AuditAction.TOKEN_CREATED,
        None,
        {
            "token_id": row.id,
            "user": user_name,
            "role": role,
            "expires_at": expires.isoformat() if expires else None,
        },
    )
    return row.id, token


def revoke_token(session: Session, token_id: int, *, actor: str) -> None:
    """Revoke a token by its id (audited); ValueError if there is none or it is revoked."""
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        raise ValueError(f"no active token {token_id}")
    row.revoked_at = utcnow()
    audit.append(session, actor, AuditAction.TOKEN_REVOKED, None, {"token_id": token_id})


def check_token(session: Session, token: str, *, now: datetime | None = None) -> TokenOwner | None:
    """Who `token` speaks for, or None if it is unknown, revoked, expired or its user disabled."""
    if not token.startswith(_PREFIX) or len(token) > 256:
        return None
    found = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == _digest(token))
    ).first()
    if found is None:
        return None
    row, user = found
    now = now or utcnow()
    if row.revoked_at is not None or user.disabled:
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return None
    return TokenOwner(token_id=row.id, user=user.name, role=row.role)


def list_tokens(session: Session) -> list[dict]:
    """Every token (never its hash): id, user, role, created, expires, revoked."""
    rows = session.execute(
        select(
            ApiToken.id,
            User.name.label("user"),
            ApiToken.role,
            ApiToken.created_at,
            ApiToken.expires_at,
            ApiToken.revoked_at,
        )
        .join(User, User.id == ApiToken.user_id)
        .order_by(ApiToken.id)
    )
    return [dict(r._mapping) for r in rows]
