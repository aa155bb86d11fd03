"""Dashboard accounts: adding, listing, disabling and enabling users, resetting and checking
passwords; every change is audited.

Passwords are hashed with scrypt from the standard library (n=2**14, r=8, p=1, a random 16-byte
salt per password) and compared in constant time; the stored string carries its parameters, so
stronger ones can be introduced later without invalidating existing hashes. Logins of unknown
users still spend one scrypt computation, so timing does not tell which names exist.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import audit
from db.audit_actions import AuditAction
from db.models import User, UserRole

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_LENGTH = 8
_MAXMEM = 64 * 1024 * 1024  # room above scrypt's 128*r*n (16 MiB) for the parameters above


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=length
    )


def hash_password(password: str) -> str:
    """The storable form of a password: `scrypt$n$r$p$salt$hash` with base64 salt and hash."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored` (as written by `hash_password`)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    # Verified against when the name is unknown, so that such a login costs as much as a real one.
    return hash_password(secrets.token_urlsafe(16))


def add_user(
    session: Session, name: str, role: str, password: str, *, actor: str = "admin"
) -> User:
    """Create an account (audited as "user.added"); ValueError for a bad name, role or password."""
    name = name.strip()
    if not name or len(name) > 64:
        raise ValueError("user name must be 1 to 64 characters")
    if role not in set(UserRole):
        raise ValueError(f"role must be one of {', '.join(UserRole)}, not {role!r}")
    _check_password(password)
    if session.execute(select(User.id).where(User.name == name)).first() is not None:
        raise ValueError(f"user {name!r} already exists")
    user = User(name=name, role=role, password_hash=hash_password(password), disabled=False)
    session.add(user)
    session.flush()
    audit.append(session, actor, AuditAction.USER_ADDED, None, {"name": name, "role": role})
    return user


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")


def list_users(session: Session) -> list[dict]:
    """Every account, by name: id, name, role, created_at, disabled (never the hash)."""
    rows = session.execute(
        select(User.id, User.name, User.role, User.created_at, User.disabled).order_by(User.name)
    )
    return [dict(r._mapping) for r in rows]


def _get(session: Session, name: str) -> User:
    user = session.execute(
        select(User).where(User.name == name).with_for_update()
    ).scalar_one_or_none()
    if user is None:
        raise ValueError(f"no user {name!r}")
    return user


def set_disabled(session: Session, name: str, disabled: bool, *, actor: str) -> User:
    """Disable or enable an account (audited as "user.disabled" / "user.enabled").

    ValueError for an unknown name, an account already in that state, an admin disabling
    themselves, or disabling the last enabled admin (nobody could manage accounts any more).
    """
    user = _get(session, name)
    if user.disabled == disabled:
        raise ValueError(f"user {name!r} is already {'disabled' if disabled else 'enabled'}")
    if disabled:
        if name == actor:
            raise ValueError("you cannot disable your own account")
        if user.role == UserRole.ADMIN:
            admins = session.execute(
                select(func.count())
                .select_from(User)
                .where(User.role == UserRole.ADMIN, User.disabled.is_(False))
            ).scalar_one()
            if admins <= 1:
                raise ValueError("the last enabled admin cannot be disabled")
    user.disabled = disabled
    session.flush()
    action = AuditAction.USER_DISABLED if disabled else AuditAction.USER_ENABLED
    audit.append(session, actor, action, None, {"name": name, "role": user.role})
    return user


def reset_password(session: Session, name: str, password: str, *, actor: str) -> User:
    """Give an account a new password (audited as "user.password_reset", without it)."""
    _check_password(password)
    user = _get(session, name)
    user.password_hash = hash_password(password)
    session.flush()
    audit.append(session, actor, AuditAction.USER_PASSWORD_RESET, None, {"name": name})
    return user


def check_credentials(session: Session, name: str, password: str) -> tuple[User | None, str]:
    """The user and "ok", or None and why not: "unknown user", "wrong password" or "disabled"."""
    user = session.execute(select(User).where(User.name == name.strip())).scalar_one_or_none()
    if user is None:
        verify_password(password, _dummy_hash())
        return None, "unknown user"
    if not verify_password(password, user.password_hash):
        return None, "wrong password"
    if user.disabled:
        return None, "disabled"
    return user, "ok"


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The enabled user with this name and password, else None."""
    return check_credentials(session, name, password)[0]
