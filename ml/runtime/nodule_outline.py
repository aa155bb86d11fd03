"""A nodule's outline by a 3-D U-Net trained on the LIDC-IDRI readers' outlines
(`radai-nodule-outline-unet`): given a point inside a candidate, the network labels a cube of
``PATCH``³ voxels at ``PATCH_SPACING_MM`` around it, and the labels are resampled back onto the
scan's own grid.

Input contract (:func:`sample_patch`, shared by training and inference so the two cannot drift
apart): the cube is sampled from the volume as it came (any pixel size or slice thickness,
trilinear, in voxel coordinates of the volume), HU clipped to [-1000, 400] and scaled to [0, 1]
(:func:`ml.runtime.networks.scale_hu`); outside the volume counts as air. The probability is the
mean over the four in-plane flips, so a scan mirrored left-right is outlined as its mirror.

What is kept: the voxels of probability at least ``THRESHOLD`` inside the lungs (where a lung
mask is given) and within the classical outline's reach of the point (``REACH`` x the candidate's
radius + ``REACH_MM``), in the connected part nearest the point (within ``NEAR_MM`` or half the
candidate's radius), so a neighbouring nodule or vessel the network also outlines is not merged
in. The limits matter in a whole scan: the network learnt from crops about 3 cm across with air
beyond them, and in real anatomy it reaches into the chest wall and consolidation beside a
nodule. Imports numpy, scipy, torch, ``ml.image`` and ``ml.runtime``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from ml.image.nodule_segment import REACH, REACH_MM
from ml.runtime import networks
from ml.runtime.registry import LoadedModel

PATCH = 48
PATCH_SPACING_MM = 0.8  # a 38 mm cube: LIDC nodules reach 3 cm, and a little context around
AIR_HU = -1000.0
THRESHOLD = 0.5
NEAR_MM = 2.0
# Flips over (y, x) of a (n, c, z, y, x) batch: the set is closed under a left-right mirror.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (4,), (3,), (3, 4))


def patch_offsets_mm(patch: int = PATCH, spacing_mm: float = PATCH_SPACING_MM) -> np.ndarray:
    """(3, patch, patch, patch) offsets in mm (z, y, x) of the cube's points from its centre."""
    t = (np.arange(patch, dtype=np.float64) - (patch - 1) / 2.0) * spacing_mm
    return np.stack(np.meshgrid(t, t, t, indexing="ij"))


def sample_points(
    volume: np.ndarray,
    spacing_zyx: Sequence[float],
    centre_zyx: Sequence[float],
    offsets_mm: np.ndarray,
    *,
    cval: float = AIR_HU,
) -> np.ndarray:
    """``volume`` at ``centre_zyx`` (voxel coordinates) + ``offsets_mm`` (3, ...) converted to
    voxels; trilinear, ``cval`` outside. Only the window the points reach is read."""
    sp = np.asarray(spacing_zyx, dtype=np.float64).reshape(3, *([1] * (offsets_mm.ndim - 1)))
    coords = np.asarray(centre_zyx, dtype=np.float64).reshape(sp.shape) + offsets_mm / sp
    lo = np.floor(coords.reshape(3, -1).min(axis=1)).astype(int)
    hi = np.floor(coords.reshape(3, -1).max(axis=1)).astype(int) + 2
    shape = np.asarray(volume.shape)
    lo_c, hi_c = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if np.any(hi_c <= lo_c):  # the points lie wholly outside the volume
        return np.full(offsets_mm.shape[1:], cval, dtype=np.float32)
    window = tuple(slice(a, b) for a, b in zip(lo_c, hi_c, strict=True))
    local = coords - lo_c.reshape(sp.shape)
    return ndimage.map_coordinates(
        np.asarray(volume[window], dtype=np.float32), local, order=1, mode="constant", cval=cval
    ).astype(np.float32)


def sample_patch(
    volume_hu: np.ndarray, spacing_zyx: Sequence[float], centre_zyx: Sequence[float]
) -> np.ndarray:
    """(1, PATCH, PATCH, PATCH) float32 network input: the cube about ``centre_zyx``."""
    hu = sample_points(volume_hu, spacing_zyx, centre_zyx, patch_offsets_mm())
    return np.asarray(networks.scale_hu(hu), dtype=np.float32)[None]


@torch.no_grad()
def predict(net: torch.nn.Module, patches: np.ndarray | torch.Tensor) -> np.ndarray:
    """Probabilities (n, PATCH, PATCH, PATCH) of a batch of :func:`sample_patch` inputs (n, 1,
    ...), the mean over `TTA_FLIPS`."""
    x = torch.as_tensor(np.asarray(patches, dtype=np.float32))
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"need (n, 1, z, y, x) patches, got {tuple(x.shape)}")
    x = x.to(next(net.parameters(), x).device)
    was_training = net.training
    net.eval()
    try:
        total = torch.zeros_like(x[:, 0])
        for dims in TTA_FLIPS:
            logits = net(x.flip(dims) if dims else x)
            p = torch.sigmoid(logits.float())
            total += (p.flip(dims) if dims else p)[:, 0]
    finally:
        net.train(was_training)
    return (total / len(TTA_FLIPS)).cpu().numpy()


def to_volume(
    probability: np.ndarray,
    spacing_zyx: Sequence[float],
    centre_zyx: Sequence[float],
    shape: Sequence[int],
) -> tuple[tuple[slice, ...], np.ndarray]:
    """(box, probability over ``box``): a cube's probabilities resampled onto the voxels of a
    volume of ``shape`` that the cube covers (trilinear, 0 outside the cube)."""
    p = probability.shape[0]
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    c = np.asarray(centre_zyx, dtype=np.float64)
    half = (p - 1) / 2.0 * PATCH_SPACING_MM / sp
    lo = np.clip(np.ceil(c - half).astype(int), 0, shape)
    hi = np.clip(np.floor(c + half).astype(int) + 1, 0, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    if any(b.stop <= b.start for b in box):
        return box, np.zeros([max(0, b.stop - b.start) for b in box], dtype=np.float32)
    axes = [
        (np.arange(a, b) - c[k]) * sp[k] / PATCH_SPACING_MM + (p - 1) / 2.0
        for k, (a, b) in enumerate(zip(lo, hi, strict=True))
    ]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    out = ndimage.map_coordinates(probability, coords, order=1, mode="constant", cval=0.0)
    return box, out.astype(np.float32)


def keep_near(
    mask: np.ndarray, spacing_zyx: Sequence[float], point_zyx: Sequence[float], near_mm: float
) -> np.ndarray:
    """The connected part of ``mask`` (26-connected) with the most voxels within ``near_mm`` of
    ``point_zyx`` (voxel coordinates of ``mask``); empty when none comes that near."""
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    grid = np.ogrid[tuple(slice(0, s) for s in mask.shape)]
    d2 = sum(((g - float(point_zyx[k])) * sp[k]) ** 2 for k, g in enumerate(grid))
    near = labels[(d2 <= near_mm**2) & (labels > 0)]
    if near.size == 0:
        return np.zeros_like(mask)
    best = int(np.bincount(near, minlength=n + 1)[1:].argmax()) + 1
    return labels == best


class Outliner:
    """Outlines nodules with a trained outline U-Net; called like
    :func:`ml.image.nodule_segment.segment_nodule` (``lung_mask`` is not needed: the network
    learnt where the readers stop at the chest wall)."""

    def __init__(
        self,
        model: LoadedModel | torch.nn.Module,
        threshold: float = THRESHOLD,
        *,
        in_lung: bool = True,
        reach: float | None = REACH,
    ):
        self.net = model.net if isinstance(model, LoadedModel) else model
        self.threshold = threshold
        self.in_lung = in_lung
        self.reach = reach

    def probability(
        self, volume_hu: np.ndarray, spacing_zyx: Sequence[float], centre_zyx: Sequence[float]
    ) -> tuple[tuple[slice, ...], np.ndarray]:
        """(box, probability over ``volume_hu[box]``) about ``centre_zyx``."""
        x = sample_patch(volume_hu, spacing_zyx, centre_zyx)[None]
        prob = predict(self.net, x)[0]
        return to_volume(prob, spacing_zyx, centre_zyx, volume_hu.shape)

    def __call__(
        self,
        volume_hu: np.ndarray,
        spacing_zyx: Sequence[float],
        centre_zyx: Sequence[float],
        radius_mm: float = 0.0,
        lung_mask: np.ndarray | None = None,
    ) -> tuple[tuple[slice, ...], np.ndarray]:
        """(box, mask): the nodule at ``centre_zyx`` as a boolean mask over ``volume_hu[box]``
        (empty when the network sees no nodule there)."""
        box, prob = self.probability(volume_hu, spacing_zyx, centre_zyx)
        point = [float(c) - b.start for c, b in zip(centre_zyx, box, strict=True)]
        keep = prob >= self.threshold
        if self.in_lung and lung_mask is not None:
            keep &= lung_mask[box]
        if self.reach is not None and radius_mm > 0:
            sp = np.asarray(spacing_zyx, dtype=np.float64)
            grid = np.ogrid[tuple(slice(0, s) for s in keep.shape)]
            d2 = sum(((g - point[k]) * sp[k]) ** 2 for k, g in enumerate(grid))
            keep &= d2 <= (self.reach * float(radius_mm) + REACH_MM) ** 2
        near = max(NEAR_MM, 0.5 * float(radius_mm))
        return box, keep_near(keep, spacing_zyx, point, near)


def equivalent_diameter_mm(mask: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Diameter of the sphere of the mask's volume."""
    volume = float(np.count_nonzero(mask)) * math.prod(float(s) for s in spacing_zyx)
    return (6.0 * volume / math.pi) ** (1.0 / 3.0)
