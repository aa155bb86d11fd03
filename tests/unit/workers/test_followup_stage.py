"""The worker's follow-up stage on a synthetic prior/follow-up pair with known truth
(ml.data.chest_phantom): tracking UIDs inherited by matched nodules and new for new ones, the
change filled in, growth raising the priority, and every bad prior refused with a reason."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from db.findings import Findings, Lesion
from dicom_io.series import Volume
from ml.data.chest_phantom import phantom_pair
from ml.image.lungs import segment_lungs
from ml.image.measure import measure_regions
from ml.runtime.followup import RegistrationRefused, tracking_uid
from workers.pipeline.analysers import Analysis
from workers.pipeline.followup import FollowUpResult, compare_with_prior, new_tracking, nodule_id
from workers.pipeline.prior import (
    Prior,
    PriorUnusable,
    check_ct,
    check_same_patient,
    interval_days,
)

UID = re.compile(r"^2\.25\.[1-9][0-9]*$")
CURRENT_UID = "1.2.826.0.1.3680043.8.498.2"
PRIOR_UID = "1.2.826.0.1.3680043.8.498.1"


def _datasets(n: int, series: str, **tags: str) -> list[Dataset]:
    out = []
    for i in range(n):
        ds = Dataset()
        ds.PatientID = "PAT-1"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "F"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = f"{series}.{i + 1}"
        for key, value in tags.items():
            setattr(ds, key, value)
        out.append(ds)
    return out


def _volume(hu: np.ndarray, spacing, series: str, **tags: str) -> Volume:
    return Volume(
        hu=hu.astype(np.float32),
        spacing_zyx=tuple(float(s) for s in spacing),
        origin_xyz=(0.0, 0.0, 0.0),
        row_cosine=(1.0, 0.0, 0.0),
        column_cosine=(0.0, 1.0, 0.0),
        datasets=_datasets(hu.shape[0], series, **tags),
        paths=[],
    )


def _analysis(hu: np.ndarray, labels: np.ndarray, spacing) -> Analysis:
    lungs = segment_lungs(hu, spacing)
    return Analysis(
        lung_mask=lungs,
        lesion_labels=labels,
        lesions=measure_regions(labels, np.asarray(spacing, dtype=float)),
        lesion_probabilities=[None] * int(labels.max()),
        lung_volume_ml=float(lungs.sum() * np.prod(spacing) / 1000),
        screening_probability=0.1,
        triage_score=0.1,
        priority=3,
        saliency=np.zeros(1),
    )


class NoAnalyser:
    """The prior comes with its SEG's labels: the stage must not analyse it again."""

    name = "none"

    def analyse(self, *_args):  # noqa: ANN202
        raise AssertionError("a prior with a SEG was analysed again")


@pytest.fixture(scope="module")
def case():
    pair = phantom_pair()
    current = _volume(pair.current, pair.spacing, "1.2.3.2")
    analysis = _analysis(pair.current, pair.current_labels, pair.spacing)
    prior_lungs = segment_lungs(pair.prior, pair.prior_spacing)
    prior_lesions = tuple(
        Lesion(
            label=m.label,
            volume_mm3=m.voxel_volume_mm3,
            max_3d_diameter_mm=m.max_3d_diameter_mm,
            max_2d_axial_diameter_mm=m.max_2d_axial_diameter_mm,
            slice_index=0,
            centroid_zyx=(0.0, 0.0, 0.0),
            tracking_uid=f"2.25.{1000 + m.label}",
            tracking_id=nodule_id(10 + m.label),
        )
        for m in measure_regions(pair.prior_labels, np.asarray(pair.prior_spacing))
    )
    prior = Prior(
        study_uid=PRIOR_UID,
        study_date="20240101",
        source="local",
        volume=_volume(pair.prior, pair.prior_spacing, "1.2.3.1"),
        lesion_labels=pair.prior_labels,
        lung_mask=prior_lungs,
        lesions=prior_lesions,
        sop_refs=[("1.2.840.10008.5.1.4.1.1.2", "1.2.3.1.1")],
    )
    result = compare_with_prior(
        CURRENT_UID,
        "20240629",
        current,
        analysis,
        prior,
        NoAnalyser(),  # type: ignore[arg-type]
    )
    return pair, current, analysis, prior, result


def test_matched_nodules_inherit_the_prior_tracking_and_get_their_change(case):
    pair, _, _, _, result = case
    # Phantom truth: labels 1-4 are in both studies, 5 resolved, 6 new.
    for label in (1, 2, 3, 4):
        assert result.tracking[label] == (f"2.25.{1000 + label}", nodule_id(10 + label))
        change = result.changes[label]
        assert change.prior_study_uid == PRIOR_UID and change.prior_label == label
        assert change.interval_days == 180.0
    grew = result.changes[1]  # 6 mm -> 7.5 mm: (7.5/6)^3 - 1 = +95 %
    assert 60.0 < grew.volume_change_pct < 130.0
    assert grew.doubling_time_days is not None and 0 < grew.doubling_time_days < 400
    shrank = result.changes[4]  # 8 mm -> 6.5 mm
    assert shrank.volume_change_pct < -30.0
    assert shrank.doubling_time_days is not None and shrank.doubling_time_days < 0


def test_a_new_nodule_gets_a_new_uid_and_the_next_number(case):
    _, _, _, _, result = case
    assert 6 not in result.changes
    uid, ident = result.tracking[6]
    assert uid == tracking_uid(CURRENT_UID, 6) and UID.match(uid)
    assert ident == nodule_id(16)  # after the prior's highest, "Nodule 15"
    assert len({u for u, _ in result.tracking.values()}) == len(result.tracking)


def test_study_summary_counts_new_and_resolved_and_names_the_prior(case):
    _, _, _, _, result = case
    fu = result.follow_up
    assert (fu["matched"], fu["new"], fu["resolved"]) == (4, 1, 1)
    assert fu["resolved_tracking_uids"] == ["2.25.1005"]
    assert fu["sum_diameters_mm"] > 0 and fu["sum_diameters_prior_mm"] > 0
    assert fu["registration"]["ok"] is True and fu["registration"]["lung_dice_after"] > 0.85
    assert result.prior_study_uid == PRIOR_UID and result.prior_reason is None
    assert result.prior_refs is not None and result.prior_refs[0] == PRIOR_UID


def test_the_registration_z_offset_at_the_lungs_centre_is_the_known_one(case):
    # The dashboard scrolls the prior beside the current by it, away from any matched nodule.
    pair, _, analysis, _, result = case
    centre = np.array(ndimage.center_of_mass(analysis.lung_mask > 0)) * np.asarray(pair.spacing)
    truth = float(pair.mapping(centre[None, :])[0, 0] - centre[0])
    assert abs(truth) > 2.0  # the pair moves along z, so an offset of 0 would fail
    assert result.follow_up["registration"]["z_offset_mm"] == pytest.approx(truth, abs=1.5)


def test_growth_makes_the_study_more_urgent_than_its_size_alone(case):
    _, _, _, _, result = case
    findings = Findings(
        screening_probability=0.1,
        priority=4,
        triage_score=0.05,
        lung_volume_ml=3000.0,
        lesions=tuple(
            Lesion(label, 100.0, 6.0, 5.0, 0, (0.0, 0.0, 0.0)) for label in (1, 2, 3, 4, 6)
        ),
    )
    out = result.apply(findings)
    # The growing 7.5 mm nodule is Lung-RADS 4A by growth: priority 2 where size alone said 4.
    assert out.priority == 2 and out.triage_score is not None and out.triage_score >= 0.5
    assert out.prior_study_uid == PRIOR_UID
    assert any("grew" in r for r in out.follow_up["growth_reasons"])
    data = Findings.from_json(out.to_json())
    assert data is not None
    first = data.lesion(1)
    assert first is not None and first.change is not None
    assert first.tracking_uid == "2.25.1001" and first.change.volume_change_pct > 0
    new = data.lesion(6)
    assert new is not None and new.change is None and new.tracking_uid


def test_without_a_prior_every_lesion_is_tracked_and_the_reason_kept():
    findings = Findings(
        screening_probability=0.1,
        priority=3,
        lung_volume_ml=3000.0,
        lesions=(Lesion(2, 100.0, 6.0, 5.0, 0, (0.0, 0.0, 0.0)),),
    )
    out = FollowUpResult(new_tracking(CURRENT_UID, [2]), prior_reason="no earlier CT").apply(
        findings
    )
    [lesion] = out.lesions
    assert lesion.tracking_uid == tracking_uid(CURRENT_UID, 2) and lesion.tracking_id == "Nodule 2"
    assert lesion.change is None
    assert out.priority == 3 and out.prior_study_uid is None and out.prior_reason == "no earlier CT"


def test_a_prior_of_another_patient_is_refused(case):
    _, current, _, _, _ = case
    other = _volume(np.zeros((3, 4, 4)), (1, 1, 1), "9.9", PatientID="PAT-2")
    with pytest.raises(PriorUnusable, match="different patient .Patient ID"):
        check_same_patient(current.datasets[0], other)
    same_id = _volume(np.zeros((3, 4, 4)), (1, 1, 1), "9.9", PatientBirthDate="19700101")
    with pytest.raises(PriorUnusable, match="birth date differs"):
        check_same_patient(current.datasets[0], same_id)
    check_same_patient(current.datasets[0], _volume(np.zeros((3, 4, 4)), (1, 1, 1), "9.9"))


def test_an_mr_prior_is_refused():
    with pytest.raises(PriorUnusable, match="MR, not CT"):
        check_ct(_volume(np.zeros((3, 4, 4)), (1, 1, 1), "9.9", Modality="MR"))


def test_a_prior_missing_half_its_slices_is_refused_by_registration(case):
    pair, current, analysis, prior, _ = case
    half = pair.prior.shape[0] // 2
    cut = dataclasses.replace(
        prior,
        volume=_volume(pair.prior[:half], pair.prior_spacing, "1.2.3.1"),
        lesion_labels=pair.prior_labels[:half],
        lung_mask=prior.lung_mask[:half],
    )
    with pytest.raises(RegistrationRefused, match="lung|cover"):
        compare_with_prior(
            CURRENT_UID,
            "20240629",
            current,
            analysis,
            cut,
            NoAnalyser(),  # type: ignore[arg-type]
        )


@pytest.mark.parametrize(
    ("current", "prior", "why"),
    [
        ("20240629", None, "date is missing"),
        ("20240629", "20240629", "not from an earlier day"),
        ("20240629", "2024XX01", "not a date"),
    ],
)
def test_an_interval_that_cannot_be_measured_is_refused(current, prior, why):
    with pytest.raises(PriorUnusable, match=why):
        interval_days(current, prior)


def test_the_interval_is_in_days():
    assert interval_days("20240629", "20240101") == 180.0


def test_the_prior_cache_keeps_to_its_size_dropping_the_oldest_first(tmp_path):
    import os

    from workers.pipeline.prior import prune_cache

    for i, name in enumerate(["1.1", "1.2", "1.3"]):
        folder = tmp_path / name / "9.9"
        folder.mkdir(parents=True)
        (folder / "a.dcm").write_bytes(b"x" * 400_000)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    prune_cache(tmp_path, max_mb=0.9, keep=tmp_path / "1.1")
    # 1.1 is the oldest but was just fetched (kept); the next oldest, 1.2, goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.1", "1.3"]
