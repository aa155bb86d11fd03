"""One study through the pipeline, as the composition of its stages (`workers/pipeline/`):
claim -> select -> load -> QA -> infer -> write SEG/SR -> record.

Idempotent by construction: a job is keyed by (study, pipeline version, hash of the input
instances); the same key twice yields one result, and output UIDs derive from the key, so a rerun
after a crash rewrites the same files instead of adding new ones. Data problems end the study as
NOT_APPLICABLE or FAILED with a reason; anything else propagates for the task to retry. A job
starts only for a study that is STABLE, QUEUED or PROCESSING (db/lifecycle.py): a message that
arrives for a study reopened, held or finished meanwhile does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from db import StudyState
from db.session import Database
from dicom_io.archive import ArchiveClient
from dicom_io.series import UnusableSeries, load_series  # noqa: F401 (the loader workers use)
from ml.runtime import inference  # noqa: F401 (tests replace inference.analyse)
from ml.runtime.registry import DEFAULT_REFS, LoadedModel
from workers.models import ModelSet
from workers.pipeline.analysers import Analyser, ModelsAnalyser, make_analyser
from workers.pipeline.claim import PIPELINE, claim
from workers.pipeline.errors import Finished
from workers.pipeline.infer import grade_lesions, run_analyser
from workers.pipeline.load import load_volume
from workers.pipeline.qa import check_input
from workers.pipeline.record import fail, record_end
from workers.pipeline.select import choose_series
from workers.pipeline.write import write_results

__all__ = ["PIPELINE", "PIPELINE_RELEASE", "fail", "pipeline_version", "process_study"]

log = logging.getLogger("radai.worker")

# The pipeline's own version; a job's key also carries the analyser's (see pipeline_version).
PIPELINE_RELEASE = "2.0"
DEFAULT_MODELS = (DEFAULT_REFS["segment"], DEFAULT_REFS["screen"], "auto")


def pipeline_version(analyser: Analyser) -> str:
    """What a job's result depends on: this code's release and the analyser's versions."""
    return f"{PIPELINE_RELEASE}/{analyser.tag}"[:32]


def process_study(
    db: Database,
    study_uid: str,
    outputs_dir: Path,
    destinations: Sequence[str] = (),
    models: ModelSet | None = None,
    analyser: Analyser | None = None,
    grader: LoadedModel | None = None,
    archive: ArchiveClient | None = None,
) -> str:
    """Run the pipeline for one study; return a short description of what happened.

    The analyser is ``analyser``, else the models in ``models``, else the shipped models on the
    CPU-or-GPU ``auto`` device. With ``archive``, the series are read by WADO-RS and the SEG and
    SR stored back by STOW-RS (a worker on another machine: RADAI_ARCHIVE_URL). With ``grader`` (the malignancy model), each kept lesion also gets
    its malignancy score.
    """
    if analyser is None:
        analyser = ModelsAnalyser(models) if models else make_analyser("models", *DEFAULT_MODELS)
    versions = dict(analyser.versions)
    version = pipeline_version(analyser)
    if grader is not None:
        versions[grader.name] = grader.version
        version = f"{version}+m{grader.version}"[:32]
    ticket = claim(db, study_uid, version)
    if isinstance(ticket, str):
        log.info("study %s: nothing to do: %s", study_uid, ticket)
        return ticket
    timings: dict[str, float] = {}
    try:
        volume = load_volume(choose_series(db, ticket, archive))
        t0 = time.perf_counter()
        check = check_input(volume)
        timings["qa"] = time.perf_counter() - t0
        analysis = run_analyser(analyser, volume)
        timings.update(analysis.timings_s)
        malignancy = None
        if grader is not None:
            t0 = time.perf_counter()
            malignancy = grade_lesions(grader, analysis, volume)
            timings["malignancy"] = time.perf_counter() - t0
        seed = f"{ticket.study_uid}/{version}/{ticket.input_hash}"
        written = write_results(
            ticket, volume, check, analysis, analyser, outputs_dir, seed, malignancy, archive
        )
        timings["write_dicom"] = written.seconds
    except Finished as end:
        record_end(db, ticket, end.state, reason=end.reason, model_versions=versions)
        log.info("study %s ended %s: %s", study_uid, end.state, end.reason)
        return f"{end.state}: {end.reason}"
    record_end(
        db,
        ticket,
        StudyState.DONE,
        written=written,
        timings=timings,
        destinations=list(destinations),
        model_versions=versions,
    )
    log.info(
        "study %s DONE: p=%.3f, %d lesion(s), priority %d",
        study_uid,
        written.findings.screening_probability,
        len(written.findings.lesions),
        written.findings.priority,
    )
    return "DONE"
