"""Peak memory and seconds of the worker's pipeline stages on CTs of clinical size.

What it measures
----------------
For each size (default 61, 300 and 534 slices of the real lung2 CT, built by
`bench/ct_series.py`: 61 is the sample at its own 5 mm slices, the others are resampled along z
to about 1 mm and 0.56 mm) a fresh Python process runs the stages a worker runs for one study,
the same functions in the same order (`workers/processing.py` without the database): load the
series (`workers.pipeline.load`), input QA, the analyser of `--pipeline` (default `baseline`,
the default RADAI_PIPELINE; `models` loads the shipped models, `cad` the CAD's classifier), the
SEG and SR and saliency files (`workers.pipeline.write`). A thread reads the process's VmRSS
every 10 ms; per stage the table shows seconds and the peak RSS above the RSS before the first
stage (imports, models loaded), and the process's VmHWM at the end. `volume` is the int16 size
of the CT (z * y * x * 2 bytes): `peak / volume` is the ratio to watch; it should not grow with
the slice count.

`--compare-to REF` runs the same in REF's worktree (e.g. the main branch's checkout) in the same
run, so the ratios are against a peer measured under the same load; the findings and the SEG's
pixels of both are compared, and any difference is printed.

    python bench/worker_memory.py                           # 61, 300, 534 slices, baseline
    python bench/worker_memory.py --pipeline models --sizes 61,534
    python bench/worker_memory.py --compare-to /work/main    # before / after, same run

The machine's load average is printed with each row: others' work skews the seconds (not the
memory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (61, 300, 534)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """The process's VmRSS every `period` seconds; `peak_since(mark)` is the highest since."""

    def __init__(self, period: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.peak = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("VmRSS"))
            time.sleep(self.period)

    def reset(self) -> int:
        now = _status_kb("VmRSS")
        self.peak = now
        return now

    def stop(self) -> None:
        self._stop.set()


def run_child(series: Path, pipeline: str, out: Path) -> dict:
    """One study through the stages in this process; returns the measurements."""
    import numpy as np

    from workers.pipeline.analysers import make_analyser
    from workers.pipeline.claim import JobTicket
    from workers.pipeline.infer import run_analyser
    from workers.pipeline.load import load_volume
    from workers.pipeline.qa import check_input
    from workers.pipeline.select import Selected
    from workers.pipeline.write import write_results
    from workers.processing import DEFAULT_MODELS

    analyser = make_analyser(pipeline, *DEFAULT_MODELS[:2], "cpu")
    files = sorted(series.glob("*.dcm"))
    sampler = Sampler()
    sampler.start()
    base = sampler.reset()
    stages: dict[str, dict[str, float]] = {}

    def stage(name: str, fn):  # noqa: ANN001, ANN202
        sampler.reset()
        t0 = time.perf_counter()
        result = fn()
        time.sleep(0.02)  # one more sample after the stage's last allocation
        stages[name] = {"s": time.perf_counter() - t0, "peak_mb": (sampler.peak - base) / 1024}
        return result

    volume = stage("load", lambda: load_volume(Selected("bench", files)))
    check = stage("qa", lambda: check_input(volume))
    analysis = stage("analyse", lambda: run_analyser(analyser, volume))
    ticket = JobTicket(1, 1, "bench", "0" * 64, 1)
    written = stage(
        "write",
        lambda: write_results(ticket, volume, check, analysis, analyser, out, "bench-seed"),
    )
    sampler.stop()
    seg = next(o for o in written.outputs if o["modality"] == "SEG")
    import pydicom

    seg_ds = pydicom.dcmread(seg["path"])
    seg_pixels = np.asarray(seg_ds.pixel_array)
    saliency = np.load(out / "bench" / "job-1" / "saliency.npz")["saliency"]
    return {
        "slices": len(files),
        "shape": list(volume.hu.shape),
        "volume_mb": int(np.prod(volume.hu.shape)) * 2 / 2**20,
        "base_mb": base / 1024,
        "hwm_mb": _status_kb("VmHWM") / 1024,
        "stages": stages,
        "timings": {k: round(v, 2) for k, v in analysis.timings_s.items()},
        "findings": written.findings.to_json(),
        "seg_frames": int(seg_ds.NumberOfFrames),
        "seg_sum": int(seg_pixels.sum(dtype=np.int64)),
        "seg_hash": hashlib.sha256(seg_pixels.tobytes()).hexdigest()[:16],
        "saliency_hash": hashlib.sha256(saliency.tobytes()).hexdigest()[:16],
    }


def _measure(root: Path, series: Path, pipeline: str, tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    out = tmp / f"out-{root.name}-{series.name}"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(series), str(out)]
    argv += ["--pipeline", pipeline]
    proc = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed in {root}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0]
    return result


def _row(label: str, r: dict) -> str:
    st = r["stages"]
    peak = max(s["peak_mb"] for s in st.values())
    total = sum(s["s"] for s in st.values())
    cells = "  ".join(f"{k} {s['s']:5.1f} s {s['peak_mb']:6.0f} MB" for k, s in st.items())
    return (
        f"{label:<10} {r['slices']:4d} sl  vol {r['volume_mb']:5.0f} MB  total {total:5.1f} s  "
        f"peak +{peak:5.0f} MB ({peak / r['volume_mb']:4.1f}x vol)  HWM {r['hwm_mb']:5.0f} MB  "
        f"load {r['load']:.2f}\n             {cells}"
    )


def _same(a: dict, b: dict) -> list[str]:
    diffs = []
    for key in ("seg_frames", "seg_sum", "seg_hash", "saliency_hash"):
        if a[key] != b[key]:
            diffs.append(f"{key}: {a[key]} != {b[key]}")
    fa, fb = dict(a["findings"]), dict(b["findings"])
    for f in (fa, fb):
        f.pop("saliency_path", None)
    if fa != fb:
        diffs.append(f"findings differ:\n  {fa}\n  {fb}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--pipeline", default="baseline", choices=("baseline", "models", "cad"))
    parser.add_argument("--compare-to", type=Path, help="another checkout, measured alongside")
    parser.add_argument("--series-dir", type=Path, help="reuse series built here (kept)")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(run_child(args.child[0], args.pipeline, args.child[1])))
        return 0

    sys.path.insert(0, str(ROOT / "bench"))
    from ct_series import write_resampled

    print(f"{os.cpu_count()} CPUs; pipeline {args.pipeline}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="radai-wmem-") as tmp_name:
        tmp = Path(tmp_name)
        series_root = args.series_dir or tmp
        failed = False
        for n in (int(s) for s in args.sizes.split(",")):
            series = series_root / f"ct{n}"
            if not any(series.glob("*.dcm")):
                write_resampled(series, slices=n)
            ours = _measure(ROOT, series, args.pipeline, tmp)
            print(_row("this", ours), flush=True)
            if args.compare_to:
                ref = _measure(args.compare_to.resolve(), series, args.pipeline, tmp)
                print(_row("reference", ref), flush=True)
                peak = max(s["peak_mb"] for s in ours["stages"].values())
                ref_peak = max(s["peak_mb"] for s in ref["stages"].values())
                print(f"           peak this / reference: {peak / ref_peak:.2f}")
                diffs = _same(ours, ref)
                failed |= bool(diffs)
                print("           results identical" if not diffs else "\n".join(diffs))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
