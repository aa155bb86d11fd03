"""The two networks, built from MONAI, and the input they expect.

Both see 2.5-D input: a slice and its two neighbours as three channels, on a 256 x 256 grid that
covers the whole reconstructed field of view (about 1.2 mm pixels for a typical chest CT), in HU
scaled by :func:`scale_hu`. The segmenter (a U-Net) labels every pixel background, lung or lesion;
the screener gives the probability that the middle slice shows a lesion, and a study's
probability is the highest of its slices.

The screener is the U-Net read as a classifier: a slice's score is its highest lesion
probability (multiple-instance pooling), and Grad-CAM explains that score. A separately trained
CNN classifier was tried twice on the CPU budget of a session (MONAI's ``Classifier``, then a
max-pooled evidence map with a dense auxiliary loss): both stayed at chance (AUC 0.5-0.6 on
synthetic held-out studies, the same score for every study), so the shipped screener shares the
segmenter's weights rather than pretending to be an independent model.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import UNet

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
SCREENER_ARCH = {"segmenter": SEGMENTER_ARCH}
# Where Grad-CAM reads activations and gradients: the U-Net's last decoder block at half
# resolution, fine enough to point at a nodule.
SCREENER_CAM_LAYER = "unet.model.1.submodule.2"
LESION_CLASS = 2


class LesionScreener(torch.nn.Module):
    """Slice screening from a segmentation U-Net: logit of its highest lesion probability."""

    def __init__(self, segmenter: dict) -> None:
        super().__init__()
        self.unet = UNet(**segmenter)

    def lesion_probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.unet(x), dim=1)[:, LESION_CLASS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.amax(self.lesion_probability(x), dim=(1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.logit(p).reshape(x.shape[0], 1)


def build(task: str, arch: dict | None = None) -> torch.nn.Module:
    """A fresh network for ``task`` ('segment' or 'screen') with the given or default shape."""
    if task == "segment":
        return UNet(**(arch or SEGMENTER_ARCH))
    if task == "screen":
        return LesionScreener(**(arch or SCREENER_ARCH))
    raise ValueError(f"unknown task {task!r}; expected 'segment' or 'screen'")


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
