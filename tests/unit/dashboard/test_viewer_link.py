"""The study page's OHIF link: where it points and the token it carries."""

from __future__ import annotations

import urllib.parse

import pytest

from dashboard import viewer_link
from db.api_tokens import check_token
from db.session import Database
from db.users import add_user


def test_the_link_opens_the_study_with_a_token() -> None:
    url = viewer_link.ohif_url("http://node:8080", "1.2.3", "radai_abc")
    parts = urllib.parse.urlsplit(url)
    assert (parts.netloc, parts.path) == ("node:8080", "/viewer")
    assert urllib.parse.parse_qs(parts.query) == {
        "StudyInstanceUIDs": ["1.2.3"],
        "token": ["radai_abc"],
    }


def test_the_base_follows_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADAI_VIEWER_URL", raising=False)
    monkeypatch.setenv("RADAI_DICOMWEB_PORT", "9090")
    assert viewer_link.viewer_base("pacs.example:8501") == "http://pacs.example:9090"
    assert viewer_link.viewer_base("[::1]:8501") == "http://[::1]:9090"
    assert viewer_link.viewer_base(None) == "http://localhost:9090"
    monkeypatch.setenv("RADAI_DICOMWEB_PORT", "0")
    assert viewer_link.viewer_base("pacs.example:8501") is None
    monkeypatch.setenv("RADAI_VIEWER_URL", "https://radai.example/")
    assert viewer_link.viewer_base("pacs.example:8501") == "https://radai.example"


def test_the_token_reads_as_the_user_and_expires(sqlite_db: Database) -> None:
    with sqlite_db.session() as s:
        add_user(s, "dr_link", "radiologist", "link battery staple", actor="test")
    token = viewer_link.issue_token(sqlite_db, "dr_link")
    with sqlite_db.session() as s:
        owner = check_token(s, token)
        assert owner is not None and (owner.user, owner.role) == ("dr_link", "radiologist")
        from datetime import timedelta

        from db.models import utcnow

        later = utcnow() + timedelta(days=viewer_link.TOKEN_DAYS, minutes=1)
        assert check_token(s, token, now=later) is None


def test_the_link_is_offered_to_the_roles_dicomweb_lets_read() -> None:
    from dicomweb.auth import PERMISSIONS, READ

    assert viewer_link.VIEWER_ROLES <= PERMISSIONS[READ]
    assert "auditor" not in viewer_link.VIEWER_ROLES
