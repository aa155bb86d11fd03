"""A transparent classical chest-CT pipeline used until trained models land: threshold-based lung
segmentation, density/shape-filtered lesion candidates, and a documented size-to-suspicion mapping
anchored on Lung-RADS v2022 solid-nodule size categories. Research software, not for clinical use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from ml.measure import RegionMeasurement, measure_regions

__all__ = [
    "BASELINE_NAME",
    "BASELINE_VERSION",
    "BaselineResult",
    "find_lesions",
    "lesion_probability",
    "priority_from_probability",
    "run_baseline",
    "screen_probability",
    "segment_lungs",
]

BASELINE_NAME = "radai-classical-baseline"
BASELINE_VERSION = "0.1.0"

# Lung parenchyma is about -850 HU; -320 HU sits between it and soft tissue (0..80 HU) and keeps
# partial-volume voxels of the pleural border with the tissue.
AIR_THRESHOLD_HU = -320.0
# A second air component counts as a lung only if it is this large relative to the largest: the
# lungs are usually joined by the trachea, and bowel gas is a few percent of lung volume.
SECOND_LUNG_MIN_FRACTION = 0.1
MIN_LUNG_VOLUME_ML = 20.0
# Radius of the per-slice closing that rolls a disk along the lung border: it pulls juxtapleural
# nodules and masses up to about this radius into the lung mask. It is done for each lung (side of
# the body) separately, so it never bridges the mediastinum between the two lungs.
BORDER_CLOSING_RADIUS_MM = 30.0
# Small air components near the body centre are trachea or oesophagus, not lung: they are kept in
# the mask but not closed, since a disk rolled around them would pull in mediastinal tissue.
AIRWAY_MAX_AREA_MM2 = 500.0
AIRWAY_MAX_CENTRE_DISTANCE_MM = 60.0
# Concavities of a lung whose direction from the lung's centre is within this angle of the
# direction to the body centre face the mediastinum (hilum, heart, aorta) and are not filled.
MEDIAL_POCKET_HALF_ANGLE_DEG = 45.0

SOFT_TISSUE_THRESHOLD_HU = -400.0
# In-plane opening radius: removes vessels and fissures thinner than twice this before labelling,
# so that nodules are not merged into the vascular tree.
VESSEL_OPENING_RADIUS_MM = 3.0
# Smallest candidate: a sphere of 3 mm radius (6 mm diameter, the Lung-RADS/Fleischner size below
# which solid nodules need no short-term follow-up).
MIN_LESION_VOLUME_MM3 = 4.0 / 3.0 * math.pi * 3.0**3
MAX_LESION_VOLUME_MM3 = 150_000.0
# Opening radius for the cores of masses: separates a large lesion from the hilum or pleura it
# touches through bridges narrower than 10 mm. Cores smaller than a 10 mm-radius sphere are left
# to the small scale.
MASS_OPENING_RADIUS_MM = 5.0
MIN_MASS_CORE_MM3 = 4.0 / 3.0 * math.pi * 10.0**3
# Small-scale candidates must be compact: on the sample CTs, the vessel bifurcations and
# confluences that survive the opening measured 0.53-0.64 and the solid nodule 0.68-0.71 (a
# threshold set on two cases: revisit on more data). Masses (large scale) are exempt, since the
# lung mask may cut them where they meet the chest wall.
MIN_NODULE_SPHERICITY = 0.65
# A candidate that touches the lung border over at least this fraction of its outline, on the
# side facing the mediastinum, is taken for hilar vessels or mediastinal tissue and dropped
# (juxtamediastinal nodules are a known blind spot of this baseline).
MIN_BORDER_CONTACT_FRACTION = 0.05
# PCA axis ratios: vessels are tubes (small minor/major), fissures and diaphragm caps are plates
# (small least/major). The least axis is only meaningful on two slices or more.
MIN_MINOR_MAJOR_RATIO = 0.6
MIN_LEAST_MAJOR_RATIO = 0.45
# A candidate on one slice only is more often a vessel cut across or lying in-plane than a
# nodule; it is kept only if solid on average and at least three slice thicknesses across.
SINGLE_SLICE_MIN_DIAMETER_SLICES = 3.0
SINGLE_SLICE_MIN_MEAN_HU = -100.0

# Lung-RADS v2022 solid-nodule size anchors (mean diameter, mm) -> suspicion score. Category 2
# (<6 mm), 3 (6-8 mm), 4A (8-15 mm), 4B (>=15 mm) map to the score bands of the priorities below.
_SIZE_ANCHORS_MM = (0.0, 6.0, 8.0, 15.0, 30.0)
_SIZE_ANCHOR_SCORES = (0.02, 0.2, 0.5, 0.9, 0.98)
# Priority thresholds on the score: 1 (most urgent) >= 0.9 > 2 >= 0.5 > 3 >= 0.2 > 4 (routine).
PRIORITY_THRESHOLDS = (0.9, 0.5, 0.2)

SALIENCY_SIGMA_MM = 2.0
# Coarse in-plane pixel size for the lung envelope and the lesion openings.
COARSE_PIXEL_MM = 1.3


@dataclass
class BaselineResult:
    """Everything :func:`run_baseline` derived from one volume; arrays share its (z, y, x) shape."""

    lung_mask: np.ndarray
    lesion_labels: np.ndarray
    lesions: list[RegionMeasurement]
    lung_volume_ml: float
    probability: float
    priority: int
    saliency: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)
    name: str = BASELINE_NAME
    version: str = BASELINE_VERSION

    def summary(self) -> dict[str, object]:
        """JSON-serialisable scalars and lesion measurements, without the arrays."""
        return {
            "name": self.name,
            "version": self.version,
            "lung_volume_ml": self.lung_volume_ml,
            "probability": self.probability,
            "priority": self.priority,
            "lesions": [m.to_dict() for m in self.lesions],
            "timings_s": dict(self.timings_s),
        }


def _check_inputs(volume: np.ndarray, spacing_zyx) -> tuple[float, float, float]:
    if np.ndim(volume) != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {np.shape(volume)}")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing_zyx must be three positive numbers, got {spacing_zyx}")
    return spacing  # type: ignore[return-value]


def _disk(radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """In-plane elliptical footprint (in pixels) of a disk of the given radius in mm."""
    ry, rx = radius_mm / spacing_yx[0], radius_mm / spacing_yx[1]
    ny, nx = int(math.floor(ry)), int(math.floor(rx))
    yy, xx = np.mgrid[-ny : ny + 1, -nx : nx + 1]
    return (yy / max(ry, 1e-9)) ** 2 + (xx / max(rx, 1e-9)) ** 2 <= 1.0


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    return boxes[0] if boxes else None


def _close_2d(mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Morphological closing by a disk via two distance transforms (fast for large radii)."""
    pad = int(math.ceil(radius_mm / min(spacing_yx))) + 2
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing_yx) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing_yx) > radius_mm
    return closed[pad:-pad, pad:-pad]


def _coarse_factor(spacing_yx: tuple[float, float]) -> int:
    return max(1, int(COARSE_PIXEL_MM / max(spacing_yx)))


def _downsample(mask: np.ndarray, factor: int, rule: str) -> np.ndarray:
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


def _upsample(arr: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    if factor == 1:
        return arr
    big = np.repeat(np.repeat(arr, factor, axis=-2), factor, axis=-1)
    return big[..., : shape[-2], : shape[-1]]


def _coarse_close(
    comp: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]
) -> np.ndarray:
    # The envelope is coarse by design, so it is computed on about 1 mm pixels; "any" makes the
    # coarse mask a superset of the lung, so the closing never loses lung.
    f = _coarse_factor(spacing_yx)
    coarse = _downsample(comp, f, "any")
    closed = _close_2d(coarse, radius_mm, (spacing_yx[0] * f, spacing_yx[1] * f))
    return _upsample(closed, f, comp.shape)


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Centroid (y, x) of a non-empty 2-D mask, from its row and column projections."""
    rows = mask.sum(axis=1, dtype=np.int64)
    cols = mask.sum(axis=0, dtype=np.int64)
    total = rows.sum()
    return np.array([rows @ np.arange(len(rows)), cols @ np.arange(len(cols))]) / total


def _fill_holes(mask: np.ndarray) -> np.ndarray:
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


def _close_lung_slice(
    air: np.ndarray, body: np.ndarray, spacing_yx: tuple[float, float], radius_mm: float
) -> np.ndarray:
    comps, n = ndimage.label(air)
    if n == 0:
        return air
    scale = np.asarray(spacing_yx)
    areas = np.bincount(comps.ravel())[1:] * (scale[0] * scale[1])
    body_centre = _centroid(body) if body.any() else np.array(air.shape) / 2
    centres = np.array(
        [
            _centroid(comps[box] == i) + (box[0].start, box[1].start)
            for i, box in enumerate(ndimage.find_objects(comps), start=1)
        ]
    ).reshape(n, 2)
    # One group per side of the body: pieces of one lung split by a fissure or a mass are closed
    # together, but the two lungs never are, so the mediastinum between them is never bridged.
    side = np.where(centres[:, 1] < body_centre[1], 1, 2)
    near_centre = np.hypot(*((centres - body_centre) * scale).T) < AIRWAY_MAX_CENTRE_DISTANCE_MM
    side[(areas < AIRWAY_MAX_AREA_MM2) & near_centre] = 0
    group = np.concatenate([[0], side])[comps]
    pad = int(math.ceil(radius_mm / min(spacing_yx))) + 2
    cos_medial = math.cos(math.radians(MEDIAL_POCKET_HALF_ANGLE_DEG))
    out = air.copy()
    for g in (1, 2):
        members = group == g
        if not members.any():
            continue
        rows = np.flatnonzero(members.any(axis=1))
        cols = np.flatnonzero(members.any(axis=0))
        y0, y1 = max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, air.shape[0])
        x0, x1 = max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, air.shape[1])
        lung = _fill_holes(members[y0:y1, x0:x1])
        pockets, n_pockets = ndimage.label(_coarse_close(lung, radius_mm, spacing_yx) & ~lung)
        if n_pockets == 0:
            continue
        centre = _centroid(lung)
        to_body = (body_centre - (y0, x0) - centre) * scale
        pocket_centres = [
            _centroid(pockets[box] == j) + (box[0].start, box[1].start)
            for j, box in enumerate(ndimage.find_objects(pockets), start=1)
        ]
        directions = (np.array(pocket_centres).reshape(n_pockets, 2) - centre) * scale
        norms = np.hypot(*directions.T) * np.hypot(*to_body)
        cosines = np.divide(directions @ to_body, norms, out=np.zeros(n_pockets), where=norms > 0)
        # Pockets facing the body centre are the hilum, heart and great vessels.
        keep = np.concatenate([[False], cosines < cos_medial])
        out[y0:y1, x0:x1] |= keep[pockets]
    return _fill_holes(out)


def segment_lungs(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    closing_radius_mm: float = BORDER_CLOSING_RADIUS_MM,
) -> np.ndarray:
    """Boolean (z, y, x) mask of the lungs, including vessels and juxtapleural/inner lesions.

    Air below -320 HU is labelled in 3-D; components touching the in-plane border of the volume
    are air outside the body. The largest remaining component, and the second largest if it is at
    least 10 % of the first (two lungs not joined by the airways), are the lungs. Each slice is then
    hole-filled (vessels, nodules inside the lung) and closed, per lung, by a disk of
    ``closing_radius_mm`` rolled along the border, which brings nodules and masses on the costal
    pleura into the mask. Concavities facing the body centre (hilum, heart, aorta) are left open,
    so lesions on the mediastinal pleura are only included as far as lung surrounds them.
    """
    spacing = _check_inputs(volume_hu, spacing_zyx)
    volume_hu = np.asarray(volume_hu)
    air = volume_hu < AIR_THRESHOLD_HU
    labels, n = ndimage.label(air)
    empty = np.zeros(air.shape, dtype=bool)
    if n == 0:
        return empty
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel()]
            + [labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    border = border[border > 0]
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.int64)
    sizes[0] = 0
    sizes[border] = 0
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    order = np.argsort(sizes)[::-1][:2]
    if sizes[order[0]] * voxel_ml < MIN_LUNG_VOLUME_ML:
        return empty
    keep = [order[0]]
    if len(order) > 1 and sizes[order[1]] >= SECOND_LUNG_MIN_FRACTION * sizes[order[0]]:
        keep.append(order[1])
    lut = np.zeros(n + 1, dtype=bool)
    lut[keep] = True
    lungs = lut[labels]
    outside_lut = np.zeros(n + 1, dtype=bool)
    outside_lut[border] = True
    body = ~outside_lut[labels]

    mask = empty
    for z in np.flatnonzero(lungs.any(axis=(1, 2))):
        mask[z] = _close_lung_slice(lungs[z], body[z], spacing[1:], closing_radius_mm)
    return mask


def _regrow(
    seeds: np.ndarray, allowed: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]
) -> np.ndarray:
    """Give back what the opening shaved off: allowed voxels within ``radius_mm`` in-plane of a
    seed go to the nearest seed's label (slice by slice, so labels never jump across slices)."""
    out = np.zeros_like(seeds)
    for z in np.flatnonzero(seeds.any(axis=(1, 2))):
        dist, (iy, ix) = ndimage.distance_transform_edt(
            seeds[z] == 0, sampling=spacing_yx, return_indices=True
        )
        grown = seeds[z][iy, ix]
        grown[~(allowed[z] & (dist <= radius_mm))] = 0
        out[z] = np.where(seeds[z] > 0, seeds[z], grown)
    return out


def _is_candidate(m: RegionMeasurement, slice_mm: float) -> bool:
    if not MIN_LESION_VOLUME_MM3 <= m.voxel_volume_mm3 <= MAX_LESION_VOLUME_MM3:
        return False
    if m.major_axis_mm <= 0 or m.minor_axis_mm / m.major_axis_mm < MIN_MINOR_MAJOR_RATIO:
        return False
    n_slices = m.bbox[3] - m.bbox[0]
    if n_slices >= 2:
        return m.least_axis_mm / m.major_axis_mm >= MIN_LEAST_MAJOR_RATIO
    return (
        m.max_2d_axial_diameter_mm >= SINGLE_SLICE_MIN_DIAMETER_SLICES * slice_mm
        and m.mean_hu is not None
        and m.mean_hu >= SINGLE_SLICE_MIN_MEAN_HU
    )


def _faces_mediastinum(
    region: np.ndarray, lung: np.ndarray, centre_yx: np.ndarray, spacing_yx: tuple[float, float]
) -> bool:
    """Whether a candidate's contact with the lung border faces the lungs' common centre.

    The centre of the lungs' bounding box stands in for the mediastinum (the body outline is not
    known here); contact is where the candidate touches voxels outside the lung mask in-plane.

    ``region`` and ``lung`` are crops of the same box; ``centre_yx`` holds, per cropped slice, the
    centre of the lungs' bounding box in crop pixels.
    """
    cross = ndimage.generate_binary_structure(2, 1)[None]
    region = np.pad(region, 1)
    lung = np.pad(lung, 1, constant_values=True)
    edge = region & ~ndimage.binary_erosion(region, structure=cross)
    touch = region & ndimage.binary_dilation(~lung, structure=cross)
    if touch.sum() < MIN_BORDER_CONTACT_FRACTION * edge.sum():
        return False
    z, y, x = np.nonzero(region)
    _, ty, tx = np.nonzero(touch)
    own = np.array([y.mean(), x.mean()])
    to_contact = (np.array([ty.mean(), tx.mean()]) - own) * spacing_yx
    to_centre = (centre_yx[int(round(z.mean())) - 1] + 1 - own) * spacing_yx
    norm = np.hypot(*to_contact) * np.hypot(*to_centre)
    cos_medial = math.cos(math.radians(MEDIAL_POCKET_HALF_ANGLE_DEG))
    return bool(norm > 0 and float(to_contact @ to_centre) / norm > cos_medial)


def _lung_centres(lung: np.ndarray) -> np.ndarray:
    """Per slice, the centre (y, x) of the bounding box of the lung mask (NaN where empty)."""
    centres = np.full((lung.shape[0], 2), np.nan)
    for z in np.flatnonzero(lung.any(axis=(1, 2))):
        rows = np.flatnonzero(lung[z].any(axis=1))
        cols = np.flatnonzero(lung[z].any(axis=0))
        centres[z] = (0.5 * (rows[0] + rows[-1]), 0.5 * (cols[0] + cols[-1]))
    return centres


def _seeds(mask: np.ndarray, min_mm3: float, voxel_mm3: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel_mm3
        labels[(sizes < min_mm3)[labels]] = 0
    return labels


def find_lesions(
    volume_hu: np.ndarray, lung_mask: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> np.ndarray:
    """Label lesion candidates inside the lung mask: int32 (z, y, x), 1 = largest by volume.

    Soft tissue (> -400 HU) inside the lungs is opened in-plane at two scales so that vessels
    detach: a 5 mm disk keeps only the cores of large lesions, a 3 mm disk the smaller ones in
    what is left. Each core is labelled in 3-D and grown back into the soft tissue the opening
    removed; a candidate is kept if its volume lies between a 6 mm sphere and 150 ml, it is not
    tubular or flat (PCA axis ratios), small ones are compact (sphericity), it spans two slices
    or more (one slice only if solid and at least three slice thicknesses across), and it does
    not lean on the lung border on the mediastinal side (hilar vessels). No lesion, no label.
    """
    return _detect_lesions(volume_hu, lung_mask, spacing_zyx)[0]


def _detect_lesions(
    volume_hu: np.ndarray, lung_mask: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> tuple[np.ndarray, list[RegionMeasurement]]:
    """:func:`find_lesions` plus the measurements (with HU) of the candidates it keeps."""
    spacing = _check_inputs(volume_hu, spacing_zyx)
    volume_hu = np.asarray(volume_hu)
    lung_mask = np.asarray(lung_mask, dtype=bool)
    if lung_mask.shape != volume_hu.shape:
        raise ValueError(f"lung_mask shape {lung_mask.shape} != volume shape {volume_hu.shape}")
    out = np.zeros(volume_hu.shape, dtype=np.int32)
    box = _bbox(lung_mask)
    if box is None:
        return out, []
    hu = volume_hu[box]
    lung = lung_mask[box]
    soft = (hu > SOFT_TISSUE_THRESHOLD_HU) & lung
    # Openings, labelling and regrowth run on about 1 mm pixels (a block is soft if most of it
    # is), which is ample for 6 mm structures and several times faster; the result is brought
    # back to full resolution and cut to the full-resolution soft tissue.
    f = _coarse_factor(spacing[1:])
    in_plane = (spacing[1] * f, spacing[2] * f)
    pixel = max(in_plane)
    voxel_mm3 = spacing[0] * in_plane[0] * in_plane[1]
    coarse_soft = _downsample(soft, f, "most")
    opened_small = ndimage.binary_opening(
        coarse_soft, structure=_disk(VESSEL_OPENING_RADIUS_MM, in_plane)[None]
    )
    opened_large = ndimage.binary_opening(
        opened_small, structure=_disk(MASS_OPENING_RADIUS_MM, in_plane)[None]
    )
    # Large scale first, so that a mass keeps the voxels that vessels touching it would claim.
    large = _regrow(
        _seeds(opened_large, MIN_MASS_CORE_MM3, voxel_mm3),
        coarse_soft,
        MASS_OPENING_RADIUS_MM + pixel,
        in_plane,
    )
    rest = coarse_soft & ~ndimage.binary_dilation(large > 0, structure=_disk(pixel, in_plane)[None])
    # The opening keeps about the core of a nodule, so the volume floor is applied loosely here
    # and exactly after regrowth.
    small = _regrow(
        _seeds(opened_small & rest, 0.25 * MIN_LESION_VOLUME_MM3, voxel_mm3),
        rest,
        VESSEL_OPENING_RADIUS_MM + pixel,
        in_plane,
    )
    offset = int(large.max())
    coarse = np.where(small > 0, small + offset, large)
    sizes = np.bincount(coarse.ravel()) * voxel_mm3
    plausible = (sizes >= 0.5 * MIN_LESION_VOLUME_MM3) & (sizes <= 2 * MAX_LESION_VOLUME_MM3)
    plausible[0] = False
    coarse[~plausible[coarse]] = 0
    grown = np.where(soft, _upsample(coarse, f, soft.shape), 0)
    in_plane = spacing[1:]
    centres = _lung_centres(lung)
    kept = []
    for m in measure_regions(grown, spacing, hu):
        if not _is_candidate(m, spacing[0]):
            continue
        if m.label > offset and m.sphericity < MIN_NODULE_SPHERICITY:
            continue
        sub = tuple(slice(lo, hi) for lo, hi in zip(m.bbox[:3], m.bbox[3:], strict=True))
        if _faces_mediastinum(
            grown[sub] == m.label,
            lung[sub],
            centres[sub[0]] - (sub[1].start, sub[2].start),
            in_plane,
        ):
            continue
        kept.append(m)
    kept.sort(key=lambda m: (-m.voxel_count, m.label))
    lut = np.zeros(int(grown.max()) + 1, dtype=np.int32)
    for rank, m in enumerate(kept, start=1):
        lut[m.label] = rank
    out[box] = lut[grown]
    origin = tuple(b.start for b in box)
    lesions = [
        replace(
            m,
            label=rank,
            centroid_zyx=tuple(c + o for c, o in zip(m.centroid_zyx, origin, strict=True)),
            bbox=tuple(v + o for v, o in zip(m.bbox, origin + origin, strict=True)),
        )
        for rank, m in enumerate(kept, start=1)
    ]
    return out, lesions


def _effective_diameter_mm(m: RegionMeasurement) -> float:
    """Diameter of the sphere with the lesion's volume (Lung-RADS allows volumetric sizing)."""
    return (6.0 * m.voxel_volume_mm3 / math.pi) ** (1.0 / 3.0)


def lesion_probability(lesion: RegionMeasurement) -> float:
    """Suspicion score in [0, 1] of one lesion from its volume-equivalent diameter.

    Piecewise linear through the Lung-RADS v2022 solid-nodule size anchors: 0 mm -> 0.02,
    6 mm -> 0.2, 8 mm -> 0.5, 15 mm -> 0.9, 30 mm and above -> 0.98; non-decreasing in size.
    """
    return float(np.interp(_effective_diameter_mm(lesion), _SIZE_ANCHORS_MM, _SIZE_ANCHOR_SCORES))


def screen_probability(lesions_measurements: list[RegionMeasurement]) -> float:
    """Suspicion score in [0, 1] of a study: :func:`lesion_probability` of its largest lesion.

    The largest lesion by volume decides, so the score is monotone in that lesion's volume; with
    no lesion it is the floor of the mapping, 0.02 (the baseline can miss lesions, so never 0).
    """
    if not lesions_measurements:
        return float(_SIZE_ANCHOR_SCORES[0])
    largest = max(lesions_measurements, key=lambda m: m.voxel_volume_mm3)
    return lesion_probability(largest)


def priority_from_probability(p: float) -> int:
    """Worklist priority from a suspicion score: 1 (most urgent) to 4 (routine).

    1 if p >= 0.9 (about Lung-RADS 4B, >= 15 mm), 2 if p >= 0.5 (4A, 8-15 mm), 3 if p >= 0.2
    (3, 6-8 mm), else 4. Raises ValueError outside [0, 1] or for NaN.
    """
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    for priority, threshold in enumerate(PRIORITY_THRESHOLDS, start=1):
        if p >= threshold:
            return priority
    return len(PRIORITY_THRESHOLDS) + 1


def _saliency(
    labels: np.ndarray, lesions: list[RegionMeasurement], spacing: tuple[float, float, float]
) -> np.ndarray:
    """Each lesion painted with its own score and blurred, so the map peaks at that score."""
    saliency = np.zeros(labels.shape, dtype=np.float32)
    sigma = tuple(SALIENCY_SIGMA_MM / s for s in spacing)
    margin = tuple(int(math.ceil(3 * s)) + 1 for s in sigma)
    for m in lesions:
        box = tuple(
            slice(max(lo - g, 0), min(hi + g, n))
            for lo, hi, g, n in zip(m.bbox[:3], m.bbox[3:], margin, labels.shape, strict=True)
        )
        blob = ndimage.gaussian_filter((labels[box] == m.label).astype(np.float32), sigma)
        peak = float(blob.max())
        if peak > 0:
            blob *= lesion_probability(m) / peak
            np.maximum(saliency[box], blob, out=saliency[box])
    return np.clip(saliency, 0.0, 1.0, out=saliency)


def run_baseline(volume_hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> BaselineResult:
    """Run the whole classical pipeline on one (z, y, x) HU volume."""
    spacing = _check_inputs(volume_hu, spacing_zyx)
    volume_hu = np.asarray(volume_hu)
    timings: dict[str, float] = {}
    start = t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = now - t0
        t0 = now

    lung_mask = segment_lungs(volume_hu, spacing)
    lap("lungs")
    labels, lesions = _detect_lesions(volume_hu, lung_mask, spacing)
    lap("lesions")
    probability = screen_probability(lesions)
    priority = priority_from_probability(probability)
    lap("score")
    saliency = _saliency(labels, lesions, spacing)
    lap("saliency")
    timings["total"] = time.perf_counter() - start
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    return BaselineResult(
        lung_mask=lung_mask,
        lesion_labels=labels,
        lesions=lesions,
        lung_volume_ml=float(lung_mask.sum(dtype=np.int64) * voxel_ml),
        probability=probability,
        priority=priority,
        saliency=saliency,
        timings_s=timings,
    )
