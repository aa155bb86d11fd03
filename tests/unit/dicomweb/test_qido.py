"""QIDO-RS query parsing and PS3.4 C.2.2.2 matching on datasets."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicomweb.errors import HttpError
from dicomweb.qido import INSTANCE, MAX_LIMIT, STUDY, answer, answer_tags, matches, parse_query


def _ds(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _match(ds: Dataset, **params: str) -> bool:
    query = parse_query(list(params.items()))
    return matches(query.keys, ds, fuzzy=query.fuzzy)


STUDY_DS = _ds(
    PatientName="DOE^JANE",
    PatientID="PID-1",
    StudyDate="20260115",
    StudyTime="101500",
    StudyInstanceUID="1.2.3",
    ModalitiesInStudy=["CT", "SEG"],
    AccessionNumber="ACC1",
)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"PatientName": "DOE^JANE"}, True),
        ({"PatientName": "doe^jane"}, False),  # case-sensitive unless fuzzy
        ({"PatientName": "DOE*"}, True),
        ({"PatientName": "D?E^JANE"}, True),
        ({"PatientName": "D?E"}, False),
        ({"PatientName": "*JANE"}, True),
        ({"PatientName": "DOE"}, False),  # single value matching is exact
        ({"PatientID": "PID-1"}, True),
        ({"PatientID": "PID-2"}, False),
        ({"StudyDate": "20260115"}, True),
        ({"StudyDate": "20260101-20260131"}, True),
        ({"StudyDate": "20260116-"}, False),
        ({"StudyDate": "-20260115"}, True),
        ({"StudyTime": "1000-1100"}, True),
        ({"StudyTime": "1100-"}, False),
        ({"StudyInstanceUID": "9.9,1.2.3"}, True),
        ({"StudyInstanceUID": "9.9\\8.8"}, False),
        ({"StudyInstanceUID": "1.2.*"}, False),  # no wildcards in UIDs
        ({"ModalitiesInStudy": "SEG"}, True),
        ({"ModalitiesInStudy": "MR"}, False),
        ({"00100020": "PID-1"}, True),  # a tag in hex names the attribute too
        ({"PatientName": ""}, True),  # universal: returned, not matched
        ({"PatientBirthDate": "19700101"}, False),  # absent attributes do not match a value
        ({"PatientName": "DOE*", "PatientID": "PID-2"}, False),  # every key must match
    ],
)
def test_matching(params: dict[str, str], expected: bool) -> None:
    assert _match(STUDY_DS, **params) is expected


def test_fuzzy_name_matching_is_off_unless_asked() -> None:
    assert not _match(STUDY_DS, PatientName="doe")
    assert _match(STUDY_DS, PatientName="doe", fuzzymatching="true")
    assert _match(STUDY_DS, PatientName="do^ja", fuzzymatching="true")
    assert not _match(STUDY_DS, PatientName="jane", fuzzymatching="true")
    assert not _match(STUDY_DS, PatientName="doe", fuzzymatching="false")


def test_numbers_match_as_numbers() -> None:
    ds = _ds(InstanceNumber=7, SeriesNumber=2)
    assert _match(ds, InstanceNumber="7") and _match(ds, InstanceNumber="07")
    assert not _match(ds, InstanceNumber="8")


@pytest.mark.parametrize(
    "params",
    [
        [("limit", "-1")],
        [("limit", "ten")],
        [("offset", "1"), ("offset", "2")],
        [("NotAnAttribute", "x")],
        [("00081111.00081150", "1.2")],  # sequence matching
        [("ReferencedStudySequence", "x")],
        [("fuzzymatching", "yes")],
        [("includefield", "Bogus")],
        [("StudyDate", "2026-01-01-2026-02-01")],
        [("00102222", "x")],  # not a known tag
    ],
)
def test_bad_queries_are_refused_with_400(params: list[tuple[str, str]]) -> None:
    with pytest.raises(HttpError) as err:
        parse_query(params)
    assert err.value.status == 400 and err.value.reason


def test_limit_is_capped_and_paging_parsed() -> None:
    query = parse_query([("limit", "100000"), ("offset", "5")])
    assert (query.limit, query.offset) == (MAX_LIMIT, 5)


def test_answers_carry_defaults_includefields_and_keys_and_no_binary() -> None:
    source = _ds(
        PatientName="DOE^JANE",
        PatientID="PID-1",
        StudyInstanceUID="1.2.3",
        StudyDescription="CHEST",
        SliceThickness=1.0,
        Manufacturer="ACME",
    )
    source.add_new(0x00091010, "LO", "private")
    source.add_new(0x00420011, "OB", b"\x00" * 10)
    query = parse_query([("Manufacturer", ""), ("includefield", "SliceThickness")])
    doc = answer(source, query, answer_tags(STUDY, query), {"NumberOfStudyRelatedSeries": 1})
    assert doc["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
    assert doc["00080070"]["Value"] == ["ACME"]  # a matching key is returned
    assert doc["00180050"]["Value"] == [1.0]  # an includefield
    assert doc["00201206"]["Value"] == [1]
    assert "00080020" in doc and "Value" not in doc["00080020"]  # a default, present and empty
    assert "00091010" not in doc and "00420011" not in doc

    everything = parse_query([("includefield", "all")])
    doc = answer(source, everything, answer_tags(INSTANCE, everything))
    assert doc["00080070"]["Value"] == ["ACME"] and "00420011" not in doc
