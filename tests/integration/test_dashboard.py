"""The dashboard through Streamlit's AppTest: login first (nothing of a patient before it, wrong
passwords refused and audited), the worklist in priority order with filters and the admins'
retry, the study viewer and reviews (stored and audited), and the audit page's chain check before
and after tampering.

One real study is built once per module: the lung1 sample sent with storescu to a running node
and processed by the pipeline (archive files, SEG, SR, saliency, findings); each test works on
its own copy of that database.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from db import AuditEntry, Job, OutboxMessage, Review, Study, StudyState
from db import login_throttle as throttle
from db.flags import FlagKind, add_flag
from db.models import utcnow
from db.session import Database
from db.users import add_user
from dicom_node.archive import Archive
from dicom_node.samples import sample_study_uid
from dicom_node.server import NodeConfig
from dicom_node.service import NodeService
from tests.conftest import RecordingPublisher, storescu, wait_for
from tests.helpers import study_state
from tests.kit.paths import REPO
from tests.unit.db.test_audit import _bypass_triggers
from workers import processing

APP = str(REPO / "dashboard" / "app.py")
LUNG1 = sample_study_uid("lung1")
PASSWORD = "correct horse battery"
USERS = {"drhouse": "radiologist", "root": "admin", "eve": "auditor"}
# Synthetic studies around the real one: (uid, priority, minutes after lung1, state, error)
EXTRA = [
    ("1.2.826.0.1.3680043.8.498.901", 2, 2, StudyState.DONE, None),
    ("1.2.826.0.1.3680043.8.498.902", 2, 1, StudyState.DONE, None),
    ("1.2.826.0.1.3680043.8.498.903", None, 3, StudyState.RECEIVING, None),
    ("1.2.826.0.1.3680043.8.498.904", None, -5, StudyState.FAILED, "pixel data undecodable"),
    ("1.2.826.0.1.3680043.8.498.905", 1, 4, StudyState.DONE, None),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, samples) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("dashboard")
    path = root / "template.sqlite"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    node = NodeService(
        db,
        Archive(root / "archive", root / "quarantine"),
        NodeConfig(host="127.0.0.1", port=0),
        stable_seconds=0.3,
        publish=RecordingPublisher(),
        poll_seconds=0.1,
        backoff_cap=1.0,
    )
    node.start()
    try:
        assert storescu(node.port, samples["lung1"]).returncode == 0
        wait_for(lambda: study_state(db, LUNG1) == StudyState.QUEUED)
    finally:
        node.stop()
    assert processing.process_study(db, LUNG1, root / "outputs") == "DONE"
    with db.session() as s:
        lung1 = s.execute(select(Study).where(Study.study_uid == LUNG1)).scalar_one()
        for uid, priority, minutes, state, error in EXTRA:
            s.add(
                Study(
                    study_uid=uid,
                    state=state,
                    priority=priority,
                    error=error,
                    patient_name=f"SYNTH^{uid[-3:]}",
                    patient_id=f"ID{uid[-3:]}",
                    study_date="20240101",
                    first_received_at=lung1.first_received_at + timedelta(minutes=minutes),
                    instance_count=3,
                )
            )
        for name, role in USERS.items():
            add_user(s, name, role, PASSWORD, actor="test")
    db.dispose()
    yield path


@pytest.fixture
def dash(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Database:
    """A private copy of the template database, which the app is pointed at."""
    path = tmp_path / "radai.sqlite"
    shutil.copy(template, path)
    url = f"sqlite:///{path}"
    monkeypatch.setenv("RADAI_DATABASE_URL", url)
    monkeypatch.setenv("RADAI_SESSION_MINUTES", "30")
    db = Database(url)
    yield db
    db.dispose()


def _text(at: AppTest) -> str:
    """Everything the page shows, as text (labels, values, tables)."""
    out = []

    def walk(node) -> None:  # noqa: ANN001
        for attr in ("label", "value", "body", "caption", "placeholder", "help"):
            try:
                v = getattr(node, attr, None)
            except Exception:  # noqa: BLE001 - some element kinds raise for absent fields
                v = None
            if v is not None:
                out.append(v.to_csv() if hasattr(v, "to_csv") else str(v))
        options = getattr(node, "options", None)
        if options:
            out.extend(map(str, options))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(out)


def _app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=60)


PAGE_FILES = {
    "Worklist": "views/worklist.py",
    "Study": "views/study.py",
    "Audit": "views/audit.py",
    "Monitoring": "views/monitoring.py",
    "Users": "views/users.py",
}


def _go(at: AppTest, title: str) -> AppTest:
    """Open a page as its sidebar link would."""
    return at.switch_page(PAGE_FILES[title]).run()


def _pages(at: AppTest) -> list[str]:
    """The pages this session's navigation offers (AppTest refuses to switch to any other).
    Leaves `at` set to the last page it tried."""
    offered = []
    for title, path in PAGE_FILES.items():
        try:
            at.switch_page(path)
        except ValueError:
            continue
        offered.append(title)
    return offered


def _login(at: AppTest, name: str, password: str = PASSWORD) -> AppTest:
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(password)
    return at.form_submit_button[0].click().run()


def _audit(db: Database, action: str | None = None) -> list[AuditEntry]:
    with db.session() as s:
        query = select(AuditEntry).order_by(AuditEntry.seq)
        if action:
            query = query.where(AuditEntry.action == action)
        return list(s.execute(query).scalars())


def test_login_is_required_and_failures_are_audited(dash):
    at = _app().run()
    assert not at.exception
    shown = _text(at)
    assert "DEMO" not in shown and "SYNTH" not in shown and LUNG1 not in shown
    assert not at.dataframe and "Log in" in shown

    _login(at, "drhouse", "not the password")
    assert at.error and "Wrong user name or password" in at.error[0].value
    assert "DEMO" not in _text(at)
    _login(at, "nobody", "hunter22")
    assert "DEMO" not in _text(at)

    failed = _audit(dash, "user.login_failed")
    assert [(e.actor, e.detail["reason"]) for e in failed] == [
        ("drhouse", "wrong password"),
        ("anonymous", "unknown user"),
    ]
    everything = json.dumps([[e.actor, e.detail] for e in _audit(dash)])
    assert "not the password" not in everything and "hunter22" not in everything

    _login(at, "drhouse")
    assert not at.exception
    assert "DEMO, LUNG1" in _text(at)
    [entry] = _audit(dash, "user.login")
    assert entry.actor == "drhouse" and entry.detail == {"role": "radiologist"}


def test_repeated_failures_delay_logins_but_never_lock_and_admins_see_them(dash):
    at = _app().run()
    for _ in range(throttle.FREE_FAILURES):
        _login(at, "drhouse", "not the password")
        assert "Wrong user name or password" in at.error[0].value
    # During the delay, the right password waits, and an unknown name gets the same words.
    _login(at, "drhouse")
    known = at.error[0].value
    assert "please wait" in known and not at.dataframe
    _login(at, "nobody", "not the password")
    # (The seconds left differ by the time between the two runs.)
    assert re.sub(r"\d+", "N", at.error[0].value) == re.sub(r"\d+", "N", known)
    time.sleep(throttle.delay_after(throttle.FREE_FAILURES).total_seconds() + 0.2)
    _login(at, "drhouse")
    assert not at.exception and "DEMO, LUNG1" in _text(at)

    admin = _login(_app().run(), "root")
    _go(admin, "Users")
    accounts = admin.dataframe[1].value  # after the accounts table
    row = accounts[accounts["Account"] == "drhouse"].iloc[0]
    assert (row["Failed"], row["Throttled"]) == (throttle.FREE_FAILURES, 1)
    assert "(names that are no account)" in set(accounts["Account"])
    assert "nobody" not in _text(admin) and "not the password" not in _text(admin)
    sources = admin.dataframe[2].value
    assert sources.iloc[0]["Failed"] == throttle.FREE_FAILURES


def test_session_expires_and_logout(dash):
    at = _login(_app().run(), "drhouse")
    assert at.dataframe
    at.session_state["activity"].last = time.time() - 31 * 60
    # A callback of a page left open past expiry does nothing (and does not revive the session).
    at.button(key="wl_open").click().run()
    assert "DEMO" not in _text(at) and not at.dataframe
    assert "expired" in at.info[0].value
    assert [e.actor for e in _audit(dash, "user.session_expired")] == ["drhouse"]
    assert _audit(dash, "study.opened") == []

    _login(at, "drhouse")
    at.button(key="logout").click().run()
    assert "DEMO" not in _text(at) and not at.dataframe
    assert [e.actor for e in _audit(dash, "user.logout")] == ["drhouse"]


def test_worklist_is_ordered_by_priority_then_arrival(dash):
    with dash.session() as s:
        lung1 = s.execute(select(Study).where(Study.study_uid == LUNG1)).scalar_one()
        lung1_priority = lung1.priority
    at = _login(_app().run(), "drhouse")
    table = at.dataframe[0].value
    rows = list(zip(table["Priority"], table["Study UID"], strict=True))
    arrival = {uid: minutes for uid, _, minutes, _, _ in EXTRA} | {LUNG1: 0}
    prio = {uid: p for uid, p, *_ in EXTRA} | {LUNG1: lung1_priority}
    expected = sorted(prio, key=lambda u: (prio[u] is None, prio[u] or 0, arrival[u]))
    assert [uid for _, uid in rows] == expected
    assert pd.isna(rows[-1][0])  # no priority sorts last
    lung1_row = table[table["Study UID"] == LUNG1].iloc[0]
    assert lung1_row["Patient"] == "DEMO, LUNG1" and lung1_row["Lesions"] >= 1
    assert lung1_row["Reviewed"] == "no" and 0 <= lung1_row["Suspicion"] <= 1
    failed = table[table["State"] == "FAILED"].iloc[0]
    assert failed["Error"] == "pixel data undecodable"
    # Radiologists get no retry button; filters narrow the list.
    assert not [b for b in at.button if b.key and b.key.startswith("retry_")]
    at.multiselect(key="f_states").set_value(["FAILED"]).run()
    assert list(at.dataframe[0].value["State"]) == ["FAILED"]


def test_admin_retries_a_failed_study(dash):
    at = _login(_app().run(), "root")
    failed_uid = EXTRA[3][0]
    at.button(key=f"retry_{failed_uid}").click().run()
    assert not at.exception
    assert at.success and "Retry queued" in at.success[0].value
    with dash.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == failed_uid)).scalar_one()
        [msg] = s.execute(select(OutboxMessage).where(OutboxMessage.study_uid == failed_uid))
        msg = msg[0]
    assert study.state == StudyState.STABLE and study.error is None
    assert msg.task == "radai.process_study" and msg.payload == {
        "study_uid": failed_uid,
        "instances": 3,
    }
    [entry] = _audit(dash, "study.retry")
    assert entry.actor == "root" and entry.study_uid == failed_uid


def _open_lung1(at: AppTest) -> AppTest:
    at.selectbox(key="wl_pick").set_value(LUNG1)
    return at.button(key="wl_open").click().run()


def test_study_viewer_and_review_are_stored_and_audited(dash):
    at = _open_lung1(_login(_app().run(), "drhouse"))
    assert not at.exception
    assert "DEMO, LUNG1" in at.header[0].value
    assert len(at.image) == 1
    [entry] = _audit(dash, "study.opened")
    assert entry.study_uid == LUNG1 and entry.actor == "drhouse"
    # Segments (lung and lesions) can be toggled; lesions can be jumped to.
    labels = [c.label for c in at.checkbox]
    assert "Lung" in labels and "Lesion 1" in labels
    with dash.session() as s:
        job = s.execute(select(Job)).scalars().one()
    lesion = job.findings["lesions"][0]
    at.slider(key=f"slice_{job.id}").set_value(1).run()
    at.button(key=f"goto_{job.id}_{lesion['label']}").click().run()
    assert at.slider(key=f"slice_{job.id}").value == lesion["slice_index"] + 1
    at.checkbox(key="saliency_on").check().run()
    at.radio(key="window").set_value("Mediastinum").run()
    assert not at.exception and len(at.image) == 1
    # The slice travels inline in the session, never as a /media/ URL that could be replayed.
    [src] = at.image[0].value
    assert src.startswith("data:image/jpeg;base64,") and "/media/" not in src
    downloads = [b.label for b in at.get("download_button")]
    assert downloads == ["Download SEG", "Download SR"]

    tag = f"{job.id}_{lesion['label']}_0"
    # No decision, or a rejection without a reason, is refused and nothing is stored.
    at.button(key=f"FormSubmitter:review_{tag}-Save review").click().run()
    assert at.error and "decision must be one of" in at.error[0].value
    at.radio(key=f"decision_{tag}").set_value("reject")
    at.button(key=f"FormSubmitter:review_{tag}-Save review").click().run()
    assert at.error and "reason is required" in at.error[0].value
    assert _audit(dash, "review.reject") == [] and at.radio(key=f"decision_{tag}").value == "reject"

    at.radio(key=f"decision_{tag}").set_value("accept")
    at.text_area(key=f"note_{tag}").input("solid nodule, as described")
    at.button(key=f"FormSubmitter:review_{tag}-Save review").click().run()
    assert not at.exception
    tag = f"{job.id}_{lesion['label']}_1"  # a saved review starts the next on fresh widgets
    at.radio(key=f"decision_{tag}").set_value("amend")
    at.text_input(key=f"reason_{tag}").input("diameter overestimated")
    at.button(key=f"FormSubmitter:review_{tag}-Save review").click().run()
    assert not at.exception

    with dash.session() as s:
        reviews = list(s.execute(select(Review).order_by(Review.id)).scalars())
    assert [(r.decision, r.lesion_label, r.job_id) for r in reviews] == [
        ("accept", lesion["label"], job.id),
        ("amend", lesion["label"], job.id),
    ]
    assert reviews[1].reason == "diameter overestimated"
    # Both models' names and versions: the segmenter drew the lesion, the screener scored it.
    assert (reviews[0].model_name, reviews[0].model_version) == (
        "radai-lung-lesion-unet+radai-lesion-screen-cnn",
        "1.0.0+2.0.0",
    )
    accepted, amended = _audit(dash, "review.accept") + _audit(dash, "review.amend")
    assert accepted.actor == amended.actor == "drhouse" and amended.study_uid == LUNG1
    assert amended.detail["reason"] == "diameter overestimated"
    assert amended.detail["review"] == reviews[1].id
    # The latest review wins on the page; the worklist now says reviewed.
    lesions = at.dataframe[0].value
    assert lesions.iloc[0]["Review"].startswith("amend by drhouse")
    _go(at, "Worklist")
    table = at.dataframe[0].value
    assert table[table["Study UID"] == LUNG1].iloc[0]["Reviewed"] == "yes"


HELD_UID = "1.2.826.0.1.3680043.8.498.906"
MIXED = "instances name 2 different patients"
CONFLICT = "second object for SOP Instance UID 1.2.3.9"


def test_held_study_shows_its_flags_and_is_released_with_a_reason(dash):
    with dash.session() as s:
        study = Study(study_uid=HELD_UID, state=StudyState.HELD, instance_count=4)
        study.patient_name, study.first_received_at = "HELD^CASE", utcnow()
        s.add(study)
        s.flush()
        for kind, reason, hold in (
            (FlagKind.PATIENTS_MIXED, MIXED, True),
            (FlagKind.INSTANCE_CONFLICT, CONFLICT, False),
        ):
            add_flag(s, study.id, HELD_UID, kind, reason, actor="node", hold=hold)
    at = _login(_app().run(), "drhouse")
    # HELD is a state of the filter, and the worklist shows every flag's reason.
    at.multiselect(key="f_states").set_value(["HELD"]).run()
    table = at.dataframe[0].value
    assert list(table["Study UID"]) == [HELD_UID] and list(table["State"]) == ["HELD"]
    assert table.iloc[0]["Flags"] == f"{MIXED}; {CONFLICT}"

    at.selectbox(key="wl_pick").set_value(HELD_UID)
    at = at.button(key="wl_open").click().run()
    assert not at.exception
    assert at.error and "HELD" in at.error[0].value and MIXED in at.error[0].value
    flags = at.dataframe[0].value
    assert list(flags["Kind"]) == ["patients_mixed", "instance_conflict"]
    assert list(flags["Reason"]) == [MIXED, CONFLICT] and all(flags["When (UTC)"])
    # No reason, no release.
    submit = f"FormSubmitter:release_{HELD_UID}_0-Release for analysis"
    at.button(key=submit).click().run()
    assert any("needs a reason" in e.value for e in at.error)
    assert _audit(dash, "study.released") == []
    at.text_input(key=f"release_reason_{HELD_UID}_0").input("one patient, renamed at the CT")
    at.button(key=submit).click().run()
    assert not at.exception
    assert at.success and "Released" in at.success[0].value
    assert not any("HELD:" in e.value for e in at.error)
    with dash.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == HELD_UID)).scalar_one()
        assert study.state == StudyState.STABLE and len(study.flags) == 2
    [entry] = _audit(dash, "study.released")
    assert entry.actor == "drhouse" and entry.detail["reason"] == "one patient, renamed at the CT"


def test_findings_without_screener_scores_show_a_dash(dash):
    """A result of the classical baseline (or before screener 2.0.0): no lesion probability."""
    with dash.session() as s:
        job = s.execute(select(Job)).scalars().one()
        findings = dict(job.findings)
        findings["pipeline"] = "baseline"
        findings["lesions"] = [
            {k: v for k, v in les.items() if k != "screening_probability"}
            for les in findings["lesions"]
        ]
        job.findings = findings
    at = _open_lung1(_login(_app().run(), "drhouse"))
    assert not at.exception
    lesions = at.dataframe[0].value
    assert set(lesions["Screener probability"]) == {"-"}
    assert "analysis baseline" in _text(at)


def test_the_malignancy_score_is_shown_with_what_it_means(dash):
    with dash.session() as s:
        job = s.execute(select(Job)).scalars().one()
        findings = dict(job.findings)
        findings["lesions"] = [{**les, "malignancy_score": 0.81} for les in findings["lesions"]]
        job.findings = findings
    at = _open_lung1(_login(_app().run(), "drhouse"))
    assert not at.exception
    lesions = at.dataframe[0].value
    assert set(lesions["Malignancy rating 4-5"]) == {"81%"}
    assert "not pathology" in " ".join(c.value for c in at.caption)


def test_roles_limit_the_pages(dash):
    at = _login(_app().run(), "eve")
    assert at.header[0].value == "Audit trail"  # the role's first page
    assert "DEMO" not in at.dataframe[0].value.to_csv()
    assert _pages(at) == ["Audit", "Monitoring"]
    at = _login(_app().run(), "drhouse")
    assert at.header[0].value == "Worklist"
    assert _pages(at) == ["Worklist", "Study", "Monitoring"]
    at = _login(_app().run(), "root")
    assert _pages(at) == [
        "Worklist",
        "Study",
        "Audit",
        "Monitoring",
        "Users",
    ]


@pytest.mark.parametrize("name", ["drhouse", "eve"])
def test_non_admins_cannot_reach_user_management(dash, name):
    at = _login(_app().run(), name)
    assert "Users" not in _pages(at)
    # The page does not exist for this session: asking for it anyway (as a crafted address
    # would) is refused, and what runs is one of the role's own pages. The store refuses
    # account changes by non-admins too (test_dashboard_db).
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(PAGE_FILES["Users"])
    at = at.run()
    assert not at.exception
    assert not [h for h in at.header if h.value == "Users"]
    assert "u_new_name" not in [t.key for t in at.text_input]
    assert "correct horse" not in _text(at)


def test_admin_manages_users_and_every_change_is_audited(dash):
    at = _login(_app().run(), "root")
    _go(at, "Users")
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["User"]) == sorted(USERS) and set(table["Status"]) == {"enabled"}
    assert "password" not in " ".join(table.columns).lower()

    # Add: mismatched and short passwords are refused with a message; nothing is stored.
    at.text_input(key="u_new_name").input("newdoc")
    at.selectbox(key="u_new_role").set_value("radiologist")
    at.text_input(key="u_new_pw").input("first password")
    at.text_input(key="u_new_pw2").input("other password")
    at.button(key="FormSubmitter:add_user-Add user").click().run()
    assert at.error and "passwords differ" in at.error[0].value
    at.text_input(key="u_new_name").input("newdoc")
    at.text_input(key="u_new_pw").input("short")
    at.text_input(key="u_new_pw2").input("short")
    at.button(key="FormSubmitter:add_user-Add user").click().run()
    assert at.error and "at least 8" in at.error[0].value
    at.text_input(key="u_new_name").input("newdoc")
    at.selectbox(key="u_new_role").set_value("auditor")
    at.text_input(key="u_new_pw").input("first password")
    at.text_input(key="u_new_pw2").input("first password")
    at.button(key="FormSubmitter:add_user-Add user").click().run()
    assert at.success and "newdoc added as auditor" in at.success[0].value
    table = at.dataframe[0].value
    assert table[table["User"] == "newdoc"].iloc[0]["Role"] == "auditor"
    assert _pages(_login(_app().run(), "newdoc", "first password")) == [
        "Audit",
        "Monitoring",
    ]

    # Disable: the user can no longer log in; an admin cannot disable themselves.
    at.selectbox(key="u_target").set_value("root").run()
    at.button(key="u_toggle").click().run()
    assert at.error and "your own account" in at.error[0].value
    at.selectbox(key="u_target").set_value("drhouse").run()
    at.button(key="u_toggle").click().run()
    assert at.success and "drhouse disabled" in at.success[0].value
    other = _login(_app().run(), "drhouse")
    assert other.error and not other.dataframe
    at.button(key="u_toggle").click().run()  # now labelled "Enable drhouse"
    assert at.success and "drhouse enabled" in at.success[0].value

    # Reset: the old password stops working, the new one works, open sessions end.
    open_session = _login(_app().run(), "drhouse")
    at.text_input(key="u_reset_pw").input("a brand new secret")
    at.text_input(key="u_reset_pw2").input("a brand new secret")
    at.button(key="FormSubmitter:reset_password-Reset password of drhouse").click().run()
    assert at.success and "Password of drhouse reset" in at.success[0].value
    assert _login(_app().run(), "drhouse").error
    assert _login(_app().run(), "drhouse", "a brand new secret").dataframe
    open_session.run()
    assert not open_session.dataframe and "password was reset" in open_session.info[0].value

    changes = [
        (e.actor, e.action, e.detail.get("name"))
        for e in _audit(dash)
        if e.action in ("user.added", "user.disabled", "user.enabled", "user.password_reset")
    ]
    assert changes[-4:] == [
        ("root", "user.added", "newdoc"),
        ("root", "user.disabled", "drhouse"),
        ("root", "user.enabled", "drhouse"),
        ("root", "user.password_reset", "drhouse"),
    ]
    [ended] = _audit(dash, "user.session_ended")
    assert (ended.actor, ended.detail) == ("drhouse", {"reason": "password reset"})
    everything = json.dumps([e.detail for e in _audit(dash)])
    assert "first password" not in everything and "brand new secret" not in everything


def test_monitoring_page_shows_the_reviewed_real_study(dash):
    with dash.session() as s:
        job = s.execute(select(Job)).scalars().one()
    lesions = [les["label"] for les in job.findings["lesions"]]
    at = _open_lung1(_login(_app().run(), "drhouse"))
    tag = f"{job.id}_{lesions[0]}_0"
    at.radio(key=f"decision_{tag}").set_value("accept")
    at.button(key=f"FormSubmitter:review_{tag}-Save review").click().run()
    assert not at.exception

    at = _login(_app().run(), "eve")
    _go(at, "Monitoring")
    assert not at.exception
    models = at.dataframe[0].value
    [row] = models.to_dict("records")
    for name, version in (
        ("radai-lung-lesion-unet", "1.0.0"),
        ("radai-lesion-screen-cnn", "2.0.0"),
    ):
        assert f"{name} {version}" in row["Model version"]
    assert (row["Jobs"], row["Done"], row["Findings"]) == (1, 1, len(lesions))
    assert (row["Reviewed"], row["Accepted"], row["Acceptance"]) == (1, 1, "100%")
    assert row["Received→result median"] != "-" and row["Result→review median"] != "-"
    # Six studies arrived (lung1 and the synthetic ones), shown in the metrics and per day.
    assert [(x.label, x.value) for x in at.metric] == [
        ("Studies", "6"),
        ("Done", "4"),
        ("Failed", "1"),
        ("Not applicable", "0"),
        ("Held", "0"),
        ("Reviewed findings", "1"),
        ("Accepted", "100%"),
    ]
    assert len(at.get("vega_lite_chart")) == 3  # decisions, turnaround, studies per day
    # The synthetic FAILED study has no job: it is counted with its reason among studies.
    failures = at.dataframe[1].value
    assert failures.to_dict("records") == [
        {"State": "FAILED", "Reason": "pixel data undecodable", "Studies": 1}
    ]
    assert "DEMO" not in _text(at) and LUNG1 not in _text(at)


def test_amend_with_corrected_measurements(dash):
    with dash.session() as s:
        job = s.execute(select(Job)).scalars().one()
    lesion = job.findings["lesions"][0]
    at = _open_lung1(_login(_app().run(), "drhouse"))
    tag = f"{job.id}_{lesion['label']}_0"
    submit = f"FormSubmitter:review_{tag}-Save review"
    axial = f"corr_max_2d_axial_diameter_mm_{tag}"
    at.radio(key=f"decision_{tag}").set_value("amend")
    at.text_input(key=f"reason_{tag}").input("measured on the lung window")
    at.number_input(key=axial).set_value(-4.0)
    at.button(key=submit).click().run()
    assert at.error and "positive number of mm" in at.error[0].value
    at.number_input(key=axial).set_value(900.0)
    at.button(key=submit).click().run()
    assert at.error and "between 0.5 and 300 mm" in at.error[0].value
    assert _audit(dash, "review.amend") == []

    corrected = round(lesion["max_2d_axial_diameter_mm"] * 0.8, 1)
    place = next(
        p for p in ("left lung, lower zone", "right lung, upper zone") if p != lesion["location"]
    )
    at.number_input(key=axial).set_value(corrected)
    at.selectbox(key=f"corr_location_{tag}").set_value(place)
    at.button(key=submit).click().run()
    assert not at.exception and not at.error
    with dash.session() as s:
        [review] = s.execute(select(Review)).scalars()
    assert review.decision == "amend" and review.corrections == {
        "max_2d_axial_diameter_mm": {
            "model": lesion["max_2d_axial_diameter_mm"],
            "corrected": corrected,
        },
        "location": {"model": lesion["location"], "corrected": place},
    }
    [entry] = _audit(dash, "review.amend")
    assert entry.detail["corrections"] == review.corrections
    # The study view shows the corrected values beside the model's, in the lesion table and
    # in the history; the audit page shows the entry's detail.
    table = at.dataframe[0].value
    assert table.iloc[0]["Screener probability"] == f"{lesion['screening_probability']:.0%}"
    shown = table.iloc[0]["Corrected by reader"]
    assert f"long-axis diameter {corrected:g} mm" in shown
    assert f"(model {lesion['max_2d_axial_diameter_mm']:g})" in shown
    assert place in shown
    assert f"{corrected:g} mm" in at.dataframe[1].value.iloc[0]["Corrections"]
    at = _login(_app().run(), "eve")
    at.text_input(key="a_study").input(LUNG1).run()
    audit_rows = at.dataframe[0].value
    amend = audit_rows[audit_rows["Action"] == "review.amend"].iloc[0]
    assert f'"corrected": "{place}"' in amend["Detail"]


def test_audit_page_verifies_and_finds_tampering(dash):
    at = _login(_app().run(), "eve")
    assert not at.exception
    at.selectbox(key="a_actor").set_value("eve").run()
    assert set(at.dataframe[0].value["Action"]) == {"user.login"}
    at.selectbox(key="a_actor").set_value("any")
    at.text_input(key="a_study").input(LUNG1).run()
    actions = set(at.dataframe[0].value["Action"])
    assert {"study.received", "job.started", "job.done"} <= actions
    at.datetime_input(key="a_since").set_value(utcnow().replace(tzinfo=None) + timedelta(hours=1))
    at.run()
    assert at.dataframe[0].value.empty

    at.button(key="verify_chain").click().run()
    assert at.success and "Chain OK" in at.success[0].value
    _bypass_triggers(dash, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    at.button(key="verify_chain").click().run()
    assert at.error and "BROKEN at seq 2" in at.error[0].value
    assert "altered" in at.error[0].value
