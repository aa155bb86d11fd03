"""Tests for ml.perturb: each degradation does what it claims (measured, not compared with its own
formula where a measurement exists), is deterministic for a seed, and leaves its input alone."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ml.data.perturb import (
    MU_WATER_PER_MM,
    blur,
    gaussian_noise,
    low_dose,
    rings,
    streaks,
    thick_slices,
    thick_slices_on_grid,
    water_equivalent_diameter_mm,
)
from ml.runtime.qa import estimate_noise_hu
from tests.kit.paths import SAMPLES

SAMPLES = SAMPLES
SPACING = (2.5, 2.5, 2.5)


def _load(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    image = sitk.ReadImage(str(SAMPLES / f"{name}_image.nrrd"))
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing()))


def _phantom(
    diameters_mm: tuple[float, ...] = (250.0,) * 6, noise_hu: float = 20.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Water-like (40 HU) disks in air on 128x128 slices of 2.5 mm pixels: (noisy, disk mask)."""
    yy, xx = np.mgrid[:128, :128]
    r_mm = np.hypot(yy - 63.5, xx - 63.5) * SPACING[1]
    disks = np.stack([r_mm < d / 2 for d in diameters_mm])
    clean = np.where(disks, 40.0, -1000.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    return clean + rng.normal(0, noise_hu, clean.shape).astype(np.float32), disks


def _roi_sd(vol: np.ndarray, disks: np.ndarray, z: slice | int = slice(None)) -> float:
    """SD inside the disks, 10 pixels in from their edge."""
    inner = ndimage.binary_erosion(disks, np.ones((1, 3, 3), bool), iterations=10)
    return float(vol[z][inner[z]].std())


def test_gaussian_noise_adds_the_requested_sd_on_a_phantom() -> None:
    vol, disks = _phantom()
    before = _roi_sd(vol, disks)
    for sigma in (10.0, 50.0):
        out = gaussian_noise(vol, sigma, np.random.default_rng(1))
        added = math.sqrt(_roi_sd(out, disks) ** 2 - before**2)
        assert added == pytest.approx(sigma, rel=0.1)


def test_gaussian_noise_on_a_real_ct_raises_measured_noise_by_sigma() -> None:
    vol, _ = _load("lung1")
    before = estimate_noise_hu(vol)
    out = gaussian_noise(vol, 30.0, np.random.default_rng(2))
    added = math.sqrt(estimate_noise_hu(out) ** 2 - before**2)
    assert added == pytest.approx(30.0, rel=0.1)


def test_low_dose_quarter_doubles_the_noise_on_a_phantom() -> None:
    vol, disks = _phantom(noise_hu=20.0)
    out = low_dose(vol, 0.25, np.random.default_rng(3), spacing=SPACING)
    assert _roi_sd(out, disks) / _roi_sd(vol, disks) == pytest.approx(2.0, rel=0.1)
    # Half the dose: sqrt(2) times the noise.
    half = low_dose(vol, 0.5, np.random.default_rng(3), spacing=SPACING)
    assert _roi_sd(half, disks) / _roi_sd(vol, disks) == pytest.approx(math.sqrt(2), rel=0.1)


def test_low_dose_quarter_doubles_the_measured_noise_on_a_real_ct() -> None:
    vol, spacing = _load("lung2")
    out = low_dose(vol, 0.25, np.random.default_rng(4), spacing=spacing)
    assert estimate_noise_hu(out) / estimate_noise_hu(vol) == pytest.approx(2.0, rel=0.1)


def test_low_dose_adds_more_noise_through_more_attenuation() -> None:
    # Three thin slices (200 mm across) and three thick ones (300 mm), the same noise in each.
    vol, disks = _phantom(diameters_mm=(200.0,) * 3 + (300.0,) * 3, noise_hu=10.0)
    out = low_dose(vol, 0.1, np.random.default_rng(5), spacing=SPACING)
    added_thin = math.sqrt(
        _roi_sd(out, disks, slice(0, 3)) ** 2 - _roi_sd(vol, disks, slice(0, 3)) ** 2
    )
    added_thick = math.sqrt(
        _roi_sd(out, disks, slice(3, 6)) ** 2 - _roi_sd(vol, disks, slice(3, 6)) ** 2
    )
    d = water_equivalent_diameter_mm(vol, SPACING[1] * SPACING[2])
    assert d[0] == pytest.approx(200 * math.sqrt(1.04), rel=0.03)
    expected = math.exp(MU_WATER_PER_MM * (d[3] - d[0]) / 2)
    assert added_thick / added_thin == pytest.approx(expected, rel=0.1)
    assert expected > 2.0
    # Without the attenuation model every slice gets the same noise.
    flat = low_dose(vol, 0.1, np.random.default_rng(5), spacing=SPACING, attenuation=False)
    ratio = (_roi_sd(flat, disks, slice(3, 6)) / _roi_sd(flat, disks, slice(0, 3))) ** 2
    assert ratio == pytest.approx(1.0, abs=0.15)


def test_low_dose_at_full_dose_changes_nothing_and_rejects_bad_fractions() -> None:
    vol, _ = _phantom()
    np.testing.assert_array_equal(low_dose(vol, 1.0, np.random.default_rng(0)), vol)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            low_dose(vol, bad, np.random.default_rng(0))


def _point_phantom() -> tuple[np.ndarray, tuple[int, int]]:
    vol = np.full((3, 96, 112), 40.0, dtype=np.float32)
    centre = (40, 60)
    vol[:, centre[0] - 1 : centre[0] + 2, centre[1] - 1 : centre[1] + 2] = 3000.0
    return vol, centre


def test_streaks_are_lines_through_the_bright_point() -> None:
    vol, (cy, cx) = _point_phantom()
    out = streaks(vol, 4, 200.0, np.random.default_rng(6))
    diff = out - vol
    # A line through the point is symmetric under reflection through it.
    r = min(cy, cx, vol.shape[1] - 1 - cy, vol.shape[2] - 1 - cx)
    window = diff[:, cy - r : cy + r + 1, cx - r : cx + r + 1]
    np.testing.assert_allclose(window, window[:, ::-1, ::-1], atol=1e-3)
    for z in range(vol.shape[0]):
        touched = np.abs(diff[z]) > 1.0
        # Thin lines, not a texture: a small part of the slice, reaching its edges.
        assert 0.02 < touched.mean() < 0.25
        edge = np.concatenate([touched[0], touched[-1], touched[:, 0], touched[:, -1]])
        assert edge.sum() >= 2
        assert np.abs(diff[z]).max() <= 4 * 200.0 + 1e-3
    # The default centre is the brightest point: the same as naming it.
    named = streaks(vol, 4, 200.0, np.random.default_rng(6), centres_yx=[(cy, cx)] * 3)
    np.testing.assert_allclose(out, named)


def test_rings_are_concentric_and_the_same_on_every_slice() -> None:
    vol = np.full((3, 100, 100), 40.0, dtype=np.float32)
    n, strength = 3, 80.0
    diff = rings(vol, n, strength, np.random.default_rng(7)) - vol
    np.testing.assert_allclose(diff[0], diff[2])
    np.testing.assert_allclose(diff[0], diff[0][::-1, :], atol=1e-4)
    np.testing.assert_allclose(diff[0], diff[0][:, ::-1], atol=1e-4)
    np.testing.assert_allclose(diff[0], diff[0].T, atol=1e-4)
    # Along a radius, n peaks of |diff| at least half the strength.
    profile = np.abs(diff[0, 50, 50:])
    peaks = [
        i for i in range(1, len(profile) - 1) if profile[i] >= max(profile[i - 1], profile[i + 1])
    ]
    strong = [i for i in peaks if profile[i] > 0.4 * strength]
    assert 1 <= len(strong) <= n
    assert np.abs(diff).max() <= n * strength + 1e-3


def test_blur_widens_an_edge_by_sigma_and_keeps_the_mean() -> None:
    spacing = (2.0, 0.5, 0.5)
    vol = np.zeros((4, 40, 200), dtype=np.int16)
    vol[:, :, 100:] = 1000
    out = blur(vol, 1.5, spacing)
    assert out.dtype == np.float32 and out.shape == vol.shape
    profile = out[2, 20]
    x16 = np.interp(160.0, profile, np.arange(200))
    x84 = np.interp(840.0, profile, np.arange(200))
    # The 16-84 % rise of a Gaussian-blurred step is 2 sigma.
    assert (x84 - x16) * spacing[2] == pytest.approx(3.0, rel=0.1)
    assert float(out.mean()) == pytest.approx(float(vol.mean()), rel=1e-3)
    np.testing.assert_array_equal(blur(vol, 0.0, spacing), vol)


def test_thick_slices_average_groups_and_scale_the_spacing() -> None:
    vol = np.random.default_rng(8).normal(0, 100, (7, 4, 5)).astype(np.float32)
    thick, spacing = thick_slices(vol, (1.0, 0.7, 0.6), 3)
    assert thick.dtype == np.float32 and thick.shape == (3, 4, 5)
    assert spacing == (3.0, 0.7, 0.6)
    np.testing.assert_allclose(thick[0], vol[0:3].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(thick[1], vol[3:6].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(thick[2], vol[6], rtol=1e-5)
    same, sp1 = thick_slices(vol, (1.0, 0.7, 0.6), 1)
    np.testing.assert_array_equal(same, vol)
    assert sp1 == (1.0, 0.7, 0.6)
    with pytest.raises(ValueError):
        thick_slices(vol, (1.0, 0.7, 0.6), 0)


def test_thick_slices_on_grid_keeps_the_grid_and_loses_through_plane_detail() -> None:
    z = np.arange(12, dtype=np.float32)
    ramp = np.broadcast_to((10.0 * z)[:, None, None], (12, 3, 3)).copy()
    out = thick_slices_on_grid(ramp, (1.0, 1.0, 1.0), 3)
    assert out.shape == ramp.shape and out.dtype == np.float32
    # Linear along z: exact between the first and last thick slices' centres (slices 1..10).
    np.testing.assert_allclose(out[1:11], ramp[1:11], atol=1e-4)
    # One bright slice is averaged with its neighbours: its peak falls to about a third.
    spike = np.zeros((12, 3, 3), dtype=np.float32)
    spike[4] = 300.0
    smeared = thick_slices_on_grid(spike, (1.0, 1.0, 1.0), 3)
    assert float(smeared.max()) == pytest.approx(100.0, rel=1e-4)
    np.testing.assert_array_equal(thick_slices_on_grid(spike, (1.0, 1.0, 1.0), 1), spike)


PERTURBATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": lambda v, rng: gaussian_noise(v, 20.0, rng),
    "low_dose": lambda v, rng: low_dose(v, 0.3, rng, spacing=SPACING),
    "streaks": lambda v, rng: streaks(v, 5, 150.0, rng),
    "rings": lambda v, rng: rings(v, 4, 60.0, rng),
    "blur": lambda v, rng: blur(v, 2.0, SPACING),
    "thick_slices_on_grid": lambda v, rng: thick_slices_on_grid(v, SPACING, 2),
}
RANDOM = {"gaussian_noise", "low_dose", "streaks", "rings"}


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_deterministic_for_a_seed_and_input_untouched(name: str, dtype: type) -> None:
    noisy, _ = _phantom()
    vol = noisy.astype(dtype)
    original = vol.copy()
    fn = PERTURBATIONS[name]
    a = fn(vol, np.random.default_rng(42))
    b = fn(vol, np.random.default_rng(42))
    np.testing.assert_array_equal(vol, original)
    assert a.dtype == np.float32 and a.shape == vol.shape
    assert a is not vol
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, vol.astype(np.float32))
    if name in RANDOM:
        assert not np.array_equal(a, fn(vol, np.random.default_rng(43)))


def test_random_perturbations_require_a_generator() -> None:
    vol, _ = _phantom()
    with pytest.raises(TypeError):
        gaussian_noise(vol, 10.0, 42)  # type: ignore[arg-type]
