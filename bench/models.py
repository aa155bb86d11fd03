"""Inference time of the shipped models and of the nodule CAD on the real 61-slice lung2 CT,
against the classical baseline measured in the same run (their peer), on the CPU with the given
torch threads.

    python bench/models.py [--repeats 3] [--threads 2]

Prints the median seconds per stage and the ratios models / baseline and CAD / baseline. Not a
test: the goal (under 10 s for a 61-slice CT on 2 cores) is read from here and reported, never
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.data.synth import load_nrrd_case  # noqa: E402
from ml.runtime import cad, inference, qa, registry  # noqa: E402
from ml.runtime.baseline import run_baseline  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "samples"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", default="lung2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hu, _, spacing = load_nrrd_case(
        DATA / f"{args.case}_image.nrrd", DATA / f"{args.case}_label.nrrd"
    )
    seg = registry.load(registry.DEFAULT_REFS["segment"])
    scr = registry.load(registry.DEFAULT_REFS["screen"])
    classifier = registry.load(registry.DEFAULT_REFS["cad"])
    inference.analyse(hu, spacing, seg, scr)  # warm-up: first calls allocate and load kernels
    cad.run_cad(hu, spacing, classifier)
    models, base, checks, stages, cads, cad_stages = [], [], [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        qa.assess(hu, spacing)
        checks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = inference.analyse(hu, spacing, seg, scr)
        models.append(time.perf_counter() - t0)
        stages.append(result.timings_s)
        t0 = time.perf_counter()
        run_baseline(hu, spacing)
        base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        found = cad.run_cad(hu, spacing, classifier)
        cads.append(time.perf_counter() - t0)
        cad_stages.append(found.timings_s)
    m, b, q = statistics.median(models), statistics.median(base), statistics.median(checks)
    c = statistics.median(cads)
    print(
        f"{args.case}: {hu.shape[0]} slices of {hu.shape[1]}x{hu.shape[2]}, "
        f"{args.threads} torch threads, median of {args.repeats}"
    )
    print("| step | seconds |")
    print("|---|---|")
    print(f"| input QA (ml.qa) | {q:.2f} |")
    for key in ("segment", "measure", "screen_and_gradcam"):
        print(f"| models: {key} | {statistics.median(s[key] for s in stages):.2f} |")
    print(f"| models: total | {m:.2f} |")
    for key in cad_stages[0]:
        if key != "total":
            print(f"| CAD: {key} | {statistics.median(s[key] for s in cad_stages):.2f} |")
    print(f"| CAD: total ({found.candidates} candidates) | {c:.2f} |")
    print(f"| classical baseline (peer) | {b:.2f} |")
    print(f"ratio models / baseline: {m / b:.2f}x; QA + models: {q + m:.2f} s (goal < 10 s)")
    print(f"ratio CAD / baseline: {c / b:.2f}x; QA + CAD: {q + c:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
