"""Morphology on (z, y, x) masks with physical spacing: disks in millimetres, per-slice closing,
coarse-grid down- and upsampling for speed, hole filling. numpy, scipy and SimpleITK (its
exact distance transform); imports nothing of ours."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# Coarse in-plane pixel size for the lung envelope and the lesion openings.
COARSE_PIXEL_MM = 1.3
# Relative widening of the squared radius of a closing's disk: distances that close to the rim
# count as on it (see close_2d).
RIM_TOLERANCE = 1e-4
# Padded slices of at least this many pixels go through ITK's distance transform, smaller ones
# through scipy's: ITK costs about 2 ms a call whatever the size and breaks even at about 250 x 250
# pixels (a closing on 0.8 mm pixels: 120 x 120 2.2 ms against scipy's 0.65, 300 x 300 4.0 against
# 4.8); a lung of a clinical CT with its padding is 300 x 400 or more.
ITK_MIN_PIXELS = 256 * 256


def check_volume(volume: np.ndarray, spacing_zyx) -> tuple[float, float, float]:
    if np.ndim(volume) != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {np.shape(volume)}")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing_zyx must be three positive numbers, got {spacing_zyx}")
    return spacing  # type: ignore[return-value]


def disk(radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """In-plane elliptical footprint (in pixels) of a disk of the given radius in mm."""
    ry, rx = radius_mm / spacing_yx[0], radius_mm / spacing_yx[1]
    ny, nx = int(math.floor(ry)), int(math.floor(rx))
    yy, xx = np.mgrid[-ny : ny + 1, -nx : nx + 1]
    return (yy / max(ry, 1e-9)) ** 2 + (xx / max(rx, 1e-9)) ** 2 <= 1.0


def as_bytes(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as 0/1 bytes (for find_objects and ITK), without a copy where it is
    already a contiguous boolean array (a clinical CT's mask is over 100 MB)."""
    if mask.dtype == np.bool_ and mask.flags.c_contiguous:
        return mask.view(np.uint8)
    return np.asarray(mask, dtype=bool).astype(np.uint8)


def bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    boxes = ndimage.find_objects(as_bytes(mask))
    return boxes[0] if boxes else None


def _scipy_squared_distance_to(obj: np.ndarray, spacing_yx: tuple[float, float]) -> np.ndarray:
    """As :func:`_squared_distance_to`, by scipy's exact transform (float64)."""
    return ndimage.distance_transform_edt(~obj, sampling=spacing_yx) ** 2


def _squared_distance_to(obj: np.ndarray, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Squared distance in mm² from each pixel outside ``obj`` to its nearest pixel of ``obj``
    (zero or below inside it). ITK's Maurer transform: exact like scipy's, without the feature
    transform scipy builds first, and faster on lung-sized slices (see ITK_MIN_PIXELS); one
    thread, since the worker's cores are shared out by the caller and a second thread gained
    nothing at this size."""
    transform = sitk.SignedMaurerDistanceMapImageFilter()
    transform.SetSquaredDistance(True)
    transform.SetUseImageSpacing(True)
    transform.SetInsideIsPositive(False)
    transform.SetNumberOfThreads(1)
    image = sitk.GetImageFromArray(as_bytes(obj))
    image.SetSpacing((float(spacing_yx[1]), float(spacing_yx[0])))
    return sitk.GetArrayFromImage(transform.Execute(image))


def close_2d(mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Morphological closing by a disk via two exact distance transforms (fast for large radii):
    dilate to every pixel within the radius of the mask, then erode to the pixels further than
    the radius from what the dilation left out."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    pad = int(math.ceil(radius_mm / min(spacing_yx))) + 2
    padded = np.pad(mask, pad)
    # ITK's squared distances are float32 and carry a few millionths of relative error that
    # depends on the direction it swept from, so a pixel exactly on the disk's rim (on pixel
    # grids where the radius is a lattice distance) could fall either side, and differently on a
    # mirrored slice: the rim is widened by a relative 1e-4 (3 um at 30 mm), which is inside.
    # The same widened rim for scipy's transform below, so that both give the same closing.
    limit = radius_mm * radius_mm * (1.0 + RIM_TOLERANCE)
    transform = (
        _squared_distance_to if padded.size >= ITK_MIN_PIXELS else _scipy_squared_distance_to
    )
    dilated = transform(padded, spacing_yx) <= limit
    closed = transform(~dilated, spacing_yx) > limit
    return closed[pad:-pad, pad:-pad]


def coarse_factor(spacing_yx: tuple[float, float]) -> int:
    return max(1, int(COARSE_PIXEL_MM / max(spacing_yx)))


def downsample(mask: np.ndarray, factor: int, rule: str) -> np.ndarray:
    """Shrink the last two axes by ``factor``: a block is set if ``any`` or ``most`` of it is."""
    if factor == 1:
        return mask
    h, w = mask.shape[-2:]
    ph, pw = -h % factor, -w % factor
    pad = [(0, 0)] * (mask.ndim - 2) + [(0, ph), (0, pw)]
    blocks = np.pad(mask, pad).reshape(
        mask.shape[:-2] + ((h + ph) // factor, factor, (w + pw) // factor, factor)
    )
    if rule == "any":
        return blocks.any(axis=(-3, -1))
    return blocks.sum(axis=(-3, -1), dtype=np.int16) * 2 >= factor * factor


def upsample(arr: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    if factor == 1:
        return arr
    big = np.repeat(np.repeat(arr, factor, axis=-2), factor, axis=-1)
    return big[..., : shape[-2], : shape[-1]]


def label_sizes(labels: np.ndarray, n: int, slab: int = 16) -> np.ndarray:
    """Voxels per label 0..n of a (z, y, x) label array, counted a few slices at a time:
    np.bincount converts its input to int64, which over a whole clinical CT is a copy twice the
    size of an int32 label volume."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    for z in range(0, labels.shape[0], slab):
        sizes += np.bincount(labels[z : z + slab].ravel(), minlength=n + 1)
    return sizes


def label_compact(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``ndimage.label`` into uint16 labels (half of its default int32's size: 280 MB less on a
    clinical CT's volume), or int32 when there are more components than uint16 can number."""
    try:
        return ndimage.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # "insufficient bit-depth": more than 65,535 components
        return ndimage.label(mask, structure=structure)


def compact_labels(highest: int) -> np.dtype:
    """The narrowest unsigned type for labels 0..highest (uint8 up to 255)."""
    return np.min_scalar_type(max(int(highest), 255))


def centroid(mask: np.ndarray) -> np.ndarray:
    """Centroid (index per axis, e.g. (y, x) or (z, y, x)) of a non-empty mask, from its
    projections on each axis: no array of coordinates (np.argwhere's int64 triples of a
    clinical CT's lungs are hundreds of megabytes; scipy's center_of_mass makes float64 copies
    of the whole volume)."""
    axes = range(mask.ndim)
    sums = [mask.sum(axis=tuple(a for a in axes if a != k), dtype=np.int64) for k in axes]
    total = sums[0].sum()
    return np.array([s @ np.arange(len(s)) for s in sums]) / total


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """2-D hole filling by labelling the background (several times faster than scipy's flood)."""
    background, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.unique(
        np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    )
    holes = np.ones(n + 1, dtype=bool)
    holes[border] = False
    holes[0] = False
    return mask | holes[background]
