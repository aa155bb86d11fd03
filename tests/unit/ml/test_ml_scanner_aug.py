"""Scanner augmentation (ml.data.scanner_aug) on a phantom study with an inserted nodule label."""

from __future__ import annotations

import numpy as np
import pytest

from ml.data import scanner_aug
from ml.data.compose import PlacementIndex, compose
from ml.image.lungs import segment_lungs
from ml.runtime.qa import estimate_noise_hu
from tests.kit.phantoms import phantom_background, phantom_crop


@pytest.fixture(scope="module")
def study():
    bg = phantom_background(shape=(40, 140, 140), spacing=(2.5, 0.7, 0.7))
    crop = phantom_crop(radii_mm=(7.0, 6.0, 6.0), shape=(10, 40, 40))
    hu, labels, _ = compose(bg, [crop], ["free"], 4, index=PlacementIndex(bg))
    return hu, labels > 0, bg.spacing


def _volume(labels, spacing):
    return float(np.count_nonzero(labels) * np.prod(spacing))


def test_mirror_twice_is_the_identity(study):
    hu, labels, _ = study
    for axes in ([2], [1], [0], [0, 1, 2]):
        once = scanner_aug.mirror(hu, labels, axes)
        assert not np.array_equal(once[1], labels)
        back = scanner_aug.mirror(*once, axes)
        assert np.array_equal(back[0], hu) and np.array_equal(back[1], labels)


def test_resampling_to_1mm_and_back_keeps_the_label_volume(study):
    hu, labels, spacing = study
    fine, fine_labels, fine_sp = scanner_aug.resample_spacing(hu, labels, spacing, (1.0, 1.0, 1.0))
    assert fine_labels.dtype == bool
    assert _volume(fine_labels, fine_sp) == pytest.approx(_volume(labels, spacing), rel=0.08)
    back, back_labels, back_sp = scanner_aug.resample_spacing(fine, fine_labels, fine_sp, spacing)
    assert back.shape == hu.shape and back_sp == pytest.approx(spacing)
    assert _volume(back_labels, back_sp) == pytest.approx(_volume(labels, spacing), rel=0.08)
    assert (back_labels & labels).sum() >= 0.85 * labels.sum()


def test_thick_slices_average_rather_than_sample(study):
    hu, labels, spacing = study
    thick, thick_labels, sp = scanner_aug.resample_spacing(hu, labels, spacing, (5.0, 0.7, 0.7))
    assert sp[0] == pytest.approx(5.0)
    assert _volume(thick_labels, sp) == pytest.approx(_volume(labels, spacing), rel=0.2)
    # Averaging two slices halves the variance of uncorrelated noise; point sampling would not.
    assert estimate_noise_hu(thick) < 0.85 * estimate_noise_hu(hu)


@pytest.mark.parametrize("factor", [0.85, 1.15])
def test_scale_changes_the_volume_by_its_cube(study, factor):
    hu, labels, spacing = study
    _, scaled = scanner_aug.rescale(hu, labels, spacing, factor)
    assert set(np.unique(scaled)) <= {False, True}
    assert _volume(scaled, spacing) == pytest.approx(factor**3 * _volume(labels, spacing), rel=0.1)


def test_rotation_keeps_the_label_binary_and_its_volume(study):
    hu, labels, spacing = study
    rot_hu, rot = scanner_aug.rotate(hu, labels, spacing, 12.0)
    assert rot.dtype == bool
    assert _volume(rot, spacing) == pytest.approx(_volume(labels, spacing), rel=0.08)
    # The nodule moves with the image: its labelled voxels are still dense.
    assert np.median(rot_hu[rot]) > -200


def test_integer_labels_keep_their_values():
    labels = np.zeros((10, 30, 30), dtype=np.int16)
    labels[3:7, 5:12, 5:12] = 1
    labels[3:7, 18:25, 18:25] = 2
    vol = np.where(labels > 0, 30.0, -850.0).astype(np.float32)
    _, out, _ = scanner_aug.resample_spacing(vol, labels, (2.0, 1.0, 1.0), (1.0, 0.5, 0.5))
    assert set(np.unique(out)) == {0, 1, 2} and out.dtype == np.int16


def test_sharp_kernel_raises_noise_and_zero_is_identity(study):
    hu, _, spacing = study
    assert np.allclose(scanner_aug.sharpen(hu, spacing, amount=0.0), hu)
    sharp = scanner_aug.sharpen(hu, spacing, amount=1.0)
    assert estimate_noise_hu(sharp) > 1.3 * estimate_noise_hu(hu)
    with pytest.raises(ValueError):
        scanner_aug.sharpen(hu, spacing, amount=-1.0)


def test_random_scanner_is_deterministic_and_labels_stay_binary(study):
    hu, labels, spacing = study
    runs = [
        scanner_aug.random_scanner(hu, labels, spacing, np.random.default_rng(7), p_grid=1.0)
        for _ in range(2)
    ]
    (v1, l1, s1, d1), (v2, l2, s2, d2) = runs
    assert d1 == d2 and s1 == s2
    assert np.array_equal(v1, v2) and np.array_equal(l1, l2)
    assert l1.dtype == bool and l1.any()
    assert 1.0 <= s1[0] <= 5.0 + 1e-6 and 0.5 - 1e-6 <= s1[1] <= 1.0 + 1e-6
    assert "spacing" in d1


def _chest(shape=(24, 96, 96), spacing=(2.5, 1.5, 1.5)):
    """A body cylinder (0 HU) with two lungs (-850 HU) running through every slice, air outside:
    a scan range that ends inside the chest, as clinical ones do."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    _, yy, xx = np.meshgrid(*axes, indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[np.hypot(yy, xx) < 65.0] = 0.0
    lungs = (np.hypot(yy, xx - 28.0) < 20.0) | (np.hypot(yy, xx + 28.0) < 20.0)
    hu[lungs] = -850.0
    return hu, lungs, spacing


def test_shrinking_extends_the_end_slices_so_the_lungs_stay_closed():
    hu, lungs, spacing = _chest()
    assert segment_lungs(hu, spacing).any()
    small, small_lungs = scanner_aug.rescale(hu, lungs, spacing, 0.8)
    # Air above and below would join the lungs to the outside air: no lungs found.
    found = segment_lungs(small, spacing)
    assert found.any()
    # Within the shrunk body (0.8 of 65 mm), 3 mm in from its edge.
    body = np.hypot(*np.indices(hu.shape[1:]) - 47.5) * 1.5 < 0.8 * 65.0 - 3.0
    for z in (0, -1):
        assert (small[z][body] > -1000).all()  # the end slices are body and lung, not air
        assert small_lungs[z].any()
    # The label was extended as the image was: it still marks the lungs found in the image.
    assert (found & small_lungs).sum() >= 0.9 * small_lungs.sum()


def test_rotation_corners_stay_air(study):
    hu, labels, spacing = study
    # Only z is extended with the end slices: in-plane, what comes from outside stays air.
    rot_hu, _ = scanner_aug.rotate(hu, labels, spacing, 12.0)
    assert np.count_nonzero(rot_hu[:, 0, 0] == scanner_aug.AIR_HU) == hu.shape[0]
