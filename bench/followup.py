"""What follow-up adds to a study: the pipeline for the bundled sample CT `lung1` with a prior of
the same patient (lung1 under new UIDs and an earlier date, analysed first), next to the same
pipeline's other stages measured in the same run (the peer).

Studies are recorded straight into a temporary SQLite database (`dicom_node.recording`, no
network) and processed in this process with `workers.processing.process_study`, so the figures
are the worker's own `jobs.timings`: `follow_up` is the whole stage (finding the prior in the
database, loading its series, reading its SEG, registering, matching, measuring, growth triage);
prior retrieval from a PACS is not part of it. SimpleITK and torch get `--threads` threads, as a
worker with RADAI_TORCH_THREADS does.

`--slices N` uses `lung2` resampled to N slices (`bench/ct_series.py`; 534 is a clinical
thin-slice CT) for both studies instead of `lung1`. `peak MB` is the process's VmHWM over the
current study's job alone (reset after the prior's): with the prior loaded and registered, the
memory a worker needs for a study that has one.

    python bench/followup.py                    # 2 threads, baseline analyser, 3 runs
    python bench/followup.py --threads 1 --pipeline models --repeats 1
    python bench/followup.py --slices 534 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import pydicom
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ct_series import write_resampled  # noqa: E402

from db import Job, audit  # noqa: E402
from db.audit_keys import AuditKeys  # noqa: E402
from db.session import Database  # noqa: E402
from dicom_node.archive import Archive, sha256  # noqa: E402
from dicom_node.assembly import mark_stable  # noqa: E402
from dicom_node.inspection import inspect_received  # noqa: E402
from dicom_node.recording import record_instance  # noqa: E402
from dicom_node.samples import build_sample_studies  # noqa: E402
from workers import processing  # noqa: E402
from workers.models import set_torch_threads  # noqa: E402
from workers.pipeline.analysers import make_analyser  # noqa: E402

STAGES = ("qa", "total", "malignancy", "follow_up", "write_dicom")


def _record(db: Database, archive: Archive, files: list[Path]) -> str:
    uid = ""
    for path in files:
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        obj = inspect_received(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        target = archive.instance_path(obj.study_uid, obj.series_uid, obj.sop_instance_uid)

        def put(_outcome: object, target: Path = target, data: bytes = data) -> str:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            return str(target)

        record_instance(
            db,
            obj,
            digest=sha256(data),
            size=len(data),
            calling_ae="BENCH",
            actor="bench",
            place=put,
        )
        uid = obj.study_uid
    mark_stable(db, 0.0)
    return uid


def _prior_copy(files: list[Path], folder: Path, run: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        study = f"{ds.StudyInstanceUID}.{90 + run}"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = study + ".1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.1.{i + 1}"
        ds.StudyDate = "20230615"
        target = folder / f"{i:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_run(tmp: Path, run: int, analyser: object, series: list[Path] | None) -> dict[str, float]:
    home = tmp / f"run{run}"
    home.mkdir()
    db = Database(f"sqlite:///{home / 'radai.sqlite'}")
    db.upgrade()
    archive = Archive(home / "archive", home / "quarantine")
    files = series or build_sample_studies(home / "samples")["lung1"]
    prior = _record(db, archive, _prior_copy(files, home / "prior", run))
    assert processing.process_study(db, prior, home / "out", analyser=analyser) == "DONE"
    current = _record(db, archive, files)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the current study's job
    assert processing.process_study(db, current, home / "out", analyser=analyser) == "DONE"
    peak = _peak_mb()
    with db.session() as s:
        job = s.execute(select(Job).where(Job.study.has(study_uid=current))).scalar_one()
        timings, findings = dict(job.timings), dict(job.findings)
    assert findings["prior_study_uid"] == prior, findings.get("prior_reason")
    db.dispose()
    timings["follow_up: registration"] = findings["follow_up"]["registration"]["seconds"]
    timings["peak MB"] = peak
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipeline", choices=["baseline", "models"], default="baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=0, help="lung2 resampled to N slices")
    args = parser.parse_args()
    set_torch_threads(args.threads)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load}")
    print(f"threads {args.threads}, pipeline {args.pipeline}, {args.repeats} run(s)")
    analyser = make_analyser(
        args.pipeline, "radai-lung-lesion-unet@1.0.0", "radai-lesion-screen-cnn@2.0.0", "cpu"
    )
    with tempfile.TemporaryDirectory(prefix="radai-bench-followup-") as tmp:
        keys = AuditKeys.load(Path(tmp) / "audit.key")
        audit.configure(keys)
        os.environ["RADAI_AUDIT_KEY_FILE"] = str(Path(tmp) / "audit.key")
        series = None
        if args.slices:
            series = write_resampled(Path(tmp) / "series", slices=args.slices)
            print(f"studies: lung2 resampled to {len(series)} slices")
        runs = [one_run(Path(tmp), i, analyser, series) for i in range(args.repeats)]
    keys_seen = sorted({k for r in runs for k in r}, key=lambda k: (k != "follow_up", k))
    print(f"{'stage':<24}{'median s':>10}{'min s':>10}{'max s':>10}")
    for key in keys_seen:
        values = [r[key] for r in runs if key in r]
        print(
            f"{key:<24}{statistics.median(values):>10.2f}{min(values):>10.2f}{max(values):>10.2f}"
        )
    # The analyser's laps add up to its "total"; the stages of the pipeline are these.
    total = [sum(r.get(k, 0.0) for k in STAGES) for r in runs]
    print(
        f"{'all stages':<24}{statistics.median(total):>10.2f}{min(total):>10.2f}{max(total):>10.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
