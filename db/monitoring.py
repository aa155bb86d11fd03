"""Figures for watching the models at work: per model version, how readers judge its findings,
how long studies wait for a result and for a reader, and how often it fails; and how many
studies arrive per day.

A "model version" is what a job records: its pipeline and pipeline version and its
`model_versions` (any dict of model name -> version; the classical baseline today, torch models
later). Jobs that have not finished yet have no `model_versions` and are grouped by pipeline
alone.

Definitions (the dashboard shows them next to the figures):
- A reviewed finding is a lesion of a job's findings with at least one review; its latest review
  counts (a re-review replaces the earlier decision). Whole-study reviews are counted apart.
  Acceptance rate = accepted / reviewed; amended findings are neither accepted nor rejected.
- Turnaround of a finished (DONE) job: received = the study's first instance, result = the job's
  finish, reviewed = the first review of that job. Medians and 90th percentiles (linear
  interpolation between closest ranks) in seconds.
- Failures count jobs whose current state is FAILED or NOT_APPLICABLE, by reason (a job retried
  successfully is DONE, so its earlier failure is not counted); `study_failures` counts studies
  in those states by their recorded reason, including studies that never got a job.

Only aggregates are returned: no patient names or IDs, no study UIDs.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache

from sqlalchemy import Text, case, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db.models import Job, Review, ReviewDecision, Study, StudyState


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Spread:
    """Median and 90th percentile of durations in seconds, over `n` jobs."""

    n: int
    median_s: float | None
    p90_s: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Spread:
        return cls(len(seconds), percentile(seconds, 50), percentile(seconds, 90))


@dataclass
class ModelStats:
    pipeline: str
    pipeline_version: str
    model_versions: dict[str, str]
    jobs: int = 0
    states: dict[str, int] = field(default_factory=dict)
    findings: int = 0  # lesions in finished jobs' findings
    reviewed: int = 0
    accepted: int = 0
    rejected: int = 0
    amended: int = 0
    study_reviews: dict[str, int] = field(default_factory=dict)  # whole-study decision -> count
    received_to_result: Spread = Spread(0, None, None)
    result_to_review: Spread = Spread(0, None, None)
    received_to_review: Spread = Spread(0, None, None)
    failure_reasons: list[tuple[str, str, int]] = field(default_factory=list)  # state, reason, n

    @property
    def label(self) -> str:
        models = ", ".join(f"{n} {v}" for n, v in sorted(self.model_versions.items()))
        base = f"{self.pipeline} {self.pipeline_version}"
        return f"{base} · {models}" if models else base

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.reviewed if self.reviewed else None

    @property
    def failed(self) -> int:
        return self.states.get(StudyState.FAILED, 0)

    @property
    def not_applicable(self) -> int:
        return self.states.get(StudyState.NOT_APPLICABLE, 0)


@dataclass(frozen=True)
class DayCount:
    day: date
    received: int
    states: dict[str, int]  # the current state of the studies received that day


@dataclass(frozen=True)
class Monitoring:
    models: list[ModelStats]  # most jobs first
    per_day: list[DayCount]  # oldest first, days without studies left out
    study_states: dict[str, int]
    studies: int
    # Studies whose current state is FAILED or NOT_APPLICABLE, by reason, whatever the model
    # (a study can fail before any job exists): (state, reason, count), most frequent first.
    study_failures: list[tuple[str, str, int]] = field(default_factory=list)


@lru_cache(maxsize=1024)
def _versions(text: str | None) -> tuple[tuple[str, str], ...]:
    # Jobs share a handful of distinct model_versions texts: each is parsed once, not per job.
    versions = json.loads(text) if text else None
    if not isinstance(versions, dict):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in versions.items()))


def _lesion_count(dialect: str) -> ColumnElement:
    """The number of lesions in a job's findings, counted by the database: decoding every
    job's findings in Python was half the time of this page with 10,000 studies."""
    if dialect == "postgresql":
        lesions = Job.findings["lesions"]
        return case((func.json_typeof(lesions) == "array", func.json_array_length(lesions)))
    return func.json_array_length(Job.findings, "$.lesions")


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return max(0.0, (later - earlier).total_seconds())


def monitoring(session: Session, *, since: datetime | None = None) -> Monitoring:
    """The figures above over studies first received at or after `since` (all when None)."""
    dialect = session.get_bind().dialect.name
    job_query = select(
        Job.id,
        Job.pipeline,
        Job.pipeline_version,
        cast(Job.model_versions, Text).label("model_versions"),
        Job.state,
        Job.error,
        _lesion_count(dialect).label("lesions"),
        Job.finished_at,
        Study.first_received_at,
    ).join(Study, Study.id == Job.study_id)
    review_query = (
        select(Review.job_id, Review.lesion_label, Review.decision, Review.created_at)
        .join(Study, Study.id == Review.study_id)
        .order_by(Review.created_at, Review.id)
    )
    study_query = select(Study.state, Study.first_received_at, Study.error)
    if since is not None:
        job_query = job_query.where(Study.first_received_at >= since)
        review_query = review_query.where(Study.first_received_at >= since)
        study_query = study_query.where(Study.first_received_at >= since)

    # Latest decision per (job, lesion) and the first review time per job, oldest first.
    latest: dict[tuple[int, int | None], str] = {}
    first_review: dict[int, datetime] = {}
    for r in session.execute(review_query):
        latest[(r.job_id, r.lesion_label)] = r.decision
        first_review.setdefault(r.job_id, r.created_at)

    stats: dict[tuple, ModelStats] = {}
    states: dict[tuple, Counter] = defaultdict(Counter)
    reasons: dict[tuple, Counter] = defaultdict(Counter)
    durations: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    job_key: dict[int, tuple] = {}
    for j in session.execute(job_query):
        key = (j.pipeline, j.pipeline_version, _versions(j.model_versions))
        job_key[j.id] = key
        m = stats.get(key)
        if m is None:
            m = stats[key] = ModelStats(j.pipeline, j.pipeline_version, dict(key[2]))
        m.jobs += 1
        states[key][j.state] += 1
        if j.state in (StudyState.FAILED, StudyState.NOT_APPLICABLE):
            reasons[key][(j.state, (j.error or "(no reason recorded)").strip())] += 1
        if j.state != StudyState.DONE:
            continue
        m.findings += j.lesions or 0
        d = durations[key]
        for name, value in (
            ("result", _seconds(j.finished_at, j.first_received_at)),
            ("review", _seconds(first_review.get(j.id), j.finished_at)),
            ("total", _seconds(first_review.get(j.id), j.first_received_at)),
        ):
            if value is not None:
                d[name].append(value)

    for (job_id, lesion), decision in latest.items():
        key = job_key.get(job_id)
        if key is None:
            continue
        m = stats[key]
        if lesion is None:
            m.study_reviews[decision] = m.study_reviews.get(decision, 0) + 1
            continue
        m.reviewed += 1
        if decision == ReviewDecision.ACCEPT:
            m.accepted += 1
        elif decision == ReviewDecision.REJECT:
            m.rejected += 1
        elif decision == ReviewDecision.AMEND:
            m.amended += 1

    for key, m in stats.items():
        m.states = dict(states[key])
        m.failure_reasons = sorted(
            ((state, reason, n) for (state, reason), n in reasons[key].items()),
            key=lambda t: (-t[2], t[0], t[1]),
        )
        d = durations[key]
        m.received_to_result = Spread.of(d["result"])
        m.result_to_review = Spread.of(d["review"])
        m.received_to_review = Spread.of(d["total"])

    days: dict[date, Counter] = defaultdict(Counter)
    study_states: Counter = Counter()
    study_reasons: Counter = Counter()
    for state, received, error in session.execute(study_query):
        days[received.date()][state] += 1
        study_states[state] += 1
        if state in (StudyState.FAILED, StudyState.NOT_APPLICABLE):
            study_reasons[(state, (error or "(no reason recorded)").strip())] += 1
    per_day = [DayCount(day, sum(c.values()), dict(c)) for day, c in sorted(days.items())]
    models = sorted(stats.values(), key=lambda m: (-m.jobs, m.label))
    failures = sorted(
        ((state, reason, n) for (state, reason), n in study_reasons.items()),
        key=lambda t: (-t[2], t[0], t[1]),
    )
    return Monitoring(models, per_day, dict(study_states), sum(study_states.values()), failures)
