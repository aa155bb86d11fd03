"""Series selection: which series of a study a pipeline takes, by rules kept as data (JSON).

A rule set names modality, SOP classes, body part, minimum slice count, maximum slice thickness
and image types to exclude. Every series that fails says why, so that a study with no match ends
NOT_APPLICABLE with a reason a person can read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

RULES_DIR = Path(__file__).with_name("rules")


@dataclass(frozen=True)
class SeriesHeader:
    """What selection needs of one series, taken from its instances' headers."""

    series_uid: str
    modality: str | None
    sop_class_uids: frozenset[str]
    body_part: str | None
    slice_count: int
    slice_thickness_mm: float | None
    image_types: frozenset[str]
    series_number: int | None = None
    description: str | None = None


@dataclass(frozen=True)
class Rules:
    pipeline: str
    modality: tuple[str, ...]
    sop_class_uids: tuple[str, ...]
    body_part_any_of: tuple[str, ...]
    body_part_may_be_missing: bool
    min_slices: int
    max_slice_thickness_mm: float
    image_type_excludes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, path: Path) -> Rules:
        data = json.loads(path.read_text())
        s = data["series"]
        return cls(
            pipeline=data["pipeline"],
            modality=tuple(s["modality"]),
            sop_class_uids=tuple(s["sop_class_uids"]),
            body_part_any_of=tuple(b.upper() for b in s["body_part_any_of"]),
            body_part_may_be_missing=bool(s.get("body_part_may_be_missing", False)),
            min_slices=int(s["min_slices"]),
            max_slice_thickness_mm=float(s["max_slice_thickness_mm"]),
            image_type_excludes=tuple(t.upper() for t in s.get("image_type_excludes", [])),
        )


def load_rules(name: str = "chest_ct") -> Rules:
    return Rules.load(RULES_DIR / f"{name}.json")


def why_not(rules: Rules, series: SeriesHeader) -> str | None:
    """None when the series fits the rules, else the first reason it does not."""
    if series.modality not in rules.modality:
        return f"modality {series.modality or 'missing'} is not {'/'.join(rules.modality)}"
    foreign = series.sop_class_uids - set(rules.sop_class_uids)
    if foreign:
        return f"holds objects of other SOP classes ({', '.join(sorted(foreign))})"
    body = (series.body_part or "").upper()
    if body and body not in rules.body_part_any_of:
        return f"body part {body} is not one of {', '.join(rules.body_part_any_of)}"
    if not body and not rules.body_part_may_be_missing:
        return "body part is missing"
    excluded = series.image_types & set(rules.image_type_excludes)
    if excluded:
        return f"image type {'/'.join(sorted(excluded))} is excluded"
    if series.slice_count < rules.min_slices:
        return f"{series.slice_count} slices, fewer than {rules.min_slices}"
    thick = series.slice_thickness_mm
    if thick is not None and thick > rules.max_slice_thickness_mm + 1e-6:
        return f"slice thickness {thick:g} mm exceeds {rules.max_slice_thickness_mm:g} mm"
    return None


@dataclass(frozen=True)
class Selection:
    chosen: SeriesHeader | None
    reasons: dict[str, str]  # series UID -> why it was not taken

    def explain(self, rules: Rules) -> str:
        if not self.reasons:
            return "the study holds no series"
        parts = [f"series {uid}: {why}" for uid, why in self.reasons.items()]
        return f"no series fits the {rules.pipeline} rules: " + "; ".join(parts)


def select_series(rules: Rules, candidates: list[SeriesHeader]) -> Selection:
    reasons: dict[str, str] = {}
    fitting = []
    for series in candidates:
        reason = why_not(rules, series)
        if reason is None:
            fitting.append(series)
        else:
            reasons[series.series_uid] = reason
    if not fitting:
        return Selection(None, reasons)
    best = max(fitting, key=lambda s: (s.slice_count, -(s.slice_thickness_mm or 99.0)))
    return Selection(best, reasons)
