"""Hostile or malformed C-STOREs: the right status, a record, the bytes kept, no patient data in
logs, and the same association goes on serving."""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import text

from dicom_node import statuses
from tests.helpers import (
    CT_IMAGE,
    MR_IMAGE,
    ct_dataset,
    encode,
    failures,
    instances,
    part10,
    raw_association,
    send_raw,
)

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.100", "1.2.826.0.1.3680043.8.498.101"


def body_of(data: bytes) -> bytes:
    fp = BytesIO(data)
    read_preamble(fp, force=False)
    _read_file_meta_info(fp)
    return data[fp.tell() :]


def _good(i: int) -> tuple[bytes, str]:
    uid = f"1.2.826.0.1.3680043.8.498.200.{i}"
    return part10(encode(ct_dataset(STUDY, SERIES, uid)), CT_IMAGE, uid), uid


def _cases() -> dict[str, tuple[bytes, int]]:
    uid = "1.2.826.0.1.3680043.8.498.300"
    good_body = encode(ct_dataset(STUDY, SERIES, uid))
    no_study = ct_dataset(STUDY, SERIES, uid)
    del no_study.StudyInstanceUID
    pathlike = ct_dataset("../../../etc/passwd", SERIES, uid)
    short_pixels = ct_dataset(STUDY, SERIES, uid)
    short_pixels.PixelData = b"\x00" * 10
    huge_dims = ct_dataset(STUDY, SERIES, uid)
    huge_dims.Rows = 65535
    huge_dims.Columns = 65535
    as_mr = ct_dataset(STUDY, SERIES, uid)
    as_mr.SOPClassUID = MR_IMAGE
    return {
        "garbage": (part10(b"\xde\xad\xbe\xef" * 5, CT_IMAGE, uid), statuses.CANNOT_UNDERSTAND),
        "truncated": (part10(good_body[:-7], CT_IMAGE, uid), statuses.CANNOT_UNDERSTAND),
        "lying_length": (
            part10(b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2" * 4, CT_IMAGE, uid),
            statuses.CANNOT_UNDERSTAND,
        ),
        "missing_study_uid": (part10(encode(no_study), CT_IMAGE, uid), statuses.MISSING_UID),
        "path_like_uid": (part10(encode(pathlike), CT_IMAGE, uid), statuses.MISSING_UID),
        "sop_class_mismatch": (part10(encode(as_mr), CT_IMAGE, uid), statuses.SOP_CLASS_MISMATCH),
        "sop_instance_mismatch": (
            part10(good_body, CT_IMAGE, "1.2.826.0.1.3680043.8.498.999"),
            statuses.SOP_INSTANCE_MISMATCH,
        ),
        "pixel_data_too_short": (
            part10(encode(short_pixels), CT_IMAGE, uid),
            statuses.PIXEL_DATA_LENGTH,
        ),
        "huge_dimensions": (part10(encode(huge_dims), CT_IMAGE, uid), statuses.PIXEL_DATA_LENGTH),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_instance_gets_status_record_and_association_continues(
    database, node_factory, tmp_path, caplog, case
):
    data, expected = CASES[case]
    node = node_factory(database, stable_seconds=30)
    caplog.set_level(logging.INFO)
    good, good_uid = _good(1)
    with raw_association(node.port, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        status = send_raw(assoc, tmp_path / "bad.dcm", data)
        assert status & 0xFF00 == expected & 0xFF00 and status == expected, hex(status)
        # The same association still stores a good instance afterwards.
        assert send_raw(assoc, tmp_path / "good.dcm", good) == statuses.SUCCESS

    [failure] = failures(database)
    assert failure.status == expected
    assert failure.calling_ae == "HOSTILE"
    assert failure.reason
    # The node keeps the dataset exactly as sent, behind a file meta of its own.
    assert Path(failure.quarantine_path).read_bytes().endswith(body_of(data))
    assert [i.sop_instance_uid for i in instances(database)] == [good_uid]
    logged = caplog.text
    assert f"0x{expected:04X}" in logged
    assert "HOSTILE^PATIENT" not in logged and "SECRET-ID-4711" not in logged


def test_oversized_instance_is_refused_out_of_resources(sqlite_db, node_factory, tmp_path):
    node = node_factory(sqlite_db, max_instance_bytes=1000, stable_seconds=30)
    uid = generate_uid()
    big = ct_dataset(STUDY, SERIES, uid, rows=64, cols=64)
    with raw_association(node.port, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        assert send_raw(assoc, tmp_path / "big.dcm", part10(encode(big), CT_IMAGE, uid)) == (
            statuses.TOO_LARGE
        )
        small, _ = _good(2)
        assert send_raw(assoc, tmp_path / "small.dcm", small) == statuses.SUCCESS
    [failure] = failures(sqlite_db)
    assert failure.status == statuses.TOO_LARGE and failure.size > 1000
    assert failure.quarantine_path is None


def test_low_disk_is_refused_before_writing(sqlite_db, node_factory, tmp_path):
    node = node_factory(sqlite_db, min_free_disk_mb=1e12, stable_seconds=30)
    good, _ = _good(3)
    with raw_association(node.port, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        assert send_raw(assoc, tmp_path / "g.dcm", good) == statuses.DISK_LOW
    assert instances(sqlite_db) == []
    assert not any((tmp_path / "home" / "archive").rglob("*.dcm"))
    assert failures(sqlite_db)[0].status == statuses.DISK_LOW


def test_unrecordable_instance_is_never_acknowledged(sqlite_db, node_factory, tmp_path):
    node = node_factory(sqlite_db, stable_seconds=30)
    with sqlite_db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances RENAME TO instances_away"))
    good, uid = _good(4)
    with raw_association(node.port, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        status = send_raw(assoc, tmp_path / "g.dcm", good)
    assert status == statuses.CANNOT_RECORD
    with sqlite_db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE instances_away RENAME TO instances"))
    # Recovered: the resend is stored and recorded.
    with raw_association(node.port, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        assert send_raw(assoc, tmp_path / "g.dcm", good) == statuses.SUCCESS
    assert [i.sop_instance_uid for i in instances(sqlite_db)] == [uid]
