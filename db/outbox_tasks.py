"""The tasks the outbox carries: their names and payloads, in one place.

The node publishes outbox messages to Celery by task name and the workers serve those names, so
both sides (and `db.requeue`) take them from here. A payload is a frozen dataclass whose fields
are the task's keyword arguments: `ProcessStudy(study_uid, instances).message(now)` is the outbox
row; `payload_of(row.task, row.payload)` reads one back.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from db.models import OutboxMessage


class TaskName(enum.StrEnum):
    PROCESS_STUDY = "radai.process_study"  # inference, on the pipeline queue
    EXPORT_OUTPUT = "radai.export_output"  # sending results, on the I/O queue


@dataclass(frozen=True)
class _Payload:
    task: ClassVar[TaskName]

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)

    def message(self, now: datetime, study_uid: str | None = None) -> OutboxMessage:
        """The outbox row that publishes this task (due now)."""
        return OutboxMessage(
            task=str(self.task), payload=self.kwargs(), study_uid=study_uid, next_attempt_at=now
        )


@dataclass(frozen=True)
class ProcessStudy(_Payload):
    """Analyse the study as it is now; `instances` is the count when it was declared stable."""

    task: ClassVar[TaskName] = TaskName.PROCESS_STUDY
    study_uid: str
    instances: int | None = None

    def message(self, now: datetime, study_uid: str | None = None) -> OutboxMessage:
        return super().message(now, study_uid or self.study_uid)


@dataclass(frozen=True)
class ExportOutput(_Payload):
    """Send one job's outputs to one destination (an `exports` row)."""

    task: ClassVar[TaskName] = TaskName.EXPORT_OUTPUT
    export_id: int


PAYLOADS: dict[TaskName, type[_Payload]] = {p.task: p for p in (ProcessStudy, ExportOutput)}


def payload_of(task: str, payload: dict) -> ProcessStudy | ExportOutput:
    """The typed payload of an outbox row; ValueError for an unknown task or wrong fields."""
    try:
        kind = PAYLOADS[TaskName(task)]
    except ValueError:
        raise ValueError(f"unknown outbox task {task!r}") from None
    try:
        return kind(**payload)  # type: ignore[return-value]
    except TypeError as exc:
        raise ValueError(f"bad payload for {task}: {exc}") from None
