"""Storing result objects: a conformance gate, then an atomic, durable write."""

from __future__ import annotations

import hashlib
import os
import uuid
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset


class NonConformantOutput(Exception):
    """An object we built does not read back as valid DICOM: never stored or sent."""


def _gate(data: bytes, ds: Dataset) -> None:
    back = pydicom.dcmread(BytesIO(data))
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if str(back.get(keyword, "")) != str(ds.get(keyword, "")) or not back.get(keyword):
            raise NonConformantOutput(f"{keyword} does not survive a write and read back")


def write_output(path: Path, ds: Dataset, modality: str) -> dict:
    """Encode, check and durably store one output; return its database row values."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    _gate(data, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return {
        "modality": modality,
        "path": str(path),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
