"""Triage: from lesion measurements to a suspicion score and a worklist priority, by a documented
size-to-suspicion mapping anchored on the Lung-RADS v2022 solid-nodule size categories.
Imports only `ml.image`."""

from __future__ import annotations

import math

import numpy as np

from ml.image.measure import RegionMeasurement

# Lung-RADS v2022 solid-nodule size anchors (mean diameter, mm) -> suspicion score. Category 2
# (<6 mm), 3 (6-8 mm), 4A (8-15 mm), 4B (>=15 mm) map to the score bands of the priorities below.
_SIZE_ANCHORS_MM = (0.0, 6.0, 8.0, 15.0, 30.0)
_SIZE_ANCHOR_SCORES = (0.02, 0.2, 0.5, 0.9, 0.98)
# Priority thresholds on the score: 1 (most urgent) >= 0.9 > 2 >= 0.5 > 3 >= 0.2 > 4 (routine).
PRIORITY_THRESHOLDS = (0.9, 0.5, 0.2)


def effective_diameter_mm(m: RegionMeasurement) -> float:
    """Diameter of the sphere with the lesion's volume (Lung-RADS allows volumetric sizing)."""
    return (6.0 * m.voxel_volume_mm3 / math.pi) ** (1.0 / 3.0)


def lesion_probability(lesion: RegionMeasurement) -> float:
    """Suspicion score in [0, 1] of one lesion from its volume-equivalent diameter.

    Piecewise linear through the Lung-RADS v2022 solid-nodule size anchors: 0 mm -> 0.02,
    6 mm -> 0.2, 8 mm -> 0.5, 15 mm -> 0.9, 30 mm and above -> 0.98; non-decreasing in size.
    """
    return diameter_probability(effective_diameter_mm(lesion))


def diameter_probability(diameter_mm: float) -> float:
    """Suspicion score in [0, 1] of a solid nodule of mean diameter ``diameter_mm`` (the mapping
    of :func:`lesion_probability`)."""
    return float(np.interp(diameter_mm, _SIZE_ANCHORS_MM, _SIZE_ANCHOR_SCORES))


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
