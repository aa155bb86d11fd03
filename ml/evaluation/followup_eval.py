"""Evaluation of follow-up on pairs with known truth: registration error at landmarks, nodule
matching and the error of the measured growth, by nodule size.

A case is two studies as arrays (volume in HU, spacing, origin, lesion labels) plus the truth:
landmark pairs (the same anatomical point in both studies), which current label is which prior
label, and the true volumes. Pairs may come from the synthetic phantom
(:func:`case_from_phantom`) or from real CTs with nodules inserted at known places and sizes; the
function takes arrays, so it is independent of how they were made. A case can also say it must be
refused (a prior of another patient or body part): a refusal then counts as correct, and a
comparison as a wrong one. Imports `ml.image`, `ml.runtime` and `ml.data`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ml.data.chest_phantom import PhantomPair
from ml.image.registration import RegistrationRefused
from ml.runtime.followup import follow_up

__all__ = [
    "FollowUpCase",
    "FollowUpEvaluation",
    "PairTruth",
    "StudyArrays",
    "case_from_phantom",
    "evaluate_followup",
]

# Size bins (true mean diameter of the smaller of the two sightings, mm): Lung-RADS boundaries.
SIZE_BINS_MM = (0.0, 6.0, 8.0, 15.0, math.inf)


@dataclass(frozen=True)
class StudyArrays:
    """One study: HU volume and lesion labels on the same (z, y, x) grid."""

    volume: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class PairTruth:
    """``matches`` maps current labels to prior labels of the same nodule; volumes are the true
    volumes (mm³) by label; landmarks are (N, 3) points, (z, y, x) mm, row i the same point."""

    landmarks_current_mm: np.ndarray
    landmarks_prior_mm: np.ndarray
    matches: dict[int, int]
    current_volume_mm3: dict[int, float]
    prior_volume_mm3: dict[int, float]
    expect_refusal: bool = False


@dataclass(frozen=True)
class FollowUpCase:
    name: str
    current: StudyArrays
    prior: StudyArrays
    interval_days: float
    truth: PairTruth


@dataclass
class CaseResult:
    name: str
    refused: bool
    reason: str | None
    seconds: float
    tre_mm: list[float] = field(default_factory=list)
    true_matches: int = 0
    false_matches: int = 0
    missed_matches: int = 0
    # (size mm, measured volume ratio, true volume ratio) per correctly matched nodule.
    growth: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class FollowUpEvaluation:
    """Totals over cases; ``growth_by_size`` maps a size bin ("6-8 mm") to the number of matched
    nodules and the median and maximum absolute error (%) of the volume ratio current/prior."""

    cases: list[CaseResult]
    tre_median_mm: float
    tre_p90_mm: float
    tre_max_mm: float
    true_matches: int
    false_matches: int
    missed_matches: int
    correct_refusals: int
    wrong_refusals: int
    wrong_comparisons: int
    growth_by_size: dict[str, dict[str, float]]
    seconds_median: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bin_name(lo: float, hi: float) -> str:
    return f">={lo:g} mm" if math.isinf(hi) else f"{lo:g}-{hi:g} mm"


def _diameter(volume_mm3: float) -> float:
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def evaluate_case(case: FollowUpCase) -> CaseResult:
    """Register, measure and match one case and score it against its truth."""
    cur, pri, truth = case.current, case.prior, case.truth
    start = time.perf_counter()
    try:
        fu, reg = follow_up(
            cur.volume,
            cur.spacing,
            cur.labels,
            pri.volume,
            pri.spacing,
            pri.labels,
            case.interval_days,
            current_study_key=f"{case.name}/current",
            prior_study_key=f"{case.name}/prior",
            current_origin=cur.origin,
            prior_origin=pri.origin,
        )
    except RegistrationRefused as refused:
        return CaseResult(case.name, True, refused.reason, time.perf_counter() - start)
    result = CaseResult(case.name, False, None, time.perf_counter() - start)
    if len(truth.landmarks_current_mm):
        est = reg.to_prior(truth.landmarks_current_mm)
        result.tre_mm = [float(v) for v in np.linalg.norm(est - truth.landmarks_prior_mm, axis=1)]
    found = {pc.current.label: pc.prior.label for pc in fu.pairs}
    for cur_label, pri_label in found.items():
        if truth.matches.get(cur_label) == pri_label:
            result.true_matches += 1
        else:
            result.false_matches += 1
    result.missed_matches = sum(1 for c, p in truth.matches.items() if found.get(c) != p)
    for pc in fu.pairs:
        c, p = pc.current.label, pc.prior.label
        if truth.matches.get(c) != p or c not in truth.current_volume_mm3:
            continue
        v1, v2 = truth.prior_volume_mm3[p], truth.current_volume_mm3[c]
        size = round(_diameter(min(v1, v2)), 6)
        result.growth.append((size, pc.current.volume_mm3 / pc.prior.volume_mm3, v2 / v1))
    return result


def evaluate_followup(
    cases: Sequence[FollowUpCase], size_bins_mm: Sequence[float] = SIZE_BINS_MM
) -> FollowUpEvaluation:
    """Evaluate every case (see :func:`evaluate_case`) and summarise: TRE over all landmarks of
    registered cases, matching counts, refusals against expectations, and growth error by size."""
    results = [evaluate_case(c) for c in cases]
    tre = np.array([v for r in results for v in r.tre_mm])
    by_size: dict[str, dict[str, float]] = {}
    growth = [g for r in results for g in r.growth]
    for lo, hi in zip(size_bins_mm[:-1], size_bins_mm[1:], strict=True):
        errors = np.array([abs(m / t - 1.0) * 100.0 for s, m, t in growth if lo <= s < hi])
        if errors.size:
            by_size[_bin_name(lo, hi)] = {
                "nodules": float(errors.size),
                "median_abs_error_pct": float(np.median(errors)),
                "max_abs_error_pct": float(errors.max()),
                "within_10pct": float(np.mean(errors <= 10.0)),
            }
    expect = {c.name: c.truth.expect_refusal for c in cases}
    return FollowUpEvaluation(
        cases=results,
        tre_median_mm=float(np.median(tre)) if tre.size else math.nan,
        tre_p90_mm=float(np.percentile(tre, 90)) if tre.size else math.nan,
        tre_max_mm=float(tre.max()) if tre.size else math.nan,
        true_matches=sum(r.true_matches for r in results),
        false_matches=sum(r.false_matches for r in results),
        missed_matches=sum(r.missed_matches for r in results),
        correct_refusals=sum(1 for r in results if r.refused and expect[r.name]),
        wrong_refusals=sum(1 for r in results if r.refused and not expect[r.name]),
        wrong_comparisons=sum(1 for r in results if not r.refused and expect[r.name]),
        growth_by_size=by_size,
        seconds_median=float(np.median([r.seconds for r in results])) if results else math.nan,
    )


def case_from_phantom(name: str, pair: PhantomPair) -> FollowUpCase:
    """A :class:`FollowUpCase` from a synthetic phantom pair, with its analytic truth."""
    matches = {
        i: i
        for i, n in enumerate(pair.nodules, start=1)
        if n.prior_diameter_mm > 0 and n.current_diameter_mm > 0
    }
    return FollowUpCase(
        name=name,
        current=StudyArrays(pair.current, pair.current_labels, pair.spacing),
        prior=StudyArrays(pair.prior, pair.prior_labels, pair.prior_spacing),
        interval_days=pair.interval_days,
        truth=PairTruth(
            landmarks_current_mm=pair.landmarks_current,
            landmarks_prior_mm=pair.landmarks_prior,
            matches=matches,
            current_volume_mm3={
                i: pair.sphere_volume(n.current_diameter_mm)
                for i, n in enumerate(pair.nodules, start=1)
                if n.current_diameter_mm > 0
            },
            prior_volume_mm3={
                i: pair.sphere_volume(n.prior_diameter_mm)
                for i, n in enumerate(pair.nodules, start=1)
                if n.prior_diameter_mm > 0
            },
        ),
    )
