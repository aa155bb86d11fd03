"""A corpus of hostile and unusual input, generated here, sent to one running node over DICOM
(on SQLite and on PostgreSQL): each case gets the specific C-STORE status it must (or its
association is closed), leaves a record (an `ingest_failures` row with the bytes in quarantine;
or the stored instance, with a flag and an audit entry where the study needs a person's look;
for network-level cases the listener's error log line), and crashes nothing; the same
association goes on serving, and after the whole corpus a normal study is still received and
queued.

The cases of `tests/test_bad_input.py` are part of the corpus (`bad_input/...`). Cases this corpus
found wrong, fixed in the node: a stream cut inside an element header was stored (as an image
without pixel data); a UID attribute encoded with another VR, an unknown VR, native pixel data
under a JPEG transfer syntax and encapsulated pixel data under a native one were stored; two
patients under one Study Instance UID were merged silently; on PostgreSQL a NUL inside a text
value and an IS value beyond 32 bits were answered 0xA703 (cannot record) instead of stored; a
value too long for its VR (sent as UN) was stored as a Python bytes repr, a multi-valued one as a
list repr, and NULs vanished from names without a trace.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from sqlalchemy import select

from db import Instance, Study, StudyState
from db.audit import AuditEntry
from db.session import Database
from dicom_node import statuses
from dicom_node.archive import Archive
from dicom_node.samples import sample_study_uid
from dicom_node.server import NodeConfig
from dicom_node.service import NodeService
from tests.conftest import RecordingPublisher, _make_pg, storescu, wait_for
from tests.helpers import CT_IMAGE, ct_dataset, encode, failures, part10, raw_association
from tests.integration import test_bad_input

SR_TEXT = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
PDF = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF
ROOT = "1.2.826.0.1.3680043.8.498.7"
STUDY, SERIES = f"{ROOT}.1", f"{ROOT}.2"
CONTROL_STUDY, CONTROL_SERIES = f"{ROOT}.3", f"{ROOT}.4"
MIXED_STUDY = f"{ROOT}.5"
MAX_BYTES = 4_000_000
NETWORK_TIMEOUT = 3.0
SECRETS = ("HOSTILE^PATIENT", "SECRET-ID-4711")

CONTEXTS = [
    (sop, ts)
    for sop in (CT_IMAGE, SR_TEXT, GSPS, PDF)
    for ts in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,
    )
]


@dataclass
class Case:
    """One input: `data` (a Part 10 stream) sent in one C-STORE, or `run` (raw network
    behaviour) instead; `expected` is the C-STORE status, None where no C-STORE completes."""

    data: bytes = b""
    expected: int | None = None
    run: Callable[[NodeService], None] | None = None
    check: Callable[[Database], None] | None = None  # further checks of what was recorded
    before: bytes = b""  # a valid instance the case builds on, sent first (must succeed)
    uid: str = field(default="")


def _uid(n: int) -> str:
    return f"{ROOT}.100.{n}"


def _ct(n: int, study: str = STUDY, **changes) -> tuple[Dataset, str]:  # noqa: ANN003
    uid = _uid(n)
    ds = ct_dataset(study, SERIES, uid)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds, uid


def _case(
    ds: Dataset,
    uid: str,
    expected: int,
    *,
    sop: str = CT_IMAGE,
    ts: str = ExplicitVRLittleEndian,
    body: bytes | None = None,
    **kw,  # noqa: ANN003
) -> Case:
    data = part10(encode(ds) if body is None else body, sop, uid, ts)
    return Case(data=data, expected=expected, uid=uid, **kw)


def _explicit(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element, its length as given (it may lie)."""
    length = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OL", b"OV"):
        return head + b"\0\0" + struct.pack("<L", length) + value
    return head + struct.pack("<H", length) + value


def _splice(ds: Dataset, tag: int, raw: bytes) -> bytes:
    """The dataset's encoding with `raw` in place of element `tag` (kept in tag order)."""
    before, after = Dataset(), Dataset()
    for elem in ds:
        if " or " in elem.VR:  # resolved from other elements when the whole set is written
            elem = DataElement(elem.tag, "OW", elem.value)
        if elem.tag < tag:
            before.add(elem)
        elif elem.tag > tag:
            after.add(elem)
    return encode(before) + raw + encode(after)


def _nested(depth: int) -> Dataset:
    item = Dataset()
    item.CodeValue = "LEAF"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([item])
        item = outer
    return item


def _non_image(n: int, sop: str, modality: str) -> tuple[Dataset, str]:
    uid = _uid(n)
    ds = Dataset()
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = f"{ROOT}.200.{n}"
    ds.Modality = modality
    ds.PatientName = "HOSTILE^PATIENT"
    ds.PatientID = "SECRET-ID-4711"
    return ds, uid


def _stored(uid: str) -> Callable[[Database], None]:
    def check(db: Database) -> None:
        with db.session() as s:
            assert s.execute(select(Instance).where(Instance.sop_instance_uid == uid)).scalar()

    return check


def _flagged_for_mixed_patients(uid: str) -> Callable[[Database], None]:
    def check(db: Database) -> None:
        with db.session() as s:
            study = s.execute(select(Study).where(Study.study_uid == MIXED_STUDY)).scalar_one()
            entries = s.execute(
                select(AuditEntry).where(
                    AuditEntry.study_uid == MIXED_STUDY,
                    AuditEntry.action == "study.patients_mixed",
                )
            ).scalars()
            details = [e.detail for e in entries]
        assert study.flagged and "Patient ID" in (study.flag_reason or ""), study.flag_reason
        assert [f["kind"] for f in study.flags] == ["patients_mixed"]
        assert study.hold_reason  # it will be HELD, not STABLE, once quiet
        assert study.instance_count == 2
        assert [d["sop_instance_uid"] for d in details] == [uid]
        # The audit trail names the instance, not the patients.
        assert not any("OTHER-PATIENT" in str(d) or "SECRET" in str(d) for d in details)

    return check


def _altered(db: Database, study_uid: str, sop_uid: str) -> tuple[Study, list[dict]]:
    with db.session() as s:
        study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        [entry] = s.execute(
            select(AuditEntry).where(
                AuditEntry.study_uid == study_uid,
                AuditEntry.action == "instance.values_altered",
            )
        ).scalars()
    assert entry.detail["sop_instance_uid"] == sop_uid
    return study, entry.detail["changes"]


def _truncated_and_flagged(uid: str, study_uid: str) -> Callable[[Database], None]:
    def check(db: Database) -> None:
        study, changes = _altered(db, study_uid, uid)
        assert study.study_description == "D" * 64
        with db.session() as s:
            series = s.execute(select(Instance).where(Instance.sop_instance_uid == uid)).scalar()
            from db import Series

            described = s.get(Series, series.series_id).series_description
        assert described == "S" * 64  # decoded from UN, not "b'SSSS..."
        assert {(c["attribute"], c["change"], c["received"], c["kept"]) for c in changes} == {
            ("StudyDescription", "truncated", 5000, 64),
            ("SeriesDescription", "truncated", 100_000, 64),
        }
        kinds = sorted(f["kind"] for f in study.flags)
        assert kinds == ["value_truncated", "value_truncated"] and study.flagged
        assert all(f["at"] for f in study.flags)
        assert "StudyDescription longer than the 64 characters LO allows" in study.flag_reason

    return check


def _nul_removal_recorded(uid: str, study_uid: str) -> Callable[[Database], None]:
    def check(db: Database) -> None:
        study, changes = _altered(db, study_uid, uid)
        assert study.patient_name == "NUL^INSIDE"
        assert changes == [
            {"attribute": "PatientName", "change": "nul_removed", "received": 1, "kept": 10}
        ]
        assert [f["kind"] for f in study.flags] == ["characters_removed"]
        assert "INSIDE" not in str(changes) + str(study.flags)  # never the value itself

    return check


def _patient_id(study_uid: str, expected: str) -> Callable[[Database], None]:
    def check(db: Database) -> None:
        with db.session() as s:
            study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        assert study.patient_id == expected, study.patient_id

    return check


def _patient_name(uid: str, expected: str) -> Callable[[Database], None]:
    def check(db: Database) -> None:
        with db.session() as s:
            study_id = s.execute(
                select(Instance.study_id).where(Instance.sop_instance_uid == uid)
            ).scalar_one()
            name = s.get(Study, study_id).patient_name
        assert name == expected, name

    return check


# Network behaviour --------------------------------------------------------------------------


def _stall(node: NodeService) -> None:
    """An established association that sends half a P-DATA-TF PDU and then nothing: the node
    must drop it after its network timeout, store nothing and leave no partial file."""
    from tests.system.test_network_faults import _stall as stall

    server = node.node._server
    assoc = stall(node.port)
    try:
        wait_for(lambda: len(server.active_associations) >= 1, timeout=10)
        held = list(server.active_associations)
        wait_for(lambda: all(a.is_aborted or not a.is_alive() for a in held), timeout=15)
    finally:
        assoc.abort()


def _flood(node: NodeService) -> None:
    """30 connections at once (garbage, silence, a valid A-ASSOCIATE-RQ), then all hang up."""
    from tests.system.test_network_faults import _association_request
    from tests.system.test_network_faults import _flood as flood_port

    flood_port(node.port, _association_request(), n=30)
    server = node.node._server
    wait_for(lambda: len(server.active_associations) == 0, timeout=NETWORK_TIMEOUT + 20)


# The corpus ---------------------------------------------------------------------------------


def _corpus() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name, (data, expected) in test_bad_input.CASES.items():
        cases[f"bad_input/{name}"] = Case(data=data, expected=expected)

    n = iter(range(1, 1000))
    C000, C001, A901 = statuses.CANNOT_UNDERSTAND, statuses.MISSING_UID, statuses.PIXEL_DATA_LENGTH

    # Truncation and lengths that lie.
    ds, uid = _ct(next(n))
    cases["empty_dataset"] = _case(ds, uid, C000, body=b"")
    ds, uid = _ct(next(n))
    cases["truncated_in_element_header"] = _case(ds, uid, C000, body=encode(ds)[: -(32 + 5)])
    ds, uid = _ct(next(n))
    body = _splice(ds, 0x00100010, _explicit(0x00100010, b"PN", b"HOSTILE^PATIENT ", 6))
    cases["length_shorter_than_value"] = _case(ds, uid, C000, body=body)
    ds, uid = _ct(next(n))
    body = _splice(ds, 0x00100010, _explicit(0x00100010, b"PN", b"", 0xFFFF))
    cases["length_beyond_the_end"] = _case(ds, uid, C000, body=body)
    ds, uid = _ct(next(n))
    body = _splice(ds, 0x00081030, _explicit(0x00081030, b"UT", b"X" * 8, 0xFFFFFFFF))
    cases["undefined_length_text"] = _case(ds, uid, C000, body=body)

    # Wrong VRs.
    ds, uid = _ct(next(n))
    ds.add_new(0x0020000D, "US", 12849)
    cases["study_uid_as_binary_us"] = _case(ds, uid, C001)
    ds, uid = _ct(next(n))
    body = _splice(ds, 0x00100020, _explicit(0x00100020, b"ZZ", b"SECRET-ID-4711"))
    cases["unknown_vr"] = _case(ds, uid, C000, body=body)
    ds, uid = _ct(next(n))
    ds.add_new(0x00280010, "LO", "FOUR")
    cases["rows_as_text"] = _case(ds, uid, A901)

    # Huge, negative or overflowing dimensions.
    ds, uid = _ct(next(n))
    ds.add_new(0x00280010, "SS", -4)
    cases["rows_negative_signed"] = _case(ds, uid, A901)
    ds, uid = _ct(next(n))
    ds.add_new(0x00280010, "UL", 0xFFFFFFFF)
    cases["rows_overflow_ul"] = _case(ds, uid, A901)
    ds, uid = _ct(next(n))
    ds.add_new(0x00280010, "US", [4, 4])
    cases["rows_two_values"] = _case(ds, uid, A901)
    ds, uid = _ct(next(n), NumberOfFrames="2147483647")
    cases["frames_huge"] = _case(ds, uid, A901)
    ds, uid = _ct(next(n), NumberOfFrames="-1")
    cases["frames_negative"] = _case(ds, uid, A901)
    ds, uid = _ct(next(n), BitsAllocated=0)
    cases["bits_allocated_zero"] = _case(ds, uid, A901)
    ds, uid = _ct(next(n))
    ds.PixelData = b"\x01\x00" * 17
    cases["pixel_data_too_long"] = _case(ds, uid, A901)

    # Transfer syntaxes that do not match the data.
    ds, uid = _ct(next(n))
    cases["explicit_body_sent_as_implicit"] = _case(
        ds, uid, C000, ts=ImplicitVRLittleEndian, body=encode(ds)
    )
    ds, uid = _ct(next(n))
    cases["little_endian_body_sent_as_big_endian"] = _case(
        ds, uid, C000, ts=ExplicitVRBigEndian, body=encode(ds)
    )
    ds, uid = _ct(next(n))
    cases["plain_body_sent_as_deflated"] = _case(
        ds, uid, C000, ts=DeflatedExplicitVRLittleEndian, body=encode(ds)
    )
    ds, uid = _ct(next(n))
    cases["native_pixels_sent_as_jpeg"] = _case(ds, uid, C000, ts=JPEGBaseline8Bit)
    ds, uid = _ct(next(n))
    fragments = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x20\x00\x00\x00"
    fragments += b"\x01\x00" * 16 + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    del ds.PixelData
    body = encode(ds) + _explicit(0x7FE00010, b"OB", fragments[:0], 0xFFFFFFFF) + fragments
    cases["encapsulated_pixels_in_native_syntax"] = _case(ds, uid, C000, body=body)

    # Objects that are not images: stored (the worker decides NOT_APPLICABLE later).
    ds, uid = _non_image(next(n), SR_TEXT, "SR")
    ds.ValueType, ds.ContentSequence = "CONTAINER", Sequence([])
    cases["structured_report"] = _case(ds, uid, statuses.SUCCESS, sop=SR_TEXT, check=_stored(uid))
    ds, uid = _non_image(next(n), GSPS, "PR")
    ds.PresentationLUTShape = "IDENTITY"
    cases["presentation_state"] = _case(ds, uid, statuses.SUCCESS, sop=GSPS, check=_stored(uid))
    ds, uid = _non_image(next(n), PDF, "DOC")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    cases["encapsulated_pdf"] = _case(ds, uid, statuses.SUCCESS, sop=PDF, check=_stored(uid))
    ds, uid = _non_image(next(n), PDF, "DOC")
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    body = encode(ds) + _explicit(0x00420011, b"OB", b"%PDF-1.4\n", 10_000)
    cases["encapsulated_pdf_length_lies"] = _case(ds, uid, C000, sop=PDF, body=body)

    # One study, two patients: stored, and the study flagged for a person to look at.
    ds, uid = _ct(next(n), study=MIXED_STUDY)
    first = part10(encode(ds), CT_IMAGE, uid)
    ds2, uid2 = _ct(next(n), study=MIXED_STUDY, PatientID="OTHER-PATIENT-0815")
    cases["study_mixing_patients"] = Case(
        data=part10(encode(ds2), CT_IMAGE, uid2),
        expected=statuses.SUCCESS,
        uid=uid2,
        check=_flagged_for_mixed_patients(uid2),
        before=first,
    )

    # Character sets: decoded, stored, never a crash.
    ds, uid = _ct(next(n), study=f"{ROOT}.10")
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    cases["charset_iso2022_ir87"] = _case(
        ds, uid, statuses.SUCCESS, check=_patient_name(uid, "Yamada^Tarou=山田^太郎=やまだ^たろう")
    )
    ds, uid = _ct(next(n), study=f"{ROOT}.6")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Zoë=Мюллер^Зоя"
    cases["charset_utf8"] = _case(
        ds, uid, statuses.SUCCESS, check=_patient_name(uid, "Müller^Zoë=Мюллер^Зоя")
    )
    ds, uid = _ct(next(n), study=f"{ROOT}.7")
    ds.SpecificCharacterSet = "ISO_IR 192"
    body = _splice(ds, 0x00100010, _explicit(0x00100010, b"PN", b"Bad\xff\xfeUTF8"))
    cases["charset_utf8_invalid_bytes"] = _case(ds, uid, statuses.SUCCESS, body=body)
    ds, uid = _ct(next(n), study=f"{ROOT}.8")
    ds.SpecificCharacterSet = "ISO_IR 999"
    body = _splice(ds, 0x00100010, _explicit(0x00100010, b"PN", b"Caf\xe9^Ren\xe9 "))
    cases["charset_unknown"] = _case(ds, uid, statuses.SUCCESS, body=body, check=_stored(uid))
    ds, uid = _ct(next(n), study=f"{ROOT}.9")
    body = _splice(ds, 0x00100010, _explicit(0x00100010, b"PN", b"NUL\x00^INSIDE"))
    cases["nul_in_text"] = _case(
        ds, uid, statuses.SUCCESS, body=body, check=_nul_removal_recorded(uid, f"{ROOT}.9")
    )

    # Values that do not fit the database.
    ds, uid = _ct(next(n), InstanceNumber="99999999999", SeriesNumber="-99999999999")
    cases["integers_beyond_32_bits"] = _case(ds, uid, statuses.SUCCESS, check=_stored(uid))
    # Values beyond their VR's maximum length (PS3.5 table 6.2-1): identity refused, the rest
    # stored truncated with a flag; never a Python repr (found: a 100,000-character name, which
    # an explicit-VR writer must send as UN, was stored as "b'AAAA...").
    ds, uid = _ct(next(n), PatientName="X" * 5000 + "^Y")
    cases["overlong_patient_name"] = _case(ds, uid, statuses.VALUE_TOO_LONG)
    ds, uid = _ct(next(n), PatientName="A" * 100_000)
    cases["overlong_patient_name_sent_as_un"] = _case(ds, uid, statuses.VALUE_TOO_LONG)
    ds, uid = _ct(next(n), PatientID="7" * 65)
    cases["overlong_patient_id"] = _case(ds, uid, statuses.VALUE_TOO_LONG)
    ds, uid = _ct(next(n), study=f"{ROOT}.11", StudyDescription="D" * 5000)
    ds.SeriesInstanceUID, ds.SeriesDescription = f"{ROOT}.13", "S" * 100_000
    cases["overlong_descriptions"] = _case(
        ds, uid, statuses.SUCCESS, check=_truncated_and_flagged(uid, f"{ROOT}.11")
    )
    ds, uid = _ct(next(n), study=f"{ROOT}.12", PatientID=["ID-1", "ID-2"])
    cases["multivalued_patient_id"] = _case(
        ds, uid, statuses.SUCCESS, check=_patient_id(f"{ROOT}.12", "ID-1\\ID-2")
    )

    # UIDs that must never become path names.
    for name, bad in (
        ("uid_overlong", "1." + "2" * 70),
        ("uid_with_letters", "1.2.abc"),
        ("uid_leading_zero", "1.2.03"),
        ("uid_absolute_path", "/etc/passwd"),
        ("uid_dot_dot", "1.2..3"),
    ):
        ds, uid = _ct(next(n))
        ds.SeriesInstanceUID = bad
        cases[name] = _case(ds, uid, C001)

    # Deep nesting.
    ds, uid = _ct(next(n))
    ds.ContentSequence = _nested(60).ContentSequence
    cases["nested_sequences_60_deep"] = _case(ds, uid, statuses.SUCCESS, check=_stored(uid))
    ds, uid = _ct(next(n))
    depth = 3000
    item = b"\x08\x00\x00\x01" + b"SH" + struct.pack("<H", 4) + b"LEAF"
    for _ in range(depth):
        item = (
            b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
            + _explicit(0x0040A730, b"SQ", b"", 0xFFFFFFFF)
            + item
            + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
            + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        )
    body = _splice(
        ds,
        0x0040A730,
        _explicit(0x0040A730, b"SQ", b"", 0xFFFFFFFF) + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
    )
    cases["nested_sequences_3000_deep"] = _case(ds, uid, C000, body=body)

    # Size.
    ds, uid = _ct(next(n), rows=1, cols=1)
    ds.Rows = ds.Columns = 1500
    ds.PixelData = b"\0" * (1500 * 1500 * 2)
    cases["oversized"] = _case(ds, uid, statuses.TOO_LARGE)

    # Network behaviour.
    cases["stall_mid_pdu"] = Case(run=_stall)
    cases["flood_of_connections"] = Case(run=_flood)
    return cases


CORPUS = _corpus()


# The node -----------------------------------------------------------------------------------


@dataclass
class Corpus:
    db: Database
    node: NodeService
    home: Path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def corpus(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Corpus]:  # noqa: ANN001
    folder = tmp_path_factory.mktemp(f"corpus-{request.param}")
    if request.param == "sqlite":
        db = Database(f"sqlite:///{folder / 'radai.sqlite'}")
        db.upgrade()
        drop = db.dispose
    else:
        db, drop = _make_pg(request.getfixturevalue("pg_template"))
    home = folder / "home"
    node = NodeService(
        db,
        Archive(home / "archive", home / "quarantine"),
        NodeConfig(
            host="127.0.0.1",
            port=0,
            max_instance_bytes=MAX_BYTES,
            network_timeout=NETWORK_TIMEOUT,
            min_free_disk_mb=100,
        ),
        stable_seconds=1.0,
        publish=RecordingPublisher(),
        poll_seconds=0.1,
        backoff_cap=1.0,
    )
    node.start()
    yield Corpus(db, node, home)
    node.stop()
    drop()


def _counts(db: Database) -> tuple[int, int]:
    with db.session() as s:
        from sqlalchemy import func

        from db import IngestFailure

        return (
            s.execute(select(func.count()).select_from(Instance)).scalar_one(),
            s.execute(select(func.count()).select_from(IngestFailure)).scalar_one(),
        )


_control = iter(range(1, 10_000))


def _control_instance() -> tuple[bytes, str]:
    uid = f"{ROOT}.300.{next(_control)}"
    return part10(encode(ct_dataset(CONTROL_STUDY, CONTROL_SERIES, uid)), CT_IMAGE, uid), uid


def _send(assoc, folder: Path, data: bytes) -> int | None:  # noqa: ANN001
    path = folder / "case.dcm"
    path.write_bytes(data)
    rsp = assoc.send_c_store(path)
    return int(rsp.Status) if rsp is not None and "Status" in rsp else None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_case(corpus: Corpus, name: str, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    case = CORPUS[name]
    db = corpus.db
    caplog.set_level("INFO")
    instances_before, failures_before = _counts(db)
    control, control_uid = _control_instance()

    if case.run is not None:
        case.run(corpus.node)
        # No C-STORE to attribute: the record is the listener's error log line (a flood of
        # connections must not turn into a flood of database writes). Nothing stored, nothing
        # half-written, and the node serves the next sender.
        assert any(
            r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR for r in caplog.records
        )
        assert _counts(db) == (instances_before, failures_before)
        assert list(corpus.home.rglob("*.partial")) == []
        with raw_association(corpus.node.port, CONTEXTS) as assoc:
            assert _send(assoc, tmp_path, control) == statuses.SUCCESS
        assert _counts(db) == (instances_before + 1, failures_before)
        return

    with raw_association(corpus.node.port, CONTEXTS) as assoc:
        if case.before:
            assert _send(assoc, tmp_path, case.before) == statuses.SUCCESS
            instances_before += 1
        status = _send(assoc, tmp_path, case.data)
        assert status is not None, "no C-STORE response"
        assert status == case.expected, f"0x{status:04X}, expected 0x{case.expected:04X}"
        # The same association goes on serving.
        assert _send(assoc, tmp_path, control) == statuses.SUCCESS

    stored = case.expected == statuses.SUCCESS
    instances_after, failures_after = _counts(db)
    assert instances_after == instances_before + 1 + stored
    assert failures_after == failures_before + (not stored)
    if not stored:
        failure = failures(db)[-1]
        assert failure.status == case.expected and failure.reason
        assert failure.calling_ae == "HOSTILE"
        if case.expected not in (statuses.TOO_LARGE, statuses.DISK_LOW):
            kept = Path(failure.quarantine_path).read_bytes()
            assert kept.endswith(test_bad_input.body_of(case.data))
        assert f"0x{case.expected:04X}" in caplog.text
    if case.check is not None:
        case.check(db)
    assert not any(secret in caplog.text for secret in SECRETS)
    assert list(corpus.home.rglob("*.partial")) == []


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 25


@pytest.mark.timeout(120)
def test_normal_study_after_the_corpus(corpus: Corpus, samples) -> None:  # noqa: ANN001
    result = storescu(corpus.node.port, samples["lung1"], aet="AFTERCORPUS")
    assert result.returncode == 0, result.stderr[-500:]
    lung1 = sample_study_uid("lung1")

    def queued() -> bool:
        with corpus.db.session() as s:
            study = s.execute(select(Study).where(Study.study_uid == lung1)).scalar_one()
            return study.state == StudyState.QUEUED and study.instance_count == 48

    wait_for(queued, timeout=30)
