"""Accuracy through the service: real CTs with inserted real nodules sent to the node as DICOM,
the SEG that comes back scored against the truth, beside the same pipeline run in memory.

What it measures
----------------
For each anatomy (default: the normal CT and the COVID-19 pneumonia CT of COVID-CT-MD, which no
shipped model was trained on) one composite study is built the way `radai evaluate --unseen`
builds them (`ml.evaluation.unseen.iter_studies`): five LIDC-IDRI nodules of the TEST-split
patients (read through the final-evaluation gate, never used to choose anything) inserted at
plausible places by the compositor. Each study is

1. written as a CT series (one file per slice, int16 HU, axial, the anatomy's own spacing, LPS
   positions) and sent with dcmtk's `storescu` to a fresh `radai node`, processed by a `radai
   worker` (the pipeline `RADAI_PIPELINE` names, `--pipeline`), and its DICOM SEG read back with
   highdicom: each lesion segment's frames are placed by their Referenced SOP Instance UID, so
   a loader that reorders, flips or transposes the series shows up as a miss;
2. run in memory by the same pipeline on the same (int16-rounded) volume: the peer.

Both are scored by the unseen evaluation's rules (a call hits a nodule when its centroid lies in
it or within its radius; Dice in the nodule's box grown by 10 mm): nodules found, false calls,
Dice of the found ones. The service column should equal the in-memory one; a difference is
what loading, resampling, orientation, QA and the SEG encoding cost.

With `--pipeline cad` each study is analysed by the nodule CAD's fold model that never saw its
anatomy (`RADAI_CAD_MODEL=radai-nodule-cad-cnn@<version>#holdout-<anatomy>`, a worker of its own
per study), as `radai evaluate --unseen` scores it; the shipped classifier saw all six.

Run: `python bench/service_accuracy.py --data ../shared/data [--anatomies normal001 P001]
[--pipeline baseline|models|cad]` with the project's venv active. Needs dcmtk and Redis at
127.0.0.1:6379 (an empty db number is claimed, as bench/e2e.py does). Reads `--data` (the shared
data folder); the service itself never does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Processes  # noqa: E402
from bench.e2e import RedisBroker, Service  # noqa: E402
from bench.e2e import storescu as send_files  # noqa: E402
from bench.ingest import build_samples  # noqa: E402
from ml.evaluation.unseen import (  # noqa: E402
    Detections,
    Detector,
    Study,
    baseline_detector,
    cad_detector,
    iter_studies,
    model_detector,
    score_study,
)
from ml.runtime import registry  # noqa: E402

SEGMENTER = "radai-lung-lesion-unet@1.0.0"
SCREENER = "radai-lesion-screen-cnn@2.0.0"
_NS = uuid.UUID("6c1f3b8e-4f1e-4d57-9b1e-5a7e0b2d9c41")


def _uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_NS, '/'.join(parts)).int}"


def write_series(study: Study, template: bytes, out: Path, tag: str) -> dict[str, int]:
    """The study's volume as an axial CT series in ``out``; returns SOP Instance UID -> z index.

    The volume is (z, y, x) in LPS order with an identity direction (as the backgrounds are read),
    so slice k sits at z0 + k * dz and rows run posterior, columns to the patient's left."""
    out.mkdir(parents=True, exist_ok=True)
    hu = np.clip(np.rint(study.hu), -1024, 3071).astype(np.int16)
    dz, dy, dx = (float(v) for v in study.spacing)
    study_uid, series_uid = _uid(tag), _uid(tag, "series")
    sop_to_z: dict[str, int] = {}
    for k in range(hu.shape[0]):
        ds = pydicom.dcmread(BytesIO(template))
        sop = _uid(tag, "instance", str(k))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.PatientID = f"SVCACC-{tag}"
        ds.PatientName = "Accuracy^Bench"
        ds.AccessionNumber = f"SA{uuid.uuid5(_NS, tag).int % 10**8}"
        ds.StudyID = "SVCACC"
        ds.StudyDescription = "radai service-accuracy benchmark (composite CT)"
        ds.SeriesDescription = f"{study.anatomy} with inserted LIDC nodules"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.SliceThickness = f"{dz:.6g}"
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = ["0", "0", f"{k * dz:.6g}"]
        if "SliceLocation" in ds:
            ds.SliceLocation = f"{k * dz:.6g}"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
        ds.save_as(out / f"{k + 1:05d}.dcm", enforce_file_format=True)
        sop_to_z[sop] = k
    return sop_to_z


def seg_labels(seg_path: Path, sop_to_z: dict[str, int], shape: tuple[int, ...]) -> np.ndarray:
    """The SEG's lesion segments as a label volume on the source grid (lung segment left out)."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    labels = np.zeros(shape, dtype=np.int16)
    lesion_numbers = [
        d.SegmentNumber for d in seg.SegmentSequence if d.SegmentLabel.lower() != "lung"
    ]
    for value, number in enumerate(lesion_numbers, start=1):
        for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
            ident = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            if ident != number:
                continue
            sop = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            z = sop_to_z[sop]
            labels[z][seg.pixel_array[i] > 0] = value
    return labels


class PipelineService(Service):
    """bench/e2e.py's service, its worker running the pipeline asked for."""

    def __init__(self, *args, pipeline: str, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline

    def env(self) -> dict[str, str]:
        return {**super().env(), "RADAI_PIPELINE": self.pipeline}


def _summary(scored) -> dict[str, float]:  # noqa: ANN001
    found = sum(
        1 for i in range(len(scored.truths)) if any(h == i for _, h, r in scored.candidates if r)
    )
    false = sum(1 for _, h, r in scored.candidates if r and h is None)
    dices = [
        o["dice"]
        for i, o in enumerate(scored.overlap)
        if any(h == i for _, h, r in scored.candidates if r)
    ]
    return {
        "nodules": len(scored.truths),
        "found": found,
        "false_calls": false,
        "dice_found": float(np.mean(dices)) if dices else float("nan"),
    }


def _cad_worker(service: PipelineService, anatomy: str) -> Detector:
    """Start a worker running the CAD's fold classifier and fold second stage that never saw
    ``anatomy`` (the shipped ones, said so, where no fold held it out), with the default
    outliner; the same models in memory are the peer."""
    refs = {}
    for setting, ref in (
        ("RADAI_CAD_MODEL", registry.DEFAULT_REFS["cad"]),
        ("RADAI_CAD_RERANKER", registry.CAD_RERANKER),
    ):
        name, version = ref.split("@")
        if f"holdout-{anatomy}" in registry.read_card(name, version).get("folds", {}):
            ref = f"{ref}#holdout-{anatomy}"
        else:
            print(f"{anatomy}: no fold model of {ref} held it out; the shipped one saw it")
        refs[setting] = ref
    service.start_worker(f"cad-{anatomy}", env=refs)
    outliner = None
    if registry.CAD_OUTLINER != registry.CLASSICAL_OUTLINE:
        outliner = registry.load(registry.CAD_OUTLINER)
    return cad_detector(
        registry.load(refs["RADAI_CAD_MODEL"]), outliner, registry.load(refs["RADAI_CAD_RERANKER"])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--anatomies", nargs="+", default=["normal001", "P001"])
    parser.add_argument("--pipeline", choices=["baseline", "models", "cad"], default="baseline")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="radai-bench-svcacc-"))
    procs = Processes()
    broker = RedisBroker()
    try:
        template = sorted(build_samples(work / "samples").glob("*.dcm"))[0].read_bytes()
        studies = [
            s
            for s in iter_studies(args.data, args.anatomies, k=1, mirror_first=False)
            if s.kind == "composite"
        ]
        service = PipelineService(
            work / "home", procs, broker.url, broker.queue, stable=2.0, pipeline=args.pipeline
        )
        service.start_node()
        if args.pipeline != "cad":
            service.start_worker("w1")
        if args.pipeline == "baseline":
            peer = baseline_detector
        elif args.pipeline == "models":  # the shipped pair, the workers' default
            peer = model_detector(registry.load(SEGMENTER), registry.load(SCREENER))
        print(
            f"pipeline {args.pipeline}; anatomies {' '.join(args.anatomies)}; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'study':32} {'path':9} {'nodules':>7} {'found':>5} {'false':>5} {'Dice':>6} {'s':>6}"
        )
        for study in studies:
            study = Study(
                study.study_id,
                study.anatomy,
                study.kind,
                np.rint(study.hu).astype(np.float32),
                study.labels,
                study.spacing,
                study.truths,
            )
            if args.pipeline == "cad":
                peer = _cad_worker(service, study.anatomy)
            tag = f"{study.study_id}-{args.pipeline}"
            sop_to_z = write_series(study, template, work / "series" / tag, tag)
            files = sorted((work / "series" / tag).glob("*.dcm"))
            start = time.monotonic()
            send_files(files, service.port)
            study_uid = _uid(tag)
            states = service.wait_finished([study_uid], args.timeout)
            svc_seconds = time.monotonic() - start
            if states.get(study_uid) != "DONE":
                print(f"{study.study_id}: service ended {states.get(study_uid)}")
                continue
            with service._db() as db:
                (seg_path,) = db.execute(
                    "SELECT o.path FROM outputs o JOIN jobs j ON o.job_id = j.id JOIN studies s "
                    "ON j.study_id = s.id WHERE s.study_uid = ? AND o.modality = 'SEG' "
                    "ORDER BY o.id DESC LIMIT 1",
                    (study_uid,),
                ).fetchone()
            labels = seg_labels(Path(seg_path), sop_to_z, study.hu.shape)
            n = int(labels.max())
            served = score_study(
                study, "service", lambda hu, sp, lab=labels, n=n: Detections(lab, [1.0] * n, 0.0)
            )
            t0 = time.monotonic()
            memory = score_study(study, "in memory", peer)
            mem_seconds = time.monotonic() - t0
            for name, scored, secs in (
                ("service", served, svc_seconds),
                ("in memory", memory, mem_seconds),
            ):
                s = _summary(scored)
                print(
                    f"{study.study_id:32} {name:9} {s['nodules']:7d} {s['found']:5d} "
                    f"{s['false_calls']:5d} {s['dice_found']:6.3f} {secs:6.1f}"
                )
            if args.pipeline == "cad":
                service.stop_workers()
        problems = service.log_problems()
        if problems:
            print(f"{len(problems)} warning/error log lines; first: {problems[0]}")
        for note in service.stop():
            print(note)
    finally:
        procs.stop_all()
        broker.cleanup()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
