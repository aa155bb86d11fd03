"""Deterministic image degradations for the robustness table: noise, simulated dose reduction,
metal-like streaks, detector rings, blur and thick slices.

Every function takes a (z, y, x) HU volume, never modifies it, and returns a new float32 HU volume
of the same shape (except :func:`thick_slices`, which returns fewer slices). Random choices come
only from the ``numpy.random.Generator`` passed in, so one seed gives one result.

Timings on one core for the 512x512x61 sample CT (shared, loaded machine): gaussian_noise 0.2 s,
low_dose 0.4 s, streaks (n=8) 0.5 s, rings < 0.1 s, blur (1.5 mm) 0.7 s, thick slices 0.2-0.3 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ml.runtime.qa import estimate_noise_hu

__all__ = [
    "blur",
    "gaussian_noise",
    "low_dose",
    "rings",
    "streaks",
    "thick_slices",
    "thick_slices_on_grid",
    "water_equivalent_diameter_mm",
]

# Linear attenuation of water at a CT beam's effective energy (~70 keV), per mm.
MU_WATER_PER_MM = 0.019
# Pixel size assumed when low_dose is given no spacing (a 512 matrix over a 36 cm field).
_DEFAULT_PIXEL_MM = 0.7
# Slice-to-slice differences in water-equivalent diameter beyond this are clipped, so that an
# empty or corrupt slice cannot produce an absurd noise factor.
_MAX_DIAMETER_DIFF_MM = 200.0
# Noise level assumed when the volume has no soft tissue to measure it in.
_FALLBACK_NOISE_HU = 10.0


def _copy(vol: np.ndarray) -> np.ndarray:
    arr = np.array(vol, dtype=np.float32, copy=True)
    if arr.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {arr.shape}")
    return arr


def _check_rng(rng: np.random.Generator) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed))")
    return rng


def gaussian_noise(vol: np.ndarray, sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise of standard deviation ``sigma_hu`` to every voxel."""
    if sigma_hu < 0:
        raise ValueError(f"sigma_hu must be >= 0, got {sigma_hu}")
    out = _copy(vol)
    noise = _check_rng(rng).standard_normal(out.shape, dtype=np.float32)
    noise *= np.float32(sigma_hu)
    out += noise
    return out


def water_equivalent_diameter_mm(vol: np.ndarray, pixel_area_mm2: float) -> np.ndarray:
    """Per-slice water-equivalent diameter (AAPM TG-220 idea): the diameter of the water disk
    that attenuates as much as the slice, from sum((HU/1000 + 1) * pixel area); air counts 0."""
    rel = np.clip(np.asarray(vol, dtype=np.float32) / 1000.0 + 1.0, 0.0, None)
    area = rel.sum(axis=(1, 2), dtype=np.float64) * pixel_area_mm2
    return 2.0 * np.sqrt(area / math.pi)


def low_dose(
    vol: np.ndarray,
    dose_fraction: float,
    rng: np.random.Generator,
    *,
    spacing: Sequence[float] | None = None,
    base_noise_hu: float | None = None,
    attenuation: bool = True,
) -> np.ndarray:
    """Simulate the same scan at ``dose_fraction`` (0 < f <= 1) of its dose, by adding noise.

    Model (simple, physically motivated, image domain): quantum noise variance is inversely
    proportional to the number of detected photons, so at a fraction f of the dose the noise SD
    is sigma / sqrt(f); the noise to add has SD sigma * sqrt(1/f - 1). The scan's own noise
    sigma is measured with :func:`ml.qa.estimate_noise_hu` (or given as ``base_noise_hu``).
    Photons left after a path of water-equivalent length D are exp(-mu D), so the noise SD grows
    like exp(mu D / 2): with ``attenuation`` each slice's added SD is scaled by
    exp(mu (D_z - D_mean) / 2), normalised to RMS 1 over the slices, where D_z is the slice's
    water-equivalent diameter (shoulders and abdomen noisier than mid-chest). This assumes fixed
    tube current (no automatic exposure control) and ignores the variation within a slice and
    the reconstruction kernel's noise texture: the added noise is white. So at f = 0.25 the noise
    as measured by ``estimate_noise_hu`` doubles; the pixel SD of a soft-kernel scan rises less.

    ``spacing`` (z, y, x) in mm gives the pixel size for D; without it 0.7 mm is assumed.
    """
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    out = _copy(vol)
    rng = _check_rng(rng)
    sigma = estimate_noise_hu(out) if base_noise_hu is None else float(base_noise_hu)
    if not math.isfinite(sigma) or sigma <= 0:
        sigma = _FALLBACK_NOISE_HU
    added = sigma * math.sqrt(1.0 / dose_fraction - 1.0)
    factors = np.ones(out.shape[0], dtype=np.float64)
    if attenuation:
        if spacing is None:
            pixel_area = _DEFAULT_PIXEL_MM**2
        else:
            sp = [float(s) for s in spacing]
            if len(sp) != 3 or min(sp) <= 0:
                raise ValueError(f"spacing must be three positive numbers, got {spacing}")
            pixel_area = sp[1] * sp[2]
        diameters = water_equivalent_diameter_mm(out, pixel_area)
        diff = np.clip(diameters - diameters.mean(), -_MAX_DIAMETER_DIFF_MM, _MAX_DIAMETER_DIFF_MM)
        factors = np.exp(MU_WATER_PER_MM * diff / 2.0)
        factors /= math.sqrt(float(np.mean(factors**2)))
    noise = rng.standard_normal(out.shape, dtype=np.float32)
    noise *= (added * factors).astype(np.float32)[:, None, None]
    out += noise
    return out


def _bright_point(plane: np.ndarray) -> tuple[float, float]:
    # A 3x3 mean keeps a single noisy pixel from winning over a real dense object.
    smooth = ndimage.uniform_filter(plane, 3)
    y, x = np.unravel_index(int(np.argmax(smooth)), plane.shape)
    return float(y), float(x)


def streaks(
    vol: np.ndarray,
    n: int,
    strength_hu: float,
    rng: np.random.Generator,
    *,
    width_px: float = 1.0,
    centres_yx: Sequence[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Metal/photon-starvation-like streaks: on each slice, ``n`` straight lines through the
    slice's brightest point (a 3x3 mean's maximum, or ``centres_yx[z]``), at random angles,
    each bright or dark with amplitude ``strength_hu`` times U(0.5, 1) and a Gaussian profile of
    ``width_px`` across. Like a filtered-back-projection streak, each line keeps its amplitude
    across the whole slice."""
    if n < 0 or strength_hu < 0 or width_px <= 0:
        raise ValueError("n and strength_hu must be >= 0 and width_px > 0")
    out = _copy(vol)
    rng = _check_rng(rng)
    nz, ny, nx = out.shape
    if centres_yx is not None and len(centres_yx) != nz:
        raise ValueError(f"centres_yx needs one (y, x) per slice ({nz}), got {len(centres_yx)}")
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    reach = 4.0 * width_px
    for z in range(nz):
        angles = rng.uniform(0.0, math.pi, size=n)
        amps = strength_hu * rng.uniform(0.5, 1.0, size=n) * rng.choice([-1.0, 1.0], size=n)
        cy, cx = centres_yx[z] if centres_yx is not None else _bright_point(out[z])
        dy, dx = yy - np.float32(cy), xx - np.float32(cx)
        pattern = np.zeros((ny, nx), dtype=np.float32)
        for theta, amp in zip(angles, amps, strict=True):
            # Distance of each pixel from the line through the centre at angle theta.
            d = np.abs(dx * np.float32(math.sin(theta)) - dy * np.float32(math.cos(theta)))
            near = d < reach
            pattern[near] += np.float32(amp) * np.exp(-0.5 * (d[near] / width_px) ** 2)
        out[z] += pattern
    return out


def rings(
    vol: np.ndarray,
    n: int,
    strength_hu: float,
    rng: np.random.Generator,
    *,
    width_px: float = 1.0,
) -> np.ndarray:
    """Detector ring artefacts: ``n`` concentric rings around the image centre at random radii
    (5 px to 45 % of the smaller side), each bright or dark with amplitude ``strength_hu`` times
    U(0.5, 1) and a Gaussian radial profile of ``width_px``. A miscalibrated detector channel
    draws the same ring on every slice, so all slices get the same pattern."""
    if n < 0 or strength_hu < 0 or width_px <= 0:
        raise ValueError("n and strength_hu must be >= 0 and width_px > 0")
    out = _copy(vol)
    rng = _check_rng(rng)
    _, ny, nx = out.shape
    r_max = max(6.0, 0.45 * min(ny, nx))
    radii = rng.uniform(5.0, r_max, size=n)
    amps = strength_hu * rng.uniform(0.5, 1.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    yy = np.arange(ny, dtype=np.float32)[:, None] - np.float32((ny - 1) / 2)
    xx = np.arange(nx, dtype=np.float32)[None, :] - np.float32((nx - 1) / 2)
    r = np.hypot(yy, xx)
    pattern = np.zeros((ny, nx), dtype=np.float32)
    for radius, amp in zip(radii, amps, strict=True):
        pattern += np.float32(amp) * np.exp(-0.5 * ((r - np.float32(radius)) / width_px) ** 2)
    out += pattern[None]
    return out


def blur(
    vol: np.ndarray, sigma_mm: float | Sequence[float], spacing: Sequence[float]
) -> np.ndarray:
    """Gaussian blur of ``sigma_mm`` (one number: isotropic in mm; or (z, y, x)) using the real
    voxel spacing, as a softer kernel or worse focal spot would blur; edges replicated."""
    out = _copy(vol)
    sp = [float(s) for s in spacing]
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    sig = [float(sigma_mm)] * 3 if np.isscalar(sigma_mm) else [float(s) for s in sigma_mm]  # type: ignore[union-attr]
    if len(sig) != 3 or min(sig) < 0:
        raise ValueError(f"sigma_mm must be >= 0 (one number or three), got {sigma_mm}")
    return ndimage.gaussian_filter(
        out, sigma=[s / p for s, p in zip(sig, sp, strict=True)], mode="nearest", output=np.float32
    )


def _check_factor(factor: int) -> int:
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    return int(factor)


def thick_slices(
    vol: np.ndarray, spacing: Sequence[float], factor: int
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Average each group of ``factor`` consecutive slices into one thick slice, as a scanner
    reconstructing thicker sections would. Returns (ceil(nz / factor) slices, spacing with z
    multiplied by ``factor``); a last incomplete group is averaged over the slices it has.

    The result no longer matches the original grid (nor its masks): for the robustness table use
    :func:`thick_slices_on_grid`, which brings it back onto the original slices."""
    out = _copy(vol)
    f = _check_factor(factor)
    sz, sy, sx = (float(s) for s in spacing)
    nz = out.shape[0]
    starts = np.arange(0, nz, f)
    sums = np.add.reduceat(out, starts, axis=0, dtype=np.float64)
    counts = np.diff(np.append(starts, nz)).astype(np.float64)
    thick = (sums / counts[:, None, None]).astype(np.float32)
    return thick, (sz * f, sy, sx)


def thick_slices_on_grid(vol: np.ndarray, spacing: Sequence[float], factor: int) -> np.ndarray:
    """:func:`thick_slices`, then linear interpolation along z from the thick slices' centres back
    to the original slice positions (clamped at the ends): same shape and grid as the input, so
    ground-truth masks and metrics stay aligned. This is the form the evaluation uses: the model
    sees the through-plane detail lost to thick sections, on the grid its labels are defined on."""
    f = _check_factor(factor)
    arr = np.asarray(vol)
    thick, _ = thick_slices(arr, spacing, f)
    nz = arr.shape[0]
    starts = np.arange(0, nz, f)
    ends = np.minimum(starts + f, nz)
    centres = (starts + ends - 1) / 2.0
    idx = np.arange(nz, dtype=np.float64)
    pos = np.interp(idx, centres, np.arange(len(centres), dtype=np.float64))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(centres) - 1)
    w = (pos - lo).astype(np.float32)[:, None, None]
    return thick[lo] * (1.0 - w) + thick[hi] * w
