"""DICOMweb's reads of the node's index: searches (QIDO-RS) matched in the database, and the
archived instances a retrieval (WADO-RS) returns.

The standard QIDO-RS matching attributes of studies and series (PS3.18 table 10.6.1-5) and their
answer fields are kept in `qido_studies` and `qido_series` (db/models.py), as each one's first
archived instance's header has them: every value, untruncated. `refresh` indexes the studies
and series that arrived since the last search (one header each, once). A search then narrows in
SQL and checks each candidate's stored values with the same matching as a header
(`qido.values_match`), so what SQL cannot say exactly (SQLite's case-insensitive LIKE, a
multi-valued attribute, fuzzy names, numbers) is still decided as PS3.4 says; the page is
answered from the stored DICOM JSON. Instance-level keys match on the node's own columns (SOP
Instance and Class UIDs, Instance Number). Only keys on other attributes are matched on the
headers, one file per candidate: the slow path, and the one every key took before.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.models import Instance, QidoSeries, QidoStudy, Series, Study
from db.session import Database
from dicomweb import qido
from dicomweb.errors import not_found
from dicomweb.qido import INSTANCE, SERIES, STUDY, Key, Query

log = logging.getLogger("radai.dicomweb")


def _tag(keyword: str) -> int:
    return int(tag_for_keyword(keyword) or 0)


# Where each key matches ---------------------------------------------------------------------

UID, INT, TEXT, MULTI = "uid", "int", "text", "multi"
Column = Any  # a mapped attribute or an SQL expression (SQLAlchemy types them apart)


@dataclass(frozen=True)
class Attr:
    """A stored attribute: its level, its column and how it holds values.

    uid: one UID; int: an integer (the node's parse); text: DICOM text, values joined by
    backslashes (the row's `multivalued` says when there is more than one); multi: a value list
    joined by backslashes (ModalitiesInStudy)."""

    level: str
    column: Column
    kind: str


_SERIES_OF_STUDY = (
    select(func.count(Series.id)).where(Series.study_id == Study.id).scalar_subquery()
)

STUDY_ATTRS: dict[int, Attr] = {
    _tag("StudyInstanceUID"): Attr(STUDY, Study.study_uid, UID),
    _tag("PatientID"): Attr(STUDY, QidoStudy.patient_id, TEXT),
    _tag("PatientName"): Attr(STUDY, QidoStudy.patient_name, TEXT),
    _tag("StudyDate"): Attr(STUDY, QidoStudy.study_date, TEXT),
    _tag("StudyTime"): Attr(STUDY, QidoStudy.study_time, TEXT),
    _tag("AccessionNumber"): Attr(STUDY, QidoStudy.accession_number, TEXT),
    _tag("ReferringPhysicianName"): Attr(STUDY, QidoStudy.referring_physician_name, TEXT),
    _tag("StudyID"): Attr(STUDY, QidoStudy.study_identifier, TEXT),
    _tag("StudyDescription"): Attr(STUDY, QidoStudy.study_description, TEXT),
    _tag("ModalitiesInStudy"): Attr(STUDY, Study.modalities, MULTI),
    _tag("NumberOfStudyRelatedInstances"): Attr(STUDY, Study.instance_count, INT),
    _tag("NumberOfStudyRelatedSeries"): Attr(STUDY, _SERIES_OF_STUDY, INT),
}
SERIES_ATTRS: dict[int, Attr] = {
    _tag("SeriesInstanceUID"): Attr(SERIES, Series.series_uid, UID),
    _tag("Modality"): Attr(SERIES, QidoSeries.modality, TEXT),
    _tag("SeriesNumber"): Attr(SERIES, QidoSeries.series_number, TEXT),
    _tag("SeriesDescription"): Attr(SERIES, QidoSeries.series_description, TEXT),
    _tag("BodyPartExamined"): Attr(SERIES, QidoSeries.body_part_examined, TEXT),
    _tag("PerformedProcedureStepStartDate"): Attr(SERIES, QidoSeries.pps_start_date, TEXT),
    _tag("PerformedProcedureStepStartTime"): Attr(SERIES, QidoSeries.pps_start_time, TEXT),
    _tag("NumberOfSeriesRelatedInstances"): Attr(SERIES, Series.instance_count, INT),
}
INSTANCE_ATTRS: dict[int, Attr] = {
    _tag("SOPInstanceUID"): Attr(INSTANCE, Instance.sop_instance_uid, UID),
    _tag("SOPClassUID"): Attr(INSTANCE, Instance.sop_class_uid, UID),
    _tag("InstanceNumber"): Attr(INSTANCE, Instance.instance_number, INT),
}
_ATTRS = {
    STUDY: STUDY_ATTRS,
    SERIES: {**STUDY_ATTRS, **SERIES_ATTRS},
    INSTANCE: {**STUDY_ATTRS, **SERIES_ATTRS, **INSTANCE_ATTRS},
}
_MULTIVALUED = {STUDY: QidoStudy.multivalued, SERIES: QidoSeries.multivalued}

# The header values `refresh` stores for each table's text columns, and the tags of the DICOM JSON
# it keeps (what a page is answered from).
_STUDY_COLUMNS = {t: a.column.key for t, a in STUDY_ATTRS.items() if a.kind == TEXT}
_SERIES_COLUMNS = {t: a.column.key for t, a in SERIES_ATTRS.items() if a.kind == TEXT}
STUDY_JSON_TAGS = frozenset(qido.STUDY_FIELDS)
SERIES_JSON_TAGS = frozenset(qido.SERIES_FIELDS) | {_tag("StudyInstanceUID")}


@dataclass
class _Condition:
    attr: Attr
    key: Key
    sql: ColumnElement | None  # what every match meets (None: nothing narrows in SQL)
    exact: bool  # for a single-valued row, sql decides alone


def _uids(value: str) -> list[str]:
    return [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]


def _like(pattern: str) -> str:
    """A DICOM wildcard as a LIKE pattern, escaped with '/'."""
    out = []
    for c in pattern:
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        else:
            out.append("/" + c if c in "%_/" else c)
    return "".join(out)


def _chunks(pattern: str) -> list[str]:
    """The literal ASCII pieces of a pattern that every fuzzy match contains, in lower case."""
    return [p.lower() for p in re.split(r"[*?^]", pattern) if p and p.isascii()]


def _integers(spec: str) -> list[int] | None:
    try:
        numbers = [float(o) for o in spec.split(",")]
    except ValueError:
        return None
    if not all(n.is_integer() for n in numbers):
        return None
    return [int(n) for n in numbers]


def condition(attr: Attr, key: Key, *, fuzzy: bool) -> _Condition:
    """The SQL a key narrows by, and whether it decides alone for single-valued rows."""
    spec, col = key.value, attr.column
    if attr.kind == UID:
        return _Condition(attr, key, col.in_(_uids(spec)), True)
    if attr.kind == INT:
        numbers = _integers(spec)
        return _Condition(attr, key, None if numbers is None else col.in_(numbers), bool(numbers))
    wildcard = "*" in spec or "?" in spec
    if attr.kind == MULTI:
        if key.vr in qido.RANGE_VRS and "-" in spec:
            return _Condition(attr, key, col.is_not(None), False)
        texts = re.split(r"[*?]", spec) if wildcard else spec.split("\\")
        found = [col.contains(t, autoescape=True) for t in texts if t]
        sql = (and_ if wildcard else or_)(*found) if found else col.is_not(None)
        return _Condition(attr, key, sql, False)
    if key.vr in qido.RANGE_VRS and "-" in spec:
        low, _, high = spec.partition("-")
        parts: list[Any] = [col.is_not(None)]
        if low:
            parts.append(col >= low)  # a value's prefix >= low exactly when the value is
        if high:
            parts.append(func.substr(col, 1, len(high)) <= high)
        return _Condition(attr, key, and_(*parts), True)
    if key.vr in qido.NUMERIC_VRS:
        return _Condition(attr, key, col.is_not(None), False)
    if key.vr == "PN" and fuzzy:
        inside = [func.lower(col).contains(c, autoescape=True) for c in _chunks(spec)]
        return _Condition(attr, key, and_(col.is_not(None), *inside), False)
    if wildcard:
        # SQLite's LIKE ignores ASCII case: a superset there, checked in Python after.
        return _Condition(attr, key, col.like(_like(spec), escape="/"), False)
    options = spec.split("\\") if "\\" in spec else [spec]
    return _Condition(attr, key, col.in_(options), True)


def _stored_values(attr: Attr, value: object) -> list[str]:
    if value is None:
        return []
    if attr.kind in (TEXT, MULTI):
        return [v for v in str(value).split("\\") if v]
    return [str(value)]


# Indexing -----------------------------------------------------------------------------------

_refresh_lock = threading.Lock()
# Per database: the (level, id) of studies and series whose first header could not be read; they
# are left out of searches (and tried again when the process restarts).
_unreadable: weakref.WeakKeyDictionary[Database, set[tuple[str, int]]] = weakref.WeakKeyDictionary()
_BATCH = 200  # series (and studies) a round reads before it writes them


def header(path: str | Path) -> Dataset:
    """An archived instance's dataset without its pixel data."""
    return pydicom.dcmread(path, stop_before_pixels=True)


def _row_values(ds: Dataset, columns: dict[int, Any]) -> tuple[dict[str, str | None], bool]:
    values: dict[str, str | None] = {}
    multivalued = False
    for tag, column in columns.items():
        found = qido.values_of(ds, tag)
        multivalued |= len(found) > 1
        values[column] = "\\".join(found) or None
    return values, multivalued


def _stored_json(ds: Dataset, tags: Iterable[int]) -> dict:
    return qido.answer(ds, Query(), set(tags))


def _insert(session: Session, table: type, rows: list[dict]) -> None:
    if not rows:
        return
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(table.__table__).values(rows).on_conflict_do_nothing())  # type: ignore[attr-defined]


def _first_instances(session: Session, group: Column, ids: list[int]) -> dict[int, str]:
    first = (
        select(group, func.min(Instance.id).label("first_id"))
        .where(group.in_(ids))
        .group_by(group)
        .subquery()
    )
    rows = session.execute(
        select(first.c[0], Instance.archive_path).join(Instance, Instance.id == first.c.first_id)
    ).all()
    return {owner: path for owner, path in rows}


def _missing(
    session: Session, level: str, limit: int, unreadable: set[tuple[str, int]]
) -> list[int]:
    if level == STUDY:
        owner, table_key = Study.id, QidoStudy.study_id
    else:
        owner, table_key = Series.id, QidoSeries.series_id
    stmt = select(owner).where(~exists().where(table_key == owner)).order_by(owner).limit(limit)
    skip = [i for lv, i in unreadable if lv == level]
    if skip:
        stmt = stmt.where(owner.not_in(skip))
    return list(session.execute(stmt).scalars())


def _read(
    paths: dict[tuple[str, int], str], unreadable: set[tuple[str, int]]
) -> dict[str, Dataset]:
    headers: dict[str, Dataset] = {}
    for (level, owner), path in paths.items():
        if path in headers:
            continue
        try:
            headers[path] = header(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file must not stop the others
            unreadable.add((level, owner))
            log.warning(
                "DICOMweb index: cannot read the header of %s id %d (%s); not searchable",
                level.lower(),
                owner,
                type(exc).__name__,
            )
    return headers


_COUNTS = select(
    select(func.count()).select_from(Series).scalar_subquery(),
    select(func.count()).select_from(QidoSeries).scalar_subquery(),
    select(func.count()).select_from(Study).scalar_subquery(),
    select(func.count()).select_from(QidoStudy).scalar_subquery(),
)


def _all_indexed(session: Session, unreadable: set[tuple[str, int]]) -> bool:
    """Whether every series and study has its row (or could not be read): one query of four
    counts, much cheaper than looking for the missing (the index's rows are a subset)."""
    series, indexed_series, studies, indexed_studies = session.execute(_COUNTS).one()
    bad_series = sum(1 for level, _ in unreadable if level == SERIES)
    return series == indexed_series + bad_series and studies == indexed_studies + (
        len(unreadable) - bad_series
    )


def refresh(db: Database, stop: threading.Event | None = None) -> int:
    """Index the studies and series not yet in `qido_studies`/`qido_series` from their first
    instance's header, in batches (until `stop` is set); how many rows were added. Cheap when
    nothing is new."""
    added = 0
    with _refresh_lock:
        unreadable = _unreadable.setdefault(db, set())
        while stop is None or not stop.is_set():
            with db.session() as s:
                if _all_indexed(s, unreadable):
                    return added
                series_ids = _missing(s, SERIES, _BATCH, unreadable)
                study_ids = _missing(s, STUDY, _BATCH, unreadable)
                if not series_ids and not study_ids:
                    return added
                paths = {
                    **{
                        (STUDY, k): p
                        for k, p in _first_instances(s, Instance.study_id, study_ids).items()
                    },
                    **{
                        (SERIES, k): p
                        for k, p in _first_instances(s, Instance.series_id, series_ids).items()
                    },
                }
            # Outside a transaction: no database lock is held while files are read.
            headers = _read(paths, unreadable)
            studies, series = [], []
            for (level, owner), path in paths.items():
                ds = headers.get(path)
                if ds is None:
                    continue
                if level == STUDY:
                    values, multi = _row_values(ds, _STUDY_COLUMNS)
                    studies.append(
                        {
                            "study_id": owner,
                            "header_path": path,
                            **values,
                            "multivalued": multi,
                            "attributes": _stored_json(ds, STUDY_JSON_TAGS),
                        }
                    )
                else:
                    values, multi = _row_values(ds, _SERIES_COLUMNS)
                    series.append(
                        {
                            "series_id": owner,
                            "header_path": path,
                            **values,
                            "multivalued": multi,
                            "attributes": _stored_json(ds, SERIES_JSON_TAGS),
                        }
                    )
            # Rows without a first instance (none in practice) are skipped this round.
            for level, ids in ((STUDY, study_ids), (SERIES, series_ids)):
                for owner in ids:
                    if (level, owner) not in paths:
                        unreadable.add((level, owner))
            with db.session() as s:
                _insert(s, QidoStudy, studies)
                _insert(s, QidoSeries, series)
            added += len(studies) + len(series)
    return added


# Searching ----------------------------------------------------------------------------------


@dataclass
class Match:
    """One answer: its UIDs, its stored DICOM JSON (None: read `path`) and computed values."""

    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    path: str
    stored: dict | None
    extra: dict = field(default_factory=dict)


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


def _candidates(level: str, joins: set[str]) -> Select:
    """The ids of one level's rows, in the answer's order, joined to what the keys need."""
    if level == STUDY:
        stmt = select(Study.id).join(QidoStudy, QidoStudy.study_id == Study.id)
        return stmt.order_by(Study.id)
    if level == SERIES:
        stmt = (
            select(Series.id)
            .join(QidoSeries, QidoSeries.series_id == Series.id)
            .join(Study, Study.id == Series.study_id)
        )
        if STUDY in joins:
            stmt = stmt.join(QidoStudy, QidoStudy.study_id == Study.id)
        return stmt.order_by(Study.id, Series.series_number, Series.id)
    stmt = (
        select(Instance.id)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Instance.study_id)
    )
    if SERIES in joins:
        stmt = stmt.join(QidoSeries, QidoSeries.series_id == Series.id)
    if STUDY in joins:
        stmt = stmt.join(QidoStudy, QidoStudy.study_id == Study.id)
    return stmt.order_by(
        Study.id, Series.series_number, Series.id, Instance.instance_number, Instance.id
    )


def _header_path(level: str) -> Column:
    return {
        STUDY: QidoStudy.header_path,
        SERIES: QidoSeries.header_path,
        INSTANCE: Instance.archive_path,
    }[level]


def search(
    db: Database,
    query: Query,
    level: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> tuple[list[Match], bool]:
    """One page of matches (at most `query.limit` from `query.offset`) and whether more follow."""
    assert level in (STUDY, SERIES, INSTANCE)
    if study_uid is not None:
        _require_study(db, study_uid)
    if series_uid is not None:
        _require_series(db, study_uid, series_uid)
    refresh(db)
    attrs = _ATTRS[level]
    conditions: list[_Condition] = []
    header_keys: list[Key] = []
    for key in query.keys:
        if key.value == "":
            continue  # universal: only returned
        if key.tag in attrs:
            conditions.append(condition(attrs[key.tag], key, fuzzy=query.fuzzy))
        else:
            header_keys.append(key)
    joins = {c.attr.level for c in conditions if c.attr.kind in (TEXT, MULTI)}
    stmt = _candidates(level, joins)
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    if series_uid is not None:
        stmt = stmt.where(Series.series_uid == series_uid)
    checked: list[_Condition] = []  # conditions some row must be checked against in Python
    for c in conditions:
        if c.sql is not None:
            stmt = stmt.where(c.sql if c.attr.kind != TEXT else or_(c.sql, _multi(c.attr)))
        if not c.exact or c.attr.kind == TEXT:
            checked.append(c)
            stmt = stmt.add_columns(c.attr.column)
            if c.attr.kind == TEXT:
                stmt = stmt.add_columns(_multi(c.attr))
    if header_keys:
        stmt = stmt.add_columns(_header_path(level))
    in_sql = not header_keys and not checked  # nothing to check row by row: SQL pages
    if in_sql:
        stmt = stmt.offset(query.offset).limit(query.limit + 1)
    with db.session() as s:
        rows = s.execute(stmt).all()
    if in_sql:
        ids = [r[0] for r in rows]
    else:
        ids = list(_confirmed(rows, checked, header_keys, query))
        ids = ids[query.offset : query.offset + query.limit + 1]
    more = len(ids) > query.limit
    return _page(db, level, ids[: query.limit]), more


def _multi(attr: Attr) -> Column:
    return _MULTIVALUED[attr.level]


def _confirmed(
    rows: Sequence, checked: list[_Condition], header_keys: list[Key], query: Query
) -> Iterator[int]:
    """The ids of the rows whose stored values (and, for `header_keys`, headers) match."""
    for row in rows:
        i = 1
        ok = True
        for c in checked:
            value = row[i]
            i += 1
            multi = False
            if c.attr.kind == TEXT:
                multi = bool(row[i])
                i += 1
            if c.exact and not multi:
                continue  # SQL decided
            if not qido.values_match(c.key, _stored_values(c.attr, value), fuzzy=query.fuzzy):
                ok = False
                break
        if ok and header_keys:
            try:
                ds = header(row[i])
            except Exception:  # noqa: BLE001 - an unreadable file matches nothing
                continue
            ok = qido.matches(header_keys, ds, fuzzy=query.fuzzy)
        if ok:
            yield row[0]


def _in_order(rows: Sequence, ids: list[int]) -> list:
    by_id = {r[0]: r for r in rows}
    return [by_id[i] for i in ids if i in by_id]


def _page(db: Database, level: str, ids: list[int]) -> list[Match]:
    if not ids:
        return []
    with db.session() as s:
        if level == STUDY:
            rows = s.execute(
                select(
                    Study.id,
                    Study.study_uid,
                    Study.modalities,
                    Study.instance_count,
                    _SERIES_OF_STUDY,
                    QidoStudy.header_path,
                    QidoStudy.attributes,
                )
                .join(QidoStudy, QidoStudy.study_id == Study.id)
                .where(Study.id.in_(ids))
            ).all()
            return [
                Match(
                    uid,
                    None,
                    None,
                    path,
                    stored,
                    {
                        "ModalitiesInStudy": [m for m in (mods or "").split("\\") if m] or None,
                        "NumberOfStudyRelatedSeries": n_series,
                        "NumberOfStudyRelatedInstances": n_instances,
                    },
                )
                for _, uid, mods, n_instances, n_series, path, stored in _in_order(rows, ids)
            ]
        if level == SERIES:
            rows = s.execute(
                select(
                    Series.id,
                    Study.study_uid,
                    Series.series_uid,
                    Series.instance_count,
                    QidoSeries.header_path,
                    QidoSeries.attributes,
                    QidoStudy.attributes,
                )
                .join(QidoSeries, QidoSeries.series_id == Series.id)
                .join(Study, Study.id == Series.study_id)
                .outerjoin(QidoStudy, QidoStudy.study_id == Study.id)
                .where(Series.id.in_(ids))
            ).all()
            return [
                Match(
                    st,
                    se,
                    None,
                    path,
                    {**study_json, **stored} if study_json is not None else None,
                    {"NumberOfSeriesRelatedInstances": n},
                )
                for _, st, se, n, path, stored, study_json in _in_order(rows, ids)
            ]
        rows = s.execute(
            select(
                Instance.id,
                Study.study_uid,
                Series.series_uid,
                Instance.sop_instance_uid,
                Instance.archive_path,
            )
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Instance.study_id)
            .where(Instance.id.in_(ids))
        ).all()
        return [Match(st, se, sop, path, None) for _, st, se, sop, path in _in_order(rows, ids)]


def answerable(level: str) -> frozenset[int]:
    """The tags a match at `level` can be answered with from its stored DICOM JSON (a series'
    holds its study's too); an instance is answered from its header."""
    if level == STUDY:
        return STUDY_JSON_TAGS
    if level == SERIES:
        return SERIES_JSON_TAGS | STUDY_JSON_TAGS
    return frozenset()


# Retrieving ---------------------------------------------------------------------------------


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
