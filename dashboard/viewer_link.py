"""The study page's "Open in OHIF" link: OHIF runs beside DICOMweb on the node's port, so the link
carries a DICOMweb bearer token for the logged-in user (one per dashboard session, short-lived,
audited when issued); OHIF takes it out of the address bar and sends it with every request."""

from __future__ import annotations

import os
import urllib.parse

from db.api_tokens import create_token
from db.models import UserRole
from db.session import Database

# Long enough for a reading session, short enough that a copied link soon stops working.
TOKEN_DAYS = 8 / 24
# Auditors read the audit trail, not images (DICOMweb refuses them too).
VIEWER_ROLES = frozenset({UserRole.RADIOLOGIST, UserRole.ADMIN})


def viewer_base(request_host: str | None) -> str | None:
    """OHIF's root as the browser reaches it: RADAI_VIEWER_URL, else the dashboard's host on
    RADAI_DICOMWEB_PORT; None when DICOMweb is off."""
    configured = os.environ.get("RADAI_VIEWER_URL", "").strip()
    if configured:
        return configured.rstrip("/")
    port = os.environ.get("RADAI_DICOMWEB_PORT", "8080").strip() or "8080"
    if port == "0":
        return None
    host = (request_host or "localhost").rsplit(":", 1)[0] if request_host else "localhost"
    if request_host and request_host.startswith("[") and "]" in request_host:
        host = request_host[: request_host.index("]") + 1]
    return f"http://{host}:{port}"


def ohif_url(base: str, study_uid: str, token: str) -> str:
    query = urllib.parse.urlencode({"StudyInstanceUIDs": study_uid, "token": token})
    return f"{base}/viewer?{query}"


def issue_token(db: Database, user_name: str) -> str:
    """A new short-lived DICOMweb token for `user_name` (audited as TOKEN_CREATED)."""
    with db.session() as s:
        _, token = create_token(s, user_name, days=TOKEN_DAYS, actor=f"dashboard:{user_name}")
    return token
