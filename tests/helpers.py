"""Small helpers shared by tests: database look-ups, hostile Part 10 streams, file copies."""

from __future__ import annotations

import shutil
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


def copy_files(files: list[Path], folder: Path) -> list[Path]:
    """Copies of `files` in `folder`, same names, same order: for tests that alter a series."""
    out = []
    for f in files:
        out.append(folder / f.name)
        shutil.copy(f, out[-1])
    return out


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


def small_chest_ct_studies(
    lung_slices: list[Path],
    out: Path,
    studies: int,
    *,
    slices: int = 20,
    first: int = 20,
    step: int = 2,
) -> dict[str, list[Path]]:
    """`studies` small chest CT studies that still pass the chest-CT selection rules.

    Each is one axial series of `slices` contiguous slices of a sample study (slices
    first+1..first+slices of lung2 by default: the middle of the lungs), subsampled by `step` in
    plane (512x512 to 256x256, pixel spacing scaled to match: 1.25 mm, within the 2 mm that image
    QA accepts; 5 mm slices), under new Study, Series and SOP Instance UIDs. Returns
    {study UID: files}.
    """
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    templates = []
    for path in lung_slices[first : first + slices]:
        ds = pydicom.dcmread(path)
        pixels = np.ascontiguousarray(ds.pixel_array[::step, ::step])
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.PixelSpacing = [float(v) * step for v in ds.PixelSpacing]
        templates.append(ds)
    result: dict[str, list[Path]] = {}
    for n in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = out / f"study{n:03d}"
        folder.mkdir(parents=True)
        files = []
        for i, ds in enumerate(templates):
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.AccessionNumber = f"SMALL{n:04d}"
            path = folder / f"CT{i + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        result[study_uid] = files
    return result


def jobs_and_outputs(db: Database) -> tuple[list, list]:
    """Every job and every output row (detached, attributes loaded)."""
    from db import Job, Output

    with db.session() as s:
        jobs = list(s.execute(select(Job).order_by(Job.id)).scalars())
        outputs = list(s.execute(select(Output).order_by(Output.id)).scalars())
    return jobs, outputs


def storescu_statuses(output: str) -> dict[str, int | None]:
    """{file: DIMSE status} from the output of `storescu -d`; None where no response came."""
    import re

    statuses: dict[str, int | None] = {}
    current: str | None = None
    for line in output.splitlines():
        sending = re.match(r"I: Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
            statuses[current] = None
            continue
        status = re.match(r"D: DIMSE Status\s*: 0x([0-9a-fA-F]{4})", line)
        if status and current is not None:
            statuses[current] = int(status.group(1), 16)
            current = None
    return statuses
