"""What the candidate classifier sees of one nodule candidate: planes through its centre at two
fields of view, sampled in millimetres from the volume as it came (any pixel size or slice
thickness; nothing assumes a grid).

Channels: the axial, coronal and sagittal planes of VIEW x VIEW points at FINE_MM spacing (a
40 mm field: the candidate and what touches it), the same three planes at COARSE_MM (an 80 mm
field: the vessel tree, pleura or hilum it belongs to), then, in the nine-plane layout, the six
diagonal planes of a cube (each holding one axis and a diagonal of the other two) at FINE_MM: a
vessel running obliquely to all three orthogonal planes cuts each of them as a round spot, as a
nodule does, but lies along one of the diagonal planes (Setio et al., IEEE TMI 2016, nine views).
HU are clipped to [-1000, 400] and scaled to [0, 1]; outside the volume counts as air.

Every plane is a pair of unit vectors (rows, columns) in (z, y, x) millimetres, so a mirror or
a transposition of the body maps each channel to a channel, possibly flipped or transposed:
:func:`transform` derives that from the vectors, for any layout.

Imports numpy, scipy, torch and `ml.image`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from ml.image.threads import for_each

VIEW = 32
FINE_MM = 1.25
COARSE_MM = 2.5
HU_RANGE = (-1000.0, 400.0)

_D = 1.0 / math.sqrt(2.0)
Z, Y, X = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
# (rows, columns) of each plane.
ORTHOGONAL = ((Y, X), (Z, X), (Z, Y))  # axial, coronal, sagittal
DIAGONAL = (
    (Z, (0.0, _D, _D)),
    (Z, (0.0, _D, -_D)),
    (Y, (_D, 0.0, _D)),
    (Y, (_D, 0.0, -_D)),
    (X, (_D, _D, 0.0)),
    (X, (_D, -_D, 0.0)),
)
# A layout: ((rows, columns), step mm) per channel.
Layout = tuple[tuple[tuple[tuple[float, ...], tuple[float, ...]], float], ...]
THREE_PLANES: Layout = tuple((p, FINE_MM) for p in ORTHOGONAL) + tuple(
    (p, COARSE_MM) for p in ORTHOGONAL
)
NINE_PLANES: Layout = THREE_PLANES + tuple((p, FINE_MM) for p in DIAGONAL)
LAYOUTS = {len(THREE_PLANES): THREE_PLANES, len(NINE_PLANES): NINE_PLANES}
CHANNELS = len(NINE_PLANES)


def layout_of(channels: int) -> Layout:
    """The layout with this many channels (6: three planes, 12: nine planes)."""
    try:
        return LAYOUTS[channels]
    except KeyError:
        known = sorted(LAYOUTS)
        raise ValueError(f"no view layout has {channels} channels; known: {known}") from None


def _offsets(layout: Layout) -> np.ndarray:
    """(channels, 3 axes, VIEW, VIEW) offsets in mm (z, y, x) of each plane through the origin."""
    t = np.arange(VIEW, dtype=np.float64) - (VIEW - 1) / 2.0
    a, b = np.meshgrid(t, t, indexing="ij")
    out = [
        (np.asarray(u)[:, None, None] * a + np.asarray(v)[:, None, None] * b) * step
        for (u, v), step in layout
    ]
    return np.stack(out).astype(np.float32)


# Candidates sampled at a time: the coordinates are 3 floats per sampled point.
_BATCH = 64


def candidate_views(
    volume_hu: np.ndarray,
    spacing_zyx: Sequence[float],
    centres_zyx: Sequence[Sequence[float]],
    channels: int = CHANNELS,
    *,
    threads: int = 1,
) -> np.ndarray:
    """Classifier inputs (n, channels, VIEW, VIEW) float32 for candidates at ``centres_zyx``
    (voxel coordinates of ``volume_hu``, fractional allowed), in the layout with ``channels``;
    sampled on ``threads`` threads (scipy's interpolation releases the GIL; the views do not
    depend on how many)."""
    n = len(centres_zyx)
    out = np.zeros((n, channels, VIEW, VIEW), dtype=np.float32)
    if n == 0:
        return out
    spacing = np.asarray(spacing_zyx, dtype=np.float32).reshape(1, 3, 1, 1)
    off = _offsets(layout_of(channels)) / spacing  # (channels, 3, VIEW, VIEW) voxels
    lo, hi = HU_RANGE
    centres = np.asarray(centres_zyx, dtype=np.float32).reshape(n, 3, 1, 1)

    def sample(i: int) -> None:
        c = centres[i : i + _BATCH, None]  # (k, 1, 3, 1, 1)
        coords = c + off[None]
        flat = np.moveaxis(coords, 2, 0).reshape(3, -1)
        values = ndimage.map_coordinates(
            volume_hu, flat, order=1, mode="constant", cval=lo, prefilter=False
        ).reshape(len(c), channels, VIEW, VIEW)
        out[i : i + _BATCH] = (np.clip(values, lo, hi) - lo) / (hi - lo)

    for_each(sample, range(0, n, _BATCH), threads)
    return out


def _match(tu: np.ndarray, tv: np.ndarray, u: tuple, v: tuple) -> tuple[bool, bool, bool] | None:
    """(transpose, flip rows, flip columns) if the plane spanned by ``tu``, ``tv`` is the plane
    (``u``, ``v``): sampled at (a, b) it is that plane at (su a, sv b), or, transposed, at
    (sv b, su a); None if it is another plane."""
    for transpose, (ru, rv) in ((False, (u, v)), (True, (v, u))):
        su, sv = float(tu @ np.asarray(ru)), float(tv @ np.asarray(rv))
        if math.isclose(abs(su), 1.0, abs_tol=1e-6) and math.isclose(abs(sv), 1.0, abs_tol=1e-6):
            return transpose, su < 0, sv < 0
    return None


@lru_cache(maxsize=64)
def _moves(
    channels: int, matrix: tuple[tuple[int, ...], ...]
) -> tuple[tuple[int, bool, bool, bool], ...]:
    """For each output channel: (input channel, transpose, flip rows, flip columns) such that the
    views of the body transformed by ``matrix`` (a signed permutation of z, y, x about the
    candidate) are the input views so moved."""
    t = np.asarray(matrix, dtype=float)
    layout = layout_of(channels)
    out = []
    for (u, v), step in layout:
        tu, tv = t @ np.asarray(u), t @ np.asarray(v)
        found = [
            (q, *m)
            for q, ((uq, vq), sq) in enumerate(layout)
            if math.isclose(sq, step) and (m := _match(tu, tv, uq, vq)) is not None
        ]
        if not found:
            raise ValueError(f"layout of {channels} channels is not closed under {matrix}")
        out.append(found[0])
    return tuple(out)


def transform(x: torch.Tensor, matrix: Sequence[Sequence[int]]) -> torch.Tensor:
    """Views (n, channels, VIEW, VIEW) of the body transformed by ``matrix`` about each candidate
    (a signed permutation of z, y, x; e.g. a mirror or an exchange of two axes)."""
    key = tuple(tuple(int(v) for v in row) for row in matrix)
    planes = []
    for q, transpose, rows, cols in _moves(int(x.shape[1]), key):
        p = x[:, q]
        if transpose:
            p = p.transpose(-1, -2)
        dims = [d for d, f in ((-2, rows), (-1, cols)) if f]
        planes.append(p.flip(dims) if dims else p)
    return torch.stack(planes, dim=1)
