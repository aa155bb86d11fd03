"""Time the follow-up core on a synthetic ~300x300x60 chest pair: registration (lung segmentation
included) and the whole comparison, on one SimpleITK thread (or ``--threads N``).

    PYTHONPATH=$PWD .venv/bin/python scripts/time_registration.py [--threads 1]

Prints wall and CPU seconds and the landmark TRE; the one-core figure is quoted in
``ml/image/registration.py``. CPU seconds are the honest figure on a shared machine."""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk

from ml.data.chest_phantom import phantom_pair
from ml.image.registration import register
from ml.runtime.followup import compare, lesions_from_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, default=(60, 300, 300))
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8))
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
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
