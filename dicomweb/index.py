"""Reads of the node's index (studies, series, instances and their archive files) for DICOMweb.

Only the database's exact columns narrow a search here (UID lists, exact IDs, date ranges,
modality); every key is then matched on the instance headers themselves (`qido`), so what the
index holds truncated or altered never decides a match on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Select, func, select

from db.models import Instance, Series, Study
from db.session import Database
from dicomweb.errors import not_found
from dicomweb.qido import INSTANCE, SERIES, STUDY, Query


@dataclass(frozen=True)
class Row:
    """One candidate match: its UIDs, the header file that stands for it and computed values."""

    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    path: str
    extra: dict


def _uids(value: str) -> list[str]:
    return [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]


def _plain(value: str | None) -> bool:
    return bool(value) and not any(c in value for c in "*?\\,")  # type: ignore[operator]


def _narrow_study(stmt: Select, query: Query) -> Select:
    if uids := query.value("StudyInstanceUID"):
        stmt = stmt.where(Study.study_uid.in_(_uids(uids)))
    if _plain(pid := query.value("PatientID")):
        stmt = stmt.where(Study.patient_id == pid)
    if _plain(acc := query.value("AccessionNumber")):
        stmt = stmt.where(Study.accession_number == acc)
    date = query.value("StudyDate")
    if date and re.fullmatch(r"\d{8}", date):
        stmt = stmt.where(Study.study_date == date)
    elif date and re.fullmatch(r"\d{8}?-\d{8}?", date):
        low, _, high = date.partition("-")
        if low:
            stmt = stmt.where(Study.study_date >= low)
        if high:
            stmt = stmt.where(Study.study_date <= high)
    return stmt


def _narrow_series(stmt: Select, query: Query) -> Select:
    if uids := query.value("SeriesInstanceUID"):
        stmt = stmt.where(Series.series_uid.in_(_uids(uids)))
    if _plain(modality := query.value("Modality")):
        stmt = stmt.where(Series.modality == modality)
    return stmt


def _narrow_instance(stmt: Select, query: Query) -> Select:
    if uids := query.value("SOPInstanceUID"):
        stmt = stmt.where(Instance.sop_instance_uid.in_(_uids(uids)))
    if uids := query.value("SOPClassUID"):
        stmt = stmt.where(Instance.sop_class_uid.in_(_uids(uids)))
    return stmt


def studies(db: Database, query: Query) -> list[Row]:
    """Candidate studies in arrival order, each with its counts and first instance's file."""
    first = (
        select(Instance.study_id, func.min(Instance.id).label("first_id"))
        .group_by(Instance.study_id)
        .subquery()
    )
    series_count = (
        select(Series.study_id, func.count(Series.id).label("n"))
        .group_by(Series.study_id)
        .subquery()
    )
    stmt = (
        select(
            Study.study_uid,
            Study.modalities,
            Study.instance_count,
            series_count.c.n,
            Instance.archive_path,
        )
        .join(first, first.c.study_id == Study.id)
        .join(Instance, Instance.id == first.c.first_id)
        .join(series_count, series_count.c.study_id == Study.id)
        .order_by(Study.id)
    )
    stmt = _narrow_study(stmt, query)
    with db.session() as s:
        rows = s.execute(stmt).all()
    return [
        Row(
            study_uid=uid,
            series_uid=None,
            sop_uid=None,
            path=path,
            extra={
                "ModalitiesInStudy": [m for m in (modalities or "").split("\\") if m] or None,
                "NumberOfStudyRelatedSeries": n_series,
                "NumberOfStudyRelatedInstances": n_instances,
            },
        )
        for uid, modalities, n_instances, n_series, path in rows
    ]


def series(db: Database, query: Query, study_uid: str | None = None) -> list[Row]:
    """Candidate series (of one study, or of all that match the study keys)."""
    first = (
        select(Instance.series_id, func.min(Instance.id).label("first_id"))
        .group_by(Instance.series_id)
        .subquery()
    )
    stmt = (
        select(
            Study.study_uid,
            Series.series_uid,
            Series.instance_count,
            Instance.archive_path,
        )
        .join(Study, Study.id == Series.study_id)
        .join(first, first.c.series_id == Series.id)
        .join(Instance, Instance.id == first.c.first_id)
        .order_by(Study.id, Series.series_number, Series.id)
    )
    if study_uid is not None:
        _require_study(db, study_uid)
        stmt = stmt.where(Study.study_uid == study_uid)
    else:
        stmt = _narrow_study(stmt, query)
    stmt = _narrow_series(stmt, query)
    with db.session() as s:
        rows = s.execute(stmt).all()
    return [
        Row(st, se, None, path, {"NumberOfSeriesRelatedInstances": n}) for st, se, n, path in rows
    ]


def instances(
    db: Database, query: Query, study_uid: str | None = None, series_uid: str | None = None
) -> list[Row]:
    """Candidate instances (of a series, a study, or all)."""
    stmt = (
        select(Study.study_uid, Series.series_uid, Instance.sop_instance_uid, Instance.archive_path)
        .join(Study, Study.id == Instance.study_id)
        .join(Series, Series.id == Instance.series_id)
        .order_by(Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    if study_uid is not None:
        _require_study(db, study_uid)
        stmt = stmt.where(Study.study_uid == study_uid)
    else:
        stmt = _narrow_study(stmt, query)
    if series_uid is not None:
        _require_series(db, study_uid, series_uid)
        stmt = stmt.where(Series.series_uid == series_uid)
    else:
        stmt = _narrow_series(stmt, query)
    stmt = _narrow_instance(stmt, query)
    with db.session() as s:
        rows = s.execute(stmt).all()
    return [Row(st, se, sop, path, {}) for st, se, sop, path in rows]


def _require_study(db: Database, study_uid: str) -> None:
    with db.session() as s:
        if s.execute(select(Study.id).where(Study.study_uid == study_uid)).first() is None:
            raise not_found(f"no study {study_uid}")


def _require_series(db: Database, study_uid: str | None, series_uid: str) -> None:
    stmt = select(Series.id).join(Study, Study.id == Series.study_id)
    stmt = stmt.where(Series.series_uid == series_uid)
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    with db.session() as s:
        if s.execute(stmt).first() is None:
            raise not_found(f"no series {series_uid} in study {study_uid}")


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path


def stored(
    db: Database, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[StoredInstance]:
    """The archived instances of a study, series or one instance, in order; 404 if none."""
    stmt = (
        select(
            Study.study_uid,
            Series.series_uid,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax,
            Instance.archive_path,
        )
        .join(Study, Study.id == Instance.study_id)
        .join(Series, Series.id == Instance.series_id)
        .where(Study.study_uid == study_uid)
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    if series_uid is not None:
        stmt = stmt.where(Series.series_uid == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_uid)
    with db.session() as s:
        rows = s.execute(stmt).all()
    if not rows:
        what = sop_uid or series_uid or study_uid
        raise not_found(f"no instance of {what} in study {study_uid}")
    return [StoredInstance(*r[:5], Path(r[5])) for r in rows]


def header(path: str | Path) -> Dataset:
    """An archived instance's dataset without its pixel data."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def matching(
    rows: Sequence[Row], query: Query, level: str, *, sql_exact: bool
) -> Iterator[tuple[Row, Dataset]]:
    """Each candidate whose header (with its computed values) matches every key, from
    `query.offset` on; with `sql_exact` the database already decided and headers are read only
    for the page."""
    from dicomweb.qido import matches

    assert level in (STUDY, SERIES, INSTANCE)
    skip = query.offset
    if sql_exact:
        rows, skip = rows[skip:], 0
    for row in rows:
        ds = header(row.path)
        for keyword, value in row.extra.items():
            if value is not None:
                setattr(ds, keyword, value)
        if sql_exact or matches(query.keys, ds, fuzzy=query.fuzzy):
            if skip:
                skip -= 1
                continue
            yield row, ds
