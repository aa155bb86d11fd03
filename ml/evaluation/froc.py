"""Free-response ROC (FROC) of nodule detection and the LUNA16 competition performance metric.

Each scan contributes its number of true nodules and its candidates, each a score and the index
of the true nodule it hits (or None: a false positive). As in the LUNA16 evaluation (Setio et al.,
Med Image Anal 2017): candidates are pooled over scans and the threshold swept from the top; a
nodule counts once however many candidates hit it (further hits are neither true nor false
positives); sensitivity at each of 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per scan is read
from the curve by linear interpolation, and the CPM is their mean. Intervals resample patients,
not scans or nodules, so that scans of one patient move together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ml.evaluation.metrics import bootstrap

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class ScanDetections:
    """What one method found in one scan."""

    scan_id: str
    nodules: int  # true nodules in the scan
    candidates: Sequence[tuple[float, int | None]]  # (score, index of the nodule hit, or None)
    patient: str = ""  # scans of one patient resample together; default: the scan itself


@dataclass(frozen=True)
class Froc:
    fps_per_scan: np.ndarray  # the curve, ascending
    sensitivity: np.ndarray
    at_rates: dict[float, float]  # sensitivity at each of FP_RATES
    cpm: float
    scans: int
    nodules: int


def froc(scans: Sequence[ScanDetections], rates: Sequence[float] = FP_RATES) -> Froc:
    """The FROC curve of ``scans`` and the sensitivity at each FP rate; NaN without nodules."""
    n_scans = len(scans)
    total = sum(s.nodules for s in scans)
    scores: list[float] = []
    keys: list[tuple[int, int] | None] = []
    for i, scan in enumerate(scans):
        for score, hit in scan.candidates:
            if hit is not None and not 0 <= hit < scan.nodules:
                raise ValueError(f"{scan.scan_id}: candidate hits nodule {hit} of {scan.nodules}")
            scores.append(float(score))
            keys.append(None if hit is None else (i, int(hit)))
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    fps, sens = [0.0], [0.0]
    found: set[tuple[int, int]] = set()
    false_pos = 0
    sorted_scores = np.asarray(scores, dtype=float)[order]
    for rank, idx in enumerate(order):
        key = keys[idx]
        if key is None:
            false_pos += 1
        else:
            found.add(key)
        # one operating point per distinct threshold: after the last candidate of equal score
        if rank + 1 == len(order) or sorted_scores[rank + 1] != sorted_scores[rank]:
            fps.append(false_pos / max(n_scans, 1))
            sens.append(len(found) / total if total else np.nan)
    fps_arr, sens_arr = _upper_envelope(np.asarray(fps), np.asarray(sens))
    at = {
        float(r): float(np.interp(r, fps_arr, sens_arr)) if total else float("nan") for r in rates
    }
    cpm = float(np.mean(list(at.values()))) if total else float("nan")
    return Froc(fps_arr, sens_arr, at, cpm, n_scans, total)


def _upper_envelope(fps: np.ndarray, sens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One point per distinct FP rate, the best sensitivity reached there, so that interpolation
    is defined. Both grow as the threshold falls, so the result is ascending in both."""
    uniq = np.unique(fps)
    return uniq, np.array([np.max(sens[fps == f]) for f in uniq])


def cpm_interval(
    scans: Sequence[ScanDetections], *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """CPM with a percentile 95 % interval, resampling patients with replacement."""
    patients = sorted({s.patient or s.scan_id for s in scans})
    by_patient = {p: [s for s in scans if (s.patient or s.scan_id) == p] for p in patients}

    def statistic(idx: np.ndarray) -> float:
        chosen = [
            ScanDetections(f"{s.scan_id}#{k}", s.nodules, s.candidates, f"{patients[i]}#{k}")
            for k, i in enumerate(idx)
            for s in by_patient[patients[i]]
        ]
        return froc(chosen).cpm

    return bootstrap(statistic, len(patients), resamples=resamples, seed=seed)
