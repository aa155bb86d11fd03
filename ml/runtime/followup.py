"""Follow-up: how each nodule changed since the prior study, and what the change means for triage.

Given the lesions of the current and the prior study (each measured on its own grid, so that a
prior volume is never blurred by resampling) and a :class:`~ml.image.registration.Registration`
of the prior onto the current study, prior lesion centres are mapped into the current frame and
matched to current lesions by a Hungarian assignment on centre distance, with a gate that scales
with lesion size: a pair farther apart than the gate is never matched, so a nodule is reported as
new or resolved rather than wrongly paired. Each pair carries its volume change, diameter change,
volume-doubling time and a tracking UID that stays the same across studies. :func:`growth_triage`
turns growth and new nodules into a suspicion score by Lung-RADS v2022 rules of thumb.
Imports `ml.image` and `ml.runtime` only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ml.image.measure import RegionMeasurement, measure_regions

# RegistrationRefused is re-exported: workers may import ml.runtime, not ml.image.
from ml.image.registration import Registration, RegistrationRefused, register
from ml.runtime.triage import diameter_probability, priority_from_probability

__all__ = [
    "FollowUp",
    "GrowthTriage",
    "Lesion",
    "NoduleChange",
    "Registration",
    "RegistrationRefused",
    "compare",
    "doubling_time_days",
    "follow_up",
    "growth_triage",
    "lesions_from_labels",
    "tracking_uid",
]

# Match gate: centres farther apart than GATE_MIN_MM + GATE_DIAMETER_FACTOR x the larger diameter
# are never paired. Registration error is ~1-2 mm and a growing nodule's centre moves by a
# fraction of its radius; two distinct nodules closer than this would be one lesion to a reader.
GATE_MIN_MM = 4.0
GATE_DIAMETER_FACTOR = 0.5
# Lung-RADS v2022: growth is an increase in mean diameter of more than 1.5 mm within 12 months.
GROWTH_DIAMETER_MM = 1.5
GROWTH_WINDOW_DAYS = 365.0
# NELSON: a volume change under 25 % is within measurement variability; a doubling time under
# 400 days is suspicious for malignancy (the Fleischner Society and BTS quote the same cut-off).
STABLE_VOLUME_CHANGE_PCT = 25.0
SUSPICIOUS_VDT_DAYS = 400.0
# Lung-RADS v2022 solid nodules, as suspicion scores on the bands of ml.runtime.triage.
CATEGORY_SCORE = {"2": 0.02, "3": 0.2, "4A": 0.5, "4B": 0.9}


@dataclass(frozen=True)
class Lesion:
    """One lesion of one study: centre in that study's frame ((z, y, x) mm), voxel volume (mm³),
    volume-equivalent diameter (mm, as ``ml.runtime.triage`` sizes lesions), its label in the
    study's label map and its tracking UID where one was assigned."""

    label: int
    centre_mm: tuple[float, float, float]
    volume_mm3: float
    diameter_mm: float
    tracking_uid: str | None = None

    @classmethod
    def from_measurement(
        cls,
        m: RegionMeasurement,
        spacing_zyx: Sequence[float],
        origin_zyx: Sequence[float] = (0.0, 0.0, 0.0),
        tracking_uid: str | None = None,
    ) -> Lesion:
        centre = np.asarray(origin_zyx, dtype=float) + np.asarray(m.centroid_zyx) * np.asarray(
            spacing_zyx, dtype=float
        )
        return cls(
            label=m.label,
            centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
            volume_mm3=m.voxel_volume_mm3,
            diameter_mm=_diameter(m.voxel_volume_mm3),
            tracking_uid=tracking_uid,
        )


def _diameter(volume_mm3: float) -> float:
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def lesions_from_labels(
    labels: np.ndarray,
    spacing_zyx: Sequence[float],
    origin_zyx: Sequence[float] = (0.0, 0.0, 0.0),
    tracking_uids: dict[int, str] | None = None,
) -> list[Lesion]:
    """The lesions of a (z, y, x) label map (one label per lesion), measured on its own grid by
    :func:`ml.image.measure.measure_regions`; ``tracking_uids`` maps labels to known UIDs."""
    uids = tracking_uids or {}
    return [
        Lesion.from_measurement(m, spacing_zyx, origin_zyx, uids.get(m.label))
        for m in measure_regions(labels, np.asarray(spacing_zyx, dtype=float))
    ]


def tracking_uid(study_key: str, lesion_key: str | int) -> str:
    """A deterministic DICOM UID (``2.25.`` + 128-bit decimal, at most 44 characters) for the
    nodule first seen as ``lesion_key`` in the study ``study_key`` (e.g. its Study Instance UID).

    A nodule keeps the UID of its first sighting: :func:`compare` carries a prior's UID to its
    match, and a prior lesion without one gets the UID its own study would have given it, so
    re-running an analysis never renames a nodule."""
    digest = hashlib.sha256(f"radai-nodule\x00{study_key}\x00{lesion_key}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def doubling_time_days(v_prior: float, v_current: float, interval_days: float) -> float | None:
    """Volume-doubling time VDT = Δt·ln 2 / ln(V2/V1), in days.

    Positive for growth (days to double), negative for shrinkage (its magnitude is the halving
    time), None when the volumes are equal (no change: an infinite doubling time), when either
    volume is not positive or when the interval is not positive (unknown or same-day study)."""
    if v_prior <= 0 or v_current <= 0 or interval_days <= 0 or v_prior == v_current:
        return None
    return float(interval_days * math.log(2.0) / math.log(v_current / v_prior))


@dataclass(frozen=True)
class NoduleChange:
    """A prior lesion matched to a current one. ``distance_mm`` is between the current centre and
    the prior centre mapped into the current frame; changes are current minus prior."""

    tracking_uid: str
    current: Lesion
    prior: Lesion
    prior_centre_in_current_mm: tuple[float, float, float]
    distance_mm: float
    volume_change_pct: float
    diameter_change_mm: float
    doubling_time_days: float | None
    interval_days: float


@dataclass(frozen=True)
class FollowUp:
    """The comparison of a study with its prior: matched pairs, new lesions (current only, with a
    fresh tracking UID) and resolved lesions (prior only), and the sums of diameters."""

    interval_days: float
    pairs: list[NoduleChange]
    new: list[Lesion]
    resolved: list[Lesion]
    sum_diameters_current_mm: float
    sum_diameters_prior_mm: float
    registration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    current: Sequence[Lesion],
    prior: Sequence[Lesion],
    registration: Registration,
    interval_days: float,
    *,
    current_study_key: str,
    prior_study_key: str,
) -> FollowUp:
    """Match the ``prior`` lesions to the ``current`` ones through ``registration`` and report
    how each changed over ``interval_days`` (current study date minus prior, > 0).

    Matching minimises the total centre distance (Hungarian assignment) among pairs within the
    gate ``GATE_MIN_MM + GATE_DIAMETER_FACTOR * max(diameters)``; a prior lesion without a
    partner inside its gate is resolved, a current one is new. Study keys seed the tracking UIDs.
    """
    if not math.isfinite(interval_days) or interval_days <= 0:
        raise ValueError(
            f"interval_days must be positive (current after prior), got {interval_days}"
        )
    prior_uids = [p.tracking_uid or tracking_uid(prior_study_key, p.label) for p in prior]
    mapped = (
        registration.to_current(np.array([p.centre_mm for p in prior]))
        if prior
        else np.zeros((0, 3))
    )
    cur_centres = np.array([c.centre_mm for c in current]).reshape(len(current), 3)
    dist = np.linalg.norm(cur_centres[:, None, :] - mapped[None, :, :], axis=-1)
    gate = GATE_MIN_MM + GATE_DIAMETER_FACTOR * np.maximum(
        np.array([c.diameter_mm for c in current])[:, None],
        np.array([p.diameter_mm for p in prior])[None, :],
    )
    allowed = dist <= gate
    pairs: list[NoduleChange] = []
    matched_cur: set[int] = set()
    matched_pri: set[int] = set()
    if allowed.any():
        # Pairs outside the gate cost more than any set of gated pairs, so the assignment uses
        # them only when nothing else is left, and they are dropped below.
        big = float(dist[allowed].sum()) + 1e6
        rows, cols = linear_sum_assignment(np.where(allowed, dist, big))
        for i, j in zip(rows, cols, strict=True):
            if not allowed[i, j]:
                continue
            c, p = current[i], prior[j]
            matched_cur.add(int(i))
            matched_pri.add(int(j))
            pairs.append(
                NoduleChange(
                    tracking_uid=prior_uids[j],
                    current=replace(c, tracking_uid=prior_uids[j]),
                    prior=replace(p, tracking_uid=prior_uids[j]),
                    prior_centre_in_current_mm=tuple(float(v) for v in mapped[j]),  # type: ignore[arg-type]
                    distance_mm=float(dist[i, j]),
                    volume_change_pct=100.0 * (c.volume_mm3 / p.volume_mm3 - 1.0),
                    diameter_change_mm=c.diameter_mm - p.diameter_mm,
                    doubling_time_days=doubling_time_days(
                        p.volume_mm3, c.volume_mm3, interval_days
                    ),
                    interval_days=float(interval_days),
                )
            )
    new = [
        replace(c, tracking_uid=c.tracking_uid or tracking_uid(current_study_key, c.label))
        for i, c in enumerate(current)
        if i not in matched_cur
    ]
    resolved = [
        replace(p, tracking_uid=prior_uids[j]) for j, p in enumerate(prior) if j not in matched_pri
    ]
    pairs.sort(key=lambda pc: pc.current.label)
    return FollowUp(
        interval_days=float(interval_days),
        pairs=pairs,
        new=new,
        resolved=resolved,
        sum_diameters_current_mm=float(sum(c.diameter_mm for c in current)),
        sum_diameters_prior_mm=float(sum(p.diameter_mm for p in prior)),
        registration=registration.quality.to_dict(),
    )


@dataclass(frozen=True)
class GrowthTriage:
    """Suspicion from the follow-up: a score in [0, 1], its worklist priority, the Lung-RADS
    category it corresponds to (solid nodules) and one reason per lesion that raised it."""

    probability: float
    priority: int
    category: str
    reasons: list[str]


def _category_of_size(diameter_mm: float) -> str:
    return (
        "4B"
        if diameter_mm >= 15
        else "4A"
        if diameter_mm >= 8
        else "3"
        if diameter_mm >= 6
        else "2"
    )


def growth_triage(follow_up: FollowUp) -> GrowthTriage:
    """Suspicion from growth and new nodules, by Lung-RADS v2022 rules of thumb for solid nodules.

    - A matched nodule is *growing* when its mean (volume-equivalent) diameter increased by more
      than 1.5 mm, the Lung-RADS definition within 12 months; at longer intervals the same rule is
      applied (more sensitive than Lung-RADS, which is the safe side for triage), and a volume
      increase of at least 25 % with a doubling time under 400 days (NELSON, Fleischner) counts
      as growth too. Growing and < 8 mm: 4A; growing and >= 8 mm: 4B.
    - A *new* nodule: < 4 mm 2, 4-6 mm 3, 6-8 mm 4A, >= 8 mm 4B.
    - A stable nodule keeps the suspicion of its size (``ml.runtime.triage``).

    The score is the largest over lesions of the category's score and the size-based score; this
    is a triage aid (worklist order), not a Lung-RADS assessment, which also weighs morphology,
    nodule type and the patient's history.
    """
    score = CATEGORY_SCORE["2"]
    category = "2"
    order = ["2", "3", "4A", "4B"]
    reasons: list[str] = []

    def raise_to(cat: str, size_mm: float, why: str | None) -> None:
        nonlocal score, category
        score = max(score, CATEGORY_SCORE[cat], diameter_probability(size_mm))
        if order.index(cat) > order.index(category):
            category = cat
        if why:
            reasons.append(why)

    for pc in follow_up.pairs:
        d = pc.current.diameter_mm
        grew_diameter = pc.diameter_change_mm > GROWTH_DIAMETER_MM
        vdt = pc.doubling_time_days
        grew_volume = (
            pc.volume_change_pct >= STABLE_VOLUME_CHANGE_PCT
            and vdt is not None
            and 0 < vdt < SUSPICIOUS_VDT_DAYS
        )
        if grew_diameter or grew_volume:
            cat = "4B" if d >= 8 else "4A"
            vdt_text = f"{vdt:.0f} d" if vdt is not None else "n/a"
            raise_to(
                cat,
                d,
                f"nodule {pc.tracking_uid} grew {pc.diameter_change_mm:+.1f} mm "
                f"({pc.volume_change_pct:+.0f} % volume, doubling time {vdt_text}) "
                f"in {pc.interval_days:.0f} days to {d:.1f} mm: Lung-RADS {cat}",
            )
        else:
            raise_to(_category_of_size(d), d, None)
    for lesion in follow_up.new:
        d = lesion.diameter_mm
        cat = "4B" if d >= 8 else "4A" if d >= 6 else "3" if d >= 4 else "2"
        raise_to(cat, d, f"new nodule {lesion.tracking_uid} of {d:.1f} mm: Lung-RADS {cat}")
    return GrowthTriage(
        probability=float(score),
        priority=priority_from_probability(score),
        category=category,
        reasons=reasons,
    )


def follow_up(
    current: np.ndarray,
    current_spacing: Sequence[float],
    current_labels: np.ndarray,
    prior: np.ndarray,
    prior_spacing: Sequence[float],
    prior_labels: np.ndarray,
    interval_days: float,
    *,
    current_study_key: str,
    prior_study_key: str,
    current_origin: Sequence[float] = (0.0, 0.0, 0.0),
    prior_origin: Sequence[float] = (0.0, 0.0, 0.0),
    prior_tracking_uids: dict[int, str] | None = None,
    current_lungs: np.ndarray | None = None,
    prior_lungs: np.ndarray | None = None,
) -> tuple[FollowUp, Registration]:
    """The whole follow-up of a study against its prior: register the prior CT onto the current
    one (:func:`ml.image.registration.register`), measure each study's lesion labels on its own
    grid and :func:`compare` them. Returns the comparison and the registration (to map points or
    resample the prior's images onto the current grid). ``prior_tracking_uids`` maps prior labels
    to the UIDs the prior's own report gave them. Raises
    :class:`~ml.image.registration.RegistrationRefused` (with a reason) when the pair cannot be
    compared, ValueError for malformed input."""
    registration = register(
        current,
        current_spacing,
        prior,
        prior_spacing,
        current_origin=current_origin,
        prior_origin=prior_origin,
        current_lungs=current_lungs,
        prior_lungs=prior_lungs,
    )
    comparison = compare(
        lesions_from_labels(current_labels, current_spacing, current_origin),
        lesions_from_labels(prior_labels, prior_spacing, prior_origin, prior_tracking_uids),
        registration,
        interval_days,
        current_study_key=current_study_key,
        prior_study_key=prior_study_key,
    )
    return comparison, registration
