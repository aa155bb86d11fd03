"""The saliency map of the classical baseline and the nodule CAD: each lesion painted with its
score and blurred, so that the map peaks at that score over the lesion (the trained models' map
is Grad-CAM instead, `ml.runtime.inference`). Imports numpy and scipy only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

SALIENCY_SIGMA_MM = 2.0

Box = tuple[slice, ...]


def paint_scores(
    labels: np.ndarray,
    scores: Mapping[int, float],
    spacing: Sequence[float],
    boxes: Mapping[int, Box] | None = None,
) -> np.ndarray:
    """A map of ``labels``' shape where each label value of ``scores`` is painted with its score
    and blurred (Gaussian of `SALIENCY_SIGMA_MM`), scaled so that its blob peaks at the score.

    ``boxes`` are the labels' bounding boxes when the caller has them (measurements do); without
    them they are found here, one pass over ``labels``. Label values without a score stay dark.
    float16, the precision it is stored in: a float32 map of a clinical CT is half a gigabyte of
    mostly zeros. Each blob is computed in float32 and rounded once, so the map is the float32
    one rounded."""
    out = np.zeros(labels.shape, dtype=np.float16)
    if not scores:
        return out
    sigma = tuple(SALIENCY_SIGMA_MM / float(s) for s in spacing)
    margin = tuple(int(math.ceil(3 * s)) + 1 for s in sigma)
    if boxes is None:
        found = ndimage.find_objects(labels, max_label=max(scores))
        boxes = {value: box for value, box in enumerate(found, start=1) if box is not None}
    for value, score in scores.items():
        box = boxes.get(value)
        if box is None:
            continue
        grown = tuple(
            slice(max(b.start - g, 0), min(b.stop + g, n))
            for b, g, n in zip(box, margin, labels.shape, strict=True)
        )
        blob = ndimage.gaussian_filter((labels[grown] == value).astype(np.float32), sigma)
        peak = float(blob.max())
        if peak > 0:
            blob *= score / peak
            # Clipped per blob, in float32: clipping the whole float16 map is slow.
            np.clip(blob, 0.0, 1.0, out=blob)
            np.maximum(out[grown], blob, out=out[grown])
    return out
