"""The saliency painter the classical baseline and the nodule CAD share (ml.runtime.saliency)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ml.runtime.saliency import paint_scores

SPACING = (2.5, 0.7, 0.8)


def _labels() -> np.ndarray:
    labels = np.zeros((30, 80, 80), dtype=np.uint8)
    labels[5:10, 10:20, 10:22] = 1
    labels[12:20, 40:55, 30:44] = 2
    labels[24:29, 62:76, 3:15] = 3
    return labels


def test_the_map_peaks_at_the_highest_scored_lesion_with_its_score() -> None:
    labels = _labels()
    scores = {1: 0.3, 2: 0.2, 3: 0.85}
    painted = paint_scores(labels, scores, SPACING)
    assert painted.dtype == np.float16 and painted.shape == labels.shape
    assert labels[np.unravel_index(np.argmax(painted), labels.shape)] == 3
    for value, score in scores.items():
        # Each blob peaks at its own score (float16 rounding), inside its lesion.
        assert float(painted[labels == value].max()) == pytest.approx(score, abs=1e-3)
    # The map is blurred, so it reaches past the lesion, but not far.
    near = ndimage.binary_dilation(labels > 0, np.ones((3, 3, 3), bool), iterations=12)
    assert painted[~(labels > 0) & near].any() and not painted[~near].any()


def test_lesions_without_a_score_stay_dark_and_boxes_only_save_the_search() -> None:
    labels = _labels()
    painted = paint_scores(labels, {2: 0.6}, SPACING)
    assert not painted[labels == 1].any() and not painted[labels == 3].any()
    boxes = {2: (slice(12, 20), slice(40, 55), slice(30, 44))}
    assert np.array_equal(paint_scores(labels, {2: 0.6}, SPACING, boxes), painted)
    assert not paint_scores(labels, {}, SPACING).any()
