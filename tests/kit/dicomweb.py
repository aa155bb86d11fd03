"""Small valid CT instances for DICOMweb tests, a DICOMweb server beside a running node, and an
archive that answers every request with one HTTP error."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from db.session import Database
from dicomweb.app import Service
from dicomweb.server import DicomWebServer
from dicomweb.stow import Store
from tests.kit.net import HOST


def ct_instance(
    study_uid: str,
    series_uid: str,
    *,
    number: int = 1,
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID-1",
    study_date: str = "20260101",
    accession: str = "ACC1",
    series_number: int = 1,
    size: int = 16,
    rle: bool = False,
) -> Dataset:
    """A small CT image (HU ramp) with its file meta, ready to save or send."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = study_date, "120000", accession
    ds.StudyID, ds.ReferringPhysicianName = "1", ""
    ds.StudyDescription = "CHEST CT"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ramp = np.linspace(-1000, 1000, size * size).reshape(size, size).astype(np.int16)
    ds.PixelData = ramp.tobytes()
    if rle:
        ds.compress(RLELossless)
    return ds


def save(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@contextmanager
def dicomweb_server(
    db: Database, store: Store | None, *, anonymous: bool = False, **tls: Path
) -> Iterator[DicomWebServer]:
    """A DICOMweb server on a free loopback port, stopped afterwards."""
    server = DicomWebServer(Service(db, store, anonymous=anonymous), HOST, 0, **tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RefusingArchive:
    url: str  # the DICOMweb root, ".../dicomweb"
    asked: list[str] = field(default_factory=list)  # the paths requested, in order


@contextmanager
def refusing_archive(status: int = 404) -> Iterator[RefusingArchive]:
    """An HTTP server on a free loopback port that answers every GET with ``status``."""
    archive = RefusingArchive("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            archive.asked.append(self.path)
            body = b"refused"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer((HOST, 0), Handler)
    archive.url = f"http://{HOST}:{httpd.server_address[1]}/dicomweb"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield archive
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
