"""The nodule CAD's parts on phantoms: blob candidates, the classifier's views, local outlines,
the training augmentation and operating point, and the whole pipeline with a small model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ml.image.blobs import detect_blobs
from ml.image.nodule_segment import segment_nodule
from ml.runtime import cad, cad_views, networks, registry
from ml.runtime.cad_views import CHANNELS, VIEW, candidate_views
from ml.runtime.nodule_outline import equivalent_diameter_mm
from ml.runtime.registry import LoadedModel
from ml.training import cad as cad_training
from ml.training import cad_samples, real_training
from ml.training import real_samples as rs

PARENCHYMA = -850.0


def _phantom(spacing, *, nodule_mm=(60.0, 60.0, 50.0), radius_mm=5.0, vessel=True):
    """A 120 x 120 x 100 mm block of lung with one solid sphere and, optionally, a vessel
    (a 2 mm-radius tube along z) at x = 80 mm. Returns (hu, lung, nodule truth)."""
    size_mm = np.array([100.0, 120.0, 120.0])
    shape = tuple(int(round(s / sp)) for s, sp in zip(size_mm, spacing, strict=True))
    z, y, x = np.meshgrid(
        *[(np.arange(n) + 0.5) * sp for n, sp in zip(shape, spacing, strict=True)], indexing="ij"
    )
    cz, cy, cx = nodule_mm[2], nodule_mm[1], nodule_mm[0]
    nodule = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius_mm**2
    hu = np.full(shape, PARENCHYMA, dtype=np.float32)
    hu[nodule] = 20.0
    if vessel:
        hu[(y - 60.0) ** 2 + (x - 90.0) ** 2 <= 2.0**2] = 30.0
    rng = np.random.default_rng(0)
    hu += rng.normal(0, 10, shape).astype(np.float32)
    lung = np.ones(shape, dtype=bool)
    return hu, lung, nodule


def _mm(centre_zyx, spacing):
    return np.asarray(centre_zyx) * np.asarray(spacing)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7)])
def test_the_strongest_blob_is_the_nodule_not_the_vessel_on_any_grid(spacing):
    hu, lung, nodule = _phantom(spacing)
    blobs = detect_blobs(hu, lung, spacing)
    assert blobs, "no candidate at all"
    # The nodule's centre in mm (voxel centres are at (i + 0.5) * spacing).
    truth_mm = np.array([50.0, 60.0, 60.0])
    best = blobs[0]
    got_mm = (np.asarray(best.centre_zyx) + 0.5) * np.asarray(spacing)
    assert np.linalg.norm(got_mm - truth_mm) < 2.5
    assert 3.0 <= best.radius_mm <= 8.0
    assert best.negative == 3 and best.blobness > 0.5
    # Candidates on the vessel are tubes: their blobness is far below the nodule's.
    on_vessel = [
        b
        for b in blobs
        if abs((b.centre_zyx[2] + 0.5) * spacing[2] - 90.0) < 3.0
        and abs((b.centre_zyx[1] + 0.5) * spacing[1] - 60.0) < 3.0
    ]
    assert all(b.blobness < 0.5 * best.blobness for b in on_vessel)


def test_the_candidates_do_not_depend_on_the_threads():
    spacing = (2.5, 0.7, 0.7)
    hu, lung, _ = _phantom(spacing, nodule_mm=(55.0, 62.0, 47.0))
    one = detect_blobs(hu, lung, spacing, threads=1)
    assert len(one) > 5
    assert detect_blobs(hu, lung, spacing, threads=3) == one
    # Nor the views: more candidates than one sampling batch, on several threads.
    centres = [b.centre_zyx for b in one] * (200 // len(one) + 1)
    views = candidate_views(hu, spacing, centres, threads=1)
    assert len(views) > 128 and views.std() > 0
    assert np.array_equal(candidate_views(hu, spacing, centres, threads=3), views)


def test_no_lung_no_candidates():
    hu, lung, _ = _phantom((2.0, 2.0, 2.0))
    assert detect_blobs(hu, np.zeros_like(lung), (2.0, 2.0, 2.0)) == []


def test_candidates_outside_the_lung_mask_are_not_reported():
    spacing = (1.0, 1.0, 1.0)
    hu, lung, nodule = _phantom(spacing, vessel=False)
    lung[:, :, 40:80] = False  # the nodule (x = 55-65 mm) is outside the mask now
    centres = [b.centre_zyx for b in detect_blobs(hu, lung, spacing)]
    assert all(not nodule[tuple(np.round(c).astype(int))] for c in centres)


def test_views_are_sampled_in_millimetres_whatever_the_grid():
    a_sp, b_sp = (1.0, 1.0, 1.0), (2.5, 0.7, 0.7)
    a, _, _ = _phantom(a_sp, vessel=True)
    b, _, _ = _phantom(b_sp, vessel=True)
    # The same point in mm on each grid (voxel centres at (i + 0.5) * spacing).
    point_mm = np.array([50.0, 60.0, 60.0])
    va = candidate_views(a, a_sp, [point_mm / a_sp - 0.5])
    vb = candidate_views(b, b_sp, [point_mm / b_sp - 0.5])
    assert va.shape == (1, CHANNELS, VIEW, VIEW)
    # Centre pixels (the nodule) are bright in every plane, corners (parenchyma) dark.
    c = VIEW // 2
    assert (va[0, :, c, c] > 0.6).all() and (va[0, :, 0, 0] < 0.2).all()
    # Away from the sphere's edge the two grids agree.
    assert np.abs(va - vb).mean() < 0.03


def test_a_nodule_is_outlined_and_the_vessel_it_touches_is_cut():
    spacing = (1.0, 0.7, 0.7)
    hu, lung, nodule = _phantom(spacing, radius_mm=5.0, vessel=False)
    z, y, x = np.meshgrid(
        *[(np.arange(n) + 0.5) * s for n, s in zip(hu.shape, spacing, strict=True)], indexing="ij"
    )
    hu[((y - 60.0) ** 2 + (z - 50.0) ** 2 <= 1.5**2) & (x > 60)] = 30.0  # a vessel leaving it
    centre = np.array([50.0, 60.0, 60.0]) / spacing - 0.5
    box, mask = segment_nodule(hu, spacing, tuple(centre), 5.0, lung)
    pred = np.zeros(hu.shape, dtype=bool)
    pred[box] = mask
    dice = 2 * (pred & nodule).sum() / (pred.sum() + nodule.sum())
    assert dice > 0.8
    vessel_far = pred & (x > 70)
    assert not vessel_far.any()


def test_nothing_dense_at_the_point_gives_an_empty_outline():
    spacing = (1.0, 1.0, 1.0)
    hu = np.full((40, 40, 40), PARENCHYMA, dtype=np.float32)
    _, mask = segment_nodule(hu, spacing, (20.0, 20.0, 20.0), 4.0)
    assert not mask.any()


@pytest.mark.parametrize("channels", [6, 12])
def test_augmentation_matches_the_views_of_the_mirrored_volume(channels):
    spacing = (1.0, 1.0, 1.0)
    hu, _, _ = _phantom(spacing, nodule_mm=(55.0, 62.0, 47.0))
    centre = np.array([47.0, 62.0, 55.0]) - 0.5 + np.array([3.0, 2.0, -1.5])  # asymmetric
    views = torch.from_numpy(candidate_views(hu, spacing, [centre], channels))
    assert views.shape == (1, channels, VIEW, VIEW)
    for axis, flip in ((2, "x"), (1, "y"), (0, "z")):
        flipped = np.flip(hu, axis=axis).copy()
        c = centre.copy()
        c[axis] = hu.shape[axis] - 1 - c[axis]
        expected = candidate_views(flipped, spacing, [c], channels)
        got = cad.flip(views, flip).numpy()
        assert np.abs(got - expected).max() < 1e-5, flip
        assert np.abs(views.numpy() - expected).max() > 0.05, flip  # the mirror is not trivial
    swapped = np.swapaxes(hu, 1, 2).copy()
    expected = candidate_views(swapped, spacing, [centre[[0, 2, 1]]], channels)
    assert np.abs(cad.swap_xy(views).numpy() - expected).max() < 1e-5
    for other in ((0, 1), (0, 2)):  # exchanges of z with y or x, only as far as maps go
        order = [0, 1, 2]
        order[other[0]], order[other[1]] = order[other[1]], order[other[0]]
        m = np.eye(3, dtype=int)[order]
        moved = np.transpose(hu, order).copy()
        expected = candidate_views(moved, spacing, [centre[order]], channels)
        assert np.abs(cad_views.transform(views, m.tolist()).numpy() - expected).max() < 1e-5


def test_the_diagonal_planes_sample_the_diagonals_in_millimetres():
    # A linear ramp in mm is sampled exactly by linear interpolation, so each plane's values
    # name its directions: 1 HU per mm along z, 2 along y, 3 along x.
    spacing = (2.0, 0.8, 0.6)
    shape = (40, 100, 130)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)],
                          indexing="ij")  # fmt: skip
    hu = (-900.0 + 1.0 * z + 2.0 * y + 3.0 * x).astype(np.float32)
    centre = np.array([20.0, 50.0, 60.0])
    views = candidate_views(hu, spacing, [centre], 12)[0]
    lo, hi = cad_views.HU_RANGE
    at_centre = -900.0 + float((centre * np.array(spacing)) @ np.array([1.0, 2.0, 3.0]))
    t = (np.arange(VIEW) - (VIEW - 1) / 2.0) * cad_views.FINE_MM
    d = 1 / math.sqrt(2)
    # Channel 6: rows along z, columns along (y + x) / sqrt(2); channel 11: rows along x,
    # columns along (z - y) / sqrt(2).
    want6 = at_centre + 1.0 * t[:, None] + (2.0 + 3.0) * d * t[None, :]
    want11 = at_centre + 3.0 * t[:, None] + (1.0 - 2.0) * d * t[None, :]
    for ch, want in ((6, want6), (11, want11)):
        got = views[ch] * (hi - lo) + lo
        inside = (want > lo) & (want < hi)
        assert inside.sum() > 100
        assert np.abs(got[inside] - want[inside]).max() < 0.05


def test_operating_threshold_keeps_the_estimated_false_calls_per_study():
    # Two studies; negatives stand for 1 or 10 candidates each.
    positive = np.array([True, True, False, False, False, False])
    weight = np.array([1.0, 1.0, 1.0, 10.0, 1.0, 10.0])
    s = cad_training.SampleSet(
        views=np.zeros((6, CHANNELS, VIEW, VIEW), np.uint8),
        positive=positive,
        weight=weight,
        study=np.array([0, 0, 0, 0, 1, 1]),
        jittered=np.zeros(6, bool),
        studies=[{}, {}],
    )
    p = np.array([0.9, 0.5, 0.95, 0.4, 0.6, 0.1])
    op = cad_training.operating_threshold(s, p, target_fp=1.0)
    # 0.95 (1 call) then 0.6 (2 calls) per 2 studies = 1.0; the next (0.4, ten) would make 6:
    # the threshold sits just above 0.4, so both positives (0.9, 0.5) are kept.
    assert 0.4 < op["threshold"] <= 0.41
    assert op["sensitivity_of_found"] == 1.0
    stricter = cad_training.operating_threshold(s, p, target_fp=0.5)
    assert 0.6 < stricter["threshold"] <= 0.61 and stricter["sensitivity_of_found"] == 0.5


def _samples(n_studies: int) -> cad_training.SampleSet:
    empty = np.zeros(0)
    return cad_training.SampleSet(empty, empty, empty, empty, empty, studies=[{}] * n_studies)


def test_the_classifiers_data_card_has_the_real_training_cards_shape():
    names = ["lung1", "cap001"]
    real = real_training.data_card(names, rs.summary([]), rs.summary([]))
    data = cad_training._card_data(names, _samples(5), _samples(2))
    assert list(data) == list(real) and list(data["split"]) == list(real["split"])
    assert data["training_studies"] == 5 and data["validation_studies"] == 2
    assert "threshold" in data["split"]["validation"] and "candidates" in data["description"]
    # What the committed card says is what the code writes today for the same studies.
    card = registry.read_card(*registry.DEFAULT_REFS["cad"].split("@"))
    shipped = card["training"]["data"]
    again = cad_training._card_data(
        shipped["anatomies"],
        _samples(shipped["training_studies"]),
        _samples(shipped["validation_studies"]),
    )
    assert again == shipped


def _in_body(hu: np.ndarray) -> np.ndarray:
    """The phantom's block inside soft tissue with air outside, so that segment_lungs finds it."""
    padded = np.full((hu.shape[0], hu.shape[1] + 40, hu.shape[2] + 40), 30.0, np.float32)
    padded[:, 20:-20, 20:-20] = hu
    padded[:, :5, :] = -1000.0
    return padded


def _model(threshold: float) -> LoadedModel:
    torch.manual_seed(0)
    net = networks.build("cad").eval()
    card = {"operating_point": {"threshold": threshold}}
    return LoadedModel(cad.CAD_MODEL, "test", "cad", net, card)


def test_the_pipeline_outlines_and_scores_with_a_model():
    spacing = (1.5, 0.8, 0.8)
    hu, _, nodule = _phantom(spacing)
    padded = _in_body(hu)
    r = cad.run_cad(padded, spacing, _model(0.0))
    assert r.masses == 0  # a 10 mm nodule is no mass
    assert r.candidates > 0 and len(r.lesions) == len(r.scores) > 0
    assert r.lesion_labels.max() == len(r.lesions)
    assert r.scores == sorted(r.scores, reverse=True)
    truth = np.zeros(padded.shape, bool)
    truth[:, 20:-20, 20:-20] = nodule
    hit = np.unique(r.lesion_labels[truth])
    assert (hit > 0).any(), "the nodule was not outlined"
    volume = math.prod(spacing) * (r.lesion_labels == hit[hit > 0][0]).sum()
    assert 0.5 * 4 / 3 * math.pi * 125 < volume < 2.0 * 4 / 3 * math.pi * 125
    only = cad.reported_only(r)
    assert len(only.lesions) == len(r.lesions)  # threshold 0: all reported
    strict = cad.reported_only(
        cad.CadResult(r.lung_mask, r.lesion_labels, r.lesions, r.scores, 2.0, r.candidates)
    )
    assert strict.lesions == [] and not strict.lesion_labels.any()


def test_a_ground_glass_outline_is_kept_but_ranked_last_and_not_reported():
    spacing = (1.5, 0.8, 0.8)
    hu, _, _ = _phantom(spacing, vessel=False)
    z, y, x = np.meshgrid(
        *[(np.arange(n) + 0.5) * sp for n, sp in zip(hu.shape, spacing, strict=True)],
        indexing="ij",
    )
    ggo = (z - 50.0) ** 2 + (y - 60.0) ** 2 + (x - 25.0) ** 2 <= 6.0**2
    hu[ggo] = -550.0 + np.random.default_rng(1).normal(0, 10, int(ggo.sum()))
    r = cad.run_cad(_in_body(hu), spacing, _model(0.0))  # threshold 0: all would be reported
    by_density = sorted(range(len(r.lesions)), key=lambda i: r.lesions[i].mean_hu)
    faint, solid = by_density[0], by_density[-1]
    assert r.lesions[faint].mean_hu < cad.MIN_REPORTED_MEAN_HU < r.lesions[solid].mean_hu
    assert r.faint(faint) and not r.faint(solid)
    assert solid in r.reported and faint not in r.reported
    assert r.ranking[faint] == pytest.approx(r.scores[faint] - 1.0)
    assert r.ranking[faint] < r.ranking[solid]
    only = cad.reported_only(r)
    assert all(m.mean_hu >= cad.MIN_REPORTED_MEAN_HU for m in only.lesions)
    assert len(only.lesions) == len(r.reported) == len(only.scores)


def test_a_mass_is_reported_by_size_whatever_the_classifier_says():
    # 45 mm across: beyond the blob scales and the nodules the classifier learnt.
    spacing = (1.5, 0.8, 0.8)
    hu, _, mass = _phantom(spacing, radius_mm=22.5, vessel=False)
    padded = _in_body(hu)
    truth = np.zeros(padded.shape, bool)
    truth[:, 20:-20, 20:-20] = mass
    r = cad.run_cad(padded, spacing, _model(2.0))  # no classifier score reaches 2
    assert r.masses == 1 and r.reported == [0]
    outline = r.lesion_labels == 1
    assert 2 * (outline & truth).sum() / (outline.sum() + truth.sum()) > 0.9
    # Candidates inside the mass are the mass: no nodule outline reaches into it.
    assert not (truth & (r.lesion_labels > 1)).any()
    assert r.ranking[0] == 1.0 and r.probabilities[0] is None
    assert r.probabilities[1:] == r.scores[1:] and 0.0 < r.scores[0] < 1.0
    only = cad.reported_only(r)
    assert only.masses == 1 and len(only.lesions) == 1
    assert (only.lesion_labels == 1).sum() == outline.sum()
    # A 25 mm sphere is a (large) nodule: left to the classifier, which reports nothing here.
    hu, _, _ = _phantom(spacing, radius_mm=12.5, vessel=False)
    small = cad.run_cad(_in_body(hu), spacing, _model(2.0))
    assert small.masses == 0 and small.reported == []


def test_the_classifier_joins_views_and_blob_features_and_reads_version_1():
    torch.manual_seed(0)
    net = networks.build("cad").eval()
    assert isinstance(net, networks.CadNet)
    views = torch.rand(5, CHANNELS, VIEW, VIEW)
    features = torch.rand(5, networks.CAD_FEATURES)
    p = cad.classify(net, views, features)
    assert p.shape == (5,) and bool(((p > 0) & (p < 1)).all())
    # The blob features reach the score: other features, other probabilities.
    assert not torch.allclose(p, cad.classify(net, views, features + 1.0))
    # A version 1 card (views only: a plain MONAI Classifier) still loads and scores.
    v1 = dict(networks.CAD_ARCH["views"], classes=1)
    old = networks.build("cad", v1).eval()
    assert not isinstance(old, networks.CadNet)
    assert cad.classify(old, views).shape == (5,)


def test_a_three_plane_classifier_is_given_the_three_plane_views():
    # Version 2.1.0 took six channels (three planes); 2.2.0 takes twelve (nine planes).
    spacing = (1.0, 1.0, 1.0)
    hu, _, _ = _phantom(spacing)
    blobs = detect_blobs(hu, np.ones(hu.shape, bool), spacing)[:5]
    centres = [b.centre_zyx for b in blobs]
    features = torch.tensor([cad.blob_features(b) for b in blobs], dtype=torch.float32)
    torch.manual_seed(0)
    for channels in (6, 12):
        arch = {**networks.CAD_ARCH, "views": {**networks.CAD_ARCH["views"]}}
        arch["views"]["in_shape"] = [channels, VIEW, VIEW]
        net = networks.build("cad", arch).eval()
        assert cad.view_channels(net) == channels
        model = LoadedModel(cad.CAD_MODEL, "test", "cad", net, {})
        got = cad.score(model, hu, spacing, blobs)
        views = torch.from_numpy(candidate_views(hu, spacing, centres, channels))
        assert np.allclose(got, cad.classify(net, views, features).numpy(), atol=1e-6)


def test_a_candidate_scores_the_same_in_the_study_mirrored_left_right():
    spacing = (2.5, 0.7, 0.7)
    hu, _, _ = _phantom(spacing, nodule_mm=(55.0, 62.0, 47.0))
    centre = np.array([18.0, 88.0, 79.0])  # off the nodule: the views are asymmetric
    mirrored = np.flip(hu, axis=2).copy()
    c = centre.copy()
    c[2] = hu.shape[2] - 1 - c[2]
    a = torch.from_numpy(candidate_views(hu, spacing, [centre]))
    b = torch.from_numpy(candidate_views(mirrored, spacing, [c]))
    assert (a - b).abs().max() > 0.05  # the views differ ...
    torch.manual_seed(1)
    net = networks.build("cad").eval()
    f = torch.rand(1, networks.CAD_FEATURES)
    with torch.no_grad():
        single = torch.sigmoid(net(a, f)[:, 0]), torch.sigmoid(net(b, f)[:, 0])
    assert abs(float(single[0] - single[1])) > 1e-4  # ... and one pass of the net sees it,
    assert abs(float(cad.classify(net, a, f) - cad.classify(net, b, f))) < 1e-5  # the score not


def test_training_learns_from_the_blob_features():
    """Views carry nothing here; the features alone tell positives from negatives, so a short
    training run must rank them through the features."""
    rng = np.random.default_rng(0)
    n = 400
    positive = rng.random(n) < 0.3
    features = rng.normal(0.0, 0.3, (n, networks.CAD_FEATURES)).astype(np.float32)
    features[:, 1] += np.where(positive, 1.0, -1.0)  # blobness
    s = cad_training.SampleSet(
        views=rng.integers(0, 255, (n, CHANNELS, VIEW, VIEW), dtype=np.uint8),
        positive=positive,
        weight=np.ones(n),
        study=np.arange(n) % 4,
        jittered=np.zeros(n, bool),
        studies=[{}] * 4,
        features=features,
    )
    net, report = cad_training.train(s, s, steps=60, hard_steps=10, log=lambda _: None)
    assert report["validation_auc"] > 0.95
    p = cad_training.scores(net, s.views, s.features)
    assert p[positive].min() > np.median(p[~positive])


def test_threshold_for_a_sensitivity_keeps_that_share_of_the_nodule_centred_positives():
    s = cad_training.SampleSet(
        views=np.zeros((7, CHANNELS, VIEW, VIEW), np.uint8),
        positive=np.array([True, True, True, True, True, False, False]),
        weight=np.ones(7),
        study=np.zeros(7, int),
        jittered=np.array([False, False, False, False, True, False, False]),
        studies=[{}],
    )
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.99, 0.95, 0.1])
    # The jittered positive (0.99) does not count: a quarter of the other four is 0.9.
    assert cad_training.threshold_for_sensitivity(s, p, 0.25) == 0.9
    assert cad_training.threshold_for_sensitivity(s, p, 0.5) == 0.8
    assert cad_training.sensitivity_at(s, p, 0.8) == 0.5
    assert cad_training.false_calls_per_study(s, p, 0.8) == 1.0


def _write_samples(folder, anatomy: str, n: int, rng) -> list:
    """Validation studies whose feature 0 tells nodules well and feature 1 hardly at all."""
    paths = []
    for i in range(n):
        m = 60
        positive = np.arange(m) < 12
        features = rng.random((m, networks.CAD_FEATURES)).astype(np.float32)
        features[:, 0] = np.where(positive, rng.uniform(0.5, 1.0, m), rng.uniform(0.0, 0.7, m))
        features[:, 1] = np.where(positive, rng.uniform(0.0, 1.0, m), rng.uniform(0.0, 0.9, m))
        study = {
            "views": rng.integers(0, 255, (m, CHANNELS, VIEW, VIEW), dtype=np.uint8),
            "positive": positive,
            "jittered": np.zeros(m, bool),
            "features": features,
            "meta": {"key": f"{anatomy}-validation-{i}", "candidates": 500},
        }
        paths.append(cad_samples.save(study, folder))
    return paths


def _reads_feature(k: int) -> torch.nn.Module:
    """A CAD classifier whose logit is 10 x feature k - 5, whatever the views."""
    net = networks.build("cad")
    with torch.no_grad():
        for p in net.head.parameters():
            p.zero_()
        net.head[0].weight[0, networks.CAD_ARCH["views"]["classes"] + k] = 10.0
        net.head[2].weight[0, 0] = 1.0
        net.head[2].bias[0] = -5.0
    return net


def test_calibration_gives_each_fold_the_share_of_nodules_the_other_fold_kept(tmp_path):
    """Two fold models (one reading a telling feature, one a poor one) and a shipped one; each
    fold's threshold must keep, on its own validation studies, what the other fold kept at its
    1-false-call threshold on anatomies it never saw; the shipped model the share that keeps
    both folds' false calls there, pooled, within 1 per study."""
    rng = np.random.default_rng(0)
    groups = {"a": ["lung1", "normal001"], "b": ["lung2", "cap001"]}
    samples = {
        a: {"train": [], "validation": _write_samples(tmp_path / "s", a, 2, rng)}
        for names in groups.values()
        for a in names
    }
    version = "9.9.9"
    torch.manual_seed(0)
    card = {"architecture": networks.CAD_ARCH, "training": {}}
    registry.save(_reads_feature(0), name=cad.CAD_MODEL, version=version, task="cad", card=card,
                  root=tmp_path)  # fmt: skip
    for g, names in groups.items():
        net = _reads_feature(0 if g == "a" else 1)
        weights = registry.save(
            net, name=cad.CAD_MODEL, version=version, task="cad", card={}, root=tmp_path,
            weights_name=f"fold-{g}.pt",
        )  # fmt: skip
        for held in (a for a in samples if a not in names):
            info = {"cases": names, "weights": weights.name}
            registry.write_fold(cad.CAD_MODEL, version, f"holdout-{held}", info, tmp_path)
    out = cad_training.calibrate(samples, root=tmp_path, version=version, log=lambda _: None)

    card = registry.read_card(cad.CAD_MODEL, version, tmp_path)
    folder = tmp_path / cad.CAD_MODEL / version
    kept = {}
    for g, names in groups.items():
        net = registry.load_weights(networks.build("cad"), folder / f"fold-{g}.pt")
        unseen = cad_training.load_samples([p for a in samples if a not in names
                                            for p in samples[a]["validation"]])  # fmt: skip
        own = cad_training.load_samples([p for a in names for p in samples[a]["validation"]])
        t = cad_training.operating_threshold(
            unseen, cad_training.scores(net, unseen.views, unseen.features)
        )["threshold"]
        p_own = cad_training.scores(net, own.views, own.features)
        kept[g] = cad_training.sensitivity_at(own, p_own, t)
    assert abs(kept["a"] - kept["b"]) > 0.1  # so that taking its own figure would fail
    for g, other in (("a", "b"), ("b", "a")):
        op = out[f"fold-{g}.pt"]
        assert op["sensitivity_of_found"] >= kept[other] - 1e-9
        assert op["sensitivity_of_found"] <= kept[other] + 1 / 24 + 1e-9  # one nodule's step
        for info in card["folds"].values():
            if info["weights"] == f"fold-{g}.pt":
                assert info["operating_point"]["threshold"] == op["threshold"] == info["threshold"]
    assert card["operating_point"]["threshold"] == out["weights.pt"]["threshold"]
    assert card["training"]["operating_point"] == card["operating_point"]
    # The shipped model: the largest share at which both folds' false calls on the anatomies
    # they never saw, pooled, stay within 1 per study; one nodule more and they do not.
    curves = []
    for g, names in groups.items():
        net = registry.load_weights(networks.build("cad"), folder / f"fold-{g}.pt")
        own = cad_training.load_samples([p for a in names for p in samples[a]["validation"]])
        unseen = cad_training.load_samples([p for a in samples if a not in names
                                            for p in samples[a]["validation"]])  # fmt: skip
        curves.append(cad_training.FalseCalls(
            own, cad_training.scores(net, own.views, own.features),
            unseen, cad_training.scores(net, unseen.views, unseen.features),
        ))  # fmt: skip
    share = out["weights.pt"]["share"]
    studies = sum(len(c.unseen.studies) for c in curves)
    assert 0 < share < max(kept.values())
    assert sum(c.on_unseen(share) for c in curves) / studies <= 1.0
    more = min(x for c in curves for x in c.shares() if x > share)
    assert sum(c.on_unseen(more) for c in curves) / studies > 1.0
    # The mean of the folds' own shares (the rule before pooling) would cost more than the target.
    mean = float(np.mean(list(kept.values())))
    assert sum(c.on_unseen(mean) for c in curves) / studies > 1.0


def test_fold_runs_leave_each_anatomy_out_once_and_train_on_all_the_others():
    names = ["lung1", "lung2", "normal001", "cap001"]
    runs = cad_training.fold_runs(names)
    assert [sorted(set(names) - set(trained)) for _, trained in runs] == [[a] for a in names]
    assert all(len(trained) == len(names) - 1 for _, trained in runs)
    assert len({run for run, _ in runs}) == len(names)
    assert cad_training.fold_runs(["lung1"]) == []


def test_every_anatomy_is_scored_in_evaluation_by_a_fold_model_that_never_saw_it(
    tmp_path, monkeypatch
):
    """A short training with folds: one fold model per anatomy, each registered as the holdout
    of the one anatomy it was not trained on, and the thresholds calibrated on unseen anatomy."""
    rng = np.random.default_rng(1)
    names = ["lung1", "lung2", "cap001"]
    samples = {
        a: {
            "train": _write_samples(tmp_path / "s" / "train", a, 1, rng),
            "validation": _write_samples(tmp_path / "s" / "val", a, 2, rng),
        }
        for a in names
    }
    short = cad_training.train
    monkeypatch.setattr(cad_training, "train", lambda *a, **k: short(*a, **k, hard_steps=2))
    written = cad_training.train_and_register(
        samples, root=tmp_path, version="9.9.9", folds=True, steps=2, log=lambda _: None
    )
    assert len(written) == 1 + len(names)
    card = registry.read_card(cad.CAD_MODEL, "9.9.9", tmp_path)
    assert sorted(card["folds"]) == sorted(f"holdout-{a}" for a in names)
    weights = set()
    for a in names:
        info = card["folds"][f"holdout-{a}"]
        assert sorted(info["cases"]) == sorted(b for b in names if b != a)
        assert "anatomies they never saw" in info["operating_point"]["chosen"]
        weights.add(info["weights"])
    assert len(weights) == len(names)
    assert "anatomies they never saw" in card["operating_point"]["chosen"]
    # Each fold model loads by reference (so the service can run it), with its own threshold.
    shipped = registry.load(f"{cad.CAD_MODEL}@9.9.9", tmp_path)
    fold = registry.load(f"{cad.CAD_MODEL}@9.9.9#holdout-lung2", tmp_path)
    registry.check(fold.ref, tmp_path)
    assert fold.version == "9.9.9#holdout-lung2" and fold.task == "cad"
    assert cad.threshold_of(fold) == card["folds"]["holdout-lung2"]["operating_point"]["threshold"]
    pairs = zip(shipped.net.state_dict().values(), fold.net.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    with pytest.raises(registry.ModelError, match="holdout-lung1, holdout-lung2"):
        registry.load(f"{cad.CAD_MODEL}@9.9.9#holdout-P001", tmp_path)
    with pytest.raises(registry.ModelError, match="NAME@VERSION#FOLD"):
        registry.load(f"{cad.CAD_MODEL}@9.9.9#", tmp_path)


def test_a_target_no_nodule_can_be_kept_within_reports_nothing(tmp_path):
    rng = np.random.default_rng(2)
    own = cad_training.load_samples(_write_samples(tmp_path / "own", "lung1", 2, rng))
    unseen = cad_training.load_samples(_write_samples(tmp_path / "unseen", "cap001", 2, rng))
    net = _reads_feature(1)
    fold = cad_training.FalseCalls(
        own, cad_training.scores(net, own.views, own.features),
        unseen, cad_training.scores(net, unseen.views, unseen.features),
    )  # fmt: skip
    assert cad_training.pooled_share([fold], target=-1.0) == 0.0
    assert cad_training.pooled_share([fold], target=1e9) == 1.0
    op = cad_training._operating_point(net, own, 0.0)
    assert op["threshold"] > 1.0 and op["sensitivity_of_found"] == 0.0


def _scored(p, positive, weight, studies):
    n = len(p)
    s = cad_training.SampleSet(
        views=np.zeros((n, 0), np.uint8),
        positive=np.array(positive),
        weight=np.array(weight, float),
        study=np.zeros(n, int),
        jittered=np.zeros(n, bool),
        studies=[{}] * studies,
    )
    return s, np.array(p, float)


def test_the_validation_froc_pools_the_fold_models_scores_on_their_unseen_anatomies():
    # Fold A's unseen study: nodule candidates at 0.9 and 0.5, false ones at 0.8 (standing for 1
    # candidate) and 0.3 (for 10); fold B's: a nodule at 0.7, a false one at 0.95.
    a, pa = _scored([0.9, 0.5, 0.8, 0.3], [True, True, False, False], [1, 1, 1, 10], 1)
    b, pb = _scored([0.7, 0.95], [True, False], [1, 1], 1)
    folds = [cad_training.FalseCalls(a, pa, a, pa), cad_training.FalseCalls(b, pb, b, pb)]
    froc = cad_training.unseen_froc(folds, rates=(0.25, 0.5, 1.0, 8.0))
    # False calls per study as the threshold falls: 0.5 (0.95), 1.0 (0.8), 6.0 (0.3).
    assert froc["0.25"] == 0.0  # above 0.95: no nodule
    assert froc["0.5"] == pytest.approx(1 / 3)  # above 0.8: the nodule at 0.9
    assert froc["1"] == 1.0  # above 0.3: all three
    assert froc["8"] == 1.0
    assert froc["mean"] == pytest.approx((0 + 1 / 3 + 1 + 1) / 4)
    assert froc["studies"] == 2 and froc["positives"] == 3


def test_an_outliner_draws_the_nodules_and_the_classical_outline_stands_in_where_it_draws_none():
    spacing = (1.5, 0.8, 0.8)
    hu, _, _ = _phantom(spacing)
    padded = _in_body(hu)
    classical = cad.run_cad(padded, spacing, _model(0.0))
    calls = []

    def nothing(volume, sp, centre, radius_mm, lung=None):
        calls.append(centre)
        return (slice(0, 1), slice(0, 1), slice(0, 1)), np.zeros((1, 1, 1), bool)

    same = cad.run_cad(padded, spacing, _model(0.0), outliner=nothing, outliner_from_mm=0.0)
    assert calls, "the outliner was not asked"
    np.testing.assert_array_equal(same.lesion_labels, classical.lesion_labels)

    def cube(volume, sp, centre, radius_mm, lung=None):
        c = np.clip(np.round(centre).astype(int), 2, np.array(volume.shape) - 3)
        return tuple(slice(int(v) - 2, int(v) + 3) for v in c), np.ones((5, 5, 5), bool)

    drawn = cad.run_cad(padded, spacing, _model(0.0), outliner=cube, outliner_from_mm=0.0)
    # The cube is drawn at candidates where the classical outline finds nothing dense, too.
    assert len(drawn.lesions) >= len(classical.lesions)
    # Each outline is the cube, less what an earlier outline took (outlines never overlap).
    assert all(m.voxel_count <= 125 for m in drawn.lesions)
    assert drawn.lesions[0].voxel_count == 125
    # By default the outliner draws only nodules whose classical outline is 18 mm or more: the
    # phantom's are smaller, so the classical outlines stand.
    small = cad.run_cad(padded, spacing, _model(0.0), outliner=cube)
    np.testing.assert_array_equal(small.lesion_labels, classical.lesion_labels)


def test_a_learnt_outliner_draws_only_where_the_classical_outline_is_wide_enough():
    volume = np.zeros((20, 20, 20), dtype=np.float32)
    side = {}

    def classical(vol, sp, centre, radius_mm, lung=None):
        s = side["classical"]
        return tuple(slice(0, s) for _ in range(3)), np.ones((s, s, s), bool)

    def learnt(vol, sp, centre, radius_mm, lung=None):
        return (slice(0, 3), slice(0, 3), slice(0, 4)), np.ones((3, 3, 4), bool)

    segment = cad.with_fallback(learnt, classical, from_mm=18.0)
    side["classical"] = 10  # 1000 mm3: a sphere of 12.4 mm
    box, mask = segment(volume, (1.0, 1.0, 1.0), (5, 5, 5), 5.0)
    assert mask.shape == (10, 10, 10)
    side["classical"] = 16  # 4096 mm3: 19.9 mm
    box, mask = segment(volume, (1.0, 1.0, 1.0), (5, 5, 5), 5.0)
    assert mask.shape == (3, 3, 4)
    # The switch reads the equivalent sphere's diameter of the classical outline: 4096 mm3 is
    # a sphere of 19.85 mm.
    assert equivalent_diameter_mm(np.ones((16, 16, 16), bool), (1.0, 1.0, 1.0)) == (
        pytest.approx(19.85, abs=0.01)
    )
