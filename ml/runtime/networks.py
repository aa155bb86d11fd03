"""The two networks, built from MONAI, and the input they expect.

The segmenter (a U-Net) sees 2.5-D input: a slice and its two neighbours as three channels, on a
256 x 256 grid that covers the whole reconstructed field of view (about 1.2 mm pixels for a
typical chest CT), in HU scaled by :func:`scale_hu`, and labels every pixel background, lung or
lesion. The screener (a CNN classifier) sees one lesion call of the segmenter at a time, as the
patches of :mod:`ml.candidates`, and gives the probability that it is a lesion; a study's
screening probability is the highest of its candidates.

Two earlier screeners were trained on whole slices (MONAI's ``Classifier``, then a max-pooled
evidence map): both stayed at chance on held-out synthetic studies. Classifying the segmenter's
candidates is the smaller problem the CPU budget can learn, and it is where the segmenter's
false positives had to be removed anyway.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import Classifier, UNet

from ml.runtime import cad_views, candidates

GRID = 256
CONTEXT = 3  # slices per input: the slice and one neighbour on each side
HU_RANGE = (-1000.0, 400.0)
SEG_CLASSES = ("background", "lung", "lesion")

SEGMENTER_ARCH = {
    "spatial_dims": 2,
    "in_channels": CONTEXT,
    "out_channels": len(SEG_CLASSES),
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
}
SCREENER_ARCH = {
    "in_shape": [candidates.CHANNELS, candidates.PATCH, candidates.PATCH],
    "classes": 1,
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
    "dropout": 0.3,
}
# The malignancy CNN (:mod:`ml.runtime.malignancy`) sees a nodule-centred 32 mm cube at 1 mm, as
# two channels (HU, lesion mask); a small 3-D classifier because it learns from ~330 nodules.
MALIGNANCY_ARCH = {
    "in_shape": [2, 32, 32, 32],
    "classes": 1,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
    "dropout": 0.3,
}
# The nodule CAD's candidate classifier (:mod:`ml.runtime.cad`) sees nine planes through the
# candidate (:mod:`ml.runtime.cad_views`, twelve 32 x 32 channels: the three orthogonal planes at
# two fields of view and the six diagonal ones), small enough to learn on the CPU, through a
# MONAI Classifier to a short embedding, joined with the blob detector's own description of the
# candidate (:func:`ml.runtime.cad.blob_features`: response, shape, density, radius, how much of
# it is in the lung) by a small head: a small network on those features alone, fitted on one
# anatomy group's validation candidates, ranked the other group's better than version 1's
# views-only fold model (AUC 0.86 vs 0.77), so the network gets both. 2.2.0 (nine planes,
# 32-64-128 channels, 4000 + 2000 steps) against 2.1.0 (three planes, 16-32-64, 3000 + 1500),
# fold models on the validation studies of the anatomy each never saw: mean sensitivity over
# 1/8-8 false calls per study 0.30 vs 0.19, at 1 false call 0.26 vs 0.13; a training step of 64
# costs 2.2 times the CPU (25.7 -> 56.7 ms on one core). Both changed at once: which of them
# gained what was not measured.
# The nodule outline U-Net (:mod:`ml.runtime.nodule_outline`) labels a 48-voxel cube at 0.8 mm
# around a point inside a nodule: small enough to train on the CPU from ~500 LIDC crops.
OUTLINE_ARCH = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 1,
}
CAD_FEATURES = 7
CAD_ARCH = {
    "views": {
        "in_shape": [cad_views.CHANNELS, cad_views.VIEW, cad_views.VIEW],
        "classes": 32,
        "channels": [32, 64, 128],
        "strides": [2, 2, 2],
        "num_res_units": 1,
        "dropout": 0.2,
    },
    "features": CAD_FEATURES,
    "hidden": 64,
}


class CadNet(torch.nn.Module):
    """The CAD classifier: a candidate's views (n, 6, 32, 32) and its blob features (n, 7) to one
    logit per candidate."""

    def __init__(self, views: dict, features: int, hidden: int) -> None:
        super().__init__()
        self.views = Classifier(**views)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(int(views["classes"]) + features, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, views: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.views(views)), features], dim=1))


class RerankNet(torch.nn.Module):
    """The nodule CAD's second stage: an outline's features (n, features), standardised by the
    training set's mean and scale (kept as buffers, so they ship with the weights), to one logit
    per outline; a logistic regression when ``hidden`` is 0, else one hidden layer."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, features: int, hidden: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        if hidden:
            self.head: torch.nn.Module = torch.nn.Sequential(
                torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
            )
        else:
            self.head = torch.nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - self.mean) / self.scale)


# Where Grad-CAM reads activations and gradients: the classifier's third block, 8 x 8 cells of
# about 9 mm over the candidate's patch.
SCREENER_CAM_LAYER = "net.layer_2"
LESION_CLASS = 2


def build(task: str, arch: dict | None = None) -> torch.nn.Module:
    """A fresh network for ``task`` ('segment', 'screen', 'malignancy', 'outline', 'cad' or
    'cad-rerank') with the given or default shape."""
    if task == "segment":
        return UNet(**(arch or SEGMENTER_ARCH))
    if task == "screen":
        return Classifier(**(arch or SCREENER_ARCH))
    if task == "malignancy":
        return Classifier(**(arch or MALIGNANCY_ARCH))
    if task == "outline":
        return UNet(**(arch or OUTLINE_ARCH))
    if task == "cad-rerank":
        if arch is None:
            raise ValueError("a cad-rerank network needs its architecture (features, hidden)")
        return RerankNet(**arch)
    if task == "cad":
        arch = arch or CAD_ARCH
        # Version 1 of the CAD classifier was views only: a plain Classifier.
        return CadNet(**arch) if "views" in arch else Classifier(**arch)
    raise ValueError(
        f"unknown task {task!r}; expected 'segment', 'screen', 'malignancy', 'outline', 'cad'"
        " or 'cad-rerank'"
    )


def scale_hu(hu: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """HU clipped to [-1000, 400] and mapped to [0, 1]: air to soft tissue and a little bone,
    the range where lung lesions differ from their background."""
    lo, hi = HU_RANGE
    if isinstance(hu, torch.Tensor):
        return (hu.clamp(lo, hi) - lo) / (hi - lo)
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def stack_context(volume: np.ndarray) -> np.ndarray:
    """(z, y, x) -> (z, CONTEXT, y, x): each slice with its neighbours, edges repeated."""
    half = CONTEXT // 2
    padded = np.pad(volume, ((half, half), (0, 0), (0, 0)), mode="edge")
    return np.stack([padded[i : i + volume.shape[0]] for i in range(CONTEXT)], axis=1)
