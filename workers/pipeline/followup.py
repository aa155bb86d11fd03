"""Follow-up: compare the study with its most recent usable prior (`workers/pipeline/prior.py`).

Takes the job, the current `Volume` and its `Analysis`; gives `FollowUpResult`: for every lesion
a Tracking Unique Identifier (inherited from the prior's matching nodule, else new) and a
Tracking Identifier ("Nodule N"), for matched ones the change since the prior, the study's prior
or the reason none was used, and the growth triage (`ml.runtime.followup.growth_triage`).

The prior is registered onto the current study and nodules matched in the registered frame by
`ml.runtime.followup.follow_up` (the same measurement code as the findings). The prior's lesions
come from its own SEG, not a second analysis: its report named those nodules and gave them
tracking UIDs, re-running a newer model on it could split or lose them, and reading a SEG takes
a fraction of a second where an analysis takes seconds. A prior from a PACS has no radai SEG
and is analysed here. A prior that cannot be used (another patient, not a CT, missing slices,
registration refused) leaves a reason on the study and never fails it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from db.findings import Findings, LesionChange
from db.session import Database
from dicom_io.retrieve import RetrieveError
from dicom_io.series import Volume
from ml.image.morphology import centroid
from ml.runtime import qa
from ml.runtime.followup import (
    FollowUp,
    Registration,
    RegistrationRefused,
    follow_up,
    growth_triage,
    tracking_uid,
)
from workers.pipeline.analysers import Analyser, Analysis
from workers.pipeline.claim import JobTicket
from workers.pipeline.errors import Finished
from workers.pipeline.infer import run_analyser
from workers.pipeline.prior import (
    MAX_CANDIDATES,
    MAX_LOOKED_AT,
    Prior,
    PriorSources,
    PriorUnusable,
    candidates,
    check_same_patient,
    current_study,
    interval_days,
)

log = logging.getLogger("radai.worker.followup")

NO_PRIOR = "no earlier CT of this patient"
NO_PATIENT_ID = "the study has no Patient ID, so no prior can be matched to it"
_NODULE = re.compile(r"^Nodule (\d+)$")


def nodule_id(number: int) -> str:
    """The Tracking Identifier people read; the number stays with the nodule across studies."""
    return f"Nodule {number}"


@dataclass(frozen=True)
class FollowUpResult:
    """What follow-up adds to a study's findings, keyed by the current lesion labels."""

    tracking: dict[int, tuple[str, str]]  # label -> (tracking UID, tracking identifier)
    changes: dict[int, LesionChange] = field(default_factory=dict)
    prior_study_uid: str | None = None
    prior_reason: str | None = None
    follow_up: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None  # growth triage's, where a prior was used
    triage_score: float | None = None
    prior_refs: tuple[str, str, list[tuple[str, str]]] | None = None  # study, series, instances
    seconds: float = 0.0

    def apply(self, findings: Findings) -> Findings:
        """The findings with tracking, changes, the prior and growth triage filled in."""
        lesions = tuple(
            replace(
                les,
                tracking_uid=self.tracking[les.label][0],
                tracking_id=self.tracking[les.label][1],
                change=self.changes.get(les.label),
            )
            for les in findings.lesions
        )
        priority = findings.priority
        score = findings.triage_score
        if self.priority is not None:
            # A growing or new nodule is more urgent than a stable one of the same size: take
            # the more urgent of the size-based and the growth-based triage.
            priority = min(priority, self.priority)
            score = max(score or 0.0, self.triage_score or 0.0)
        return replace(
            findings,
            lesions=lesions,
            priority=priority,
            triage_score=None if score is None else round(float(score), 4),
            prior_study_uid=self.prior_study_uid,
            prior_reason=self.prior_reason,
            follow_up=dict(self.follow_up),
        )


def new_tracking(study_uid: str, labels: Sequence[int]) -> dict[int, tuple[str, str]]:
    """Tracking for a study seen without a prior: each nodule is first seen here."""
    return {label: (tracking_uid(study_uid, label), nodule_id(label)) for label in labels}


def origin_zyx(volume: Volume) -> tuple[float, float, float]:
    """The first voxel in the volume's own (slice normal, column, row) frame, in mm: the frame
    the registration works in (identity direction), shared by both studies of one scanner
    orientation."""
    row, col = np.asarray(volume.row_cosine), np.asarray(volume.column_cosine)
    origin = np.asarray(volume.origin_xyz)
    normal = np.cross(row, col)
    return (float(origin @ normal), float(origin @ col), float(origin @ row))


def run_follow_up(
    db: Database,
    ticket: JobTicket,
    volume: Volume,
    analysis: Analysis,
    analyser: Analyser,
    sources: PriorSources | None = None,
) -> FollowUpResult:
    """Compare with the most recent usable prior; without one, say why. Never raises for a
    prior's problem: the study gets its findings either way."""
    t0 = time.perf_counter()
    labels = [m.label for m in analysis.lesions]
    plain = new_tracking(ticket.study_uid, labels)
    current = current_study(db, ticket.study_id)
    if not (current.patient_id or "").strip():
        return FollowUpResult(plain, prior_reason=NO_PATIENT_ID, seconds=time.perf_counter() - t0)
    reasons: list[str] = []
    tried = 0
    for looked, cand in enumerate(
        candidates(db, ticket.study_id, volume, sources or PriorSources())
    ):
        # Priors that loaded are compared at most MAX_CANDIDATES times (a registration each);
        # ones refused while loading cost less but are bounded too.
        if tried >= MAX_CANDIDATES or looked >= MAX_LOOKED_AT:
            break
        try:
            prior = cand.load()
            tried += 1
            check_same_patient(volume.datasets[0], prior.volume)
            result = compare_with_prior(
                ticket.study_uid, current.study_date, volume, analysis, prior, analyser
            )
        except PriorUnusable as exc:
            reasons.append(f"prior {cand.study_uid}: {exc.reason}")
        except RegistrationRefused as exc:
            reasons.append(f"prior {cand.study_uid}: registration refused: {exc.reason}")
        except RetrieveError as exc:
            reasons.append(f"prior {cand.study_uid}: {exc.reason}")
        except Exception as exc:  # a prior's problem must never fail the current study
            log.exception(
                "study %s: follow-up with prior %s failed", ticket.study_uid, cand.study_uid
            )
            reasons.append(f"prior {cand.study_uid}: follow-up failed ({type(exc).__name__})")
        else:
            if reasons:
                result.follow_up["priors_not_used"] = reasons
            log.info(
                "study %s: compared with prior %s (%s)",
                ticket.study_uid,
                cand.study_uid,
                cand.source,
            )
            return replace(result, seconds=time.perf_counter() - t0)
    reason = "; ".join(reasons) if reasons else NO_PRIOR
    log.info("study %s: no prior used: %s", ticket.study_uid, reason)
    return FollowUpResult(plain, prior_reason=reason[:2000], seconds=time.perf_counter() - t0)


def compare_with_prior(
    study_uid: str,
    study_date: str | None,
    volume: Volume,
    analysis: Analysis,
    prior: Prior,
    analyser: Analyser,
) -> FollowUpResult:
    """Register ``prior`` onto the current study, match its nodules, measure the change."""
    interval = interval_days(study_date, prior.study_date)
    prior_labels, prior_lungs = prior.lesion_labels, prior.lung_mask
    sizes: dict[int, tuple[float, float]] = {}  # prior label -> (volume mm3, max 3D diameter)
    if prior_labels is None:
        report = qa.assess(prior.volume.hu, prior.volume.spacing_zyx)
        if not report.analysable:
            raise PriorUnusable("the prior is not analysable: " + "; ".join(report.reasons))
        try:
            prior_analysis = run_analyser(analyser, prior.volume)
        except Finished as end:
            raise PriorUnusable(f"the prior cannot be analysed: {end.reason}") from None
        prior_labels, prior_lungs = prior_analysis.lesion_labels, prior_analysis.lung_mask
        sizes = {
            m.label: (m.voxel_volume_mm3, m.max_3d_diameter_mm) for m in prior_analysis.lesions
        }
    else:
        sizes = {les.label: (les.volume_mm3, les.max_3d_diameter_mm) for les in prior.lesions}
    prior_ids = {les.label: les.tracking_id for les in prior.lesions if les.tracking_id is not None}
    fu, registration = follow_up(
        volume.hu,
        volume.spacing_zyx,
        analysis.lesion_labels,
        prior.volume.hu,
        prior.volume.spacing_zyx,
        prior_labels,
        interval,
        current_study_key=study_uid,
        prior_study_key=prior.study_uid,
        current_origin=origin_zyx(volume),
        prior_origin=origin_zyx(prior.volume),
        prior_tracking_uids={
            les.label: les.tracking_uid for les in prior.lesions if les.tracking_uid
        },
        # As booleans without a copy where they are (each is a byte per voxel of a clinical CT).
        current_lungs=np.asarray(analysis.lung_mask, dtype=bool),
        prior_lungs=None if prior_lungs is None else np.asarray(prior_lungs, dtype=bool),
    )
    current_size = {m.label: m.max_3d_diameter_mm for m in analysis.lesions}
    result = _result(study_uid, prior, fu, prior_ids, sizes, current_size, interval)
    offset = lung_z_offset_mm(registration, analysis.lung_mask, volume)
    if offset is not None:
        result.follow_up["registration"]["z_offset_mm"] = round(offset, 2)
    return result


def lung_z_offset_mm(registration: Registration, lungs: np.ndarray, volume: Volume) -> float | None:
    """Where the current lungs' centre lies in the prior, along the slice normal, minus where it
    lies in the current (prior z = current z + offset): what a viewer needs to scroll the two
    series together away from any matched nodule. None without lungs."""
    if not np.any(lungs):
        return None
    centre_idx = centroid(np.asarray(lungs, dtype=bool))
    centre_mm = np.asarray(origin_zyx(volume)) + centre_idx * np.asarray(volume.spacing_zyx)
    return float(registration.to_prior(centre_mm[None, :])[0, 0] - centre_mm[0])


def _result(
    study_uid: str,
    prior: Prior,
    fu: FollowUp,
    prior_ids: dict[int, str],
    prior_sizes: dict[int, tuple[float, float]],
    current_size: dict[int, float],
    interval: float,
) -> FollowUpResult:
    used = [int(m.group(1)) for m in (_NODULE.match(i) for i in prior_ids.values()) if m]
    used += [p.label for p in fu.resolved] + [pc.prior.label for pc in fu.pairs]
    next_number = max(used, default=0) + 1
    tracking: dict[int, tuple[str, str]] = {}
    changes: dict[int, LesionChange] = {}
    for pc in fu.pairs:
        label = pc.current.label
        tracking[label] = (
            pc.tracking_uid,
            prior_ids.get(pc.prior.label, nodule_id(pc.prior.label)),
        )
        prior_volume, prior_d3 = prior_sizes.get(pc.prior.label, (pc.prior.volume_mm3, None))
        d3 = current_size.get(label)
        vdt = pc.doubling_time_days
        changes[label] = LesionChange(
            prior_study_uid=prior.study_uid,
            prior_volume_mm3=round(float(prior_volume), 1),
            volume_change_pct=round(pc.volume_change_pct, 1),
            doubling_time_days=None if vdt is None else round(vdt, 1),
            prior_label=pc.prior.label,
            prior_max_3d_diameter_mm=None if prior_d3 is None else round(float(prior_d3), 1),
            diameter_change_mm=(
                None if prior_d3 is None or d3 is None else round(float(d3 - prior_d3), 1)
            ),
            interval_days=round(interval, 1),
        )
    for lesion in sorted(fu.new, key=lambda les: les.label):
        tracking[lesion.label] = (
            lesion.tracking_uid or tracking_uid(study_uid, lesion.label),
            nodule_id(next_number),
        )
        next_number += 1
    growth = growth_triage(fu)
    summary: dict[str, Any] = {
        "prior_study_date": prior.study_date,
        "prior_source": prior.source,
        "interval_days": round(interval, 1),
        # Volume-equivalent diameters (ml.runtime.followup), the size growth triage uses.
        "sum_diameters_mm": round(fu.sum_diameters_current_mm, 1),
        "sum_diameters_prior_mm": round(fu.sum_diameters_prior_mm, 1),
        "matched": len(fu.pairs),
        "new": len(fu.new),
        "resolved": len(fu.resolved),
        "resolved_tracking_uids": [les.tracking_uid for les in fu.resolved],
        "growth_category": growth.category,
        "growth_reasons": growth.reasons,
        "registration": {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in fu.registration.items()
        },
    }
    series_uid = str(prior.volume.datasets[0].SeriesInstanceUID)
    return FollowUpResult(
        tracking=tracking,
        changes=changes,
        prior_study_uid=prior.study_uid,
        follow_up=summary,
        priority=growth.priority,
        triage_score=growth.probability,
        prior_refs=(prior.study_uid, series_uid, list(prior.sop_refs)),
    )
