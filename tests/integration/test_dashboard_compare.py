"""The study page's comparison with the prior study, through Streamlit's AppTest on a real
database: two synthetic CT studies of one patient (archive files, SEGs, findings of schema 3
written as the worker would), the prior beside the current with one slider, the tracked nodule
outlined in both images (checked in the images' pixels), the prior's opening audited; a result
without a prior says why, and a prior of another patient is refused.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from dashboard import store
from db import AuditEntry, Job, Study, StudyState
from db.findings import Findings, Lesion, LesionChange
from db.session import Database
from db.users import add_user
from tests.kit.ct_studies import CTStudy, record
from tests.kit.paths import REPO

APP = str(REPO / "dashboard" / "app.py")
PASSWORD = "correct horse battery"
T_A, T_N, T_R = "2.25.1001", "2.25.1002", "2.25.1003"  # grown, new, resolved nodules
NO_PRIOR = "no earlier CT of this patient"
OTHER_PATIENT_PRIOR = "1.2.826.0.1.3680043.8.498.77"
MISMATCHED = "1.2.826.0.1.3680043.8.498.78"
REMOTE = "1.2.826.0.1.3680043.8.498.79"  # its prior was fetched from a PACS, never stored

# The current study: 2.5 mm slices; the prior: 5 mm slices from another table position.
CURRENT = CTStudy(
    "CMP1",
    "20240701",
    slices=40,
    spacing_z=2.5,
    nodules=[(1, 24, 6.0), (2, 8, 4.0)],
    tracking_uids={1: T_A, 2: T_N},
)
PRIOR = CTStudy(
    "CMP1",
    "20240101",
    slices=24,
    spacing_z=5.0,
    first_z=-300.0,
    nodules=[(1, 18, 4.0), (2, 9, 5.0)],
    tracking_uids={1: T_R, 2: T_A},
)


def _lesion(label: int, z: int, uid: str, tid: str, change: LesionChange | None = None) -> Lesion:
    return Lesion(
        label=label,
        volume_mm3=900.0,
        max_3d_diameter_mm=12.0,
        max_2d_axial_diameter_mm=12.0,
        slice_index=z,
        centroid_zyx=(z * 2.5, 33.6, 43.4),
        tracking_uid=uid,
        tracking_id=tid,
        change=change,
    )


def _findings(**kw) -> Findings:  # noqa: ANN003
    return Findings(screening_probability=0.7, priority=2, lung_volume_ml=900.0, **kw)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("compare")
    path = root / "template.sqlite"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    grown = LesionChange(
        prior_study_uid=PRIOR.study_uid,
        prior_volume_mm3=520.0,
        volume_change_pct=73.0,
        doubling_time_days=231.0,
        prior_label=2,
        interval_days=182.0,
    )
    record(
        db,
        CURRENT,
        root,
        _findings(
            lesions=(
                _lesion(1, 24, T_A, "Nodule A", grown),
                _lesion(2, 8, T_N, "Nodule N"),
            ),
            prior_study_uid=PRIOR.study_uid,
            follow_up={"registration": {"lung_dice_after": 0.93, "ncc_after": 0.81}},
        ),
    )
    record(
        db,
        PRIOR,
        root,
        _findings(
            lesions=(_lesion(1, 18, T_R, "Nodule R"), _lesion(2, 9, T_A, "Nodule A")),
            prior_reason=NO_PRIOR,
        ),
    )
    with db.session() as s:
        # A result whose recorded prior is another patient's study: refused, never shown.
        other = Study(study_uid=OTHER_PATIENT_PRIOR, state=StudyState.DONE, patient_id="OTHER")
        mismatched = Study(study_uid=MISMATCHED, state=StudyState.DONE, patient_id="CMP1")
        remote = Study(study_uid=REMOTE, state=StudyState.DONE, patient_id="CMP1")
        s.add_all([other, mismatched, remote])
        s.flush()
        for study, findings in (
            (mismatched, _findings(prior_study_uid=OTHER_PATIENT_PRIOR)),
            (
                remote,
                _findings(
                    prior_study_uid="1.2.826.0.1.3680043.8.498.80",
                    follow_up={"prior_source": "PACS@10.0.0.9:104"},
                ),
            ),
        ):
            s.add(
                Job(
                    study_id=study.id,
                    pipeline="radai-test",
                    pipeline_version="0",
                    input_hash=study.study_uid[-2:] * 32,
                    state="DONE",
                    findings=findings.to_json(),
                )
            )
        add_user(s, "drhouse", "radiologist", PASSWORD, actor="test")
    db.dispose()
    yield path


@pytest.fixture
def dash(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    path = tmp_path / "radai.sqlite"
    path.write_bytes(template.read_bytes())
    url = f"sqlite:///{path}"
    monkeypatch.setenv("RADAI_DATABASE_URL", url)
    monkeypatch.setenv("RADAI_SESSION_MINUTES", "30")
    db = Database(url)
    yield db
    db.dispose()


def _study_page(study_uid: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.text_input(key="login_name").input("drhouse")
    at.text_input(key="login_password").input(PASSWORD)
    at.form_submit_button[0].click().run()
    at.session_state["study_uid"] = study_uid
    return at.switch_page("views/study.py").run()


def _job_id(db: Database, study_uid: str) -> int:
    with db.session() as s:
        return s.execute(
            select(Job.id).join(Study).where(Study.study_uid == study_uid)
        ).scalar_one()


def _highlighted(src: str) -> int:
    """Pixels of the comparison's yellow outline in a JPEG data URI (JPEG shifts colours a
    little and smears a thin ring: yellow is where red and green stand well above blue)."""
    assert src.startswith("data:image/jpeg;base64,") and "/media/" not in src
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((r > 170) & (g > 150) & (r - b > 90) & (g - b > 90)).sum())


def _audit(db: Database, action: str) -> list[AuditEntry]:
    with db.session() as s:
        return list(
            s.execute(select(AuditEntry).where(AuditEntry.action == action)).scalars().all()
        )


def test_prior_beside_current_with_linked_slices_and_the_nodule_outlined_in_both(dash):
    job = _job_id(dash, CURRENT.study_uid)
    at = _study_page(CURRENT.study_uid)
    assert not at.exception
    assert "Compare with prior" in [h.value for h in at.subheader]
    assert len(at.image) == 1  # nothing of the prior loaded (or audited) before it is asked for
    assert _audit(dash, "study.opened") == []

    at.toggle(key=f"cmp_on_{job}").set_value(True).run()
    assert not at.exception
    [opened] = _audit(dash, "study.opened")
    assert (opened.actor, opened.study_uid) == ("drhouse", PRIOR.study_uid)
    assert opened.detail == {"as_prior_of": CURRENT.study_uid}
    selector = at.selectbox(key=f"cmp_nodule_{job}")
    assert selector.options == [
        "Nodule A · volume +73% · doubling time 231 d",
        "Nodule N · new since the prior",
        "Nodule R · not found in this study",
    ]
    assert selector.value == 0  # the nodule seen in both
    assert len(at.image) == 3  # the study viewer, then prior and current
    prior, current = at.image[1], at.image[2]
    # Opened on the nodule: current slice 24, prior slice 9 (1-based in captions).
    assert at.slider(key=f"cmp_slice_{job}").value == 25
    assert prior.captions[0].startswith("Prior · slice 10 of 24 · Nodule A outlined")
    assert "linked by nodule" in prior.captions[0]
    assert current.captions[0].startswith("Current · slice 25 of 40 · Nodule A outlined")
    assert _highlighted(prior.value[0]) > 40 and _highlighted(current.value[0]) > 40

    # One slider scrolls both: 4 current slices (10 mm) away is 2 prior slices, past the nodule.
    at.slider(key=f"cmp_slice_{job}").set_value(29).run()
    prior, current = at.image[1], at.image[2]
    assert prior.captions[0].startswith("Prior · slice 12 of 24 · Nodule A not on this slice")
    assert current.captions[0].startswith("Current · slice 29 of 40 · Nodule A not on this slice")
    assert _highlighted(prior.value[0]) == 0 and _highlighted(current.value[0]) == 0

    # A nodule gone since the prior: scrolled to, outlined in the prior only.
    at.selectbox(key=f"cmp_nodule_{job}").set_value(2).run()
    assert not at.exception
    prior, current = at.image[1], at.image[2]
    assert prior.captions[0].startswith("Prior · slice 19 of 24 · Nodule R outlined")
    assert "linked by relative position" in prior.captions[0]
    assert "not in this study's SEG" in current.captions[0]
    assert _highlighted(prior.value[0]) > 20 and _highlighted(current.value[0]) == 0
    assert len(_audit(dash, "study.opened")) == 1  # reruns do not open the prior again


def test_a_result_without_prior_says_why_and_a_prior_of_another_patient_is_refused(dash):
    at = _study_page(PRIOR.study_uid)
    assert not at.exception
    assert any(f"No comparison with a prior study: {NO_PRIOR}" in i.value for i in at.info)
    assert not [t for t in at.toggle if (t.key or "").startswith("cmp_on_")]

    at = _study_page(MISMATCHED)
    assert not at.exception
    assert any("of another patient" in e.value for e in at.error)
    assert not [t for t in at.toggle if (t.key or "").startswith("cmp_on_")]
    assert _audit(dash, "study.opened") == []

    at = _study_page(REMOTE)
    assert not at.exception
    assert any("came from PACS@10.0.0.9:104" in i.value for i in at.info)
    assert not [t for t in at.toggle if (t.key or "").startswith("cmp_on_")]


def test_the_prior_is_read_with_the_permission_to_read_studies(dash):
    with dash.session() as s:
        auditor = store.SessionUser(1, "eve", "auditor")
        with pytest.raises(store.Forbidden):
            store.prior_for_comparison(s, PRIOR.study_uid, patient_id="CMP1", user=auditor)
        doctor = store.SessionUser(2, "drhouse", "radiologist")
        got = store.prior_for_comparison(s, PRIOR.study_uid, patient_id="CMP1", user=doctor)
        assert got is not None and len(got["series_paths"]) == PRIOR.slices
        assert got["seg_path"] and got["findings"].prior_reason == NO_PRIOR
        assert store.prior_for_comparison(s, "1.2.3.404", patient_id="CMP1", user=doctor) is None
