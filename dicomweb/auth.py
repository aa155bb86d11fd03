"""Who may do what over DICOMweb: a bearer token (`db.api_tokens`) names a user and a role.

Reading (search, retrieve) is for radiologists, admins and workers; storing (STOW-RS) for admins
and workers. Auditors read the audit trail, not images. Without a token a request is refused
(401) unless anonymous access is configured, and then it may only read.
"""

from __future__ import annotations

from dataclasses import dataclass

from db.api_tokens import WORKER_ROLE, check_token
from db.models import UserRole
from db.session import Database
from dicomweb.errors import HttpError

READ, STORE = "read", "store"
ANONYMOUS = "anonymous"
PERMISSIONS: dict[str, frozenset[str]] = {
    READ: frozenset({UserRole.RADIOLOGIST, UserRole.ADMIN, WORKER_ROLE, ANONYMOUS}),
    STORE: frozenset({UserRole.ADMIN, WORKER_ROLE}),
}


@dataclass(frozen=True)
class Principal:
    user: str
    role: str

    @property
    def actor(self) -> str:
        return f"dicomweb:{self.user}"


class Unauthorized(HttpError):
    def __init__(self, reason: str) -> None:
        super().__init__(401, reason)


def identify(db: Database, authorization: str | None, *, anonymous: bool) -> Principal:
    """The principal of a request's Authorization header; 401 when it has none and anonymous
    access is off, or a token that is unknown, revoked, expired or of a disabled user."""
    if not authorization:
        if anonymous:
            return Principal(ANONYMOUS, ANONYMOUS)
        raise Unauthorized("a bearer token is required")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("only bearer tokens are accepted")
    with db.session() as s:
        owner = check_token(s, token.strip())
    if owner is None:
        raise Unauthorized("the token is not valid")
    return Principal(owner.user, owner.role)


def require(principal: Principal, what: str) -> None:
    """403 when the principal's role may not `what` (READ or STORE)."""
    if principal.role not in PERMISSIONS[what]:
        raise HttpError(403, f"role {principal.role} may not {what}")
