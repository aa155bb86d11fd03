"""Follow-up validation on real CTs (issue #14, item 6): prior/current pairs built from each real
anatomy with a known deformation, real LIDC nodules inserted at two known sizes, independent noise;
scored for registration error at landmarks, matching and growth, by nodule size.

A pair (:func:`build_pair`) from one background B (:mod:`ml.data.backgrounds`):

* the *prior* is B with real nodules composited at their prior sizes (:func:`ml.data.compose.
  insert_nodule`, ``free`` positions, so the whole nodule lies in aerated lung);
* the *current* is B seen through a known smooth mapping T (current mm -> prior mm,
  :class:`ml.data.chest_phantom.Breathing`: a rigid shift plus a cranio-caudal displacement that
  grows from the apex to the diaphragm and an antero-posterior expansion that grows the same way),
  with the same nodules composited at T^-1 of their prior centres at their current sizes
  (:func:`ml.data.compose.insert_at`). Volume ratios current / prior are 1 (stable) or
  `GROWTH_FACTOR` (growing), alternating over sizes and pairs, so each size is seen both ways;
* distractors: one nodule only in the prior (resolved) and one only in the current (new), the
  new one at least `DISTRACTOR_MIN_DISTANCE_MM` from every prior nodule mapped into the current;
* independent correlated noise (`NOISE_SD_HU`) on each study.

Truth: T itself for `LANDMARKS_PER_PAIR` random points of the current lungs (TRE), which label is
which nodule, and nominal volumes (readers' mask volume x scale^3, as :mod:`ml.data.compose`
advises: the label on a 5 mm grid loses volume to partial volume, and that loss is part of what is
measured here).

Two runs per pair (:func:`evaluate_pair`): ``truth_labels``, :func:`ml.runtime.followup.follow_up`
on the compositor's label maps (registration with both lung segmentations, matching, measurement:
what the follow-up itself adds, timed); and ``baseline``, the classical pipeline's own calls on each
study (:func:`ml.runtime.baseline.run_baseline`) fed to the same follow-up with the baseline's lungs
(end to end: detection limits it; a call hits a nodule when its centre lies inside the nodule's
label or within its equivalent radius, as in :mod:`ml.evaluation.unseen`). Sizes: the nominal
equivalent diameter of the smaller sighting. Volume-change error: |measured ratio / true ratio - 1|.

Nodules are from the LIDC *validation*-split patients (:mod:`ml.data.splits`); nothing here is
tuned, and no test-split patient is read. Imports `ml.data`, `ml.image` and `ml.runtime`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ml.data.backgrounds import ANATOMIES, load_anatomy
from ml.data.chest_phantom import Breathing
from ml.data.compose import (
    InsertedNodule,
    PlacementError,
    PlacementIndex,
    attachment,
    insert_at,
    insert_nodule,
    scale_for_volume,
)
from ml.data.nodules import NoduleCrop, NoduleRow, load_crop, read_nodule_table
from ml.data.splits import rows_in
from ml.data.synth import Background
from ml.image.registration import RegistrationRefused
from ml.runtime.baseline import run_baseline
from ml.runtime.followup import FollowUp, Lesion, follow_up

__all__ = [
    "RealPair",
    "TruthNodule",
    "build_pair",
    "breathing_for",
    "compact",
    "evaluate_pair",
    "invert",
    "run",
    "summarise",
    "warp_background",
]

FOLLOWUP_SEED = 20261130
INTERVAL_DAYS = 180.0
# Prior diameters (mm) of the nodules seen in both studies: two under the 6 mm Lung-RADS line,
# four at or above it.
PRIOR_DIAMETERS_MM = (4.0, 5.0, 6.5, 8.0, 10.0, 13.0)
# Volume x1.7 in 180 days: a doubling time of about 235 days, the suspicious range.
GROWTH_FACTOR = 1.7
RESOLVED_DIAMETER_MM = 7.0
NEW_DIAMETER_MM = 8.0
# A new nodule this far from every prior nodule cannot be within any match gate.
DISTRACTOR_MIN_DISTANCE_MM = 30.0
# Source crops within this factor of the wanted diameter, so scaling keeps their texture plausible.
CROP_DIAMETER_FACTOR = 2.0
NOISE_SD_HU = 15.0
NOISE_SIGMA_PX = 0.7
LANDMARKS_PER_PAIR = 300
# The mapping: shift (mm, each axis, random sign), cranio-caudal amplitude and AP expansion (mm).
SHIFT_MM = (2.0, 6.0)
AMPLITUDE_MM = (5.0, 9.0)
EXPANSION_MM = (2.0, 4.0)
SIZE_SPLIT_MM = 6.0
TARGETS = {
    "tre_median_mm": 1.5,
    "volume_change_error_pct": 10.0,
    "seconds_per_study": 20.0,
}
THREADS = 2


@dataclass
class TruthNodule:
    """One inserted nodule: its label in each study (None where absent), nominal volumes (mm³),
    centres ((z, y, x) mm, each study's frame) and source."""

    key: int
    prior_label: int | None
    current_label: int | None
    prior_volume_mm3: float | None
    current_volume_mm3: float | None
    prior_centre_mm: tuple[float, float, float] | None
    current_centre_mm: tuple[float, float, float] | None
    source: str

    @property
    def status(self) -> str:
        if self.prior_label is not None and self.current_label is not None:
            return "matched"
        return "resolved" if self.prior_label is not None else "new"

    @property
    def diameter_mm(self) -> float:
        """Nominal equivalent diameter of the smaller sighting."""
        vols = [v for v in (self.prior_volume_mm3, self.current_volume_mm3) if v]
        return _diameter(min(vols))

    @property
    def true_ratio(self) -> float | None:
        if self.prior_volume_mm3 and self.current_volume_mm3:
            return self.current_volume_mm3 / self.prior_volume_mm3
        return None


@dataclass
class RealPair:
    """A prior/current pair on one grid (origin 0, the background's spacing) and its truth;
    ``mapping`` maps current points to prior points ((z, y, x) mm)."""

    name: str
    anatomy: str
    spacing: tuple[float, float, float]
    prior_hu: np.ndarray
    prior_labels: np.ndarray
    current_hu: np.ndarray
    current_labels: np.ndarray
    mapping: Breathing
    landmarks_current_mm: np.ndarray
    landmarks_prior_mm: np.ndarray
    nodules: list[TruthNodule]
    interval_days: float = INTERVAL_DAYS
    provenance: list[dict] = field(default_factory=list)


def _diameter(volume_mm3: float) -> float:
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def _volume(diameter_mm: float) -> float:
    return math.pi * diameter_mm**3 / 6.0


def invert(mapping: Breathing, points_mm: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Points x with ``mapping(x) = points`` by fixed-point iteration x <- x - (T(x) - p); it
    converges because T is a shift plus a displacement whose gradient is well below 1."""
    p = np.asarray(points_mm, dtype=np.float64)
    x = p.copy()
    for _ in range(iterations):
        residual = mapping(x) - p
        x = x - residual
        if float(np.abs(residual).max(initial=0.0)) < 1e-6:
            break
    return x


def breathing_for(background: Background, rng: np.random.Generator) -> Breathing:
    """A breathing-like mapping for ``background``: the displacement rises from the lung apex to
    the diaphragm. Arrays are LPS (:func:`ml.data.backgrounds.load_anatomy`), so z grows towards
    the head: the diaphragm is at the lungs' lowest slice."""
    sp = np.asarray(background.spacing, dtype=np.float64)
    slices = np.flatnonzero(background.lung.any(axis=(1, 2)))
    if slices.size == 0:
        raise ValueError(f"{background.name}: no lung")
    extent = np.asarray(background.hu.shape) * sp
    shift = rng.uniform(*SHIFT_MM, size=3) * rng.choice([-1.0, 1.0], size=3)
    return Breathing(
        shift_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
        amplitude_mm=float(rng.uniform(*AMPLITUDE_MM)),
        expansion_mm=float(rng.uniform(*EXPANSION_MM)),
        z_apex_mm=float(slices[-1] * sp[0]),
        z_base_mm=float(slices[0] * sp[0]),
        centre_yx_mm=(float(extent[1] / 2), float(extent[2] / 2)),
        width_mm=float(0.6 * extent[2]),
    )


def warp_background(background: Background, mapping: Breathing, slab: int = 8) -> Background:
    """``background`` seen through ``mapping``: the value at current point x is the background's
    at mapping(x) (linear; lungs: interpolated mask >= 1/2). Beyond the scan the edge voxels are
    repeated (a table shift moves anatomy out of the field of view; air there would join the lungs
    to the outside air and defeat lung segmentation). Done in slabs of z so that the coordinate
    arrays stay small."""
    sp = np.asarray(background.spacing, dtype=np.float64)
    nz, ny, nx = background.hu.shape
    hu = np.empty(background.hu.shape, dtype=np.float32)
    lung = np.empty(background.hu.shape, dtype=bool)
    lung_f = background.lung.astype(np.float32)
    yy, xx = np.meshgrid(np.arange(ny) * sp[1], np.arange(nx) * sp[2], indexing="ij")
    for z0 in range(0, nz, slab):
        zs = np.arange(z0, min(z0 + slab, nz)) * sp[0]
        pts = np.stack(
            [
                np.broadcast_to(zs[:, None, None], (zs.size, ny, nx)),
                np.broadcast_to(yy, (zs.size, ny, nx)),
                np.broadcast_to(xx, (zs.size, ny, nx)),
            ],
            axis=-1,
        )
        coords = np.moveaxis(mapping(pts) / sp, -1, 0)
        hu[z0 : z0 + zs.size] = ndimage.map_coordinates(
            background.hu, coords, order=1, mode="nearest"
        )
        lung[z0 : z0 + zs.size] = (
            ndimage.map_coordinates(lung_f, coords, order=1, mode="nearest") >= 0.5
        )
    return Background(
        f"{background.name}/current", hu, lung, background.spacing, np.zeros(hu.shape, bool)
    )


def _noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), (0.0, NOISE_SIGMA_PX, NOISE_SIGMA_PX)
    )
    return n * np.float32(NOISE_SD_HU / max(float(n.std()), 1e-6))


@dataclass(frozen=True)
class Request:
    """One nodule to insert: volumes (mm³) in the prior and the current, None where absent."""

    crop: NoduleCrop
    prior_volume_mm3: float | None
    current_volume_mm3: float | None


def requests_for(crops: Sequence[NoduleCrop], k: int) -> list[Request]:
    """The standard design of the ``k``-th pair from at least ``len(PRIOR_DIAMETERS_MM) + 2``
    crops: nodules of `PRIOR_DIAMETERS_MM` stable or growing by `GROWTH_FACTOR` (alternating,
    shifted by ``k``), then one resolved and one new nodule."""
    n = len(PRIOR_DIAMETERS_MM)
    if len(crops) < n + 2:
        raise ValueError(f"need {n + 2} crops, got {len(crops)}")
    out = []
    for i, d in enumerate(PRIOR_DIAMETERS_MM):
        factor = GROWTH_FACTOR if (i + k) % 2 else 1.0
        out.append(Request(crops[i], _volume(d), _volume(d) * factor))
    out.append(Request(crops[n], _volume(RESOLVED_DIAMETER_MM), None))
    out.append(Request(crops[n + 1], None, _volume(NEW_DIAMETER_MM)))
    return out


def build_pair(
    background: Background,
    requests: Sequence[Request],
    seed: int,
    *,
    name: str | None = None,
    mapping: Breathing | None = None,
    index: PlacementIndex | None = None,
    landmarks: int = LANDMARKS_PER_PAIR,
) -> RealPair:
    """A prior/current pair from ``background`` (see the module's description). A nodule that
    cannot be placed is left out of both studies; one whose current position cannot take it (off
    the lungs after the mapping) stays in the prior as a resolved nodule: the truth says what was
    built. Deterministic for one seed."""
    rng = np.random.default_rng(seed)
    mapping = mapping or breathing_for(background, rng)
    sp = np.asarray(background.spacing, dtype=np.float64)
    index = index or PlacementIndex(background)
    current_bg = warp_background(background, mapping)
    current_index = PlacementIndex(current_bg)
    prior_hu = np.array(background.hu, dtype=np.float32, copy=True)
    prior_labels = np.zeros(prior_hu.shape, dtype=np.int16)
    current_hu = np.array(current_bg.hu, dtype=np.float32, copy=True)
    current_labels = np.zeros(current_hu.shape, dtype=np.int16)
    nodules: list[TruthNodule] = []
    provenance: list[dict] = []
    label = 0
    for req in (r for r in requests if r.prior_volume_mm3):
        label += 1
        truth = _insert_both(
            req,
            label,
            seed,
            rng,
            mapping,
            (prior_hu, prior_labels, index),
            (current_hu, current_labels, current_index),
            provenance,
        )
        if truth is None:
            label -= 1
            continue
        nodules.append(truth)
    mapped_prior = np.array(
        [invert(mapping, np.asarray(n.prior_centre_mm)[None])[0] for n in nodules]
    ).reshape(-1, 3)
    for req in (r for r in requests if not r.prior_volume_mm3 and r.current_volume_mm3):
        label += 1
        ins = _insert_new(
            req, label, seed, rng, (current_hu, current_labels, current_index), mapped_prior
        )
        if ins is None:
            label -= 1
            continue
        source = f"{req.crop.row.patient_id} #{req.crop.row.nodule_id}"
        nodules.append(
            TruthNodule(
                label, None, label, None, ins.nominal_volume_mm3, None, _xyz(ins.centre_mm), source
            )
        )
        provenance.append({"study": "current", **ins.to_dict()})
    prior_hu += _noise(prior_hu.shape, rng)
    current_hu += _noise(current_hu.shape, rng)
    lung_voxels = np.argwhere(current_bg.lung)
    chosen = lung_voxels[rng.choice(len(lung_voxels), min(landmarks, len(lung_voxels)), False)]
    points = chosen * sp
    return RealPair(
        name=name or f"{background.name}-followup-{seed}",
        anatomy=background.name,
        spacing=(float(sp[0]), float(sp[1]), float(sp[2])),
        prior_hu=prior_hu,
        prior_labels=prior_labels,
        current_hu=current_hu,
        current_labels=current_labels,
        mapping=mapping,
        landmarks_current_mm=points,
        landmarks_prior_mm=mapping(points),
        nodules=nodules,
        provenance=provenance,
    )


def _insert_new(
    req: Request,
    label: int,
    seed: int,
    rng: np.random.Generator,
    current: tuple[np.ndarray, np.ndarray, PlacementIndex],
    mapped_prior: np.ndarray,
    tries: int = 5,
) -> InsertedNodule | None:
    """Insert a nodule of the current only at a drawn ``free`` position at least
    `DISTRACTOR_MIN_DISTANCE_MM` from every prior nodule mapped into the current (a position too
    near is undone and another drawn); None when none is found. Arrays are modified in place."""
    current_hu, current_labels, index = current
    for _ in range(tries):
        saved_hu, saved_labels = current_hu.copy(), current_labels.copy()
        ins = _insert_free(current, req.crop, req.current_volume_mm3, rng, label, seed)
        if ins is None:
            return None
        centre = np.asarray(ins.centre_mm)
        if not len(mapped_prior) or (
            np.linalg.norm(mapped_prior - centre, axis=1).min() >= DISTRACTOR_MIN_DISTANCE_MM
        ):
            return ins
        current_hu[...] = saved_hu
        current_labels[...] = saved_labels
    return None


def _insert_free(
    study: tuple[np.ndarray, np.ndarray, PlacementIndex],
    crop: NoduleCrop,
    volume_mm3: float | None,
    rng: np.random.Generator,
    label: int,
    seed: int,
) -> InsertedNodule | None:
    """``crop`` scaled to ``volume_mm3`` at a drawn ``free`` position; None where none fits."""
    hu, labels, index = study
    try:
        return insert_nodule(
            hu,
            labels,
            index,
            crop,
            "free",
            rng,
            scale=scale_for_volume(crop, float(volume_mm3 or 0.0)),
            label_value=label,
            seed=seed,
        )
    except (PlacementError, ValueError):
        return None


def _insert_both(
    req: Request,
    label: int,
    seed: int,
    rng: np.random.Generator,
    mapping: Breathing,
    prior: tuple[np.ndarray, np.ndarray, PlacementIndex],
    current: tuple[np.ndarray, np.ndarray, PlacementIndex],
    provenance: list[dict],
    tries: int = 5,
) -> TruthNodule | None:
    """Insert ``req`` into the prior at a drawn ``free`` position and, where it has a current
    volume, into the current at the mapped position; when the current cannot take it there (off
    the lungs after the mapping, too small to leave a label on a thick slice) the prior insertion
    is undone and another position drawn. None when no position works: the nodule is left out
    of both studies. Arrays are modified in place."""
    prior_hu, prior_labels, index = prior
    current_hu, current_labels, current_index = current
    sp = index.spacing
    source = f"{req.crop.row.patient_id} #{req.crop.row.nodule_id}"
    for _ in range(tries):
        saved_hu, saved_labels = prior_hu.copy(), prior_labels.copy()
        ins = _insert_free(prior, req.crop, req.prior_volume_mm3, rng, label, seed)
        if ins is None:
            return None
        prior_centre = np.asarray(ins.centre_mm)
        truth = TruthNodule(
            label, label, None, ins.nominal_volume_mm3, None, _xyz(prior_centre), None, source
        )
        if not req.current_volume_mm3:
            provenance.append({"study": "prior", **ins.to_dict()})
            return truth
        current_centre = invert(mapping, prior_centre[None])[0]
        try:
            cur = insert_at(
                current_hu,
                current_labels,
                current_index,
                req.crop,
                current_centre / sp,
                scale=scale_for_volume(req.crop, float(req.current_volume_mm3 or 0.0)),
                label_value=label,
                seed=seed,
                kind="same nodule, mapped",
            )
        except PlacementError:
            prior_hu[...] = saved_hu
            prior_labels[...] = saved_labels
            continue
        truth.current_label = label
        truth.current_volume_mm3 = cur.nominal_volume_mm3
        truth.current_centre_mm = _xyz(current_centre)
        provenance.append({"study": "prior", **ins.to_dict()})
        provenance.append({"study": "current", **cur.to_dict()})
        return truth
    return None


def _xyz(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


# --- scoring ------------------------------------------------------------------------------------


def _bin(diameter_mm: float) -> str:
    return f"<{SIZE_SPLIT_MM:g} mm" if diameter_mm < SIZE_SPLIT_MM else f">={SIZE_SPLIT_MM:g} mm"


def _empty_counts() -> dict[str, int]:
    return {
        "nodules": 0,
        "true_matches": 0,
        "false_matches": 0,
        "missed": 0,
        "missed_not_detected": 0,
    }


def hits(
    lesions: Sequence[Lesion],
    truth_labels: np.ndarray,
    nodules: Sequence[TruthNodule],
    spacing: Sequence[float],
    study: str,
) -> dict[int, int | None]:
    """Which truth nodule (key) each lesion hits: its centre inside the nodule's label, else
    within the nodule's equivalent radius of its centre (the nearest), else None."""
    sp = np.asarray(spacing, dtype=np.float64)
    present = [n for n in nodules if (n.prior_label if study == "prior" else n.current_label)]
    by_label = {(n.prior_label if study == "prior" else n.current_label): n for n in present}
    centres = np.array(
        [n.prior_centre_mm if study == "prior" else n.current_centre_mm for n in present]
    ).reshape(-1, 3)
    radii = np.array(
        [
            _diameter((n.prior_volume_mm3 if study == "prior" else n.current_volume_mm3) or 0.0) / 2
            for n in present
        ]
    )
    out: dict[int, int | None] = {}
    for lesion in lesions:
        c = np.asarray(lesion.centre_mm)
        vox = tuple(np.clip(np.round(c / sp).astype(int), 0, np.array(truth_labels.shape) - 1))
        inside = int(truth_labels[vox])
        if inside in by_label:
            out[lesion.label] = by_label[inside].key
            continue
        if len(present):
            d = np.linalg.norm(centres - c, axis=1)
            j = int(np.argmin(np.where(d <= radii, d, np.inf)))
            out[lesion.label] = present[j].key if d[j] <= radii[j] else None
        else:
            out[lesion.label] = None
    return out


def score(
    fu: FollowUp,
    current_hits: dict[int, int | None],
    prior_hits: dict[int, int | None],
    nodules: Sequence[TruthNodule],
) -> dict[str, Any]:
    """Matching counts by size bin and the growth of each correctly matched nodule.

    True match: both lesions hit the same nodule seen in both studies. False match: any other pair
    that involves a nodule (two different nodules, a distractor, a nodule and a non-nodule call);
    a pair of two calls that hit no nodule is counted apart (``other_pairs``: the same non-nodule
    tracked, neither right nor wrong here). Missed: a nodule of both studies not truly matched,
    ``missed_not_detected`` when a study has no call on it."""
    by_key = {n.key: n for n in nodules}
    counts: dict[str, dict[str, int]] = {}
    for n in nodules:
        if n.status == "matched":
            counts.setdefault(_bin(n.diameter_mm), _empty_counts())["nodules"] += 1
    growth: list[dict[str, float]] = []
    other_pairs = 0
    truly: set[int] = set()
    for pc in fu.pairs:
        kc, kp = current_hits.get(pc.current.label), prior_hits.get(pc.prior.label)
        if kc is None and kp is None:
            other_pairs += 1
            continue
        if kc == kp and kc is not None and by_key[kc].status == "matched":
            n = by_key[kc]
            counts[_bin(n.diameter_mm)]["true_matches"] += 1
            truly.add(kc)
            true_ratio = float(n.true_ratio or math.nan)
            measured = pc.current.volume_mm3 / pc.prior.volume_mm3
            growth.append(
                {
                    "diameter_mm": n.diameter_mm,
                    "true_ratio": true_ratio,
                    "measured_ratio": measured,
                    "error_pct": 100.0 * abs(measured / true_ratio - 1.0),
                    "change_error_points": 100.0 * abs(measured - true_ratio),
                    "distance_mm": pc.distance_mm,
                }
            )
            continue
        size = max(by_key[k].diameter_mm for k in (kc, kp) if k is not None)
        counts.setdefault(_bin(size), _empty_counts())["false_matches"] += 1
    detected_cur = {k for k in current_hits.values() if k is not None}
    detected_pri = {k for k in prior_hits.values() if k is not None}
    for n in nodules:
        if n.status != "matched" or n.key in truly:
            continue
        c = counts[_bin(n.diameter_mm)]
        c["missed"] += 1
        if n.key not in detected_cur or n.key not in detected_pri:
            c["missed_not_detected"] += 1
    return {"by_size": counts, "growth": growth, "other_pairs": other_pairs}


def evaluate_pair(pair: RealPair, *, baseline: bool = True) -> dict[str, Any]:
    """Both runs of one pair (see the module's description); seconds are wall time of the
    follow-up alone (registration with lung segmentation, measurement, matching)."""
    sp = pair.spacing
    out: dict[str, Any] = {
        "name": pair.name,
        "anatomy": pair.anatomy,
        "shape": list(pair.current_hu.shape),
        "spacing": list(sp),
        "mapping": asdict(pair.mapping),
        "nodules": [
            {**asdict(n), "status": n.status, "diameter_mm": n.diameter_mm} for n in pair.nodules
        ],
    }
    current_key, prior_key = f"{pair.name}/current", f"{pair.name}/prior"
    start, cpu = time.perf_counter(), time.process_time()
    try:
        fu, reg = follow_up(
            pair.current_hu,
            sp,
            pair.current_labels,
            pair.prior_hu,
            sp,
            pair.prior_labels,
            pair.interval_days,
            current_study_key=current_key,
            prior_study_key=prior_key,
        )
    except RegistrationRefused as refused:
        out["truth_labels"] = {
            "refused": refused.reason,
            "seconds": time.perf_counter() - start,
        }
        return out
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tre = np.linalg.norm(reg.to_prior(pair.landmarks_current_mm) - pair.landmarks_prior_mm, axis=1)
    identity = np.linalg.norm(pair.landmarks_current_mm - pair.landmarks_prior_mm, axis=1)
    identity_map = {n.current_label: n.key for n in pair.nodules if n.current_label}
    prior_map = {n.prior_label: n.key for n in pair.nodules if n.prior_label}
    cur_hits = {lab: identity_map.get(lab) for lab in _labels_of(fu, "current")}
    pri_hits = {lab: prior_map.get(lab) for lab in _labels_of(fu, "prior")}
    out["truth_labels"] = {
        "refused": None,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "registration": reg.quality.to_dict(),
        "tre_mm": [float(v) for v in tre],
        "displacement_mm": [float(v) for v in identity],
        **score(fu, cur_hits, pri_hits, pair.nodules),
    }
    if not baseline:
        return out
    t0 = time.perf_counter()
    calls_current = run_baseline(pair.current_hu, sp)
    calls_prior = run_baseline(pair.prior_hu, sp)
    detect_seconds = time.perf_counter() - t0
    start, cpu = time.perf_counter(), time.process_time()
    try:
        fu_b, _ = follow_up(
            pair.current_hu,
            sp,
            calls_current.lesion_labels,
            pair.prior_hu,
            sp,
            calls_prior.lesion_labels,
            pair.interval_days,
            current_lungs=calls_current.lung_mask,
            prior_lungs=calls_prior.lung_mask,
            current_study_key=current_key,
            prior_study_key=prior_key,
        )
    except RegistrationRefused as refused:
        out["baseline"] = {"refused": refused.reason, "seconds": time.perf_counter() - start}
        return out
    out["baseline"] = {
        "refused": None,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "detection_seconds_both_studies": detect_seconds,
        **score(
            fu_b,
            hits(_lesions_of(fu_b, "current"), pair.current_labels, pair.nodules, sp, "current"),
            hits(_lesions_of(fu_b, "prior"), pair.prior_labels, pair.nodules, sp, "prior"),
            pair.nodules,
        ),
    }
    return out


def _lesions_of(fu: FollowUp, study: str) -> list[Lesion]:
    if study == "current":
        return [pc.current for pc in fu.pairs] + list(fu.new)
    return [pc.prior for pc in fu.pairs] + list(fu.resolved)


def _labels_of(fu: FollowUp, study: str) -> list[int]:
    return [lesion.label for lesion in _lesions_of(fu, study)]


# --- summary ------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    a = np.asarray(values, dtype=np.float64)
    if not a.size:
        return {"n": 0, "median": None, "p90": None, "max": None}
    return {
        "n": int(a.size),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
    }


FINE_BINS_MM = (0.0, 6.0, 8.0, 10.0, 15.0, math.inf)
FINE_BIN_NAMES = tuple(
    f">={lo:g} mm" if math.isinf(hi) else f"{lo:g}-{hi:g} mm"
    for lo, hi in zip(FINE_BINS_MM[:-1], FINE_BINS_MM[1:], strict=True)
)


def _fine_bin(diameter_mm: float) -> str:
    i = int(np.searchsorted(FINE_BINS_MM, diameter_mm, side="right")) - 1
    return FINE_BIN_NAMES[min(max(i, 0), len(FINE_BIN_NAMES) - 1)]


def _growth_by(
    runs: Sequence[dict[str, Any]], key: Callable[[dict], str], order: Sequence[str]
) -> dict[str, Any]:
    groups: dict[str, list[float]] = {}
    for r in runs:
        for g in r["growth"]:
            groups.setdefault(key(g), []).append(g["error_pct"])
    return {b: _stats(groups[b]) for b in order if b in groups}


def summarise(pairs: Sequence[dict[str, Any]], run_name: str) -> dict[str, Any]:
    """Totals of one run (``truth_labels`` or ``baseline``) over pairs: refusals, TRE, matching
    and growth error by size, seconds."""
    runs = [p[run_name] for p in pairs if run_name in p]
    done = [r for r in runs if not r["refused"]]
    counts: dict[str, dict[str, int]] = {}
    for r in done:
        for b, c in r["by_size"].items():
            tot = counts.setdefault(b, _empty_counts())
            for k, v in c.items():
                tot[k] += v
    growth: dict[str, Any] = {}
    for b in sorted({_bin(g["diameter_mm"]) for r in done for g in r["growth"]}):
        errs = [g["error_pct"] for r in done for g in r["growth"] if _bin(g["diameter_mm"]) == b]
        points = [
            g["change_error_points"]
            for r in done
            for g in r["growth"]
            if _bin(g["diameter_mm"]) == b
        ]
        growth[b] = {
            "error_pct": _stats(errs),
            "change_error_points": _stats(points),
            "within_target": float(np.mean(np.asarray(errs) <= TARGETS["volume_change_error_pct"])),
        }
    out: dict[str, Any] = {
        "pairs": len(runs),
        "refused": [r["refused"] for r in runs if r["refused"]],
        "matching_by_size": counts,
        "other_pairs": sum(r["other_pairs"] for r in done),
        "growth_by_size": growth,
        "growth_by_fine_size": _growth_by(
            done, lambda g: _fine_bin(g["diameter_mm"]), FINE_BIN_NAMES
        ),
        "seconds": _stats([r["seconds"] for r in runs]),
        "cpu_seconds": _stats([r["cpu_seconds"] for r in done]),
    }
    by_anatomy: dict[str, list[float]] = {}
    for p in pairs:
        if run_name in p and not p[run_name]["refused"]:
            key = f"{p['anatomy']} ({p['spacing'][0]:g} mm slices)"
            by_anatomy.setdefault(key, []).extend(
                g["error_pct"] for g in p[run_name]["growth"] if g["diameter_mm"] >= SIZE_SPLIT_MM
            )
    out["growth_error_pct_6mm_up_by_anatomy"] = {k: _stats(v) for k, v in by_anatomy.items()}
    if run_name == "truth_labels":
        out["tre_mm"] = _stats([v for r in done for v in r["tre_mm"]])
        out["displacement_mm"] = _stats([v for r in done for v in r["displacement_mm"]])
        out["tre_median_by_pair_mm"] = {
            p["name"]: float(np.median(p[run_name]["tre_mm"]))
            for p in pairs
            if not p[run_name]["refused"]
        }
    else:
        out["detection_seconds_both_studies"] = _stats(
            [r["detection_seconds_both_studies"] for r in done]
        )
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the ``truth_labels`` summary: one row each, met or not."""
    big = f">={SIZE_SPLIT_MM:g} mm"
    m = summary["matching_by_size"].get(big, _empty_counts())
    false_all = sum(c["false_matches"] for c in summary["matching_by_size"].values())
    g = summary["growth_by_size"].get(big, {}).get("error_pct", {})
    tre = summary.get("tre_mm", {}).get("median")
    # CPU seconds of the follow-up (both threads together) bound its wall time on two cores of
    # its own from above, whatever else the measuring machine was running; wall time does not.
    secs = summary.get("cpu_seconds", {}).get("max")
    rows = [
        {
            "target": "TRE median inside the lungs <= 1.5 mm",
            "value": tre,
            "met": tre is not None and tre <= TARGETS["tre_median_mm"] and not summary["refused"],
        },
        {
            "target": "every nodule >= 6 mm matched to itself, no false matches",
            "value": f"{m['true_matches']}/{m['nodules']} matched, {false_all} false",
            "met": m["nodules"] > 0 and m["true_matches"] == m["nodules"] and false_all == 0,
        },
        {
            "target": "volume change within 10 % of the truth, nodules >= 6 mm (every one)",
            "value": g.get("max"),
            "met": g.get("max") is not None
            and g["max"] <= TARGETS["volume_change_error_pct"]
            and m["true_matches"] == m["nodules"],
        },
        {
            "target": "follow-up adds <= 20 s per study on 2 cores (slowest pair, CPU s)",
            "value": secs,
            "met": secs is not None and secs <= TARGETS["seconds_per_study"],
        },
    ]
    return rows


def compact(pair: dict[str, Any]) -> dict[str, Any]:
    """``pair`` with its per-landmark lists replaced by their statistics (the summary already
    holds the pooled figures), to keep the written JSON small."""
    tl = pair.get("truth_labels", {})
    if "tre_mm" not in tl or not isinstance(tl["tre_mm"], list):
        return pair
    short = {**tl, "tre_mm": _stats(tl["tre_mm"]), "displacement_mm": _stats(tl["displacement_mm"])}
    return {**pair, "truth_labels": short}


# --- the evaluation -----------------------------------------------------------------------------


def validation_rows(data_dir: Path) -> list[NoduleRow]:
    """LIDC rows of the validation-split patients whose crops exist."""
    crop_dir = Path(data_dir) / "lidc-nodules"
    rows = read_nodule_table(crop_dir / "nodules.csv", crop_dir)
    return rows_in(rows, "validation")


def pick_crops(
    rows: Sequence[NoduleRow],
    wanted_mm: Sequence[float],
    load: Callable[[NoduleRow], NoduleCrop],
    rng: np.random.Generator,
    used: set[tuple[str, int]],
) -> list[NoduleCrop]:
    """One crop per wanted diameter: a not yet used nodule not touching its own chest wall, of
    table diameter within `CROP_DIAMETER_FACTOR` of the wish, in a seeded order (falls back to
    used ones when none is left)."""
    order = [rows[i] for i in rng.permutation(len(rows))]
    out: list[NoduleCrop] = []
    for d in wanted_mm:
        fits = [r for r in order if 1 / CROP_DIAMETER_FACTOR <= r.diameter_mm / d <= 2.0]
        for candidates in ([r for r in fits if (r.patient_id, r.nodule_id) not in used], fits):
            chosen = None
            for r in candidates:
                crop = load(r)
                if attachment(crop) is None:
                    chosen = crop
                    break
            if chosen is not None:
                used.add((chosen.row.patient_id, chosen.row.nodule_id))
                out.append(chosen)
                break
        else:
            raise ValueError(f"no validation crop of about {d} mm")
    return out


def run(
    data_dir: Path,
    anatomies: Sequence[str] = ANATOMIES,
    *,
    pairs_per_anatomy: int = 1,
    seed: int = FOLLOWUP_SEED,
    baseline: bool = True,
    threads: int = THREADS,
    rows: Sequence[NoduleRow] | None = None,
    load: Callable[[Path, str], Background] | None = None,
    crop_loader: Callable[[NoduleRow], NoduleCrop] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Build and evaluate ``pairs_per_anatomy`` pairs per anatomy; SimpleITK runs on ``threads``
    threads (restored afterwards). Returns the JSON-ready results: settings, each pair, the
    summaries of both runs and the targets."""
    t_all = time.perf_counter()
    data_dir = Path(data_dir)
    crop_dir = data_dir / "lidc-nodules"
    rows = list(rows) if rows is not None else validation_rows(data_dir)
    load = load or (lambda d, name: load_anatomy(d, name, seed=ANATOMIES.index(name)))
    crop_loader = crop_loader or (lambda row: load_crop(crop_dir, row))
    rng = np.random.default_rng(seed)
    used: set[tuple[str, int]] = set()
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    pairs: list[dict[str, Any]] = []
    try:
        for a, name in enumerate(anatomies):
            background = load(data_dir, name)
            index = PlacementIndex(background)
            for k in range(pairs_per_anatomy):
                wanted = [*PRIOR_DIAMETERS_MM, RESOLVED_DIAMETER_MM, NEW_DIAMETER_MM]
                crops = pick_crops(rows, wanted, crop_loader, rng, used)
                pair_seed = seed + 1000 * a + k
                t0 = time.perf_counter()
                pair = build_pair(background, requests_for(crops, a + k), pair_seed, index=index)
                build_seconds = time.perf_counter() - t0
                result = evaluate_pair(pair, baseline=baseline)
                result["build_seconds"] = build_seconds
                pairs.append(result)
                tl = result["truth_labels"]
                progress(
                    f"{pair.name}: "
                    + (
                        f"refused: {tl['refused']}"
                        if tl["refused"]
                        else f"TRE median {np.median(tl['tre_mm']):.2f} mm, follow-up "
                        f"{tl['seconds']:.1f} s"
                    )
                )
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    summary = {"truth_labels": summarise(pairs, "truth_labels")}
    if baseline:
        summary["baseline"] = summarise(pairs, "baseline")
    pairs = [compact(p) for p in pairs]
    return {
        "settings": {
            "anatomies": list(anatomies),
            "pairs_per_anatomy": pairs_per_anatomy,
            "seed": seed,
            "threads": threads,
            "interval_days": INTERVAL_DAYS,
            "prior_diameters_mm": list(PRIOR_DIAMETERS_MM),
            "growth_factor": GROWTH_FACTOR,
            "resolved_diameter_mm": RESOLVED_DIAMETER_MM,
            "new_diameter_mm": NEW_DIAMETER_MM,
            "noise_sd_hu": NOISE_SD_HU,
            "landmarks_per_pair": LANDMARKS_PER_PAIR,
            "lidc_split": "validation",
            "lidc_nodules_used": sorted(f"{p} #{n}" for p, n in used),
        },
        "pairs": pairs,
        "summary": summary,
        "targets": targets(summary["truth_labels"]),
        "seconds": time.perf_counter() - t_all,
    }
