"""One study through the pipeline, as the composition of its stages (`workers/pipeline/`):
claim -> select -> load -> QA -> infer -> follow-up -> write SEG/SR -> record.

Idempotent by construction: a job is keyed by (study, pipeline version, hash of the input
instances); the same key twice yields one result, and output UIDs derive from the key, so a rerun
after a crash rewrites the same files instead of adding new ones. Data problems end the study as
NOT_APPLICABLE or FAILED with a reason; anything else propagates for the task to retry. A job
starts only for a study that is STABLE, QUEUED or PROCESSING (db/lifecycle.py): a message that
arrives for a study reopened, held or finished meanwhile does nothing.

While a study runs its worker renews the job's lease (`pipeline/heartbeat.py`, db/leases.py); a
worker that finds its lease gone stops before writing, and its late end is refused in any case.
On an error the lease is released to the task's retry, kept for `retry_grace_seconds` after which
the reaper queues the study again should the retry never come.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from db import StudyState, leases
from db.session import Database
from dicom_io.archive import ArchiveClient
from dicom_io.series import UnusableSeries, load_series  # noqa: F401 (the loader workers use)
from ml.runtime import inference  # noqa: F401 (tests replace inference.analyse)
from ml.runtime.registry import DEFAULT_REFS, LoadedModel
from workers.models import ModelSet
from workers.pipeline.analysers import Analyser, ModelsAnalyser, make_analyser
from workers.pipeline.claim import PIPELINE, claim
from workers.pipeline.errors import Finished
from workers.pipeline.followup import run_follow_up
from workers.pipeline.heartbeat import Heartbeat, LeaseLost
from workers.pipeline.infer import grade_lesions, run_analyser
from workers.pipeline.load import load_volume
from workers.pipeline.prior import PriorSources
from workers.pipeline.qa import check_input
from workers.pipeline.record import fail, lease_lost, record_end
from workers.pipeline.select import choose_series
from workers.pipeline.write import write_results

__all__ = ["PIPELINE", "PIPELINE_RELEASE", "fail", "pipeline_version", "process_study"]

log = logging.getLogger("radai.worker")

# The pipeline's own version; a job's key also carries the analyser's (see pipeline_version).
PIPELINE_RELEASE = "2.1"  # 2.1: follow-up (tracking UIDs, change since the prior)
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
    lease_seconds: float = leases.DEFAULT_SECONDS,
    retry_grace_seconds: float | None = None,
    prior_sources: PriorSources | None = None,
    archive: ArchiveClient | None = None,
) -> str:
    """Run the pipeline for one study; return a short description of what happened.

    The analyser is ``analyser``, else the models in ``models``, else the shipped models on the
    CPU-or-GPU ``auto`` device. With ``grader`` (the malignancy model), each kept lesion also gets
    its malignancy score. The job's lease lasts `lease_seconds` and is renewed while it runs.
    Priors come from the database and, with ``prior_sources``, from PACS.
    With ``archive`` (a worker on another machine: RADAI_ARCHIVE_URL), the series are read by
    WADO-RS and the SEG and SR stored back by STOW-RS.
    """
    if analyser is None:
        analyser = ModelsAnalyser(models) if models else make_analyser("models", *DEFAULT_MODELS)
    versions = dict(analyser.versions)
    version = pipeline_version(analyser)
    if grader is not None:
        versions[grader.name] = grader.version
        version = f"{version}+m{grader.version}"[:32]
    ticket = claim(db, study_uid, version, lease_seconds=lease_seconds)
    if isinstance(ticket, str):
        log.info("study %s: nothing to do: %s", study_uid, ticket)
        return ticket
    heartbeat = Heartbeat(db, ticket, lease_seconds)
    timings: dict[str, float] = {}
    with heartbeat:
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
            followed = run_follow_up(db, ticket, volume, analysis, analyser, prior_sources)
            timings["follow_up"] = followed.seconds
            # A worker that was frozen or cut off past its lease writes nothing: another has
            # the study by now (the result files' names derive from the job key).
            heartbeat.confirm()
            seed = f"{ticket.study_uid}/{version}/{ticket.input_hash}"
            written = write_results(
                ticket,
                volume,
                check,
                analysis,
                analyser,
                outputs_dir,
                seed,
                malignancy,
                followed,
                archive,
            )
            timings["write_dicom"] = written.seconds
        except Finished as end:
            if not record_end(db, ticket, end.state, reason=end.reason, model_versions=versions):
                return _lost(study_uid, ticket.job_id)
            log.info("study %s ended %s: %s", study_uid, end.state, end.reason)
            return f"{end.state}: {end.reason}"
        except LeaseLost:
            lease_lost(db, ticket)
            return _lost(study_uid, ticket.job_id)
        except BaseException:
            grace = lease_seconds if retry_grace_seconds is None else retry_grace_seconds
            heartbeat.release(grace)
            raise
    recorded = record_end(
        db,
        ticket,
        StudyState.DONE,
        written=written,
        timings=timings,
        destinations=list(destinations),
        model_versions=versions,
    )
    if not recorded:
        return _lost(study_uid, ticket.job_id)
    log.info(
        "study %s DONE: p=%.3f, %d lesion(s), priority %d",
        study_uid,
        written.findings.screening_probability,
        len(written.findings.lesions),
        written.findings.priority,
    )
    return "DONE"


def _lost(study_uid: str, job_id: int) -> str:
    log.warning("study %s: job %d's lease was lost; its result is not recorded", study_uid, job_id)
    return "LEASE_LOST: the study was queued again; this run's result is not recorded"
