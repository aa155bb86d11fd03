"""The lung mask's border closing on a clinical-size CT: ITK's distance transform against scipy's.

`ml.image.lungs.segment_lungs` closes each lung on every slice by a disk of 30 mm, as two exact
Euclidean distance transforms (`ml.image.morphology.close_2d`). This times `segment_lungs` on the
real lung2 CT (the shared data folder's copy, else the bundled sample) resampled along z to
`--slices` (default 534, about 0.56 mm), alternating the shipped closing (SimpleITK's Maurer
transform for padded lung slices of at least `ITK_MIN_PIXELS`, scipy's below) with its peer
measured in the same run, the same closing through scipy's
`distance_transform_edt` (what it used before), and checks both give the same mask.

    python bench/lung_mask.py                  # 534 slices, 2 rounds
    python bench/lung_mask.py --slices 300 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ct_series import _source_dir  # noqa: E402
from ml.image import lungs, morphology  # noqa: E402


def scipy_close_2d(
    mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]
) -> np.ndarray:
    pad = int(math.ceil(radius_mm / min(spacing_yx))) + 2
    padded = np.pad(mask, pad)
    limit = radius_mm * radius_mm * (1.0 + morphology.RIM_TOLERANCE)
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing_yx) ** 2 <= limit
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing_yx) ** 2 > limit
    return closed[pad:-pad, pad:-pad]


def resampled_lung2(slices: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    image = sitk.ReadImage(str(_source_dir() / "lung2_image.nrrd"))
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    sz, sy, sx = image.GetSpacing()[::-1]
    where = np.linspace(0.0, volume.shape[0] - 1, slices)
    lo = np.minimum(np.floor(where).astype(int), volume.shape[0] - 2)
    t = (where - lo)[:, None, None].astype(np.float32)
    resampled = volume[lo] * (1 - t) + volume[lo + 1] * t
    return resampled, (sz * (volume.shape[0] - 1) / (slices - 1), sy, sx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=534)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    volume, spacing = resampled_lung2(args.slices)
    print(f"lung2 resampled to {volume.shape}, spacing {tuple(round(s, 4) for s in spacing)} mm")
    shipped = lungs.close_2d
    peers = {"itk (shipped)": shipped, "scipy (peer)": scipy_close_2d}
    seconds: dict[str, list[float]] = {name: [] for name in peers}
    masks: dict[str, np.ndarray] = {}
    try:
        for r in range(args.rounds):
            order = list(peers) if r % 2 == 0 else list(peers)[::-1]
            for name in order:
                lungs.close_2d = peers[name]
                start = time.perf_counter()
                masks[name] = lungs.segment_lungs(volume, spacing)
                seconds[name].append(time.perf_counter() - start)
                print(
                    f"round {r + 1} {name}: {seconds[name][-1]:.2f} s "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    finally:
        lungs.close_2d = shipped
    differ = int((masks["itk (shipped)"] != masks["scipy (peer)"]).sum())
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    print(
        f"median: itk {median['itk (shipped)']:.2f} s, scipy {median['scipy (peer)']:.2f} s, "
        f"itk / scipy {median['itk (shipped)'] / median['scipy (peer)']:.2f}x; "
        f"mask voxels that differ: {differ}"
    )
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
