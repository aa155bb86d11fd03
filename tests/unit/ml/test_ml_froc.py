"""Tests for ml.evaluation.froc: FROC and CPM on detections whose curve is worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.evaluation.froc import FP_RATES, ScanDetections, cpm_interval, froc


def test_perfect_detector_has_cpm_one():
    scans = [ScanDetections(f"s{i}", 2, [(0.9, 0), (0.8, 1)]) for i in range(4)]
    result = froc(scans)
    assert result.cpm == 1.0
    assert all(v == 1.0 for v in result.at_rates.values())


def test_curve_worked_by_hand():
    # 2 scans, 4 nodules. Sorted: 0.9 TP(a0), 0.8 FP, 0.7 TP(b0), 0.6 FP, 0.5 FP, 0.4 TP(a1).
    scans = [
        ScanDetections("a", 2, [(0.9, 0), (0.6, None), (0.4, 1)]),
        ScanDetections("b", 2, [(0.8, None), (0.7, 0), (0.5, None)]),
    ]
    r = froc(scans)
    # points (FP/scan, sensitivity): (0,0) (0,.25) (.5,.25) (.5,.5) (1,.5) (1.5,.5) (1.5,.75)
    np.testing.assert_allclose(r.fps_per_scan, [0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(r.sensitivity, [0.25, 0.5, 0.5, 0.75])
    assert r.at_rates[0.125] == pytest.approx(0.25 + 0.25 * 0.25)  # interpolated 0 -> 0.5
    assert r.at_rates[1.0] == pytest.approx(0.5)
    assert r.at_rates[8.0] == pytest.approx(0.75)  # beyond the last point: the last sensitivity
    assert r.cpm == pytest.approx(np.mean([r.at_rates[f] for f in FP_RATES]))


def test_second_hit_on_a_nodule_is_neither_true_nor_false_positive():
    once = froc([ScanDetections("a", 1, [(0.9, 0), (0.1, None)])])
    twice = froc([ScanDetections("a", 1, [(0.9, 0), (0.5, 0), (0.1, None)])])
    np.testing.assert_allclose(once.fps_per_scan, twice.fps_per_scan)
    np.testing.assert_allclose(once.sensitivity, twice.sensitivity)


def test_missed_nodules_and_false_positives_lower_the_cpm():
    good = froc([ScanDetections("a", 2, [(0.9, 0), (0.8, 1), (0.1, None)])]).cpm
    worse = froc([ScanDetections("a", 2, [(0.9, None), (0.8, 0)])]).cpm
    assert worse < good


def test_no_nodules_gives_nan_and_bad_indices_raise():
    assert math.isnan(froc([ScanDetections("n", 0, [(0.5, None)])]).cpm)
    with pytest.raises(ValueError):
        froc([ScanDetections("a", 1, [(0.5, 1)])])


def test_interval_resamples_patients_and_brackets_the_point():
    rng = np.random.default_rng(0)
    scans = []
    for p in range(12):
        cands = [(float(rng.uniform(0.5, 1)), 0), (float(rng.uniform(0, 0.9)), None)]
        scans.append(ScanDetections(f"s{p}", 1, cands, patient=f"p{p // 2}"))
    point, lo, hi = cpm_interval(scans, resamples=200, seed=1)
    assert point == pytest.approx(froc(scans).cpm)
    assert lo <= point <= hi and lo < hi
