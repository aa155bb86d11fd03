"""Time the follow-up core on a synthetic ~300x300x60 chest pair: registration (lung segmentation
included) and the whole comparison, on one SimpleITK thread (or ``--threads N``). With
``--sample lung2`` the pair is instead a bundled real CT (data/samples) and itself seen through a
known breathing-like deformation plus noise (registration only: the samples have one lesion).

    PYTHONPATH=$PWD .venv/bin/python scripts/time_registration.py [--threads 1] [--sample lung2]

Prints wall and CPU seconds and the landmark TRE; the one-core figure is quoted in
``ml/image/registration.py``. CPU seconds are the honest figure on a shared machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ml.data.chest_phantom import Breathing, phantom_pair
from ml.image.lungs import segment_lungs
from ml.image.registration import register
from ml.runtime.followup import compare, lesions_from_labels

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def sample_pair(name: str) -> None:
    img = sitk.ReadImage(str(SAMPLES / f"{name}_image.nrrd"))
    prior = sitk.GetArrayFromImage(img).astype(np.float32)
    spacing = img.GetSpacing()[::-1]
    lungs = np.flatnonzero(segment_lungs(prior, spacing).any(axis=(1, 2)))
    extent = np.asarray(prior.shape) * spacing
    mapping = Breathing(
        shift_mm=(3.0, -4.0, 2.0),
        amplitude_mm=6.0,
        expansion_mm=3.0,
        z_apex_mm=lungs[0] * spacing[0],
        z_base_mm=lungs[-1] * spacing[0],
        centre_yx_mm=(extent[1] / 2, extent[2] / 2),
        width_mm=0.6 * extent[2],
    )
    grid = np.stack(
        np.meshgrid(
            *[np.arange(n) * s for n, s in zip(prior.shape, spacing, strict=True)], indexing="ij"
        ),
        -1,
    )
    coords = np.moveaxis(mapping(grid) / np.asarray(spacing), -1, 0)
    current = ndimage.map_coordinates(prior, coords, order=1, mode="nearest").astype(np.float32)
    current += np.random.default_rng(0).normal(0, 15, current.shape).astype(np.float32)
    inside = np.argwhere(segment_lungs(current, spacing))
    points = inside[np.random.default_rng(1).choice(len(inside), 200, replace=False)] * spacing
    wall, cpu = time.perf_counter(), time.process_time()
    reg = register(current, spacing, prior, spacing)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tre = np.linalg.norm(reg.to_prior(points) - mapping(points), axis=1)
    print(
        f"{name} {prior.shape}: registration {wall:.1f} s wall / {cpu:.1f} s CPU; TRE median "
        f"{np.median(tre):.2f} mm, p90 {np.percentile(tre, 90):.2f} mm, max {tre.max():.2f} mm"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, default=(60, 300, 300))
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8))
    parser.add_argument("--sample", help="a bundled sample CT (lung1, lung2) instead")
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if args.sample:
        sample_pair(args.sample)
        return
    pair = phantom_pair(shape=args.shape, spacing=args.spacing)
    wall, cpu = time.perf_counter(), time.process_time()
    reg = register(pair.current, pair.spacing, pair.prior, pair.spacing)
    reg_wall, reg_cpu = time.perf_counter() - wall, time.process_time() - cpu
    fu = compare(
        lesions_from_labels(pair.current_labels, pair.spacing),
        lesions_from_labels(pair.prior_labels, pair.spacing),
        reg,
        pair.interval_days,
        current_study_key="current",
        prior_study_key="prior",
    )
    all_wall, all_cpu = time.perf_counter() - wall, time.process_time() - cpu
    tre = np.linalg.norm(reg.to_prior(pair.landmarks_current) - pair.landmarks_prior, axis=1)
    print(
        f"shape {tuple(args.shape)} spacing {tuple(args.spacing)} threads {args.threads}: "
        f"registration {reg_wall:.1f} s wall / {reg_cpu:.1f} s CPU, whole follow-up "
        f"{all_wall:.1f} s wall / {all_cpu:.1f} s CPU; TRE median {np.median(tre):.2f} mm, "
        f"max {tre.max():.2f} mm; {len(fu.pairs)} pairs, {len(fu.new)} new, "
        f"{len(fu.resolved)} resolved"
    )


if __name__ == "__main__":
    main()
