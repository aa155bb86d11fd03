"""Each lesion's longest axial diameter as a line on one CT slice, for the SR's planar groups.

Viewers such as OHIF draw only TID 1500 groups that carry image coordinates (SCOORD); radai's
volumetric groups point at SEG segments, which such viewers do not draw. A two-point POLYLINE on
the slice where the lesion is widest shows its size where a reader looks for it (tracked as the
lesion, so OHIF labels it with the volumetric group's values too: see sr.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError


@dataclass(frozen=True)
class AxialLine:
    """The longest in-plane chord of a lesion: its slice (0-based, in the series' order), its two
    end points as (row, column) pixel centres, and its length in mm."""

    slice_index: int
    start_rc: tuple[float, float]
    end_rc: tuple[float, float]
    length_mm: float

    def graphic_data(self) -> np.ndarray:
        """(column, row) pairs in SCOORD's pixel frame, where the top-left pixel's centre is
        (0.5, 0.5)."""
        return np.array(
            [
                [self.start_rc[1] + 0.5, self.start_rc[0] + 0.5],
                [self.end_rc[1] + 0.5, self.end_rc[0] + 0.5],
            ],
            dtype=float,
        )


def _farthest_pair(points_rc: np.ndarray, spacing_yx: np.ndarray) -> tuple[int, int, float]:
    """Indices of the two points farthest apart in mm (on the convex hull: few points)."""
    mm = points_rc * spacing_yx
    candidates = np.arange(len(mm))
    if len(mm) > 3:
        try:
            candidates = ConvexHull(mm).vertices
        except QhullError:  # collinear points: every point is a candidate
            pass
    sub = mm[candidates]
    d = np.linalg.norm(sub[:, None, :] - sub[None, :, :], axis=-1)
    i, j = np.unravel_index(int(d.argmax()), d.shape)
    return int(candidates[i]), int(candidates[j]), float(d[i, j])


def longest_axial_lines(labels: np.ndarray, spacing_yx: Sequence[float]) -> dict[int, AxialLine]:
    """For each label > 0 of a (z, y, x) label volume: the longest chord between pixel centres on
    the slice where the label covers most pixels (nearest its middle slice on a tie). A lesion of
    one pixel gets a line of length 0 from that pixel to itself."""
    labels = np.asarray(labels)
    sp = np.asarray([float(s) for s in spacing_yx], dtype=float)
    out: dict[int, AxialLine] = {}
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        areas = mask.sum(axis=(1, 2))
        middle = (len(areas) - 1) / 2.0
        k = max(range(len(areas)), key=lambda i: (areas[i], -abs(i - middle)))
        points = np.argwhere(mask[k]).astype(float)
        a, b, length = _farthest_pair(points, sp)
        offset = np.array([box[1].start, box[2].start], dtype=float)
        start, end = points[a] + offset, points[b] + offset
        if not math.isfinite(length):
            continue
        out[index] = AxialLine(
            slice_index=box[0].start + k,
            start_rc=(float(start[0]), float(start[1])),
            end_rc=(float(end[0]), float(end[1])),
            length_mm=length,
        )
    return out
