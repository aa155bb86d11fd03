"""Lung segmentation by air threshold and per-lung border closing on chest CT volumes in
Hounsfield units. Used by QA, the synthetic-data tools and the classical baseline. Imports only
`ml.image`."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ml.image.morphology import (
    centroid,
    check_volume,
    close_2d,
    fill_holes,
    label_compact,
    label_sizes,
)
from ml.image.threads import for_each

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


def _close_lung_slice(
    air: np.ndarray, body: np.ndarray, spacing_yx: tuple[float, float], radius_mm: float
) -> np.ndarray:
    comps, n = ndimage.label(air)
    if n == 0:
        return air
    scale = np.asarray(spacing_yx)
    areas = np.bincount(comps.ravel())[1:] * (scale[0] * scale[1])
    body_centre = centroid(body) if body.any() else np.array(air.shape) / 2
    centres = np.array(
        [
            centroid(comps[box] == i) + (box[0].start, box[1].start)
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
        lung = fill_holes(members[y0:y1, x0:x1])
        # At full resolution: a closing on coarse blocks laid from one corner would not be laid
        # the same way on a mirrored slice, and a study mirrored left-right would get another
        # lung mask (and other nodule candidates); the exact closing is mirror-symmetric.
        pockets, n_pockets = ndimage.label(close_2d(lung, radius_mm, spacing_yx) & ~lung)
        if n_pockets == 0:
            continue
        centre = centroid(lung)
        to_body = (body_centre - (y0, x0) - centre) * scale
        pocket_centres = [
            centroid(pockets[box] == j) + (box[0].start, box[1].start)
            for j, box in enumerate(ndimage.find_objects(pockets), start=1)
        ]
        directions = (np.array(pocket_centres).reshape(n_pockets, 2) - centre) * scale
        norms = np.hypot(*directions.T) * np.hypot(*to_body)
        cosines = np.divide(directions @ to_body, norms, out=np.zeros(n_pockets), where=norms > 0)
        # Pockets facing the body centre are the hilum, heart and great vessels.
        keep = np.concatenate([[False], cosines < cos_medial])
        out[y0:y1, x0:x1] |= keep[pockets]
    return fill_holes(out)


def segment_lungs(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    closing_radius_mm: float = BORDER_CLOSING_RADIUS_MM,
    threads: int = 1,
) -> np.ndarray:
    """Boolean (z, y, x) mask of the lungs, including vessels and juxtapleural/inner lesions.

    Air below -320 HU is labelled in 3-D; components touching the in-plane border of the volume
    are air outside the body. The largest remaining component, and the second largest if it is at
    least 10 % of the first (two lungs not joined by the airways), are the lungs. Each slice is then
    hole-filled (vessels, nodules inside the lung) and closed, per lung, by a disk of
    ``closing_radius_mm`` rolled along the border, which brings nodules and masses on the costal
    pleura into the mask. Concavities facing the body centre (hilum, heart, aorta) are left open,
    so lesions on the mediastinal pleura are only included as far as lung surrounds them.
    The slices are closed on ``threads`` threads (the mask does not depend on how many).
    """
    spacing = check_volume(volume_hu, spacing_zyx)
    volume_hu = np.asarray(volume_hu)
    labels, n = label_compact(volume_hu < AIR_THRESHOLD_HU)
    empty = np.zeros(labels.shape, dtype=bool)
    if n == 0:
        return empty
    border = np.unique(
        np.concatenate(
            [labels[:, 0, :].ravel(), labels[:, -1, :].ravel()]
            + [labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
    )
    border = border[border > 0]
    sizes = label_sizes(labels, n)
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
    del labels  # the largest array here: gone before the per-slice work

    mask = empty
    slices = np.flatnonzero(lungs.any(axis=(1, 2))).tolist()

    def close(z: int) -> None:
        mask[z] = _close_lung_slice(lungs[z], body[z], spacing[1:], closing_radius_mm)

    for_each(close, slices, threads)
    return mask
