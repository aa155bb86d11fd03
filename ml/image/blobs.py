"""Nodule candidates by multi-scale blob detection (scale-normalised Laplacian of Gaussian) in
the lungs, each described by its Hessian shape and density.

A nodule is a bright, roughly spherical blob in dark parenchyma; a vessel is a bright tube. The
scale-normalised Laplacian of Gaussian -s^2 * LoG_s peaks at the centre of a sphere of radius
about sqrt(3) * s, whatever its contrast profile, so partial-volume and part-solid nodules are
found where a fixed density threshold and an opening (the classical baseline) lose their core.
The volume is resampled to an isotropic grid first, so thick (5 mm) and thin slices are treated
alike and no grid is assumed. The eigenvalues of the Hessian at the candidate's own scale tell a
blob (three strongly negative) from a tube (one near zero) or a plate (two near zero).

Imports numpy, scipy and ``ml.image`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ml.image.morphology import bbox, check_volume

# Isotropic grid of the search: fine enough for a 6 mm nodule (about 5 voxels across).
GRID_MM = 1.25
# Gaussian scales (mm): blob radii of about sqrt(3) times these, 3 to 15 mm (nodules 6-30 mm).
SIGMAS_MM = (1.75, 2.5, 3.5, 5.0, 7.0, 9.0)
# HU clipped before filtering: bone and contrast must not out-shine soft-tissue nodules.
CLIP_HU = (-1000.0, 200.0)
# A local maximum is a candidate only if its response reaches this (HU, scale-normalised): a
# 6 mm solid nodule in parenchyma gives several hundred; faint texture a few tens.
MIN_RESPONSE = 60.0
# Maxima closer than this many voxels are one (the maximum filter's half width).
PEAK_RADIUS_VOX = 2
PARENCHYMA_HU = -850.0
MAX_CANDIDATES = 3000


@dataclass(frozen=True)
class Blob:
    """One candidate: centre in the input volume's voxels (z, y, x), its radius and features."""

    centre_zyx: tuple[float, float, float]
    radius_mm: float
    response: float  # scale-normalised -LoG at the centre (HU)
    blobness: float  # |l3| / |l1| of the Hessian eigenvalues (1 for a sphere, 0 for a tube)
    tubeness: float  # |l2| / |l1| (1 for a sphere or tube, 0 for a plate)
    negative: int  # how many eigenvalues are negative (3 for a bright blob)
    centre_hu: float  # smoothed HU at the centre
    in_lung: float  # fraction of the blob's sphere inside the lung mask

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _resample(volume: np.ndarray, spacing, grid_mm: float, order: int) -> np.ndarray:
    zoom = [s / grid_mm for s in spacing]
    return ndimage.zoom(volume, zoom, order=order, prefilter=False, grid_mode=False)


def _hessian_at(smooth: np.ndarray, p: tuple[int, int, int]) -> np.ndarray:
    """Second derivatives of ``smooth`` at ``p`` by central differences (3 x 3)."""
    z, y, x = p
    c = smooth[z, y, x]
    h = np.zeros((3, 3))
    idx = np.array(p)
    for a in range(3):
        e = np.zeros(3, dtype=int)
        e[a] = 1
        h[a, a] = smooth[tuple(idx + e)] - 2 * c + smooth[tuple(idx - e)]
        for b in range(a + 1, 3):
            f = np.zeros(3, dtype=int)
            f[b] = 1
            h[a, b] = h[b, a] = 0.25 * (
                smooth[tuple(idx + e + f)]
                - smooth[tuple(idx + e - f)]
                - smooth[tuple(idx - e + f)]
                + smooth[tuple(idx - e - f)]
            )
    return h


def _scale_space(
    iso: np.ndarray, sigmas_mm: Sequence[float], grid_mm: float, pool: ThreadPoolExecutor
) -> tuple[np.ndarray, np.ndarray]:
    """The strongest scale-normalised response over the scales at each voxel, and its scale's
    index. The scales filter on the pool's threads (scipy's filters release the GIL) and are
    folded in scale order, so a tie goes to the smaller scale whatever the threads."""

    def response(s_mm: float) -> np.ndarray:
        s = s_mm / grid_mm
        return -(s * s) * ndimage.gaussian_laplace(iso, s)

    best = np.full(iso.shape, -np.inf, dtype=np.float32)
    scale = np.zeros(iso.shape, dtype=np.uint8)
    for i, r in enumerate(pool.map(response, sigmas_mm)):
        better = r > best
        best[better] = r[better]
        scale[better] = i
        del r, better
    return best, scale


def detect_blobs(
    volume_hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    grid_mm: float = GRID_MM,
    sigmas_mm: tuple[float, ...] = SIGMAS_MM,
    min_response: float = MIN_RESPONSE,
    threads: int = 1,
) -> list[Blob]:
    """Blob candidates inside ``lung_mask``, strongest first (at most ``MAX_CANDIDATES``);
    the filters run on ``threads`` threads (the result does not depend on how many)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return _detect(volume_hu, lung_mask, spacing_zyx, grid_mm, sigmas_mm, min_response, pool)


def _detect(
    volume_hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    grid_mm: float,
    sigmas_mm: tuple[float, ...],
    min_response: float,
    pool: ThreadPoolExecutor,
) -> list[Blob]:
    spacing = check_volume(volume_hu, spacing_zyx)
    lung_mask = np.asarray(lung_mask, dtype=bool)
    if lung_mask.shape != np.shape(volume_hu):
        raise ValueError(f"lung_mask shape {lung_mask.shape} != volume {np.shape(volume_hu)}")
    box = bbox(lung_mask)
    if box is None:
        return []
    margin = [int(math.ceil(10.0 / s)) for s in spacing]
    box = tuple(
        slice(max(0, b.start - m), min(n, b.stop + m))
        for b, m, n in zip(box, margin, lung_mask.shape, strict=True)
    )
    hu = np.clip(np.asarray(volume_hu[box], dtype=np.float32), *CLIP_HU)
    iso_job = pool.submit(_resample, hu, spacing, grid_mm, 1)
    # Linear, not nearest: nearest-neighbour rounds a grid point half-way between two voxels
    # one way, and the mirrored volume's the other way, so a study mirrored left-right would get
    # other candidates. A point is in the lung when at least half of what it is made from is
    # (with a margin for rounding, so that such half-way points count the same both ways).
    lung_job = pool.submit(_resample, lung_mask[box].astype(np.float32), spacing, grid_mm, 1)
    iso = iso_job.result()
    lung = lung_job.result() >= 0.5 - 1e-4
    del hu, iso_job, lung_job
    # Outside the lungs is made parenchyma: the chest wall, mediastinum and diaphragm would
    # otherwise out-shine a nodule that touches them (the lung mask's closing takes juxtapleural
    # nodules in, so they become free blobs here).
    iso[~lung] = PARENCHYMA_HU
    # Input voxels per iso voxel, exactly as zoom maps the corners (grid_mode=False).
    n_in = np.array([b.stop - b.start for b in box], dtype=float)
    step = (n_in - 1) / np.maximum(np.array(iso.shape, dtype=float) - 1, 1)
    best, scale = _scale_space(iso, sigmas_mm, grid_mm, pool)
    peaks = (best == ndimage.maximum_filter(best, size=2 * PEAK_RADIUS_VOX + 1)) & lung
    peaks &= best >= min_response
    zz, yy, xx = np.nonzero(peaks)
    order = np.argsort(-best[zz, yy, xx], kind="stable")[:MAX_CANDIDATES]
    # Hessian features: the smoothed volume of each scale some candidate has, computed once.
    needed = sorted({int(scale[zz[j], yy[j], xx[j]]) for j in order})
    smoothed = dict(
        zip(
            needed,
            pool.map(lambda k: ndimage.gaussian_filter(iso, sigmas_mm[k] / grid_mm), needed),
            strict=True,
        )
    )
    lung_f = lung.astype(np.float32)
    out: list[Blob] = []
    shape = np.array(iso.shape)
    for j in order:
        p = (int(zz[j]), int(yy[j]), int(xx[j]))
        if np.any(np.array(p) < 1) or np.any(np.array(p) >= shape - 1):
            continue
        k = int(scale[p])
        sm = smoothed[k]
        ev = np.linalg.eigvalsh(_hessian_at(sm, p))
        mags = np.sort(np.abs(ev))[::-1]
        l1 = max(float(mags[0]), 1e-6)
        radius_mm = math.sqrt(3.0) * sigmas_mm[k]
        rv = max(1, int(round(radius_mm / grid_mm)))
        sub = tuple(slice(max(0, c - rv), c + rv + 1) for c in p)
        g = np.ogrid[tuple(slice(sl.start - c, sl.stop - c) for sl, c in zip(sub, p, strict=True))]
        ball = np.asarray(sum(a * a for a in g) <= rv * rv)
        ball = ball[: lung_f[sub].shape[0], : lung_f[sub].shape[1], : lung_f[sub].shape[2]]
        in_lung = float(lung_f[sub][ball].mean()) if ball.any() else 0.0
        centre = np.array(p, dtype=float) * step + [b.start for b in box]
        out.append(
            Blob(
                centre_zyx=tuple(float(c) for c in centre),  # type: ignore[arg-type]
                radius_mm=radius_mm,
                response=float(best[p]),
                blobness=float(mags[2]) / l1,
                tubeness=float(mags[1]) / l1,
                negative=int((ev < 0).sum()),
                centre_hu=float(sm[p]),
                in_lung=in_lung,
            )
        )
    return out
