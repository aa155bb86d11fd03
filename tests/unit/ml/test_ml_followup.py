"""Follow-up on synthetic chest pairs with known truth: registration (ml.image.registration),
matching and growth (ml.runtime.followup) and the evaluation helper (ml.evaluation.followup_eval).

The pair is a phantom chest and a follow-up seen through a known breathing-like deformation plus a
shift, with nodules regrown by known factors, one resolved, one new, and independent noise."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ml.data.chest_phantom import phantom_pair, render_chest
from ml.evaluation.followup_eval import case_from_phantom, evaluate_followup
from ml.image.measure import measure_regions
from ml.image.morphology import centroid
from ml.image.registration import (
    METRIC_WINDOW_HU,
    Grid,
    Registration,
    RegistrationQuality,
    RegistrationRefused,
    _shrink_factors,
    _windowed_shrunk,
    register,
    verdict,
    windowed_block_mean,
)
from ml.runtime.followup import (
    FollowUp,
    Lesion,
    NoduleChange,
    compare,
    doubling_time_days,
    growth_triage,
    lesions_from_labels,
    tracking_uid,
)

UID = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


@pytest.fixture(scope="module")
def pair():
    return phantom_pair()


@pytest.fixture(scope="module")
def registration(pair):
    return register(pair.current, pair.spacing, pair.prior, pair.spacing)


@pytest.fixture(scope="module")
def follow_up(pair, registration):
    return compare(
        lesions_from_labels(pair.current_labels, pair.spacing),
        lesions_from_labels(pair.prior_labels, pair.spacing),
        registration,
        pair.interval_days,
        current_study_key="study-2",
        prior_study_key="study-1",
    )


def _quality(**changes) -> RegistrationQuality:
    good = RegistrationQuality(
        ncc_identity=0.3,
        ncc_initial=0.8,
        ncc_after=0.95,
        lung_dice_initial=0.9,
        lung_dice_after=0.97,
        jacobian_min=0.9,
        jacobian_max=1.2,
        folding_fraction=0.0,
        lung_volume_current_ml=2000.0,
        lung_volume_prior_ml=2100.0,
        lung_coverage=1.0,
        seconds=1.0,
    )
    return dataclasses.replace(good, **changes)


def _identity_registration(shape=(10, 10, 10)) -> Registration:
    grid = Grid(shape, (1.0, 1.0, 1.0))
    return Registration(
        sitk.Transform(3, sitk.sitkIdentity),
        grid,
        grid,
        _quality(),
        sitk.Transform(3, sitk.sitkIdentity),
    )


def _lesion(label: int, centre, diameter: float, uid: str | None = None) -> Lesion:
    return Lesion(label, tuple(centre), math.pi * diameter**3 / 6.0, diameter, uid)


# --- registration -------------------------------------------------------------------------------


def test_registration_recovers_the_deformation_within_1_5_mm(pair, registration):
    before = np.linalg.norm(pair.landmarks_current - pair.landmarks_prior, axis=1)
    tre = np.linalg.norm(
        registration.to_prior(pair.landmarks_current) - pair.landmarks_prior, axis=1
    )
    # The deformation is large enough that doing nothing fails the target.
    assert np.median(before) > 5.0
    assert np.median(tre) <= 1.5
    assert np.percentile(tre, 90) <= 3.0
    # The nodule centres (last rows) are where growth is read.
    assert tre[-len(pair.nodules) :].max() <= 1.5
    q = registration.quality
    assert q.ok and q.reason is None
    assert q.ncc_after > q.ncc_initial > q.ncc_identity
    assert q.folding_fraction == 0.0 and q.jacobian_min > 0.5


def test_to_current_inverts_to_prior(pair, registration):
    back = registration.to_current(registration.to_prior(pair.landmarks_current))
    assert np.abs(back - pair.landmarks_current).max() < 0.05


def test_resampled_prior_labels_land_on_the_current_nodules(pair, registration):
    warped = registration.resample_prior(pair.prior_labels, labels=True)
    assert warped.shape == pair.current_labels.shape and warped.dtype == pair.prior_labels.dtype
    # The stable 12 mm nodule (label 3): the prior's mask warped onto the current one.
    a, b = warped == 3, pair.current_labels == 3
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.7
    image = registration.resample_prior(pair.prior)
    assert image.shape == pair.current.shape and np.isfinite(image).all()


def test_refuses_a_volume_without_lungs(pair):
    abdomen, _ = render_chest(pair.prior.shape, pair.spacing, with_lungs=False, noise_hu=20.0)
    with pytest.raises(RegistrationRefused, match="too little lung") as err:
        register(pair.current, pair.spacing, abdomen, pair.spacing)
    assert "prior" in err.value.reason


def test_refuses_an_mr_as_prior(pair):
    # MR intensities are positive: no air at CT's -1000 HU, so no lungs to register.
    mr = np.clip(pair.prior + 1000.0, 0, None) * 0.8
    with pytest.raises(RegistrationRefused, match="too little lung"):
        register(pair.current, pair.spacing, mr, pair.spacing)


def test_refuses_a_prior_with_missing_slices(pair):
    # 16 slices (32 mm) in the middle of the prior never arrived and the rest was stacked.
    gappy = np.concatenate([pair.prior[:24], pair.prior[40:]])
    with pytest.raises(RegistrationRefused, match="lung volumes differ"):
        register(pair.current, pair.spacing, gappy, pair.spacing)


def test_refuses_a_prior_whose_lungs_do_not_overlap(pair):
    # Same lung volume, other anatomy: the prior shows the bases, the follow-up the apices, so
    # after registration the lungs cannot coincide.
    with pytest.raises(RegistrationRefused, match="covers only") as err:
        register(pair.current[:38], pair.spacing, pair.prior[26:], pair.spacing)
    assert err.value.quality is not None and not err.value.quality.ok
    assert err.value.quality.reason == err.value.reason


def test_verdict_names_each_failure():
    assert verdict(_quality()) is None
    assert "folds" in verdict(_quality(folding_fraction=0.01, jacobian_min=-0.2))
    assert "Jacobian" in verdict(_quality(jacobian_max=9.0))
    assert "did not improve" in verdict(_quality(ncc_initial=0.9, ncc_after=0.8))
    assert "too dissimilar" in verdict(_quality(ncc_initial=0.2, ncc_after=0.3))
    assert "do not overlap" in verdict(_quality(lung_dice_after=0.5))
    assert "covers only 60%" in verdict(_quality(lung_coverage=0.6))
    assert "Jacobian" in verdict(_quality(jacobian_min=math.nan))


def test_refusals_of_malformed_input(pair):
    with pytest.raises(ValueError, match="spacing"):
        register(pair.current, (0.0, 1.0, 1.0), pair.prior, pair.spacing)
    with pytest.raises(ValueError, match="3-D"):
        register(pair.current[0], pair.spacing, pair.prior, pair.spacing)


# --- matching and growth ------------------------------------------------------------------------


def test_every_nodule_is_matched_to_itself(pair, follow_up):
    both = [
        i for i, n in enumerate(pair.nodules, 1) if n.prior_diameter_mm and n.current_diameter_mm
    ]
    assert [(pc.current.label, pc.prior.label) for pc in follow_up.pairs] == [(i, i) for i in both]
    assert [lesion.label for lesion in follow_up.new] == [6]
    assert [lesion.label for lesion in follow_up.resolved] == [5]
    assert max(pc.distance_mm for pc in follow_up.pairs) <= 1.5


def test_volume_change_is_within_10_percent_of_the_truth(pair, follow_up):
    for pc in follow_up.pairs:
        n = pair.nodules[pc.current.label - 1]
        true_ratio = (n.current_diameter_mm / n.prior_diameter_mm) ** 3
        assert min(n.current_diameter_mm, n.prior_diameter_mm) >= 6.0
        measured = 1.0 + pc.volume_change_pct / 100.0
        assert abs(measured / true_ratio - 1.0) <= 0.10, (pc.current.label, measured, true_ratio)
        # Measured on each study's own grid: exactly the voxel volumes of the two label maps.
        voxel = float(np.prod(pair.spacing))
        assert pc.prior.volume_mm3 == pytest.approx(
            (pair.prior_labels == pc.prior.label).sum() * voxel
        )
        assert pc.current.volume_mm3 == pytest.approx(
            (pair.current_labels == pc.current.label).sum() * voxel
        )
        if pc.current.volume_mm3 == pc.prior.volume_mm3:
            assert pc.doubling_time_days is None
        else:
            ratio = pc.current.volume_mm3 / pc.prior.volume_mm3
            expected_vdt = pair.interval_days * math.log(2) / math.log(ratio)
            assert pc.doubling_time_days == pytest.approx(expected_vdt)
    assert follow_up.sum_diameters_current_mm == pytest.approx(
        sum(c.diameter_mm for c in lesions_from_labels(pair.current_labels, pair.spacing))
    )


def test_tracking_uids_are_carried_and_fresh_ones_are_deterministic(follow_up):
    for pc in follow_up.pairs:
        assert pc.tracking_uid == tracking_uid("study-1", pc.prior.label)
        assert pc.current.tracking_uid == pc.prior.tracking_uid == pc.tracking_uid
    assert follow_up.new[0].tracking_uid == tracking_uid("study-2", 6)
    uids = [pc.tracking_uid for pc in follow_up.pairs] + [follow_up.new[0].tracking_uid]
    assert len(set(uids)) == len(uids)
    assert all(UID.match(u) and len(u) <= 64 for u in uids)


def test_a_known_tracking_uid_is_carried_to_the_match():
    prior = [_lesion(1, (5, 5, 5), 8.0, "1.2.3.4")]
    fu = compare(
        [_lesion(7, (5.5, 5, 5), 9.0)],
        prior,
        _identity_registration(),
        90.0,
        current_study_key="b",
        prior_study_key="a",
    )
    assert fu.pairs[0].tracking_uid == "1.2.3.4" and fu.pairs[0].current.tracking_uid == "1.2.3.4"


def test_the_gate_refuses_distant_pairs_and_the_assignment_is_global():
    reg = _identity_registration()
    # 6 mm nodules 12 mm apart are outside the gate (4 + 0.5 * 6 = 7 mm): new and resolved.
    fu = compare(
        [_lesion(1, (0, 0, 12), 6.0)],
        [_lesion(1, (0, 0, 0), 6.0)],
        reg,
        30.0,
        current_study_key="b",
        prior_study_key="a",
    )
    assert fu.pairs == [] and len(fu.new) == 1 and len(fu.resolved) == 1
    # Greedy nearest-first would pair current 1 with prior 2 (2 mm) and leave current 2 unmatched
    # (prior 1 is 9 mm from it, outside its 8 mm gate); the assignment pairs both.
    prior = [_lesion(1, (0, 0, 0), 8.0), _lesion(2, (0, 0, 5), 8.0)]
    current = [_lesion(1, (0, 0, 3), 8.0), _lesion(2, (0, 0, 9), 8.0)]
    fu = compare(current, prior, reg, 30.0, current_study_key="b", prior_study_key="a")
    assert sorted((pc.current.label, pc.prior.label) for pc in fu.pairs) == [(1, 1), (2, 2)]


def test_compare_refuses_a_non_positive_interval():
    with pytest.raises(ValueError, match="interval"):
        compare([], [], _identity_registration(), 0.0, current_study_key="b", prior_study_key="a")


def test_doubling_time():
    assert doubling_time_days(100.0, 200.0, 90.0) == pytest.approx(90.0)
    assert doubling_time_days(100.0, 800.0, 300.0) == pytest.approx(100.0)
    assert doubling_time_days(200.0, 100.0, 90.0) == pytest.approx(-90.0)
    assert doubling_time_days(100.0, 100.0, 90.0) is None
    assert doubling_time_days(0.0, 100.0, 90.0) is None
    assert doubling_time_days(100.0, 200.0, 0.0) is None


def _change(d_prior: float, d_current: float, days: float = 180.0) -> NoduleChange:
    p, c = _lesion(1, (0, 0, 0), d_prior, "u"), _lesion(1, (0, 0, 0), d_current, "u")
    return NoduleChange(
        "u",
        c,
        p,
        (0.0, 0.0, 0.0),
        0.0,
        100.0 * (c.volume_mm3 / p.volume_mm3 - 1),
        d_current - d_prior,
        doubling_time_days(p.volume_mm3, c.volume_mm3, days),
        days,
    )


def _follow_up(pairs=(), new=()) -> FollowUp:
    return FollowUp(180.0, list(pairs), list(new), [], 0.0, 0.0)


def test_growth_triage_follows_lung_rads_growth_rules():
    stable = growth_triage(_follow_up([_change(5.0, 5.2)]))
    assert stable.category == "2" and stable.priority == 4 and stable.reasons == []
    small_growth = growth_triage(_follow_up([_change(5.0, 7.0)]))
    assert small_growth.category == "4A" and small_growth.priority == 2
    assert "grew +2.0 mm" in small_growth.reasons[0]
    large_growth = growth_triage(_follow_up([_change(7.0, 9.0)]))
    assert large_growth.category == "4B" and large_growth.priority == 1
    # 1.2 mm in diameter is under Lung-RADS' 1.5 mm, but +40 % volume in 180 days is a doubling
    # time of about 370 days: growth by NELSON/Fleischner.
    by_volume = growth_triage(_follow_up([_change(10.0, 11.2)]))
    assert by_volume.category == "4B" and by_volume.priority == 1
    new = growth_triage(_follow_up(new=[_lesion(1, (0, 0, 0), 9.0, "n")]))
    assert new.category == "4B" and "new nodule" in new.reasons[0]
    assert growth_triage(_follow_up(new=[_lesion(1, (0, 0, 0), 5.0, "n")])).category == "3"


def test_growth_triage_on_the_phantom(follow_up):
    # Nodule 1 grows 6 -> 7.5 mm (4A) and a 7 mm nodule is new (4A); the 12 mm one is stable.
    triage = growth_triage(follow_up)
    assert triage.category == "4A" and triage.priority == 2
    assert any("grew" in r for r in triage.reasons) and any(
        "new nodule" in r for r in triage.reasons
    )


# --- evaluation helper ----------------------------------------------------------------------------


def test_evaluation_of_a_pair_with_another_deformation_and_origin():
    # The prior on a coarser grid (2.5 x 1.5 x 1.5 mm against 2 x 1.25 x 1.25 mm).
    other = phantom_pair(
        shift_mm=(-6.0, 4.0, -3.0),
        amplitude_mm=9.0,
        expansion_mm=4.0,
        seed=5,
        prior_shape=(52, 120, 120),
        prior_spacing=(2.5, 1.5, 1.5),
    )
    case = case_from_phantom("other", other)
    # The follow-up's frame is elsewhere (another table position): its points move with it.
    offset = np.array([-250.0, 40.0, -15.0])
    moved = dataclasses.replace(
        case,
        current=dataclasses.replace(case.current, origin=tuple(offset)),
        truth=dataclasses.replace(
            case.truth, landmarks_current_mm=case.truth.landmarks_current_mm + offset
        ),
    )
    abdomen, _ = render_chest(other.prior.shape, other.prior_spacing, with_lungs=False)
    refused = dataclasses.replace(
        case,
        name="abdomen",
        prior=dataclasses.replace(case.prior, volume=abdomen),
        truth=dataclasses.replace(case.truth, expect_refusal=True),
    )
    ev = evaluate_followup([moved, refused])
    assert ev.tre_median_mm <= 1.5
    assert ev.true_matches == 4 and ev.false_matches == 0 and ev.missed_matches == 0
    assert ev.correct_refusals == 1 and ev.wrong_refusals == 0 and ev.wrong_comparisons == 0
    assert ev.cases[1].reason and "too little lung" in ev.cases[1].reason
    assert sum(int(b["nodules"]) for b in ev.growth_by_size.values()) == 4
    for name, stats in ev.growth_by_size.items():
        assert stats["max_abs_error_pct"] <= 10.0, (name, stats)
    print(
        f"\nTRE median {ev.tre_median_mm:.2f} p90 {ev.tre_p90_mm:.2f} max {ev.tre_max_mm:.2f} mm; "
        f"growth {ev.growth_by_size}; registration {ev.cases[0].seconds:.1f} s"
    )


def test_measure_regions_is_the_volume_source(pair):
    lesions = lesions_from_labels(pair.prior_labels, pair.spacing, (10.0, 0.0, 0.0), {2: "1.2.3"})
    ms = measure_regions(pair.prior_labels, pair.spacing)
    assert [lesion.tracking_uid for lesion in lesions] == [None, "1.2.3", None, None, None]
    assert [lesion.volume_mm3 for lesion in lesions] == [m.voxel_volume_mm3 for m in ms]
    assert lesions[0].centre_mm[0] == pytest.approx(10.0 + ms[0].centroid_zyx[0] * pair.spacing[0])


def test_the_metric_volume_is_itk_binshrink_of_the_clipped_volume_without_a_full_copy():
    # Shapes that blocks do not divide, a window that clips both ends, and an origin.
    rng = np.random.default_rng(7)
    volume = rng.normal(-400.0, 900.0, size=(47, 61, 53)).astype(np.float32)
    grid = Grid.of(volume, (0.7, 0.6, 0.8), (10.0, -20.0, 5.0))
    factors = _shrink_factors(grid)
    assert factors == (4, 5, 3)
    lo, hi = METRIC_WINDOW_HU
    itk = sitk.BinShrink(grid.image(np.clip(volume, lo, hi)), factors[::-1])
    ours = _windowed_shrunk(volume, grid)
    assert ours.GetSize() == itk.GetSize()
    assert np.allclose(ours.GetSpacing(), itk.GetSpacing())
    assert np.allclose(ours.GetOrigin(), itk.GetOrigin())
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(itk), rtol=0, atol=1e-3
    )
    # Slab boundaries change nothing.
    np.testing.assert_array_equal(
        windowed_block_mean(volume, factors, slab=1), windowed_block_mean(volume, factors, slab=5)
    )


def test_centroid_of_a_3d_mask_is_its_centre_of_mass():
    rng = np.random.default_rng(3)
    mask = rng.random((9, 14, 11)) < 0.2
    np.testing.assert_allclose(centroid(mask), ndimage.center_of_mass(mask), rtol=1e-12)
    np.testing.assert_allclose(centroid(mask[4]), ndimage.center_of_mass(mask[4]), rtol=1e-12)
