"""QIDO-RS matched in the database (`dicomweb.index`): for studies sent to a running node, every
search gives the matches the same keys give on the instances' own headers (the PS3.4 matching of
`dicomweb.qido`), on SQLite and PostgreSQL; stored keys are matched without reading a file, a
new study is indexed by the next search, and an unreadable file leaves only its study out."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db import QidoSeries, QidoStudy
from dicom_io.cstore import send_files
from dicomweb import index, qido
from dicomweb.qido import INSTANCE, SERIES, STUDY
from tests.conftest import wait_for
from tests.kit.dicomweb import ct_instance, dicomweb_server, save
from tests.kit.net import HOST

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class SeriesSpec:
    uid: str
    number: int
    datasets: list[Dataset] = field(default_factory=list)


@dataclass
class StudySpec:
    uid: str
    series: list[SeriesSpec] = field(default_factory=list)


def _study(tmp: Path, n_series: tuple[int, ...], **attrs: object) -> StudySpec:
    """A study with len(n_series) series of that many instances; `attrs` on every instance
    (`Modality_2` etc. for one series)."""
    study = StudySpec(generate_uid())
    for k, count in enumerate(n_series, start=1):
        series = SeriesSpec(generate_uid(), k)
        for n in range(1, count + 1):
            ds = ct_instance(study.uid, series.uid, number=n, series_number=k)
            for name, value in attrs.items():
                keyword, _, only = name.partition("_")
                if not only or int(only) == k:
                    setattr(ds, keyword, value)
            if ds.Modality == "MR":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
            series.datasets.append(ds)
        study.series.append(series)
    return study


def _corpus(tmp: Path) -> list[StudySpec]:
    return [
        _study(
            tmp,
            (3, 1),
            Modality_2="MR",
            SeriesDescription_2="AX T2 FLAIR",
            PerformedProcedureStepStartDate="20260101",
        ),
        _study(
            tmp,
            (1,),
            PatientName="ROE^RICHARD",
            PatientID="PID-2",
            StudyDate="20260301",
            StudyTime="083000",
            AccessionNumber="ACC2",
            InstitutionName="GENERAL",
        ),
        _study(tmp, (2,), PatientName=["ZED^ONE", "ZED^TWO"], PatientID="PID-3"),
        _study(
            tmp,
            (1, 2),
            SpecificCharacterSet="ISO_IR 192",
            PatientName="MÜLLER^ÉRIC",
            PatientID="PID-4",
            StudyDate="20251231",
            ReferringPhysicianName="WHO^DR",
            StudyID="S4",
            StudyDescription="Thorax nativ",
            SeriesNumber_2=12,
        ),
        _study(
            tmp,
            (1,),
            PatientName="doe^john",
            PatientID="PID_5",
            AccessionNumber="A%_1",
            StudyDate="20260102",
            StudyTime="120001.5",
        ),
    ]


def _send(studies: list[StudySpec], tmp: Path, port: int) -> dict[str, Path]:
    files = []
    for study in studies:
        for series in study.series:
            files += [save(ds, tmp / "corpus") for ds in series.datasets]
    send_files(files, ("RADAI", HOST, port), calling_aet="TESTSCU")
    return {f.stem: f for f in files}


# What the same keys match on the headers themselves (the answer's computed values set as the
# search used to set them).


def _expected(studies: list[StudySpec], level: str, query: qido.Query) -> list[str]:
    keys = [k for k in query.keys if k.value != ""]
    out = []
    for study in studies:
        first = study.series[0].datasets[0]
        if level == STUDY:
            ds = copy.deepcopy(first)
            ds.ModalitiesInStudy = list(dict.fromkeys(s.datasets[0].Modality for s in study.series))
            ds.NumberOfStudyRelatedInstances = sum(len(s.datasets) for s in study.series)
            ds.NumberOfStudyRelatedSeries = len(study.series)
            if qido.matches(keys, ds, fuzzy=query.fuzzy):
                out.append(study.uid)
            continue
        for series in sorted(study.series, key=lambda s: s.number):
            if level == SERIES:
                ds = copy.deepcopy(series.datasets[0])
                ds.NumberOfSeriesRelatedInstances = len(series.datasets)
                if qido.matches(keys, ds, fuzzy=query.fuzzy):
                    out.append(series.uid)
                continue
            out += [
                str(ds.SOPInstanceUID)
                for ds in series.datasets
                if qido.matches(keys, ds, fuzzy=query.fuzzy)
            ]
    return out


def _found(db, level: str, query: qido.Query) -> list[str]:  # noqa: ANN001
    matches, more = index.search(db, query, level)
    assert not more
    return [{STUDY: m.study_uid, SERIES: m.series_uid, INSTANCE: m.sop_uid}[level] for m in matches]


@pytest.fixture
def indexed(database, node_factory, tmp_path: Path) -> Iterator[dict]:  # noqa: ANN001
    studies = _corpus(tmp_path)
    node = node_factory(database)
    files = _send(studies, tmp_path, node.port)
    yield {"db": database, "studies": studies, "files": files, "node": node}


STUDY_QUERIES = [
    {},
    {"PatientName": "DOE*"},
    {"PatientName": "doe*"},
    {"PatientName": "*^J*"},
    {"PatientName": "D?E^JANE"},
    {"PatientName": "ZED^TWO"},
    {"PatientName": "ZED*"},
    {"PatientName": "MÜLLER*"},
    {"PatientName": "*"},
    {"PatientName": "doe", "fuzzymatching": "true"},
    {"PatientName": "müll^é", "fuzzymatching": "true"},
    {"PatientName": "ZED^T", "fuzzymatching": "true"},
    {"PatientID": "PID-2"},
    {"PatientID": "PID_5"},
    {"PatientID": "PID-?"},
    {"PatientID": "PID-1\\PID-4"},
    {"PatientID": "pid-2"},
    {"AccessionNumber": "A%_1"},
    {"AccessionNumber": "A%*"},
    {"AccessionNumber": "A_*"},
    {"StudyDate": "20260101"},
    {"StudyDate": "20260101-20260301"},
    {"StudyDate": "-20260101"},
    {"StudyDate": "20260102-"},
    {"StudyTime": "0800-0900"},
    {"StudyTime": "1200-1200"},
    {"StudyTime": "120001-"},
    {"ModalitiesInStudy": "MR"},
    {"ModalitiesInStudy": "CT"},
    {"ModalitiesInStudy": "M*"},
    {"ModalitiesInStudy": "MR\\SR"},
    {"ReferringPhysicianName": "WHO*"},
    {"StudyID": "S4"},
    {"StudyDescription": "*nativ"},
    {"NumberOfStudyRelatedInstances": "3"},
    {"NumberOfStudyRelatedSeries": "2"},
    {"InstitutionName": "GENERAL"},  # not stored: matched on the headers
    {"PatientName": "DOE*", "StudyDate": "20260102-"},
    {"PatientID": "PID-1", "ModalitiesInStudy": "MR", "StudyDate": ""},
]
SERIES_QUERIES = [
    {},
    {"Modality": "MR"},
    {"Modality": "C?"},
    {"SeriesNumber": "12"},
    {"SeriesNumber": "12.0"},
    {"SeriesNumber": "1,2"},
    {"SeriesDescription": "*FLAIR"},
    {"PerformedProcedureStepStartDate": "20260101-"},
    {"PatientID": "PID-4"},
    {"PatientName": "ZED^ONE", "Modality": "CT"},
    {"NumberOfSeriesRelatedInstances": "2"},
]
INSTANCE_QUERIES = [
    {},
    {"InstanceNumber": "2"},
    {"InstanceNumber": "1,3"},
    {"SOPClassUID": MR_STORAGE},
    {"Modality": "MR"},
    {"PatientID": "PID-4", "SeriesNumber": "12"},
    {"Rows": "16"},  # not stored: matched on the headers
]


@pytest.mark.parametrize(
    ("level", "queries"),
    [(STUDY, STUDY_QUERIES), (SERIES, SERIES_QUERIES), (INSTANCE, INSTANCE_QUERIES)],
)
def test_searches_match_what_the_headers_match(indexed: dict, level: str, queries: list) -> None:
    nonempty = 0
    for params in queries:
        query = qido.parse_query(list(params.items()))
        expected = _expected(indexed["studies"], level, query)
        assert _found(indexed["db"], level, query) == expected, params
        nonempty += bool(expected)
    assert nonempty >= len(queries) - 3  # the queries do select something


def test_multivalued_and_case_and_escapes_decide_as_on_the_header(indexed: dict) -> None:
    db, studies = indexed["db"], indexed["studies"]

    def uids(**params: str) -> list[str]:
        return _found(db, STUDY, qido.parse_query(list(params.items())))

    assert uids(PatientName="ZED^TWO") == [studies[2].uid]  # the second of two values
    assert uids(PatientName="doe*") == [studies[4].uid]  # case-sensitive, SQLite's LIKE is not
    assert uids(AccessionNumber="A%_1") == [studies[4].uid]
    assert uids(AccessionNumber="A%*") == [studies[4].uid]  # % is a character, not a wildcard
    assert uids(AccessionNumber="ACC_") == []
    assert uids(PatientName="müll^é", fuzzymatching="true") == [studies[3].uid]


def test_paging_with_rows_checked_after_the_database(indexed: dict) -> None:
    db, studies = indexed["db"], indexed["studies"]
    everyone = [s.uid for s in studies]
    for params in ({}, {"PatientName": "*"}):  # paged by SQL / checked in Python, then paged
        pages = []
        for offset in range(0, 6, 2):
            query = qido.parse_query([*params.items(), ("limit", "2"), ("offset", str(offset))])
            matches, more = index.search(db, query, STUDY)
            pages += [m.study_uid for m in matches]
            assert more == (offset + 2 < len(everyone))
        assert pages == everyone, params


def test_stored_answers_equal_the_headers_answers(indexed: dict) -> None:
    db, studies = indexed["db"], indexed["studies"]
    matches, _ = index.search(db, qido.Query(), STUDY)
    tags = qido.answer_tags(STUDY, qido.Query())
    assert tags <= index.answerable(STUDY)
    for m, study in zip(matches, studies, strict=True):
        first = pydicom.dcmread(indexed["files"][str(study.series[0].datasets[0].SOPInstanceUID)])
        assert m.stored is not None
        assert qido.answer_from_json(m.stored, tags, m.extra) == qido.answer(
            first, qido.Query(), tags, m.extra
        )
    doc = qido.answer_from_json(matches[3].stored or {}, tags, matches[3].extra)
    assert doc["00100010"]["Value"] == [{"Alphabetic": "MÜLLER^ÉRIC"}]
    assert doc["00201206"]["Value"] == [2] and doc["00201208"]["Value"] == [3]
    series, _ = index.search(db, qido.Query(), SERIES)
    tags = qido.answer_tags(SERIES, qido.Query(), spans=(STUDY,))
    assert tags <= index.answerable(SERIES)
    for m in series:
        path = m.path
        assert m.stored is not None
        expected = qido.answer(pydicom.dcmread(path), qido.Query(), tags, m.extra)
        assert qido.answer_from_json(m.stored, tags, m.extra) == expected


def test_stored_keys_match_without_reading_a_file_and_new_studies_are_indexed(
    indexed: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = indexed["db"]
    index.search(db, qido.Query(), STUDY)  # indexes what arrived
    read: list[str] = []
    real = index.header
    monkeypatch.setattr(index, "header", lambda path: read.append(str(path)) or real(path))
    for level, queries in ((STUDY, STUDY_QUERIES), (SERIES, SERIES_QUERIES)):
        for params in queries:
            if not {"InstitutionName", "Rows"} & set(params):
                index.search(db, qido.parse_query(list(params.items())), level)
    assert read == []
    index.search(db, qido.parse_query([("InstitutionName", "GENERAL")]), STUDY)
    assert len(read) == len(indexed["studies"])  # a key not stored: one header per study
    read.clear()

    new = _study(tmp_path, (2, 1), PatientID="PID-NEW", Modality_2="MR")
    _send([new], tmp_path / "new", indexed["node"].port)
    matches, _ = index.search(db, qido.parse_query([("PatientID", "PID-NEW")]), STUDY)
    assert [m.study_uid for m in matches] == [new.uid]
    assert len(read) == 2  # its two series' first instances (one is the study's), once
    matches, _ = index.search(db, qido.parse_query([("Modality", "MR")]), SERIES)
    assert new.series[1].uid in [m.series_uid for m in matches]
    assert len(read) == 2
    with db.session() as s:
        assert s.execute(select(func.count()).select_from(QidoStudy)).scalar_one() == 6
        assert s.execute(select(func.count()).select_from(QidoSeries)).scalar_one() == 9


def test_an_unreadable_first_instance_leaves_only_its_study_out(
    database,  # noqa: ANN001
    node_factory,  # noqa: ANN001
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    studies = [_study(tmp_path, (1,), PatientID=f"PID-{k}") for k in range(3)]
    node = node_factory(database)
    _send(studies, tmp_path, node.port)
    first = studies[1].series[0].datasets[0]
    broken = node.archive.instance_path(
        studies[1].uid, studies[1].series[0].uid, first.SOPInstanceUID
    )
    broken.write_bytes(b"not DICOM")
    with caplog.at_level(logging.WARNING, logger="radai.dicomweb"):
        matches, _ = index.search(database, qido.Query(), STUDY)
    assert [m.study_uid for m in matches] == [studies[0].uid, studies[2].uid]
    assert "cannot read the header" in caplog.text and "PID-1" not in caplog.text
    again, _ = index.search(database, qido.parse_query([("PatientID", "PID-2")]), STUDY)
    assert [m.study_uid for m in again] == [studies[2].uid]


def test_the_server_indexes_new_studies_before_anyone_searches(
    database,  # noqa: ANN001
    node_factory,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    node = node_factory(database)

    def rows() -> tuple[int, int]:
        with database.session() as s:
            return (
                s.execute(select(func.count()).select_from(QidoStudy)).scalar_one(),
                s.execute(select(func.count()).select_from(QidoSeries)).scalar_one(),
            )

    with dicomweb_server(database, node.node.store):
        _send([_study(tmp_path, (1, 1)), _study(tmp_path, (2,))], tmp_path, node.port)
        wait_for(lambda: rows() == (2, 3), timeout=30)


def test_migration_0010_downgrades_and_upgrades(database) -> None:  # noqa: ANN001
    from alembic import command
    from sqlalchemy import inspect

    command.downgrade(database.alembic_config(), "0009")
    tables = inspect(database.engine).get_table_names()
    assert "qido_studies" not in tables and "qido_series" not in tables
    database.upgrade()
    tables = inspect(database.engine).get_table_names()
    assert "qido_studies" in tables and "qido_series" in tables
