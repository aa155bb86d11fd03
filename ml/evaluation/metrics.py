"""Evaluation metrics: MONAI's implementations, lesion matching, and bootstrap intervals.

Overlap and distance metrics (Dice, IoU, HD95) and the classification metrics (AUC, sensitivity,
specificity, accuracy) come from ``monai.metrics``; this module only adapts shapes, handles the
empty cases explicitly, matches lesions for detection counts and resamples studies for 95 %
bootstrap intervals (percentile method).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import (
    DiceMetric,
    HausdorffDistanceMetric,
    MeanIoU,
    compute_confusion_matrix_metric,
    compute_roc_auc,
    get_confusion_matrix,
)
from scipy import ndimage


def _onehot(mask: np.ndarray) -> torch.Tensor:
    """(z, y, x) bool -> (1, 2, z, y, x) one-hot, the layout MONAI's metrics take."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    return torch.stack([~m, m]).float()[None]


def overlap(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, IoU and 95th-percentile Hausdorff distance (mm) of two boolean masks.

    Both empty: Dice and IoU 1, HD95 0 (nothing to find, nothing found). One empty: Dice and IoU
    0, HD95 infinite (MONAI would return NaN, which would silently drop the case from a mean).
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    if not pred.any() and not truth.any():
        return {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}
    if not pred.any() or not truth.any():
        return {"dice": 0.0, "iou": 0.0, "hd95_mm": math.inf}
    # Crop to the union's box (plus a margin) so the distance transform stays small.
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    box = tuple(slice(max(0, b.start - 2), b.stop + 2) for b in box)
    p, t = _onehot(pred[box]), _onehot(truth[box])
    dice = DiceMetric(include_background=False, reduction="mean")(p, t)
    iou = MeanIoU(include_background=False, reduction="mean")(p, t)
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument.
        warnings.simplefilter("ignore", FutureWarning)
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean")(
            p, t, spacing=[float(s) for s in spacing]
        )
    return {"dice": float(dice.mean()), "iou": float(iou.mean()), "hd95_mm": float(hd.mean())}


@dataclass(frozen=True)
class Detection:
    true_positives: int  # truth lesions touched by a predicted component
    false_negatives: int
    false_positives: int  # predicted components touching no truth lesion


def match_lesions(pred_labels: np.ndarray, truth_labels: np.ndarray) -> Detection:
    """Count detections between two label maps (0 = background, one id per lesion).

    A truth lesion is found when any predicted component overlaps it by at least one voxel; a
    predicted component that overlaps no truth lesion is a false positive.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    truth_ids = np.unique(truth_labels[truth_labels > 0])
    pred_ids = np.unique(pred_labels[pred_labels > 0])
    both = (truth_labels > 0) & (pred_labels > 0)
    hit_truth = np.unique(truth_labels[both])
    hit_pred = np.unique(pred_labels[both])
    return Detection(
        true_positives=int(hit_truth.size),
        false_negatives=int(truth_ids.size - hit_truth.size),
        false_positives=int(pred_ids.size - hit_pred.size),
    )


def classification(
    scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5
) -> dict[str, float]:
    """AUC, accuracy, sensitivity and specificity of study scores against 0/1 labels."""
    y_pred = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    out: dict[str, float] = {}
    if 0 < float(y.sum()) < len(y):
        out["auc"] = float(compute_roc_auc(y_pred, y))
    else:
        out["auc"] = math.nan  # undefined with one class only
    binary = (y_pred >= threshold).float()
    # One row per study; summed, they give the confusion counts of the whole set.
    cm = get_confusion_matrix(binary[:, None], y[:, None], include_background=True).sum(dim=0)
    for name, key in (
        ("accuracy", "accuracy"),
        ("sensitivity", "recall"),
        ("specificity", "specificity"),
    ):
        out[name] = float(compute_confusion_matrix_metric(key, cm)[0])
    return out


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score, for plotting."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=int)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    pos, neg = max(1, int(y.sum())), max(1, int((1 - y).sum()))
    tpr = np.array([((s >= t) & (y == 1)).sum() / pos for t in thresholds])
    fpr = np.array([((s >= t) & (y == 0)).sum() / neg for t in thresholds])
    return fpr, tpr


def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n_items: int,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile 95 % interval of ``statistic(indices)`` over items.

    ``statistic`` receives an array of item indices (all of them for the point estimate, a
    resample with replacement otherwise). Resamples where the statistic is undefined (NaN) are
    skipped; with fewer than 2 items the interval is the point itself.
    """
    point = float(statistic(np.arange(n_items)))
    if n_items < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = float(statistic(rng.integers(0, n_items, size=n_items)))
        if not math.isnan(v):
            values.append(v)
    if not values:
        return point, math.nan, math.nan
    lo, hi = np.percentile(values, [2.5, 97.5])
    return point, float(lo), float(hi)


def mean_ci(values: Sequence[float], *, seed: int = 0) -> tuple[float, float, float]:
    """Mean with a bootstrap 95 % interval; infinite values are kept (they dominate honestly)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    return bootstrap(lambda idx: float(np.mean(arr[idx])), arr.size, seed=seed)


def median_ci(values: Sequence[float], *, seed: int = 0) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    return bootstrap(lambda idx: float(np.median(arr[idx])), arr.size, seed=seed)
