"""The two networks, built from MONAI, and the input they expect.

Both see 2.5-D input: a slice and its two neighbours as three channels, on a 256 x 256 grid that
covers the whole reconstructed field of view (about 1.2 mm pixels for a typical chest CT), in HU
scaled by :func:`scale_hu`. The segmenter (a U-Net) labels every pixel background, lung or lesion;
the screener gives the probability that the middle slice shows a lesion, and a study's
probability is the highest of its slices.

The screener is a fully convolutional stack of MONAI residual units ending in a one-channel map
of lesion evidence, pooled by its maximum (multiple-instance learning): a small nodule anywhere in
the slice can raise the score, which a flatten-and-dense head (MONAI's ``Classifier``) learned
far more slowly on our CPU budget (its loss was still at chance after 75 steps).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.blocks import Convolution, ResidualUnit
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
SCREENER_ARCH = {
    "in_channels": CONTEXT,
    "channels": [16, 32, 64, 64],
    "strides": [2, 2, 2, 1],
}
# The screener's last convolution block: where Grad-CAM reads activations and gradients.
SCREENER_CAM_LAYER = "features.3"


class MaxPoolScreener(torch.nn.Module):
    """Residual units -> 1x1 convolution to a lesion-evidence map -> its maximum as the logit."""

    def __init__(self, in_channels: int, channels: list[int], strides: list[int]) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        previous = in_channels
        for i, (c, s) in enumerate(zip(channels, strides, strict=True)):
            if i == 0:
                layers.append(Convolution(2, previous, c, strides=s, kernel_size=3))
            else:
                layers.append(ResidualUnit(2, previous, c, strides=s, subunits=2))
            previous = c
        self.features = torch.nn.Sequential(*layers)
        self.evidence = Convolution(2, previous, 1, kernel_size=1, conv_only=True)

    def evidence_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.evidence(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.evidence_map(x), dim=(2, 3)).reshape(x.shape[0], 1)


def build(task: str, arch: dict | None = None) -> torch.nn.Module:
    """A fresh network for ``task`` ('segment' or 'screen') with the given or default shape."""
    if task == "segment":
        return UNet(**(arch or SEGMENTER_ARCH))
    if task == "screen":
        return MaxPoolScreener(**(arch or SCREENER_ARCH))
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
