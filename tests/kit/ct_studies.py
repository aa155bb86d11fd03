"""Small synthetic CT studies recorded in radai's database as the node and the worker would leave
them (archive files, study/series/instance rows, a done job with its findings and SEG), for
dashboard tests that need more than one study of a patient without running the pipeline.

Imports pydicom, highdicom (through the worker's SEG writer) and `db`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from db import Instance, Job, Output, Series, Study, StudyState
from db.findings import Findings
from db.session import Database
from workers.dicom_out.seg import build_segmentation

INTERCEPT = -1024


@dataclass
class CTStudy:
    """One synthetic study: a body of soft tissue with air lungs, and spherical nodules given as
    (label, slice index, radius in mm); slices ``spacing_z`` mm apart from ``first_z``."""

    patient_id: str
    study_date: str
    slices: int = 30
    spacing_z: float = 2.5
    first_z: float = 0.0
    size: int = 96
    pixel_mm: float = 0.7
    nodules: list[tuple[int, int, float]] = field(default_factory=list)
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    # Tracking UIDs of nodule labels, written into the SEG's segments as the worker would.
    tracking_uids: dict[int, str] = field(default_factory=dict)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """HU (int16), lung mask and lesion labels, each (z, y, x)."""
        z, y, x = np.meshgrid(
            np.arange(self.slices) * self.spacing_z,
            np.arange(self.size) * self.pixel_mm,
            np.arange(self.size) * self.pixel_mm,
            indexing="ij",
        )
        hu = np.full(z.shape, -1000, dtype=np.int16)
        c = self.size * self.pixel_mm / 2
        body = (y - c) ** 2 + (x - c) ** 2 <= (0.45 * self.size * self.pixel_mm) ** 2
        hu[body] = 40
        lung = body & (np.abs(x - c) > 4) & ((y - c) ** 2 + (np.abs(x - c) - 14) ** 2 <= 12**2)
        hu[lung] = -850
        labels = np.zeros(z.shape, dtype=np.uint8)
        for label, index, radius in self.nodules:
            zc = index * self.spacing_z
            ball = (z - zc) ** 2 + (y - c) ** 2 + (x - (c + 14)) ** 2 <= radius**2
            hu[ball] = 30
            labels[ball] = label
        return hu, lung, labels

    def write(self, folder: Path) -> list[Dataset]:
        """The series as one Part 10 file per slice under ``folder``; the datasets in order."""
        folder.mkdir(parents=True, exist_ok=True)
        hu, _, _ = self.arrays()
        frame = generate_uid()
        out = []
        for k in range(self.slices):
            ds = Dataset()
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.PatientName = f"FOLLOW^{self.patient_id}"
            ds.PatientID = self.patient_id
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "O"
            ds.StudyInstanceUID = self.study_uid
            ds.StudyDate = self.study_date
            ds.StudyTime = "120000"
            ds.StudyID = "1"
            ds.AccessionNumber = self.study_date
            ds.ReferringPhysicianName = ""
            ds.Modality = "CT"
            ds.SeriesInstanceUID = self.series_uid
            ds.SeriesNumber = 1
            ds.FrameOfReferenceUID = frame
            ds.PositionReferenceIndicator = ""
            ds.Manufacturer = "radai tests"
            ds.InstanceNumber = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0, 0, self.first_z + k * self.spacing_z]
            ds.PixelSpacing = [self.pixel_mm, self.pixel_mm]
            ds.SliceThickness = self.spacing_z
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = self.size
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = INTERCEPT
            ds.RescaleSlope = 1
            ds.PixelData = (hu[k].astype(np.int32) - INTERCEPT).astype("<u2").tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(folder / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
            out.append(ds)
        return out

    def write_seg(self, datasets: list[Dataset], path: Path) -> Path:
        """Lung and nodules as the worker's SEG, nodule segments carrying ``tracking_uids``."""
        _, lung, labels = self.arrays()
        seg = build_segmentation(
            datasets, lung, labels, algorithm_name="radai-test", algorithm_version="0"
        )
        for item in seg.SegmentSequence:
            label = str(item.SegmentLabel)
            if label.startswith("Lesion ") and int(label.split()[1]) in self.tracking_uids:
                item.TrackingUID = self.tracking_uids[int(label.split()[1])]
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(path)
        return path


def record(db: Database, study: CTStudy, root: Path, findings: Findings) -> int:
    """Write ``study``'s series and SEG under ``root`` and record it as DONE with ``findings``
    (their series UID set to the study's); returns the job's id."""
    datasets = study.write(root / study.study_uid)
    seg_path = study.write_seg(datasets, root / "outputs" / f"{study.study_uid}-seg.dcm")
    data: dict[str, Any] = findings.to_json() | {
        "series_uid": study.series_uid,
        "slices": study.slices,
    }
    with db.session() as s:
        row = Study(
            study_uid=study.study_uid,
            state=StudyState.DONE,
            patient_id=study.patient_id,
            patient_name=f"FOLLOW^{study.patient_id}",
            study_date=study.study_date,
            study_description="CT CHEST follow-up test",
            instance_count=study.slices,
            priority=findings.priority,
        )
        s.add(row)
        s.flush()
        series = Series(
            study_id=row.id,
            series_uid=study.series_uid,
            modality="CT",
            instance_count=study.slices,
        )
        s.add(series)
        s.flush()
        for k, ds in enumerate(datasets):
            path = root / study.study_uid / f"CT{k + 1:04d}.dcm"
            blob = path.read_bytes()
            s.add(
                Instance(
                    study_id=row.id,
                    series_id=series.id,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=CTImageStorage,
                    instance_number=k + 1,
                    archive_path=str(path),
                    sha256=hashlib.sha256(blob).hexdigest(),
                    size=len(blob),
                    transfer_syntax=ExplicitVRLittleEndian,
                    calling_ae="TESTSCU",
                )
            )
        job = Job(
            study_id=row.id,
            pipeline="radai-test",
            pipeline_version="0",
            input_hash=hashlib.sha256(study.study_uid.encode()).hexdigest(),
            state="DONE",
            findings=data,
            model_versions={"radai-test": "0"},
        )
        s.add(job)
        s.flush()
        s.add(
            Output(
                job_id=job.id,
                study_id=row.id,
                modality="SEG",
                path=str(seg_path),
                sop_instance_uid=generate_uid(),
                series_uid=generate_uid(),
                sha256=hashlib.sha256(seg_path.read_bytes()).hexdigest(),
            )
        )
        return job.id
