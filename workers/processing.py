"""One study through the pipeline: select a series, load it, analyse it, write SEG and SR, record.

Idempotent by construction: a job is keyed by (study, pipeline version, hash of the input
instances); the same key twice yields one result, and output UIDs derive from the key, so a rerun
after a crash rewrites the same files instead of adding new ones. Data problems end the study as
NOT_APPLICABLE or FAILED with a reason; anything else propagates for the task to retry. A job
starts only for a study that is STABLE, QUEUED or PROCESSING (db/lifecycle.py): a message that
arrives for a study reopened, held or finished meanwhile does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select, update

from db import Export, Instance, Job, Output, Series, Study, StudyState, audit, lifecycle
from db.audit_actions import AuditAction
from db.models import utcnow
from db.outbox_tasks import ExportOutput
from db.session import Database
from dicom_io.series import UndecodablePixels, UnusableSeries, Volume, load_series
from ml.runtime import inference, qa
from ml.runtime.registry import DEFAULT_REFS
from workers.dicom_out.seg import build_segmentation
from workers.dicom_out.sr import build_measurement_report
from workers.models import ModelSet, load_models
from workers.outputs import write_output
from workers.selection import SeriesHeader, load_rules, select_series

log = logging.getLogger("radai.worker")

PIPELINE = "chest-ct-lung-lesions"
# The pipeline's own version; a job's key also carries the model versions (see pipeline_version).
PIPELINE_RELEASE = "2.0"
ACTOR = "worker"
RUNNING = "RUNNING"
DEFAULT_MODELS = (DEFAULT_REFS["segment"], DEFAULT_REFS["screen"], "auto")
MIN_LUNG_ML = 200.0  # less than this in view: not a chest CT we can analyse


class Finished(Exception):
    """The job ended without findings (NOT_APPLICABLE or FAILED) for a reason people read."""

    def __init__(self, state: StudyState, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


@dataclass(frozen=True)
class JobTicket:
    job_id: int
    study_id: int
    study_uid: str
    input_hash: str
    attempt: int


def input_hash(pairs: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for sop_uid, sha in sorted(pairs):
        digest.update(f"{sop_uid}:{sha}\n".encode())
    return digest.hexdigest()


def pipeline_version(models: ModelSet) -> str:
    """What a job's result depends on: this code's release and the models' versions."""
    return f"{PIPELINE_RELEASE}/{models.pipeline_tag}"[:32]


def _start(db: Database, study_uid: str, version: str) -> JobTicket | str:
    """Claim the job for the study's current instances, or say why there is nothing to do."""
    with db.session() as s:
        study = s.execute(
            select(Study).where(Study.study_uid == study_uid).with_for_update()
        ).scalar_one_or_none()
        if study is None:
            return "unknown study"
        if study.state == StudyState.RECEIVING:
            return "study reopened by new instances; it will be queued again"
        if study.state == StudyState.HELD:
            return "study is held for a person's review (radai release); not analysed"
        pairs = s.execute(
            select(Instance.sop_instance_uid, Instance.sha256).where(Instance.study_id == study.id)
        ).all()
        key = input_hash([(a, b) for a, b in pairs])
        job = s.execute(
            select(Job).where(
                Job.study_id == study.id,
                Job.pipeline_version == version,
                Job.input_hash == key,
            )
        ).scalar_one_or_none()
        if job is not None and job.state in (StudyState.DONE, StudyState.NOT_APPLICABLE):
            event = lifecycle.JOB_EVENTS[StudyState(job.state)]
            if study.state in lifecycle.TRANSITIONS[event].sources:
                lifecycle.transition(
                    s, study, event, actor=ACTOR, detail={"job": job.id, "reused": True}
                )
            return f"already {job.state} for these instances (job {job.id})"
        if study.state not in lifecycle.TRANSITIONS[AuditAction.JOB_STARTED].sources:
            return f"study is {study.state}; nothing to start"
        if job is None:
            job = Job(
                study_id=study.id,
                pipeline=PIPELINE,
                pipeline_version=version,
                input_hash=key,
                state=RUNNING,
                attempts=0,
            )
            s.add(job)
        job.state = RUNNING
        job.attempts += 1
        job.started_at = utcnow()
        job.error = None
        study.attempts += 1
        s.flush()
        lifecycle.transition(
            s,
            study,
            AuditAction.JOB_STARTED,
            actor=ACTOR,
            detail={"job": job.id, "attempt": job.attempts},
        )
        return JobTicket(job.id, study.id, study_uid, key, job.attempts)


def _series_headers(
    db: Database, study_id: int
) -> tuple[list[SeriesHeader], dict[str, list[Path]]]:
    with db.session() as s:
        rows = s.execute(
            select(
                Series.series_uid,
                Series.series_number,
                Series.series_description,
                Instance.archive_path,
            )
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
        ).all()
    files: dict[str, list[Path]] = {}
    meta: dict[str, tuple] = {}
    for series_uid, number, description, path in rows:
        files.setdefault(series_uid, []).append(Path(path))
        meta[series_uid] = (number, description)
    headers = []
    for series_uid, paths in files.items():
        modalities, classes, body, thick, types = set(), set(), None, None, set()
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            modalities.add(str(ds.get("Modality", "")) or None)
            classes.add(str(ds.SOPClassUID))
            body = body or (str(ds.get("BodyPartExamined", "")) or None)
            if ds.get("SliceThickness") not in (None, ""):
                thick = max(thick or 0.0, float(ds.SliceThickness))
            types.update(str(t).upper() for t in (ds.get("ImageType") or []))
        modality = modalities.pop() if len(modalities) == 1 else None
        headers.append(
            SeriesHeader(
                series_uid=series_uid,
                modality=modality,
                sop_class_uids=frozenset(classes),
                body_part=body,
                slice_count=len(paths),
                slice_thickness_mm=thick,
                image_types=frozenset(types),
                series_number=meta[series_uid][0],
                description=meta[series_uid][1],
            )
        )
    return headers, files


def lesion_location(centroid_zyx: tuple[float, float, float], lung: np.ndarray, vol: Volume) -> str:
    """Side from patient coordinates (LPS: +x is patient-left), zone from the lung's extent."""
    z, y, x = centroid_zyx
    row, col = np.asarray(vol.row_cosine), np.asarray(vol.column_cosine)
    dy, dx = vol.spacing_zyx[1], vol.spacing_zyx[2]
    point = np.asarray(vol.origin_xyz) + row * x * dx + col * y * dy
    lung_x = [
        float((np.asarray(vol.origin_xyz) + row * xx * dx)[0])
        for xx in np.nonzero(lung.any(axis=(0, 1)))[0][[0, -1]]
    ]
    side = "left" if point[0] > (lung_x[0] + lung_x[1]) / 2 else "right"
    slices = np.nonzero(lung.any(axis=(1, 2)))[0]
    top_is_high_index = vol.origin_xyz[2] < vol.origin_xyz[2] + vol.spacing_zyx[0]
    frac = (z - slices[0]) / max(1, slices[-1] - slices[0])
    if top_is_high_index:
        frac = 1 - frac  # volume order runs feet to head: high index is cranial
    zone = "upper" if frac < 1 / 3 else "middle" if frac < 2 / 3 else "lower"
    return f"{side} lung, {zone} zone"


def _analyse(ticket: JobTicket, volume: Volume, outputs_dir: Path, models: ModelSet) -> dict:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check = qa.assess(volume.hu, volume.spacing_zyx)
    timings["qa"] = time.perf_counter() - t0
    if not check.analysable:
        raise Finished(StudyState.NOT_APPLICABLE, "not analysable: " + "; ".join(check.reasons))
    result = inference.analyse(volume.hu, volume.spacing_zyx, models.segmenter, models.screener)
    timings.update(result.timings_s)
    if result.lung_volume_ml < MIN_LUNG_ML:
        raise Finished(
            StudyState.NOT_APPLICABLE,
            f"only {result.lung_volume_ml:.0f} ml of lung in the field of view; "
            "not a chest CT this pipeline can analyse",
        )
    lesions = []
    for m, p in zip(result.lesions, result.lesion_probabilities, strict=True):
        lesions.append(
            {
                "label": m.label,
                "volume_mm3": round(m.voxel_volume_mm3, 1),
                "max_3d_diameter_mm": round(m.max_3d_diameter_mm, 1),
                "max_2d_axial_diameter_mm": round(m.max_2d_axial_diameter_mm, 1),
                "mean_hu": round(m.mean_hu, 1) if m.mean_hu is not None else None,
                "location": lesion_location(m.centroid_zyx, result.lung_mask, volume),
                "centroid_zyx": [round(float(c), 1) for c in m.centroid_zyx],
                "slice_index": int(round(m.centroid_zyx[0])),
                "screening_probability": round(p, 4),
            }
        )
    seed = f"{ticket.study_uid}/{pipeline_version(models)}/{ticket.input_hash}"
    seg_model, scr_model = models.segmenter, models.screener
    t0 = time.perf_counter()
    seg = build_segmentation(
        volume.datasets,
        result.lung_mask,
        result.lesion_labels,
        algorithm_name=seg_model.name,
        algorithm_version=seg_model.version,
        instance_uid_seed=seed + "/seg",
    )
    sr = build_measurement_report(
        volume.datasets,
        seg,
        lesions,
        lung_volume_ml=result.lung_volume_ml,
        screening_probability=result.screening_probability,
        algorithm_name=seg_model.name,
        algorithm_version=seg_model.version,
        screening_algorithm=(scr_model.name, scr_model.version),
        instance_uid_seed=seed + "/sr",
    )
    timings["write_dicom"] = time.perf_counter() - t0
    folder = outputs_dir / ticket.study_uid / f"job-{ticket.job_id}"
    written = [
        write_output(folder / "seg.dcm", seg, "SEG"),
        write_output(folder / "sr.dcm", sr, "SR"),
    ]
    saliency_path = folder / "saliency.npz"
    np.savez_compressed(saliency_path, saliency=result.saliency.astype(np.float16))
    return {
        "findings": {
            "screening_probability": round(float(result.screening_probability), 4),
            "triage_score": round(float(result.probability), 4),
            "priority": int(result.priority),
            "lung_volume_ml": round(float(result.lung_volume_ml), 1),
            "lesions": lesions,
            "series_uid": str(volume.datasets[0].SeriesInstanceUID),
            "slices": len(volume.datasets),
            "saliency_path": str(saliency_path),
            "saliency_method": "Grad-CAM of " + scr_model.ref,
            "input_qa": check.to_dict(),
            "not_for_clinical_use": True,
        },
        "outputs": written,
        "timings": timings,
        "priority": int(result.priority),
    }


def _finish(
    db: Database,
    ticket: JobTicket,
    state: StudyState,
    *,
    reason: str | None = None,
    analysis: dict | None = None,
    destinations: list[str] = (),
    model_versions: dict[str, str] | None = None,
) -> None:
    now = utcnow()
    with db.session() as s:
        job = s.get(Job, ticket.job_id, with_for_update=True)
        study = s.get(Study, ticket.study_id, with_for_update=True)
        job.state = state
        job.error = reason
        job.finished_at = now
        if model_versions is not None:
            job.model_versions = model_versions
        if analysis:
            job.findings = analysis["findings"]
            job.timings = analysis["timings"]
            existing = {o.sop_instance_uid for o in job.outputs}
            for out in analysis["outputs"]:
                if out["sop_instance_uid"] not in existing:
                    s.add(Output(job_id=job.id, study_id=study.id, **out))
            s.flush()
            # Exports go through the outbox: written with the result, published by the node.
            for name in destinations:
                export = Export(job_id=job.id, study_id=study.id, destination=name)
                s.add(export)
                s.flush()
                s.add(ExportOutput(export.id).message(now, ticket.study_uid))
        if state in (StudyState.DONE, StudyState.NOT_APPLICABLE):
            s.execute(
                update(Job)
                .where(Job.study_id == study.id, Job.id != job.id, Job.superseded.is_(False))
                .values(superseded=True)
            )
        detail = {"job": job.id, "state": str(state)}
        if reason:
            detail["reason"] = reason
        if analysis:
            f = analysis["findings"]
            detail.update(
                probability=f["screening_probability"],
                lesions=len(f["lesions"]),
                outputs=[o["sop_instance_uid"] for o in analysis["outputs"]],
                model=model_versions,
            )
        event = lifecycle.JOB_EVENTS[state]
        # A study reopened meanwhile stays RECEIVING (this result will itself be superseded):
        # the job's end is audited all the same, without a state change.
        if study.state == StudyState.PROCESSING:
            study.error = reason
            if analysis:
                study.priority = analysis["priority"]
            lifecycle.transition(s, study, event, actor=ACTOR, detail=detail, now=now)
        else:
            audit.append(s, ACTOR, event, ticket.study_uid, detail)


def fail(db: Database, study_uid: str, reason: str) -> None:
    """Record a permanent failure of the running job of a study (e.g. retries exhausted)."""
    with db.session() as s:
        row = s.execute(
            select(Job.id, Job.study_id, Job.input_hash, Job.attempts)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_uid == study_uid, Job.state == RUNNING)
            .order_by(Job.id.desc())
        ).first()
    if row is None:
        return
    _finish(
        db, JobTicket(row[0], row[1], study_uid, row[2], row[3]), StudyState.FAILED, reason=reason
    )


def process_study(
    db: Database,
    study_uid: str,
    outputs_dir: Path,
    destinations: list[str] = (),
    models: ModelSet | None = None,
) -> str:
    """Run the pipeline for one study; return a short description of what happened.

    ``models`` defaults to the shipped models on the CPU-or-GPU ``auto`` device.
    """
    models = models or load_models(*DEFAULT_MODELS)
    versions = models.versions
    ticket = _start(db, study_uid, pipeline_version(models))
    if isinstance(ticket, str):
        log.info("study %s: nothing to do: %s", study_uid, ticket)
        return ticket
    rules = load_rules()
    try:
        headers, files = _series_headers(db, ticket.study_id)
        selection = select_series(rules, headers)
        if selection.chosen is None:
            raise Finished(StudyState.NOT_APPLICABLE, selection.explain(rules))
        try:
            volume = load_series(files[selection.chosen.series_uid])
        except UnusableSeries as exc:
            raise Finished(StudyState.NOT_APPLICABLE, f"series not usable: {exc}") from None
        except UndecodablePixels as exc:
            raise Finished(StudyState.FAILED, str(exc)) from None
        analysis = _analyse(ticket, volume, outputs_dir, models)
    except Finished as end:
        _finish(db, ticket, end.state, reason=end.reason, model_versions=versions)
        log.info("study %s ended %s: %s", study_uid, end.state, end.reason)
        return f"{end.state}: {end.reason}"
    _finish(
        db,
        ticket,
        StudyState.DONE,
        analysis=analysis,
        destinations=list(destinations),
        model_versions=versions,
    )
    f = analysis["findings"]
    log.info(
        "study %s DONE: p=%.3f, %d lesion(s), priority %d",
        study_uid,
        f["screening_probability"],
        len(f["lesions"]),
        f["priority"],
    )
    return "DONE"
