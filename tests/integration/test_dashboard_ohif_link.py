"""The study page's "Open in OHIF" on the processed sample study (the dashboard tests' template):
a link to /viewer for the study with a token that DICOMweb accepts as the logged-in user, one
token per session (not one per rerun), and no link for an auditor."""

from __future__ import annotations

import urllib.parse

import pytest
from streamlit.testing.v1 import AppTest

from db.api_tokens import check_token
from db.session import Database
from tests.integration import test_dashboard
from tests.integration.test_dashboard import LUNG1, _app, _audit, _login, _open_lung1

template = test_dashboard.template
dash = test_dashboard.dash


def _links(at: AppTest) -> list[str]:
    return [b.proto.url for b in at.get("link_button")]


def test_the_study_page_links_ohif_with_the_users_token(
    dash: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADAI_VIEWER_URL", "https://radai.example:8443")
    at = _open_lung1(_login(_app().run(), "drhouse"))
    assert not at.exception
    [url] = _links(at)
    parts = urllib.parse.urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://radai.example:8443/viewer"
    query = urllib.parse.parse_qs(parts.query)
    assert query["StudyInstanceUIDs"] == [LUNG1]
    with dash.session() as s:
        owner = check_token(s, query["token"][0])
    assert owner is not None and (owner.user, owner.role) == ("drhouse", "radiologist")
    at.run()  # a rerun keeps the session's token
    assert _links(at) == [url]
    [issued] = _audit(dash, "token.created")
    assert issued.actor == "dashboard:drhouse"
