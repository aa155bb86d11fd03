"""Turn the bundled sample chest CTs (NRRD, from pyradiomics' BSD-3 test data) into DICOM CT
Image Storage series, so demos and tests can feed a realistic study through the DICOM node
without touching patient data. Headers are synthetic and marked DEMO throughout; geometry and
Hounsfield units are carried over exactly from the NRRD. Research software, not for clinical use.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_io.windows import WINDOW_PRESETS

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
SAMPLE_CASES = ("lung1", "lung2")

IMPLEMENTATION_VERSION_NAME = "RADAI_010"
# UIDs are name-based so that rebuilding a sample yields byte-identical files: a PACS that
# already holds the demo study then sees the same instances, not a new study. pydicom's
# generate_uid(prefix=None, entropy_srcs=...) cannot do this (it ignores the entropy and returns
# a random UUID), so we form 2.25.<uuid5> ourselves, which ISO/IEC 9834-8 allows.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:radai:dicom_node:samples:v1")


def _name_uid(*parts: str) -> str:
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(parts)).int}"


IMPLEMENTATION_CLASS_UID = _name_uid("implementation", IMPLEMENTATION_VERSION_NAME)

# Unsigned storage with a -1024 intercept is the common CT convention (air reads as 0).
_DEFAULT_INTERCEPT = -1024
# Fixed so that the output is reproducible; the date itself is arbitrary.
_STUDY_DATE = "20240102"
_STUDY_TIME = "093000"


@dataclass(frozen=True)
class _Demographics:
    sex: str
    birth_date: str
    study_id: str
    accession: str


_DEMOGRAPHICS = {
    "lung1": _Demographics("M", birth_date="19580314", study_id="DEMO1", accession="RADAIDEMO1"),
    "lung2": _Demographics("F", birth_date="19640921", study_id="DEMO2", accession="RADAIDEMO2"),
}


def _uid(case: str, *parts: str) -> str:
    return _name_uid("case", case, *parts)


def _check_case(case: str) -> None:
    if case not in SAMPLE_CASES:
        raise ValueError(f"unknown sample case {case!r}; expected one of {SAMPLE_CASES}")


def sample_study_uid(case: str) -> str:
    """Return the StudyInstanceUID that `build_sample_series` always writes for `case`."""
    _check_case(case)
    return _uid(case, "study")


def _stored_pixels(hu: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Map HU to uint16 stored values; return (stored, intercept, bits_stored).

    The intercept is lowered below -1024 only when the data needs it, so nothing is clipped and
    stored * 1 + intercept gives back the input exactly.
    """
    if not np.issubdtype(hu.dtype, np.integer):
        raise ValueError(f"sample image must hold integer HU, got {hu.dtype}")
    lo, hi = int(hu.min()), int(hu.max())
    intercept = min(_DEFAULT_INTERCEPT, lo)
    top = hi - intercept
    if top > 0xFFFF:
        raise ValueError(f"HU range {lo}..{hi} does not fit in 16 bits")
    # 12 bits is what CT viewers expect; widen only if the data actually needs it.
    bits_stored = max(12, top.bit_length())
    stored = (hu.astype(np.int32) - intercept).astype("<u2")
    return stored, intercept, bits_stored


def _base_dataset(case: str, image: sitk.Image, intercept: int, bits_stored: int) -> Dataset:
    """Attributes shared by every slice of the series."""
    demo = _DEMOGRAPHICS[case]
    tag = case.upper()
    ds = Dataset()

    # SOP Common
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate = _STUDY_DATE
    ds.InstanceCreationTime = _STUDY_TIME

    # Patient
    ds.PatientName = f"DEMO^{tag}"
    ds.PatientID = f"RADAI-DEMO-{tag}"
    ds.PatientBirthDate = demo.birth_date
    ds.PatientSex = demo.sex
    # Valid here because every identifying header is synthetic; the pixels are public data.
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "radai demo: synthetic headers on public sample CT"

    # General Study
    ds.StudyInstanceUID = sample_study_uid(case)
    ds.StudyDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.StudyID = demo.study_id
    ds.AccessionNumber = demo.accession
    ds.StudyDescription = f"CT CHEST {tag} DEMO - not a real patient study"

    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = _uid(case, "series")
    ds.SeriesNumber = 1
    ds.SeriesDate = _STUDY_DATE
    ds.SeriesTime = _STUDY_TIME
    ds.SeriesDescription = "DEMO axial chest"
    ds.BodyPartExamined = "CHEST"
    # The NRRDs are LPS volumes from supine head-first scans; PatientPosition is Type 2C for CT.
    ds.PatientPosition = "HFS"

    # Frame of Reference
    ds.FrameOfReferenceUID = _uid(case, "frame-of-reference")
    ds.PositionReferenceIndicator = ""

    # General Equipment
    ds.Manufacturer = "radai demo generator"
    ds.ManufacturerModelName = "radai samples"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION_NAME

    # General Image / CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.ContentDate = _STUDY_DATE
    ds.ContentTime = _STUDY_TIME
    ds.ImageComments = "DEMO - not a real patient study; headers generated by radai"
    # Acquisition parameters are unknown for the sample data; 120 kV is a typical chest value.
    ds.KVP = "120"

    # Image Plane (per-slice position is set by the caller)
    spacing = image.GetSpacing()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    # ITK's direction columns are the index axes; axis 0 runs along a row, axis 1 down a column.
    ds.ImageOrientationPatient = [_ds_float(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [_ds_float(spacing[1]), _ds_float(spacing[0])]
    ds.SliceThickness = _ds_float(spacing[2])
    ds.SpacingBetweenSlices = _ds_float(spacing[2])

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = image.GetSize()[1]
    ds.Columns = image.GetSize()[0]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"

    # VOI LUT
    center, width = WINDOW_PRESETS["Lung"]
    ds.WindowCenter, ds.WindowWidth = f"{center:g}", f"{width:g}"
    ds.WindowCenterWidthExplanation = "LUNG"
    return ds


def _ds_float(value: float) -> str:
    # DS is limited to 16 characters; %.10g keeps sub-micrometre precision within that limit
    # and writes 5.0 as "5" rather than pydicom's auto-formatted float noise.
    text = f"{float(value):.10g}"
    return "0" if text == "-0" else text


def build_sample_series(case: str, out_dir: Path, samples_dir: Path = SAMPLES_DIR) -> list[Path]:
    """Write `case` as one CT series, one Part 10 file per axial slice, into `out_dir/case/`.

    Returns the written paths in slice order (CT0001.dcm is index 0 of the NRRD's z axis).
    """
    _check_case(case)
    image = sitk.ReadImage(str(Path(samples_dir) / f"{case}_image.nrrd"))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{case}: expected a scalar 3-D volume")
    hu = sitk.GetArrayFromImage(image)  # (z, y, x)
    stored, intercept, bits_stored = _stored_pixels(hu)

    base = _base_dataset(case, image, intercept, bits_stored)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    slice_step = direction[:, 2] * image.GetSpacing()[2]
    normal = np.cross(direction[:, 0], direction[:, 1])

    series_dir = Path(out_dir) / case
    series_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(stored.shape[0]):
        number = k + 1
        sop_uid = _uid(case, "instance", str(number))
        position = origin + slice_step * k

        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds_float(v) for v in position]
        ds.SliceLocation = _ds_float(float(normal @ position))
        ds.add_new(0x7FE00010, "OW", stored[k].tobytes())

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta

        path = series_dir / f"CT{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def build_sample_studies(out_dir: Path, samples_dir: Path = SAMPLES_DIR) -> dict[str, list[Path]]:
    """Build every sample case; returns {case: slice paths}."""
    return {case: build_sample_series(case, out_dir, samples_dir) for case in SAMPLE_CASES}
