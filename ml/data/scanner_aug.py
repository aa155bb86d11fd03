"""Training augmentation for what other scanners and protocols do to a study, applied to the
volume and its label together: mirrors, rotation, scale, pixel size and slice thickness, noise and
dose, sharp and smooth kernels.

Geometry changes move the label with the image: the image is interpolated linearly, each label
value's mask is interpolated as a fraction and kept where it is at least 1/2, so labels stay
binary (or the same integer values) and keep their physical volume. A coarser grid is an average,
not a point sample: before going to a coarser spacing the image and masks are smoothed by the box
that one new voxel covers (as a Gaussian of the same variance), so a 5 mm slice is a thick slice.
Noise, dose and the smooth kernel reuse :mod:`ml.data.perturb`; only the sharp kernel (unsharp
masking in-plane, which also raises the noise, as a sharp kernel does) is new here.

Every function returns new arrays; random choices come only from the generator passed in.
Measured on the shared 2-core machine, lung2 (61 x 512 x 512, 5 x 0.63 x 0.63 mm) with an inserted
nodule: mirror 0.1 s; rotate 1.9 s; rescale 1.3 s; resample to 5 x 1 x 1 mm 0.9 s, to
1 x 0.7 x 0.7 mm (five times the slices) 7 s; sharpen 0.3 s.
Imports `ml.image` and `ml.data.perturb`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ml.data import perturb
from ml.image.preprocess import resample

Spacing = tuple[float, float, float]
AIR_HU = -1024.0
SCALE_RANGE = (0.85, 1.15)
ROTATION_DEG = 15.0
IN_PLANE_MM = (0.5, 1.0)
SLICE_MM = (1.0, 5.0)
DOSE_FRACTION = (0.25, 1.0)


def _per_label(labels: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a float-valued geometric map to each label value's mask; keep fractions >= 1/2."""
    labels = np.asarray(labels)
    values = [v for v in np.unique(labels) if v != 0]
    out: np.ndarray | None = None
    for v in values:
        frac = fn((labels == v).astype(np.float32))
        if out is None:
            out = np.zeros(frac.shape, dtype=labels.dtype)
        out[frac >= 0.5] = v
    if out is None:
        out = np.zeros(fn(np.zeros(labels.shape, dtype=np.float32)).shape, dtype=labels.dtype)
    return out


def mirror(
    volume: np.ndarray, labels: np.ndarray, axes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Flip along ``axes`` (0 = z, head-feet; 1 = y, front-back; 2 = x, left-right)."""
    axes = tuple(int(a) for a in axes)
    return np.flip(volume, axes).copy(), np.flip(labels, axes).copy()


def _z_reach(shape: Sequence[int], sp: np.ndarray, m: np.ndarray) -> tuple[int, int]:
    """Slices below 0 and beyond the last that ``x_in = M (x_out - c) + c`` reads from the grid's
    corners (whole slices, rounded up)."""
    centre = (np.array(shape) - 1) / 2.0 * sp
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    z_in = (m @ (corners.T * sp - centre).T)[0] / sp[0] + (shape[0] - 1) / 2.0
    below = max(0, math.ceil(-float(z_in.min()) - 1e-6))
    above = max(0, math.ceil(float(z_in.max()) - (shape[0] - 1) - 1e-6))
    return below, above


def _affine(
    volume: np.ndarray, labels: np.ndarray, spacing: Sequence[float], matrix_zyx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Resample on the same grid through ``x_in = M (x_out - c) + c`` (physical, c the centre).

    Beyond the first and last slice the source is extended with those slices, image and labels
    alike; in-plane, outside is air (labels 0). Air above and below would join the lungs to the
    air outside the body, and a CT's scan range ends inside the anatomy, not in air. A label is
    extended only where it touches the end slice: the lungs; never an inserted nodule, which
    `ml.data.compose` keeps off the volume's faces."""
    sp = np.asarray(spacing, dtype=np.float64)
    centre = (np.array(volume.shape) - 1) / 2.0 * sp
    m_zyx = np.asarray(matrix_zyx, dtype=np.float64)
    below, above = _z_reach(volume.shape, sp, m_zyx)
    # SimpleITK works in (x, y, z): reverse the axes of the matrix and the centre.
    m = m_zyx[::-1, ::-1]
    transform = sitk.AffineTransform(m.ravel().tolist(), (0.0, 0.0, 0.0), centre[::-1].tolist())
    reference = sitk.Image([int(n) for n in volume.shape[::-1]], sitk.sitkFloat32)
    reference.SetSpacing(sp[::-1].tolist())

    def warp(arr: np.ndarray, default: float) -> np.ndarray:
        padded = np.pad(np.asarray(arr, dtype=np.float32), ((below, above), (0, 0), (0, 0)), "edge")
        img = sitk.GetImageFromArray(padded)
        img.SetSpacing(sp[::-1].tolist())
        img.SetOrigin((0.0, 0.0, -below * float(sp[0])))
        out = sitk.Resample(img, reference, transform, sitk.sitkLinear, default, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)

    return warp(volume, AIR_HU), _per_label(labels, lambda m_: warp(m_, 0.0))


def rotate(
    volume: np.ndarray, labels: np.ndarray, spacing: Sequence[float], angle_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate in the axial plane by ``angle_deg`` about the volume's centre (physical space, so
    non-square pixels are handled); corners from outside are air."""
    a = math.radians(angle_deg)
    m = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return _affine(volume, labels, spacing, m)


def rescale(
    volume: np.ndarray, labels: np.ndarray, spacing: Sequence[float], factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Make the anatomy ``factor`` times larger (all three axes) about the centre, same grid;
    when smaller, the end slices are repeated beyond the ends (see `_affine`)."""
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return _affine(volume, labels, spacing, np.eye(3) / factor)


def _antialias(arr: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    w = np.asarray(target, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)
    sigma = np.sqrt(np.maximum(w * w - 1.0, 0.0) / 12.0)
    if sigma.max() < 0.05:
        return arr
    return ndimage.gaussian_filter(arr.astype(np.float32), sigma, mode="nearest")


def resample_spacing(
    volume: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, Spacing]:
    """The study on a grid of ``target_spacing`` (z, y, x) mm over the same extent (see
    :func:`ml.image.preprocess.resample`): returns (volume, labels, spacing actually used)."""
    sp = tuple(float(s) for s in spacing)
    target = tuple(float(t) for t in target_spacing)
    vol, new_sp = resample(_antialias(volume, sp, target), sp, target_spacing=target)

    def mask(m: np.ndarray) -> np.ndarray:
        return resample(_antialias(m, sp, target), sp, target_spacing=target)[0]

    return vol, _per_label(labels, mask), new_sp


def sharpen(
    volume: np.ndarray, spacing: Sequence[float], amount: float = 1.0, sigma_mm: float = 1.0
) -> np.ndarray:
    """A sharper reconstruction kernel, imitated by in-plane unsharp masking:
    ``v + amount * (v - G_sigma v)``; edges overshoot and the noise rises, as with a bone or lung
    kernel. ``amount`` 0 is the identity."""
    if amount < 0 or sigma_mm <= 0:
        raise ValueError("amount must be >= 0 and sigma_mm > 0")
    sp = [float(s) for s in spacing]
    vol = np.asarray(volume, dtype=np.float32)
    smooth = ndimage.gaussian_filter(vol, [0.0, sigma_mm / sp[1], sigma_mm / sp[2]], mode="nearest")
    return (vol + np.float32(amount) * (vol - smooth)).astype(np.float32)


def random_scanner(
    volume: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    *,
    p_mirror: float = 0.5,
    p_rotate: float = 0.5,
    p_scale: float = 0.5,
    p_grid: float = 0.5,
    p_dose: float = 0.5,
    p_kernel: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, Spacing, dict[str, object]]:
    """One random draw of the augmentations above (each with its probability), in the order
    geometry, grid, dose, kernel. Returns (volume, labels, spacing, what was done)."""
    sp: Spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    done: dict[str, object] = {}
    axes = [a for a in (2, 1, 0) if rng.random() < p_mirror]
    if axes:
        volume, labels = mirror(volume, labels, axes)
        done["mirror_axes"] = axes
    if rng.random() < p_rotate:
        angle = float(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
        volume, labels = rotate(volume, labels, sp, angle)
        done["rotate_deg"] = angle
    if rng.random() < p_scale:
        factor = float(rng.uniform(*SCALE_RANGE))
        volume, labels = rescale(volume, labels, sp, factor)
        done["scale"] = factor
    if rng.random() < p_grid:
        pixel = float(rng.uniform(*IN_PLANE_MM))
        thickness = float(rng.uniform(*SLICE_MM))
        volume, labels, sp = resample_spacing(volume, labels, sp, (thickness, pixel, pixel))
        done["spacing"] = list(sp)
    if rng.random() < p_dose:
        fraction = float(rng.uniform(*DOSE_FRACTION))
        volume = perturb.low_dose(volume, fraction, rng, spacing=sp)
        done["dose_fraction"] = fraction
    if rng.random() < p_kernel:
        if rng.random() < 0.5:
            amount = float(rng.uniform(0.5, 1.5))
            volume = sharpen(volume, sp, amount)
            done["sharp_kernel"] = amount
        else:
            sigma = float(rng.uniform(0.4, 1.0))
            volume = perturb.blur(volume, (0.0, sigma, sigma), sp)
            done["smooth_kernel_mm"] = sigma
    return np.asarray(volume, dtype=np.float32), labels, sp, done
