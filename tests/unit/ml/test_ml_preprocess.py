"""Tests for ml.preprocess: windows, CLAHE, denoising, resampling and the network normalisation,
on small phantoms whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ml.image.preprocess import (
    DENOISE_METHODS,
    LUNG_WINDOW,
    denoise,
    enhance_contrast,
    normalise_for_network,
    resample,
    window,
)

SPACING = (5.0, 0.6, 0.6)


def _step_phantom(rng: np.random.Generator, sigma: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """-100 HU (fat) left half, +100 HU (muscle) right half, white noise: (noisy, clean)."""
    clean = np.full((6, 96, 96), -100.0, dtype=np.float32)
    clean[:, :, 48:] = 100.0
    return clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32), clean


def _centres_mm(shape, spacing) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm, the first voxel's outer face at 0."""
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(shape, spacing, centre_mm, radii_mm) -> np.ndarray:
    grids = _centres_mm(shape, spacing)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_mm, radii_mm, strict=True)) <= 1


def test_window_maps_level_to_half_and_clips() -> None:
    hu = np.array([[[-2000, -1350, -600, 150, 3000]]], dtype=np.int16)
    out = window(hu, -600, 1500)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    # Monotone inside the window.
    ramp = window(np.linspace(-1400, 200, 50).reshape(1, 1, -1), -600, 1500).ravel()
    assert np.all(np.diff(ramp) >= 0) and ramp[0] == 0 and ramp[-1] == 1


@pytest.mark.parametrize("level_width", [LUNG_WINDOW, (40.0, 400.0), (400.0, 1800.0)])
def test_window_centres_on_its_level(level_width: tuple[float, float]) -> None:
    level, width = level_width
    out = window(np.array([[[level, level - width, level + width]]]), level, width)
    np.testing.assert_allclose(out.ravel(), [0.5, 0.0, 1.0], atol=1e-6)


def test_window_rejects_bad_width() -> None:
    with pytest.raises(ValueError):
        window(np.zeros((1, 1, 1)), 0, 0)
    with pytest.raises(ValueError):
        window(np.zeros((1, 1, 1)), 0, -10)


def test_clahe_raises_local_contrast_of_a_faint_structure() -> None:
    # A 30 HU disk on 0 HU is nearly invisible in the lung window (0.02 apart).
    yy, xx = np.mgrid[:128, :128]
    plane = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 20**2, 30.0, 0.0)
    vol = np.stack([plane, plane + 10.0]).astype(np.float32)
    before = window(vol, *LUNG_WINDOW)
    after = enhance_contrast(vol)
    assert after.dtype == np.float32 and after.shape == vol.shape
    assert after.min() >= 0.0 and after.max() <= 1.0
    inside = (yy - 64) ** 2 + (xx - 64) ** 2 < 15**2
    outside = (yy - 64) ** 2 + (xx - 64) ** 2 > 25**2
    for z in range(2):
        gap_before = before[z][inside].mean() - before[z][outside].mean()
        gap_after = after[z][inside].mean() - after[z][outside].mean()
        assert gap_after > 3 * gap_before > 0
    # A flat slice (all air) stays what the window makes of it instead of turning white.
    flat = enhance_contrast(np.full((1, 32, 32), -1000.0))
    np.testing.assert_allclose(flat, window(np.full((1, 32, 32), -1000.0), *LUNG_WINDOW))


@pytest.mark.parametrize("method", DENOISE_METHODS)
@pytest.mark.parametrize("per_slice", [True, False])
def test_denoise_lowers_noise(method: str, per_slice: bool) -> None:
    noisy, clean = _step_phantom(np.random.default_rng(0))
    out = denoise(noisy, SPACING, method, per_slice=per_slice)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    flat = np.s_[:, 8:-8, 8:36]
    before = float(np.std(noisy[flat] - clean[flat]))
    after = float(np.std(out[flat] - clean[flat]))
    # Achieved (noise SD removed): curvature flow 53-61 %, anisotropic 65-73 %, median 59-74 %,
    # gaussian 83 %.
    assert after < 0.65 * before, (method, per_slice, before, after)
    # The mean level of each side is kept.
    assert abs(float(out[flat].mean()) + 100.0) < 5.0


@pytest.mark.parametrize("method", ["curvature_flow", "anisotropic", "median"])
def test_edge_preserving_methods_keep_the_step(method: str) -> None:
    noisy, _ = _step_phantom(np.random.default_rng(1))
    out = denoise(noisy, SPACING, method)
    # Columns right beside the edge keep most of the 200 HU step (a 1 mm Gaussian keeps 128 HU).
    step = float(out[:, 8:-8, 49].mean() - out[:, 8:-8, 46].mean())
    assert step > 170.0, (method, step)
    blurred = denoise(noisy, SPACING, "gaussian")
    assert float(blurred[:, 8:-8, 49].mean() - blurred[:, 8:-8, 46].mean()) < step


def test_denoise_does_not_modify_input_and_rejects_unknown_method() -> None:
    noisy, _ = _step_phantom(np.random.default_rng(2))
    copy = noisy.copy()
    denoise(noisy, SPACING, "curvature_flow")
    np.testing.assert_array_equal(noisy, copy)
    with pytest.raises(ValueError):
        denoise(noisy, SPACING, "wavelet")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "kwargs"),
    [
        ("spacing", {"target_spacing": 1.0}),
        ("spacing", {"target_spacing": (1.5, 0.8, 0.8)}),
        ("shape", {"target_shape": (64, 40, 48)}),
    ],
)
def test_resample_keeps_extent_volume_and_position(target: str, kwargs: dict) -> None:
    shape, spacing = (24, 80, 90), (2.5, 0.7, 0.65)
    centre, radii = (31.0, 27.0, 30.0), (14.0, 12.0, 10.0)
    mask = _ellipsoid(shape, spacing, centre, radii)
    out, new_sp = resample(mask, spacing, is_mask=True, **kwargs)
    assert out.dtype == bool
    extent = np.array(shape) * spacing
    np.testing.assert_allclose(np.array(out.shape) * new_sp, extent, rtol=1e-9)
    if target == "spacing":
        wanted = np.broadcast_to(np.asarray(kwargs["target_spacing"], dtype=float), (3,))
        # The spacing used is within half a voxel over the extent of the one asked for.
        assert np.all(np.abs(new_sp - wanted) <= wanted**2 / extent + 1e-9)
    exact = 4.0 / 3.0 * np.pi * np.prod(radii)
    assert abs(out.sum() * np.prod(new_sp) - exact) / exact < 0.05
    # No half-voxel shift: the centroid stays where it was in mm.
    centroid_mm = (np.array(ndimage.center_of_mass(out)) + 0.5) * new_sp
    np.testing.assert_allclose(centroid_mm, centre, atol=0.5 * max(new_sp))


def test_resample_image_is_linear_float_and_goes_back_to_the_original_grid() -> None:
    shape, spacing = (12, 40, 40), (5.0, 0.7, 0.7)
    grids = _centres_mm(shape, spacing)
    # A linear ramp in mm is reproduced exactly by linear interpolation away from the ends.
    ramp = (2.0 * grids[0] - 3.0 * grids[1] + grids[2]).astype(np.int16)
    iso, iso_sp = resample(ramp, spacing, target_spacing=1.0)
    assert iso.dtype == np.float32
    back, back_sp = resample(iso, iso_sp, target_shape=shape)
    np.testing.assert_allclose(back_sp, spacing)
    inner = np.s_[1:-1, 2:-2, 2:-2]
    np.testing.assert_allclose(back[inner], ramp[inner], atol=1.5)
    # A constant volume stays constant right up to its faces: nothing falls outside the grid.
    const, _ = resample(np.full(shape, -1000, np.int16), spacing, target_spacing=(0.5, 0.3, 0.3))
    assert const.min() == const.max() == -1000


def test_resample_labels_stay_labels() -> None:
    labels = np.zeros((10, 30, 30), dtype=np.int32)
    labels[2:5, 5:15, 5:15] = 1
    labels[6:9, 15:25, 15:25] = 7
    out, _ = resample(labels, (3.0, 1.0, 1.0), target_spacing=0.8, is_mask=True)
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 1, 7}


def test_resample_needs_exactly_one_target() -> None:
    vol = np.zeros((4, 4, 4))
    with pytest.raises(ValueError):
        resample(vol, (1, 1, 1))
    with pytest.raises(ValueError):
        resample(vol, (1, 1, 1), target_spacing=1.0, target_shape=(2, 2, 2))


def test_normalise_for_network_lung_window_and_zscore() -> None:
    rng = np.random.default_rng(3)
    vol = np.full((4, 64, 64), -1000.0, dtype=np.float32)
    vol[:, 16:48, 16:48] = rng.normal(40.0, 20.0, (4, 32, 32))
    vol[:, 0, 0] = -3024.0  # padding outside the reconstruction circle
    lung = normalise_for_network(vol)
    assert lung.dtype == np.float32
    np.testing.assert_allclose(lung, window(vol, *LUNG_WINDOW))
    assert normalise_for_network(np.array([[[-600.0]]]))[0, 0, 0] == pytest.approx(0.5)
    z = normalise_for_network(vol, "zscore")
    assert z.dtype == np.float32
    body = vol > -500
    assert abs(float(z[body].mean())) < 1e-4 and abs(float(z[body].std()) - 1.0) < 1e-3
    # Padding is clipped to -1024 first, so it lands with the air, not far beyond it.
    assert z[0, 0, 0] == pytest.approx(z[0, 0, 1] - 24.0 / float(vol[body].std()), rel=1e-3)
    with pytest.raises(ValueError):
        normalise_for_network(vol, "minmax")  # type: ignore[arg-type]
