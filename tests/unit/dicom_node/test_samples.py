"""Tests for dicom_node.samples: the demo CT series must be valid DICOM and carry the NRRD's
Hounsfield units and geometry over exactly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.samples import (
    SAMPLE_CASES,
    SAMPLES_DIR,
    build_sample_series,
    build_sample_studies,
    sample_study_uid,
)

DCIODVFY = Path("/usr/bin/dciodvfy")


@pytest.fixture(scope="module")
def lung2_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_sample_series("lung2", tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module")
def lung2_nrrd() -> sitk.Image:
    return sitk.ReadImage(str(SAMPLES_DIR / "lung2_image.nrrd"))


def _uids(paths: list[Path]) -> list[tuple[str, str, str, str]]:
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append(
            (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID)
        )
    return out


def test_lung2_pixels_and_geometry_round_trip(lung2_files: list[Path], lung2_nrrd: sitk.Image):
    assert len(lung2_files) == 61
    assert [p.name for p in lung2_files[:2]] == ["CT0001.dcm", "CT0002.dcm"]
    expected_hu = sitk.GetArrayFromImage(lung2_nrrd)  # (z, y, x)
    origin = np.array(lung2_nrrd.GetOrigin())
    sx, sy, sz = lung2_nrrd.GetSpacing()

    positions = []
    for k, path in enumerate(lung2_files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == expected_hu.shape[1:]
        hu = ds.pixel_array.astype(np.int32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, expected_hu[k])
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([sy, sx])
        assert float(ds.SliceThickness) == pytest.approx(sz)
        positions.append([float(v) for v in ds.ImagePositionPatient])
        assert float(ds.SliceLocation) == pytest.approx(positions[-1][2])

    positions = np.array(positions)
    np.testing.assert_allclose(positions[0], origin, atol=1e-4)
    np.testing.assert_allclose(np.diff(positions, axis=0), [[0.0, 0.0, 5.0]] * 60, atol=1e-4)


def test_demo_markers(lung2_files: list[Path]):
    ds = pydicom.dcmread(lung2_files[0], stop_before_pixels=True)
    assert str(ds.PatientName) == "DEMO^LUNG2"
    assert ds.PatientID == "RADAI-DEMO-LUNG2"
    assert "DEMO - not a real patient study" in ds.StudyDescription
    assert ds.Modality == "CT"
    assert ds.BodyPartExamined == "CHEST"
    assert ds.Manufacturer == "radai demo generator"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.file_meta.ImplementationVersionName == "RADAI_010"
    assert ds.file_meta.ImplementationClassUID.startswith("2.25.")


def test_uids_deterministic_and_distinct_between_cases(lung2_files: list[Path], tmp_path: Path):
    rebuilt = build_sample_studies(tmp_path)
    assert set(rebuilt) == set(SAMPLE_CASES)

    first = _uids(lung2_files)
    assert _uids(rebuilt["lung2"]) == first
    assert len({sop for *_, sop in first}) == len(first)
    assert {study for study, *_ in first} == {sample_study_uid("lung2")}
    assert all(uid.startswith("2.25.") for row in first for uid in row)

    lung1 = _uids(rebuilt["lung1"])
    assert sample_study_uid("lung1") != sample_study_uid("lung2")
    lung1_uids = {uid for row in lung1 for uid in row}
    lung2_uids = {uid for row in first for uid in row}
    assert not lung1_uids & lung2_uids


@pytest.mark.skipif(not DCIODVFY.exists(), reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(lung2_files: list[Path]):
    for path in (lung2_files[0], lung2_files[len(lung2_files) // 2], lung2_files[-1]):
        proc = subprocess.run(
            [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60
        )
        output = proc.stdout + proc.stderr
        # dciodvfy names the IOD it recognised; its absence means it did not validate as CT.
        assert "CTImage" in output, output
        errors = [line for line in output.splitlines() if "Error" in line]
        assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_simpleitk_series_reader_matches_nrrd(lung2_files: list[Path], lung2_nrrd: sitk.Image):
    series_dir = lung2_files[0].parent
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir))
    assert len(names) == 61
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = reader.Execute()

    np.testing.assert_allclose(image.GetOrigin(), lung2_nrrd.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), lung2_nrrd.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), lung2_nrrd.GetDirection(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(lung2_nrrd))


def test_synthetic_volume_low_values_and_oblique_geometry(tmp_path: Path):
    # Non-square, anisotropic, oblique and below -1024 HU: catches row/column swaps in
    # PixelSpacing and orientation, and an intercept that would clip.
    rng = np.random.default_rng(0)
    hu = rng.integers(-2048, 3000, size=(3, 5, 7), dtype=np.int16)
    hu[0, 0, 0] = -2048
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    image.SetDirection(direction.ravel().tolist())
    samples_dir = tmp_path / "in"
    samples_dir.mkdir()
    sitk.WriteImage(image, str(samples_dir / "lung1_image.nrrd"))

    files = build_sample_series("lung1", tmp_path / "out", samples_dir=samples_dir)
    assert len(files) == 3
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert float(ds.RescaleIntercept) <= -2048
        assert ds.HighBit == ds.BitsStored - 1
        assert int(ds.pixel_array.max()) < 2**ds.BitsStored
        restored = ds.pixel_array.astype(np.int32) + int(float(ds.RescaleIntercept))
        np.testing.assert_array_equal(restored, hu[k])
        assert (ds.Rows, ds.Columns) == (5, 7)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.9, 0.7])
        iop = [float(v) for v in ds.ImageOrientationPatient]
        np.testing.assert_allclose(iop, [c, s, 0.0, -s, c, 0.0], atol=1e-8)
        expected_pos = np.array([10.0, -20.0, 30.0 + 2.5 * k])
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected_pos)

    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files[0].parent))
    back = sitk.ReadImage(names)
    np.testing.assert_allclose(back.GetDirection(), direction.ravel(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), (0.7, 0.9, 2.5), atol=1e-6)


def test_unknown_case_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown sample case"):
        build_sample_series("lung3", tmp_path)
    with pytest.raises(ValueError):
        sample_study_uid("../lung1")
