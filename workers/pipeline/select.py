"""Select the series to analyse by the rules kept as data (`workers/rules/chest_ct.json`).

Takes a `JobTicket`; gives `Selected`, or ends the study NOT_APPLICABLE with the rules' reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select

from db import Instance, Series, StudyState
from db.session import Database
from workers.pipeline.claim import JobTicket
from workers.pipeline.errors import Finished
from workers.selection import SeriesHeader, load_rules, select_series


@dataclass(frozen=True)
class Selected:
    series_uid: str
    files: list[Path]


def choose_series(db: Database, ticket: JobTicket) -> Selected:
    rules = load_rules()
    headers, files = _series_headers(db, ticket.study_id)
    selection = select_series(rules, headers)
    if selection.chosen is None:
        raise Finished(StudyState.NOT_APPLICABLE, selection.explain(rules))
    uid = selection.chosen.series_uid
    return Selected(uid, files[uid])


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
        modalities: set[str | None] = set()
        classes: set[str] = set()
        types: set[str] = set()
        body: str | None = None
        thick: float | None = None
        for file in paths:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
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
