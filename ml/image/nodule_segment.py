"""One nodule's outline from a point inside it and its approximate radius: a local density
threshold half-way between the nodule's core and the parenchyma around it, limited to a sphere
around the point, with attached vessels cut at their narrowest by a small opening.

The half-way threshold follows the nodule's own contrast, so a solid nodule (core near 0 HU) is
cut near -420 HU and a part-solid one lower, down to `MIN_THRESHOLD_HU`; readers outline the
partial-volume rim of a nodule as part of it, which a fixed -400 HU threshold loses on small
ones. Imports numpy, scipy and ``ml.image``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

DEFAULT_PARENCHYMA_HU = -850.0
MIN_THRESHOLD_HU = -700.0
MAX_THRESHOLD_HU = -300.0
REACH = 1.6  # the outline stays within REACH x radius (+ REACH_MM) of the point
REACH_MM = 2.0
CORE_SIGMA_MM = 0.7
CUT = 0.4  # where between parenchyma (0) and the nodule's core (1) the outline is cut


def segment_nodule(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    centre_zyx: tuple[float, float, float],
    radius_mm: float,
    lung_mask: np.ndarray | None = None,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """(box, mask): the nodule's voxels as a boolean mask over ``volume_hu[box]`` (empty when
    nothing dense lies at the point). With ``lung_mask`` (one that takes juxtapleural nodules in,
    as :func:`ml.image.lungs.segment_lungs` does) the outline stops at the chest wall."""
    sp = np.asarray(spacing_zyx, dtype=float)
    reach = REACH * radius_mm + REACH_MM
    half = np.ceil((reach + 3.0) / sp).astype(int)
    c = np.round(np.asarray(centre_zyx)).astype(int)
    box = tuple(
        slice(max(0, int(ci - h)), min(n, int(ci + h + 1)))
        for ci, h, n in zip(c, half, volume_hu.shape, strict=True)
    )
    local = np.asarray(volume_hu[box], dtype=np.float32)
    grids = np.ogrid[tuple(slice(b.start, b.stop) for b in box)]
    dist = np.sqrt(sum(((g - cc) * s) ** 2 for g, cc, s in zip(grids, centre_zyx, sp, strict=True)))
    smooth = ndimage.gaussian_filter(local, CORE_SIGMA_MM / sp)
    core_zone = dist <= max(1.5, 0.5 * radius_mm)
    core = float(smooth[core_zone].max()) if core_zone.any() else float(smooth.max())
    shell = (dist > reach) & (local < -600.0)
    parenchyma = float(np.median(local[shell])) if shell.sum() > 10 else DEFAULT_PARENCHYMA_HU
    level = parenchyma + CUT * (core - parenchyma)
    threshold = float(np.clip(level, MIN_THRESHOLD_HU, MAX_THRESHOLD_HU))
    dense = (local > threshold) & (dist <= reach)
    if lung_mask is not None:
        dense &= np.asarray(lung_mask[box], dtype=bool)
    empty = np.zeros(local.shape, dtype=bool)
    if not dense.any():
        return box, empty  # type: ignore[return-value]
    # Vessels join a nodule through necks narrower than the nodule: an opening by a ball of a
    # quarter of its radius (at least about one voxel) cuts them; the nodule is then rebuilt
    # inside the dense voxels by geodesic dilation, which does not cross back into the vessels.
    r_open = max(0.25 * radius_mm, 1.0)
    ball_half = np.maximum(np.floor(r_open / sp).astype(int), 0)
    g = np.ogrid[tuple(slice(-h, h + 1) for h in ball_half)]
    ball = sum((gi * s / r_open) ** 2 for gi, s in zip(g, sp, strict=True)) <= 1.0
    opened = ndimage.binary_opening(dense, structure=ball) if ball.sum() > 1 else dense
    seed_from = opened if opened.any() else dense
    labels, n = ndimage.label(seed_from)
    if n == 0:
        return box, empty  # type: ignore[return-value]
    # The component at the point, else the nearest one.
    at = labels[tuple(np.clip(c - [b.start for b in box], 0, np.array(local.shape) - 1))]
    if at == 0:
        d = np.where(labels > 0, dist, np.inf)
        at = labels[np.unravel_index(int(np.argmin(d)), d.shape)]
        if not math.isfinite(float(d.min())) or float(d.min()) > radius_mm + 2.0:
            return box, empty  # type: ignore[return-value]
    mask = labels == at
    if ball.sum() > 1:
        mask = ndimage.binary_dilation(mask, structure=ball, mask=dense)
    return box, mask  # type: ignore[return-value]
