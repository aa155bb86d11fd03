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
from dicom_io.archive import ArchiveClient
from workers.pipeline.claim import JobTicket
from workers.pipeline.errors import Finished
from workers.selection import SeriesHeader, load_rules, select_series


@dataclass(frozen=True)
class Selected:
    series_uid: str
    files: list[Path]


def choose_series(
    db: Database, ticket: JobTicket, archive: ArchiveClient | None = None
) -> Selected:
    """With ``archive``, the instances are read by WADO-RS (through its cache), not by path."""
    rules = load_rules()
    headers, files = _series_headers(db, ticket, archive)
    selection = select_series(rules, headers)
    if selection.chosen is None:
        raise Finished(StudyState.NOT_APPLICABLE, selection.explain(rules))
    uid = selection.chosen.series_uid
    return Selected(uid, files[uid])


def _series_headers(
    db: Database, ticket: JobTicket, archive: ArchiveClient | None
) -> tuple[list[SeriesHeader], dict[str, list[Path]]]:
    with db.session() as s:
        rows = s.execute(
            select(
                Series.series_uid,
                Series.series_number,
                Series.series_description,
                Instance.archive_path,
                Instance.sop_instance_uid,
            )
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == ticket.study_id)
        ).all()
    files: dict[str, list[Path]] = {}
    sops: dict[str, list[str]] = {}
    meta: dict[str, tuple] = {}
    for series_uid, number, description, path, sop in rows:
        files.setdefault(series_uid, []).append(Path(path))
        sops.setdefault(series_uid, []).append(sop)
        meta[series_uid] = (number, description)
    if archive is not None:
        for series_uid, uids in sops.items():
            local = archive.series_files(ticket.study_uid, series_uid, uids)
            files[series_uid] = [local[sop] for sop in uids]
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
