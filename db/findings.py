"""The shape of a job's findings: what the worker writes into `jobs.findings` and what the
dashboard, `radai studies`, monitoring and the SR writer read.

One home for it, with a schema version. Rows written before the version existed (schema 1) read
the same way: every field they lack has a documented default. Readers go through
:meth:`Findings.from_json`; writers through :meth:`Findings.to_json`. Imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# 1: the dicts written before this module; 2: adds "schema" and "pipeline";
# 3: adds follow-up (a lesion's tracking identity and change since the prior study)
SCHEMA_VERSION = 3


class FindingsError(ValueError):
    """Stored findings that no version of the schema can read."""


@dataclass(frozen=True)
class LesionChange:
    """How a lesion changed since the same nodule in the prior study (matched in the registered
    frame). ``doubling_time_days`` is None where the volume did not grow (or the interval is 0)."""

    prior_study_uid: str
    prior_volume_mm3: float
    volume_change_pct: float
    doubling_time_days: float | None = None
    prior_label: int | None = None  # the nodule's segment number in the prior's SEG
    prior_max_3d_diameter_mm: float | None = None
    diameter_change_mm: float | None = None
    interval_days: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LesionChange:
        try:
            return cls(
                prior_study_uid=str(data["prior_study_uid"]),
                prior_volume_mm3=float(data["prior_volume_mm3"]),
                volume_change_pct=float(data["volume_change_pct"]),
                doubling_time_days=_opt_float(data.get("doubling_time_days")),
                prior_label=None if data.get("prior_label") is None else int(data["prior_label"]),
                prior_max_3d_diameter_mm=_opt_float(data.get("prior_max_3d_diameter_mm")),
                diameter_change_mm=_opt_float(data.get("diameter_change_mm")),
                interval_days=_opt_float(data.get("interval_days")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FindingsError(f"unreadable lesion change {data!r:.200}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lesion:
    """One lesion call that the pipeline kept, measured on the original grid.

    ``label`` is its segment number in the SEG (1-based among lesions); ``slice_index`` the
    0-based index of its centroid's slice in the analysed series, ordered as the series loader
    orders it (the viewer uses the same loader, so it is the viewer's index too)."""

    label: int
    volume_mm3: float
    max_3d_diameter_mm: float
    max_2d_axial_diameter_mm: float
    slice_index: int
    centroid_zyx: tuple[float, float, float]
    mean_hu: float | None = None
    location: str | None = None
    screening_probability: float | None = None  # absent for results before screener 2.0.0
    # The estimated probability that LIDC readers would rate it 4-5 of 5 for malignancy (their
    # impression, not pathology); absent where no malignancy model ran.
    malignancy_score: float | None = None
    # Follow-up (schema 3): the TID 1500 Tracking Unique Identifier, the same for one nodule in
    # every study of the patient, and its human-readable Tracking Identifier; ``change`` only
    # where the nodule was matched to one in the prior study.
    tracking_uid: str | None = None
    tracking_id: str | None = None
    change: LesionChange | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lesion:
        try:
            centroid = tuple(float(c) for c in data["centroid_zyx"])
            if len(centroid) != 3:
                raise ValueError("centroid_zyx must have three coordinates")
            return cls(
                label=int(data["label"]),
                volume_mm3=float(data["volume_mm3"]),
                max_3d_diameter_mm=float(data["max_3d_diameter_mm"]),
                max_2d_axial_diameter_mm=float(data["max_2d_axial_diameter_mm"]),
                slice_index=int(data["slice_index"]),
                centroid_zyx=centroid,  # type: ignore[arg-type]
                mean_hu=_opt_float(data.get("mean_hu")),
                location=data.get("location"),
                screening_probability=_opt_float(data.get("screening_probability")),
                malignancy_score=_opt_float(data.get("malignancy_score")),
                tracking_uid=data.get("tracking_uid"),
                tracking_id=data.get("tracking_id"),
                change=(
                    None if data.get("change") is None else LesionChange.from_json(data["change"])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FindingsError(f"unreadable lesion {data!r:.200}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["centroid_zyx"] = list(self.centroid_zyx)
        out["change"] = None if self.change is None else self.change.to_json()
        return out


@dataclass(frozen=True)
class Findings:
    """A study's result: the study-level scores, the lesions, and where the evidence is."""

    screening_probability: float
    priority: int
    lung_volume_ml: float
    lesions: tuple[Lesion, ...] = ()
    triage_score: float | None = None
    series_uid: str | None = None
    slices: int | None = None
    saliency_path: str | None = None
    saliency_method: str | None = None
    input_qa: dict[str, Any] = field(default_factory=dict)
    not_for_clinical_use: bool = True
    pipeline: str | None = None  # the analyser that ran ("models", "baseline"); None before v2
    # Follow-up (schema 3): the prior study compared with, or why none was (e.g. "no earlier CT
    # of this patient", "registration refused: no overlap"); both None before schema 3.
    prior_study_uid: str | None = None
    prior_reason: str | None = None
    # Study-level follow-up figures (sum of diameters now and then, new and resolved nodules,
    # the registration's quality report); empty where no prior was used.
    follow_up: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Findings | None:
        """Findings from a stored dict (any schema up to this one); None for no findings."""
        if not data:
            return None
        schema = int(data.get("schema", 1))
        if schema > SCHEMA_VERSION:
            raise FindingsError(
                f"findings schema {schema} is newer than this code reads ({SCHEMA_VERSION})"
            )
        try:
            return cls(
                screening_probability=float(data["screening_probability"]),
                priority=int(data["priority"]),
                lung_volume_ml=float(data["lung_volume_ml"]),
                lesions=tuple(Lesion.from_json(x) for x in data.get("lesions") or ()),
                triage_score=_opt_float(data.get("triage_score")),
                series_uid=data.get("series_uid"),
                slices=None if data.get("slices") is None else int(data["slices"]),
                saliency_path=data.get("saliency_path"),
                saliency_method=data.get("saliency_method"),
                input_qa=dict(data.get("input_qa") or {}),
                not_for_clinical_use=bool(data.get("not_for_clinical_use", True)),
                pipeline=data.get("pipeline"),
                prior_study_uid=data.get("prior_study_uid"),
                prior_reason=data.get("prior_reason"),
                follow_up=dict(data.get("follow_up") or {}),
                schema=SCHEMA_VERSION,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FindingsError):
                raise
            raise FindingsError(f"unreadable findings: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["lesions"] = [les.to_json() for les in self.lesions]
        out["input_qa"] = dict(self.input_qa)
        out["follow_up"] = dict(self.follow_up)
        return out

    def lesion(self, label: int) -> Lesion | None:
        return next((les for les in self.lesions if les.label == label), None)

    def tracked(self, tracking_uid: str) -> Lesion | None:
        """The lesion carrying this Tracking Unique Identifier, if any."""
        return next((les for les in self.lesions if les.tracking_uid == tracking_uid), None)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
