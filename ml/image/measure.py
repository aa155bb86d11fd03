"""Per-region shape and intensity measurements of labelled masks that reproduce pyradiomics 3.0.1
shape features ("original" settings, no resampling): voxel and mesh volume, surface area,
sphericity, maximum 3D and axial-slice diameters and PCA axis lengths, plus HU statistics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage import measure as skmeasure

__all__ = ["RegionMeasurement", "measure_regions", "max_pairwise_distance"]

# Rows per block of the brute-force distance search: bounds memory to about 8 MB per block.
_BLOCK = 1024


@dataclass(frozen=True)
class RegionMeasurement:
    """Measurements of one labelled region; lengths in mm, volumes in mm³, areas in mm².

    ``centroid_zyx`` is in voxel coordinates of the input array; ``bbox`` is
    ``(z0, y0, x0, z1, y1, x1)`` with exclusive upper bounds, like Python slices.
    """

    label: int
    voxel_count: int
    voxel_volume_mm3: float
    mesh_volume_mm3: float
    surface_area_mm2: float
    sphericity: float
    max_3d_diameter_mm: float
    max_2d_axial_diameter_mm: float
    major_axis_mm: float
    minor_axis_mm: float
    least_axis_mm: float
    mean_hu: float | None
    min_hu: float | None
    max_hu: float | None
    centroid_zyx: tuple[float, float, float]
    bbox: tuple[int, int, int, int, int, int]

    @property
    def volume_ml(self) -> float:
        return self.voxel_volume_mm3 / 1000.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["centroid_zyx"] = list(self.centroid_zyx)
        d["bbox"] = list(self.bbox)
        return d


def _brute_force_max(points: np.ndarray) -> float:
    """Largest pairwise distance by exhaustive search, blockwise to bound memory."""
    n = len(points)
    if n < 2:
        return 0.0
    pts = np.ascontiguousarray(points, dtype=np.float64)
    best = 0.0
    for start in range(0, n, _BLOCK):
        block = pts[start : start + _BLOCK]
        # Only pairs (i, j) with j >= i are needed; the rest were seen from the other side.
        rest = pts[start:]
        d2 = (
            np.sum(block**2, axis=1)[:, None]
            + np.sum(rest**2, axis=1)[None, :]
            - 2.0 * block @ rest.T
        )
        best = max(best, float(d2.max()))
    return math.sqrt(max(best, 0.0))


def max_pairwise_distance(points: np.ndarray) -> float:
    """Largest Euclidean distance between any two of ``points`` (N, D).

    The farthest pair always lies on the convex hull, so only hull vertices are compared; flat or
    collinear point sets (where Qhull fails) fall back to exhaustive search.
    """
    pts = np.unique(np.asarray(points, dtype=np.float64), axis=0)
    if len(pts) < 2:
        return 0.0
    if len(pts) > pts.shape[1] + 1:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:
            pass
    return _brute_force_max(pts)


def _mesh(mask: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface of a binary mask in physical (z, y, x) mm, like pyradiomics."""
    # Zero padding closes the surface where the region touches the crop border.
    padded = np.pad(mask.astype(np.float32), 1)
    verts, faces, _, _ = skmeasure.marching_cubes(
        padded, level=0.5, spacing=spacing, method="lorensen", allow_degenerate=False
    )
    return verts.astype(np.float64), faces


def _mesh_volume_area(verts: np.ndarray, faces: np.ndarray) -> tuple[float, float]:
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    # Signed tetrahedra against the origin sum to the enclosed volume for a closed mesh.
    volume = abs(float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)
    area = float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())
    return volume, area


def _max_axial_diameter(verts: np.ndarray, z_step: float) -> float:
    # Vertices lie on a half-voxel grid along z, so rounding to it groups exact same-plane points.
    keys = np.round(verts[:, 0] / (0.5 * z_step)).astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    bounds = np.flatnonzero(np.diff(keys_sorted)) + 1
    best = 0.0
    for group in np.split(order, bounds):
        if len(group) > 1:
            best = max(best, max_pairwise_distance(verts[group, 1:]))
    return best


def _axes(coords_mm: np.ndarray) -> tuple[float, float, float]:
    """Major, minor and least axis lengths: 4·sqrt of the PCA eigenvalues (population cov)."""
    if len(coords_mm) < 2:
        return 0.0, 0.0, 0.0
    centred = coords_mm - coords_mm.mean(axis=0)
    cov = centred.T @ centred / len(coords_mm)
    eig = np.sort(np.clip(np.linalg.eigvalsh(cov), 0.0, None))
    return 4.0 * math.sqrt(eig[2]), 4.0 * math.sqrt(eig[1]), 4.0 * math.sqrt(eig[0])


def _measure_one(
    label: int,
    region: np.ndarray,
    offset: tuple[int, int, int],
    spacing: tuple[float, float, float],
    hu: np.ndarray | None,
) -> RegionMeasurement:
    idx = np.argwhere(region)
    count = len(idx)
    voxel_volume = count * spacing[0] * spacing[1] * spacing[2]
    verts, faces = _mesh(region, spacing)
    mesh_volume, area = _mesh_volume_area(verts, faces)
    sphericity = (36.0 * math.pi * mesh_volume**2) ** (1.0 / 3.0) / area if area > 0 else 0.0
    major, minor, least = _axes(idx * np.asarray(spacing))
    centroid = idx.mean(axis=0) + np.asarray(offset)
    lo = idx.min(axis=0) + np.asarray(offset)
    hi = idx.max(axis=0) + np.asarray(offset) + 1
    if hu is not None:
        values = hu[region]
        mean_hu: float | None = float(values.mean())
        min_hu: float | None = float(values.min())
        max_hu: float | None = float(values.max())
    else:
        mean_hu = min_hu = max_hu = None
    return RegionMeasurement(
        label=int(label),
        voxel_count=int(count),
        voxel_volume_mm3=float(voxel_volume),
        mesh_volume_mm3=mesh_volume,
        surface_area_mm2=area,
        sphericity=float(sphericity),
        max_3d_diameter_mm=max_pairwise_distance(verts),
        max_2d_axial_diameter_mm=_max_axial_diameter(verts, spacing[0]),
        major_axis_mm=major,
        minor_axis_mm=minor,
        least_axis_mm=least,
        mean_hu=mean_hu,
        min_hu=min_hu,
        max_hu=max_hu,
        centroid_zyx=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        bbox=(int(lo[0]), int(lo[1]), int(lo[2]), int(hi[0]), int(hi[1]), int(hi[2])),
    )


def measure_regions(
    labels: np.ndarray,
    spacing_zyx: tuple[float, float, float] | np.ndarray,
    image: np.ndarray | None = None,
) -> list[RegionMeasurement]:
    """Measure every non-zero label of a (z, y, x) label array, in increasing label order.

    Each label is measured as a whole even if it is not connected; label connected components
    first (e.g. ``scipy.ndimage.label``) to measure them separately. ``image`` (same shape, HU)
    adds intensity statistics.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (z, y, x), got shape {labels.shape}")
    if image is not None and np.shape(image) != labels.shape:
        raise ValueError(f"image shape {np.shape(image)} != labels shape {labels.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_zyx must be three positive numbers, got {spacing_zyx}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer or boolean array, got {labels.dtype}")
    if labels.size == 0 or not labels.any():
        return []
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi <= max(1_000_000, labels.size // 8):
        # find_objects gives every box in one pass, and a label is present iff it has a box.
        found = ndimage.find_objects(labels)
        boxes = {i: box for i, box in enumerate(found, start=1) if box is not None}
    else:
        boxes = {}
        for lab in np.unique(labels):
            if lab == 0:
                continue
            nz = np.argwhere(labels == lab)
            lo_idx, hi_idx = nz.min(axis=0), nz.max(axis=0) + 1
            boxes[int(lab)] = tuple(
                slice(int(a), int(b)) for a, b in zip(lo_idx, hi_idx, strict=True)
            )
    results = []
    for lab in sorted(boxes):
        box = boxes[lab]
        region = labels[box] == lab
        hu = None if image is None else np.asarray(image)[box]
        offset = (box[0].start, box[1].start, box[2].start)
        results.append(_measure_one(int(lab), region, offset, spacing, hu))
    return results
