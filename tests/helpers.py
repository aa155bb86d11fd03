"""Small helpers shared by tests: database look-ups and hostile Part 10 streams."""

from __future__ import annotations

from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import func, select

from db import IngestFailure, Instance, OutboxMessage, Study
from db.session import Database

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def study_row(db: Database, study_uid: str) -> Study | None:
    with db.session() as s:
        return s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()


def study_state(db: Database, study_uid: str) -> str | None:
    row = study_row(db, study_uid)
    return row.state if row else None


def count(db: Database, model, *where) -> int:  # noqa: ANN001
    with db.session() as s:
        return s.execute(select(func.count()).select_from(model).where(*where)).scalar_one()


def failures(db: Database) -> list[IngestFailure]:
    with db.session() as s:
        return list(s.execute(select(IngestFailure).order_by(IngestFailure.id)).scalars())


def instances(db: Database) -> list[Instance]:
    with db.session() as s:
        return list(s.execute(select(Instance)).scalars())


def outbox(db: Database) -> list[OutboxMessage]:
    with db.session() as s:
        return list(s.execute(select(OutboxMessage).order_by(OutboxMessage.id)).scalars())


def part10(
    body: bytes, sop_class: str, sop_instance: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> bytes:
    """A Part 10 stream with a correct file meta in front of an arbitrary (maybe hostile) body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + body


def encode(ds: Dataset) -> bytes:
    """The dataset body (no meta) in Explicit VR Little Endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def ct_dataset(
    study_uid: str, series_uid: str, sop_uid: str, rows: int = 4, cols: int = 4
) -> Dataset:
    ds = Dataset()
    ds.set_original_encoding(False, True)
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "HOSTILE^PATIENT"
    ds.PatientID = "SECRET-ID-4711"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00" * rows * cols
    return ds


@contextmanager
def raw_association(port: int, contexts: list[tuple[str, str]], aec: str = "RADAI"):
    """An association that sends files' bytes as they are (pynetdicom's chunked send)."""
    ae = AE(ae_title="HOSTILE")
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established, "association was not established"
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield assoc
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        if assoc.is_established:
            assoc.release()


def send_raw(assoc, path: Path, data: bytes) -> int:  # noqa: ANN001
    path.write_bytes(data)
    rsp = assoc.send_c_store(path)
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    return int(rsp.Status)
