"""Celery tasks, served under the names of `db.outbox_tasks.TaskName`: the node's outbox
dispatcher publishes them by name, with a payload dataclass's fields as keyword arguments.

Delivery is at least once (acks_late, redelivered when a worker dies), the work idempotent (see
`processing`). Unexpected errors (a database restart, a full disk) are retried with capped
exponential backoff; when retries run out the study is FAILED with the reason, and stays
visible and retryable (`radai retry STUDY_UID`).
"""

from __future__ import annotations

import logging

from db.outbox_tasks import TaskName
from dicom_io.backoff import backoff_delay
from dicom_io.destinations import Destination, format_destination
from workers import exporting, processing
from workers.app import app, runtime, share_cores
from workers.malloc_tuning import trim_heap
from workers.models import load_grader
from workers.pipeline.analysers import make_analyser
from workers.pipeline.prior import PriorSources

log = logging.getLogger("radai.worker")

MAX_RETRIES = 5
RETRY_BASE, RETRY_CAP = 2.0, 120.0  # seconds


@app.task(name=str(TaskName.PROCESS_STUDY), bind=True, acks_late=True, max_retries=MAX_RETRIES)
def process_study(self, study_uid: str, instances: int | None = None) -> str:  # noqa: ANN001
    """`db.outbox_tasks.ProcessStudy`'s fields are this task's arguments."""
    rt = runtime()
    log.info("study %s: %s", study_uid, share_cores())
    # Should the retry below never arrive, the reaper queues the study once its delay and a
    # lease have passed (db/leases.py).
    delay = backoff_delay(self.request.retries + 1, base=RETRY_BASE, cap=RETRY_CAP)
    try:
        return processing.process_study(
            rt.db,
            study_uid,
            rt.config.outputs_dir,
            destinations=[format_destination(d) for d in rt.config.export_to],
            analyser=make_analyser(
                rt.config.pipeline,
                rt.config.segment_model,
                rt.config.screen_model,
                rt.config.device,
                rt.config.infer_batch,
                rt.config.cad_model,
                rt.config.cad_outliner,
                rt.config.cad_reranker,
            ),
            grader=load_grader(rt.config.malignancy_model, rt.config.device),
            lease_seconds=rt.config.lease_seconds,
            retry_grace_seconds=delay + rt.config.lease_seconds,
            prior_sources=PriorSources(
                destinations=tuple(Destination(*d) for d in rt.config.prior_sources),
                cache_dir=rt.config.prior_cache_dir,
                cache_max_mb=rt.config.prior_cache_mb,
                calling_aet=rt.config.calling_aet,
                archive=rt.archive,
            ),
            archive=rt.archive,
        )
    except Exception as exc:
        if self.request.retries >= MAX_RETRIES:
            reason = f"gave up after {MAX_RETRIES + 1} attempts: {type(exc).__name__}: {exc}"
            log.exception("study %s failed permanently", study_uid)
            processing.fail(rt.db, study_uid, reason[:2000])
            return f"FAILED: {reason}"
        log.warning("study %s: attempt failed (%s); retrying", study_uid, exc)
        # `retries` counts the retries already made: this failure is number retries + 1.
        raise self.retry(exc=exc, countdown=delay) from exc
    finally:
        # The study's arrays are freed by now: their pages go back before the next study.
        trim_heap()


@app.task(name=str(TaskName.EXPORT_OUTPUT), bind=True, acks_late=True, max_retries=None)
def export_output(self, export_id: int) -> str:  # noqa: ANN001
    """`db.outbox_tasks.ExportOutput`'s fields are this task's arguments."""
    rt = runtime()
    delay = exporting.run_export(
        rt.db,
        export_id,
        {format_destination(d): Destination(*d) for d in rt.config.export_to},
        calling_aet=rt.config.calling_aet,
        timeout=rt.config.export_timeout,
        max_attempts=rt.config.export_max_attempts,
        backoff_cap=rt.config.export_backoff_cap,
        deidentified=rt.config.deidentified,
        home=rt.config.home,
    )
    if delay is not None:
        raise self.retry(countdown=delay)
    return "settled"
