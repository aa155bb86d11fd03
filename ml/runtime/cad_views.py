"""What the candidate classifier sees of one nodule candidate: three orthogonal planes through
its centre at two fields of view, sampled in millimetres from the volume as it came (any pixel
size or slice thickness; nothing assumes a grid).

Channels: axial, coronal and sagittal planes of VIEW x VIEW points at FINE_MM spacing (a 40 mm
field: the candidate and what touches it), then the same three planes at COARSE_MM (an 80 mm
field: the vessel tree, pleura or hilum it belongs to). HU are clipped to [-1000, 400] and
scaled to [0, 1]; outside the volume counts as air.

Imports numpy and scipy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

VIEW = 32
FINE_MM = 1.25
COARSE_MM = 2.5
CHANNELS = 6
HU_RANGE = (-1000.0, 400.0)


def _plane_offsets(step_mm: float) -> np.ndarray:
    """(3 planes, 3 axes, VIEW, VIEW) offsets in mm (z, y, x) of the axial, coronal, sagittal
    planes through the origin."""
    t = (np.arange(VIEW, dtype=np.float32) - (VIEW - 1) / 2.0) * step_mm
    a, b = np.meshgrid(t, t, indexing="ij")
    zero = np.zeros_like(a)
    return np.stack(
        [
            np.stack([zero, a, b]),  # axial: rows y, columns x
            np.stack([a, zero, b]),  # coronal: rows z, columns x
            np.stack([a, b, zero]),  # sagittal: rows z, columns y
        ]
    )


def candidate_views(
    volume_hu: np.ndarray,
    spacing_zyx: Sequence[float],
    centres_zyx: Sequence[Sequence[float]],
) -> np.ndarray:
    """Classifier inputs (n, CHANNELS, VIEW, VIEW) float32 for candidates at ``centres_zyx``
    (voxel coordinates of ``volume_hu``, fractional allowed)."""
    n = len(centres_zyx)
    out = np.zeros((n, CHANNELS, VIEW, VIEW), dtype=np.float32)
    if n == 0:
        return out
    spacing = np.asarray(spacing_zyx, dtype=np.float32).reshape(1, 3, 1, 1)
    offsets = [_plane_offsets(FINE_MM), _plane_offsets(COARSE_MM)]
    lo, hi = HU_RANGE
    centres = np.asarray(centres_zyx, dtype=np.float32).reshape(n, 1, 3, 1, 1)
    for k, off in enumerate(offsets):
        # (n, 3 planes, 3 axes, VIEW, VIEW) voxel coordinates
        coords = centres + (off / spacing)[None]
        flat = np.moveaxis(coords, 2, 0).reshape(3, -1)
        values = ndimage.map_coordinates(
            volume_hu, flat, order=1, mode="constant", cval=lo, prefilter=False
        )
        values = values.reshape(n, 3, VIEW, VIEW)
        out[:, 3 * k : 3 * k + 3] = (np.clip(values, lo, hi) - lo) / (hi - lo)
    return out
