"""Evaluation metrics on inputs whose answers are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.evaluation import metrics


def _box(shape, z, y, x) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[z, y, x] = True
    return m


def test_dice_and_iou_of_overlapping_boxes_match_their_definitions() -> None:
    a = _box((6, 30, 30), slice(1, 4), slice(5, 15), slice(5, 15))  # 300 voxels
    b = _box((6, 30, 30), slice(1, 4), slice(5, 15), slice(10, 20))  # 300, overlap 150
    got = metrics.overlap(a, b, (5.0, 1.0, 1.0))
    assert got["dice"] == pytest.approx(2 * 150 / 600, abs=1e-6)
    assert got["iou"] == pytest.approx(150 / 450, abs=1e-6)


def test_hd95_of_a_shifted_box_is_the_shift_in_millimetres() -> None:
    a = _box((8, 40, 40), slice(2, 6), slice(10, 20), slice(10, 20))
    b = np.roll(a, 4, axis=2)  # 4 pixels of 0.5 mm in x
    got = metrics.overlap(a, b, (5.0, 0.5, 0.5))
    assert got["hd95_mm"] == pytest.approx(2.0, abs=1e-6)
    same = metrics.overlap(a, a, (5.0, 0.5, 0.5))
    assert same == {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}


def test_empty_masks_are_scored_explicitly_not_dropped() -> None:
    empty = np.zeros((3, 10, 10), dtype=bool)
    full = _box((3, 10, 10), 1, slice(2, 5), slice(2, 5))
    assert metrics.overlap(empty, empty, (1, 1, 1)) == {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}
    missed = metrics.overlap(empty, full, (1, 1, 1))
    assert missed["dice"] == 0.0 and math.isinf(missed["hd95_mm"])
    with pytest.raises(ValueError):
        metrics.overlap(empty, np.zeros((2, 10, 10), dtype=bool), (1, 1, 1))


def test_classification_figures_on_a_hand_counted_example() -> None:
    scores = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2]
    labels = [0, 0, 1, 1, 1, 0]
    got = metrics.classification(scores, labels, threshold=0.5)
    # Of the 9 positive/negative pairs only (0.35, 0.4) is ranked wrongly -> 8 of 9.
    assert got["auc"] == pytest.approx(8 / 9)
    assert got["sensitivity"] == pytest.approx(2 / 3)  # 0.8 and 0.7 above threshold
    assert got["specificity"] == pytest.approx(1.0)
    assert got["accuracy"] == pytest.approx(5 / 6)
    assert math.isnan(metrics.classification([0.2, 0.9], [1, 1])["auc"])


def test_roc_curve_runs_from_origin_to_one() -> None:
    fpr, tpr = metrics.roc_curve([0.1, 0.9, 0.4, 0.6], [0, 1, 0, 1])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert tpr[2] == 1.0 and fpr[2] == 0.0  # perfectly separable


def test_lesion_matching_counts_hits_misses_and_false_alarms() -> None:
    truth = np.zeros((1, 10, 10), dtype=int)
    truth[0, 1:3, 1:3] = 1
    truth[0, 6:8, 6:8] = 2
    pred = np.zeros_like(truth)
    pred[0, 2:4, 2:4] = 5  # touches lesion 1
    pred[0, 0, 9] = 6  # nowhere near a lesion
    det = metrics.match_lesions(pred, truth)
    assert det == metrics.Detection(true_positives=1, false_negatives=1, false_positives=1)


def test_bootstrap_interval_brackets_the_point_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(1)
    small = rng.normal(10, 2, size=10)
    large = rng.normal(10, 2, size=400)
    p1, lo1, hi1 = metrics.mean_ci(small)
    p2, lo2, hi2 = metrics.mean_ci(large)
    assert lo1 <= p1 <= hi1 and lo2 <= p2 <= hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 3
    assert lo2 < 10 < hi2
    assert metrics.bootstrap(lambda idx: 1.0, 1) == (1.0, 1.0, 1.0)
