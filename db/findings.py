"""The shape of a job's findings: what the worker writes into `jobs.findings` and what the
dashboard, `radai studies`, monitoring and the SR writer read.

One home for it, with a schema version. Rows written before the version existed (schema 1) read
the same way: every field they lack has a documented default. Readers go through
:meth:`Findings.from_json`; writers through :meth:`Findings.to_json`. Imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 2  # 1: the dicts written before this module; 2: adds "schema" and "pipeline"


class FindingsError(ValueError):
    """Stored findings that no version of the schema can read."""


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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FindingsError(f"unreadable lesion {data!r:.200}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["centroid_zyx"] = list(self.centroid_zyx)
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
        return out

    def lesion(self, label: int) -> Lesion | None:
        return next((les for les in self.lesions if les.label == label), None)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
