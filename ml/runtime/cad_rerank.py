"""The nodule CAD's second stage: each outline scored again from what the outline shows.

The classifier (:mod:`ml.runtime.cad`) sees a candidate as planes through its centre and the
blob detector's description; once the candidate is outlined, its 3-D shape is known too: how
long it is against how wide (a vessel followed along its course), how round, how large against
the blob that seeded it, how dense. The second stage reads those with the classifier's own score,
also against the study's other outlines, and gives each outline a new probability
(:class:`ml.runtime.networks.RerankNet`, fitted on validation outlines by
:mod:`ml.training.cad_rerank`). False-positive reduction on candidates' shape and density features
was how lung-nodule CAD worked before CNNs (e.g. Armato et al., RadioGraphics 1999; Murphy et al.,
Med Image Anal 2009); here it follows the CNN.

Imports numpy, torch, ``ml.image`` and ``ml.runtime``. Research software, not for clinical use.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ml.image.blobs import Blob
from ml.image.measure import RegionMeasurement

FEATURES = (
    "classifier logit",
    "log volume (mm3)",
    "sphericity",
    "log major / minor axis",
    "least / major axis",
    "log max 3-D diameter / equivalent diameter",
    "mean HU / 1000",
    "max HU / 1000",
    "min HU / 1000",
    "log equivalent diameter / blob diameter",
    "blob response / 500",
    "blob blobness",
    "blob tubeness",
    "blob negative eigenvalues / 3",
    "blob centre HU / 1000 + 1",
    "blob share in lung",
    "blob radius / 15 mm",
    "classifier logit - the study's median",
    "classifier rank in the study / outlines",
)
# Tried on validation and not adopted: four more features of what surrounds each outline (the
# mean density of a 5 mm shell beyond it, the shell's share denser than -500 HU and inside the
# lungs, the median density of the lung within 15 mm), meant to tell consolidation and ground
# glass from a nodule in aerated lung. On the same 36 validation composites' outlines, leave one
# anatomy out, the best recipe with them reached CPM 0.457 against 0.469 without them (the rule,
# fixed before fitting: ship only if better), and they did not lower the pneumonia anatomies'
# false calls at the operating point (docs/models/cad-rerank-context-validation.json).
# Nor fitting on 12 validation composites per anatomy instead of 6: CPM 0.479 against 0.469 for
# the chosen recipe, lower for the other four, with the 165 validation nodules then inserted
# about twice each, so held-out anatomies' nodules were mostly trained on elsewhere
# (docs/models/cad-rerank-more-studies-validation.json).
# The last two are read against the study's other outlines (:func:`in_study`): a classifier that
# never saw an anatomy scores all of its candidates higher or lower than those of another, and a
# nodule stands out from its own study's vessels even where its score is low against others'.
STUDY_FEATURES = 2
_EPS = 1e-4


def _log_ratio(a: float, b: float) -> float:
    return math.log(max(a, 0.1) / max(b, 0.1))


def outline_features(m: RegionMeasurement, seed: Blob, score: float) -> list[float]:
    """The second stage's input for the outline ``m`` drawn from the candidate ``seed`` that the
    classifier scored ``score``, in the order of `FEATURES` but for the study-relative ones
    (:func:`in_study` appends those)."""
    p = min(max(float(score), _EPS), 1.0 - _EPS)
    volume = max(float(m.voxel_volume_mm3), 1.0)
    equivalent = (6.0 * volume / math.pi) ** (1.0 / 3.0)
    mean_hu = -1000.0 if m.mean_hu is None else float(m.mean_hu)
    return [
        math.log(p / (1.0 - p)),
        math.log(volume),
        float(m.sphericity),
        _log_ratio(m.major_axis_mm, m.minor_axis_mm),
        max(float(m.least_axis_mm), 0.0) / max(float(m.major_axis_mm), 0.1),
        _log_ratio(m.max_3d_diameter_mm, equivalent),
        mean_hu / 1000.0,
        (mean_hu if m.max_hu is None else float(m.max_hu)) / 1000.0,
        (mean_hu if m.min_hu is None else float(m.min_hu)) / 1000.0,
        _log_ratio(equivalent, 2.0 * seed.radius_mm),
        seed.response / 500.0,
        seed.blobness,
        seed.tubeness,
        seed.negative / 3.0,
        (seed.centre_hu + 1000.0) / 1000.0,
        seed.in_lung,
        seed.radius_mm / 15.0,
    ]


def in_study(rows: np.ndarray) -> np.ndarray:
    """One study's outline features (n, len(FEATURES) - `STUDY_FEATURES`, classifier logit
    first) with the study-relative ones appended: each logit less the study's median, and its
    rank (0: the best) over the number of outlines."""
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, len(FEATURES) - STUDY_FEATURES)
    logit = rows[:, 0]
    rank = np.empty(len(rows), dtype=np.float32)
    rank[np.argsort(-logit, kind="stable")] = np.arange(len(rows), dtype=np.float32)
    relative = logit - np.median(logit) if len(rows) else logit
    extra = np.stack([relative, rank / max(1, len(rows))], axis=1).astype(np.float32)
    return np.concatenate([rows, extra], axis=1)


@torch.no_grad()
def probabilities(net: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """The second stage's probability for each row of ``features`` (n, len(FEATURES))."""
    if len(features) == 0:
        return np.zeros(0, dtype=np.float64)
    device = next(net.parameters()).device
    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    return torch.sigmoid(net.eval()(x)[:, 0]).double().cpu().numpy()
