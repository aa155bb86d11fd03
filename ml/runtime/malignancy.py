"""The per-nodule malignancy score: the LIDC readers' impression, learned by a small 3-D CNN.

What the score means: the network's estimate of the probability that the LIDC-IDRI radiologists,
rating this nodule on their 1-5 malignancy-likelihood scale, would give it a max-voted rating of 4
or 5 ("moderately" or "highly suspicious") rather than 1 or 2. It was trained on nodules rated
1, 2, 4 or 5 only (3 = "indeterminate" left out), so for a nodule they would rate 3 it is a guess
between the two camps. It is a radiologists' impression, NOT pathology, NOT a diagnosis, and not
for clinical use; the readers' impression is known to follow size closely.

Input contract (:func:`nodule_patch`, shared by training and inference so the two cannot
drift apart): a cube of ``PATCH``³ voxels at ``PATCH_SPACING_MM`` mm centred on the lesion mask's
centroid, resampled from whatever spacing the scan has (trilinear). Channel 0 is HU clipped to
``HU_RANGE`` and mapped to [0, 1]; channel 1 is the lesion mask on the same grid. Context above
and below the lesion's own slices is blanked (set to air) because in about half of the LIDC
training crops the crop ends at the nodule's first and last slice: the network never learned
from that context, so at inference it is not shown any either. Outside the scan is air too.

At inference the score is the mean over the four in-plane flips (none, x, y, both), which makes
it invariant to a left-right mirror of the scan. Imports `ml.runtime` and `ml.image`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from ml.image.morphology import as_bytes, bbox
from ml.runtime import networks
from ml.runtime.registry import LoadedModel

PATCH = int(networks.MALIGNANCY_ARCH["in_shape"][-1])  # type: ignore[index]
PATCH_SPACING_MM = 1.0
HU_RANGE = (-1000.0, 1000.0)  # wide enough to tell calcification (benign) from soft tissue
AIR_HU = -1000.0
# Flips over (y, x) of a (n, c, z, y, x) batch: the set is closed under a left-right mirror.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (4,), (3,), (3, 4))


def scale_hu(hu: np.ndarray) -> np.ndarray:
    lo, hi = HU_RANGE
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def nodule_patch(
    volume_hu: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    patch: int = PATCH,
    patch_spacing_mm: float = PATCH_SPACING_MM,
) -> np.ndarray:
    """(2, patch, patch, patch) float32 network input of the lesion ``mask`` (boolean, on the
    grid of ``volume_hu``, (z, y, x), spacing in mm), centred on the mask's centroid.

    Voxel i of an axis covers [i * s, (i + 1) * s] mm, so its centre is at (i + 0.5) * s."""
    hu = np.asarray(volume_hu, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    sp = _spacing(spacing_zyx)
    if hu.ndim != 3 or m.shape != hu.shape:
        raise ValueError(f"need a 3-D volume and a mask of its shape, got {hu.shape}, {m.shape}")
    box = bbox(m)
    if box is None:
        raise ValueError("empty lesion mask")
    return _patch(hu, lambda window: m[window], box, sp, patch, patch_spacing_mm)


def _spacing(spacing_zyx: Sequence[float]) -> np.ndarray:
    sp = np.asarray([float(s) for s in spacing_zyx], dtype=np.float64)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive numbers, got {spacing_zyx}")
    return sp


def _patch(
    hu: np.ndarray,
    mask_in: Callable[[tuple[slice, ...]], np.ndarray],
    box: tuple[slice, ...],
    sp: np.ndarray,
    patch: int,
    patch_spacing_mm: float,
) -> np.ndarray:
    """:func:`nodule_patch` of the lesion whose mask, within any window of the volume, is
    ``mask_in(window)`` and lies inside ``box``. Only the box and the part of the volume the
    patch samples are read: on a clinical CT a whole-volume mask, its float copy and its
    coordinates cost half a gigabyte and most of a second per lesion."""
    start = np.array([s.start for s in box])
    idx = np.argwhere(mask_in(box)) + start
    centre_mm = (idx.mean(axis=0) + 0.5) * sp
    offsets = (np.arange(patch) - (patch - 1) / 2.0) * patch_spacing_mm
    axes_mm = [centre_mm[a] + offsets for a in range(3)]
    # Fractional voxel index of each patch sample point, axis by axis.
    axes_idx = [axes_mm[a] / sp[a] - 0.5 for a in range(3)]
    # The voxels linear interpolation reads at those points (both neighbours of each); outside
    # the volume, map_coordinates' constant fills in as it would on the whole volume. Shifting
    # the coordinates by whole voxels is exact, so the samples are the whole volume's.
    lo = [min(max(int(np.floor(a[0])), 0), n - 1) for a, n in zip(axes_idx, hu.shape, strict=True)]
    hi = [
        max(min(int(np.floor(a[-1])) + 2, n), lo_ + 1)
        for a, n, lo_ in zip(axes_idx, hu.shape, lo, strict=True)
    ]
    window = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    local = [a - o for a, o in zip(axes_idx, lo, strict=True)]
    coords = np.stack(np.meshgrid(*local, indexing="ij"))
    image = ndimage.map_coordinates(hu[window], coords, order=1, mode="constant", cval=AIR_HU)
    near = mask_in(window).astype(np.float32)
    label = ndimage.map_coordinates(near, coords, order=1, mode="constant")
    z_lo, z_hi = idx[:, 0].min() * sp[0], (idx[:, 0].max() + 1) * sp[0]
    outside = (axes_mm[0] < z_lo) | (axes_mm[0] > z_hi)
    image[outside] = AIR_HU
    label[outside] = 0.0
    return np.stack([scale_hu(image), np.clip(label, 0.0, 1.0)]).astype(np.float32)


def predict_patches(net: torch.nn.Module, patches: np.ndarray | torch.Tensor) -> np.ndarray:
    """Scores in [0, 1] of a batch of :func:`nodule_patch` inputs, averaged over ``TTA_FLIPS``."""
    x = torch.as_tensor(np.asarray(patches, dtype=np.float32))
    if x.ndim != 5 or x.shape[1] != 2:
        raise ValueError(f"need (n, 2, z, y, x) patches, got {tuple(x.shape)}")
    x = x.to(next(net.parameters(), x).device)  # where the weights are (a GPU worker's)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            probs = [
                torch.sigmoid(net(x.flip(dims) if dims else x).reshape(-1)) for dims in TTA_FLIPS
            ]
    finally:
        net.train(was_training)
    return torch.stack(probs).mean(dim=0).cpu().numpy().astype(np.float64)


def score_lesions(
    volume_hu: np.ndarray,
    spacing_zyx: Sequence[float],
    lesion_labels: np.ndarray,
    model: LoadedModel | torch.nn.Module,
) -> list[float]:
    """One malignancy score in [0, 1] per lesion of the label map ``lesion_labels`` (integers on
    the grid of ``volume_hu``, 0 = background), in increasing label order. See the module
    docstring for what the score means: the LIDC readers' impression, not pathology."""
    labels = np.asarray(lesion_labels)
    if labels.shape != np.shape(volume_hu):
        raise ValueError(f"label map {labels.shape} and volume {np.shape(volume_hu)} differ")
    if labels.dtype == np.bool_:
        labels = as_bytes(labels)
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise ValueError("lesion labels must not be negative")
    hu = np.asarray(volume_hu, dtype=np.float32)
    sp = _spacing(spacing_zyx)
    # One pass for every lesion's box (label order), instead of a whole-volume unique and a
    # whole-volume comparison per lesion.
    boxes = [(i, box) for i, box in enumerate(ndimage.find_objects(labels), 1) if box is not None]
    if not boxes:
        return []
    net = model.net if isinstance(model, LoadedModel) else model

    def lesion(value: int) -> Callable[[tuple[slice, ...]], np.ndarray]:
        return lambda window: labels[window] == value

    patches = np.stack(
        [_patch(hu, lesion(i), box, sp, PATCH, PATCH_SPACING_MM) for i, box in boxes]
    )
    return [float(s) for s in predict_patches(net, patches)]
