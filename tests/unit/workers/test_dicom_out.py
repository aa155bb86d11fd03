"""The SEG and SR writers produce valid DICOM (dciodvfy, dsrdump) that reads back to the input."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DS

from workers.dicom_out import build_measurement_report, build_segmentation
from workers.dicom_out.axial_line import longest_axial_lines
from workers.dicom_out.sr import PriorReference

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
SLICES, SIZE = 8, 64
SPACING = (2.5, 0.7, 0.7)  # z, y, x in mm
ALGO = {"algorithm_name": "radai-lung", "algorithm_version": "0.1.0"}


def make_ct_series(slices: int = SLICES, size: int = SIZE) -> list[pydicom.Dataset]:
    """A complete single-frame CT Image Storage series, ordered by increasing z."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    series = []
    for i in range(slices):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Test^Synthetic"
        ds.PatientID = "RADAI-TEST-1"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate, ds.StudyTime = "20240102", "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.Manufacturer = "synthetic"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ContentDate, ds.ContentTime = "20240102", "101500"
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-22.4, -22.4, -100.0 + i * SPACING[0]]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.SliceThickness = SPACING[0]
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        pixels = rng.integers(0, 200, (size, size), dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        series.append(ds)
    return series


def sphere(center: tuple[int, int, int], radius: float) -> np.ndarray:
    z, y, x = np.ogrid[:SLICES, :SIZE, :SIZE]
    cz, cy, cx = center
    return (
        ((z - cz) * SPACING[0]) ** 2 + ((y - cy) * SPACING[1]) ** 2 + ((x - cx) * SPACING[2]) ** 2
    ) <= radius**2


@dataclass
class Case:
    ct: list[pydicom.Dataset]
    lung: np.ndarray
    labels: np.ndarray
    lesions: list[dict]


def make_case(lesion_labels: tuple[int, ...] = (1, 2)) -> Case:
    ct = make_ct_series()
    lung = np.zeros((SLICES, SIZE, SIZE), dtype=bool)
    lung[1:7, 6:58, 6:58] = True
    labels = np.zeros(lung.shape, dtype=np.uint16)
    centres = {1: ((3, 20, 22), 4.0), 2: ((4, 42, 40), 3.0), 3: ((5, 30, 45), 2.5)}
    hu = np.stack([ds.pixel_array.astype(np.float64) - 1024 for ds in ct])
    lesions = []
    for label in lesion_labels:
        centre, radius = centres[label]
        mask = sphere(centre, radius)
        labels[mask] = label
        lesions.append(
            {
                "label": label,
                "volume_mm3": float(mask.sum() * SPACING[0] * SPACING[1] * SPACING[2]),
                "max_3d_diameter_mm": 2 * radius + 0.25,
                "max_2d_axial_diameter_mm": 2 * radius - 0.5,
                "mean_hu": float(hu[mask].mean()),
                "location": "right lung, upper zone" if label == 1 else None,
            }
        )
    return Case(ct, lung, labels, lesions)


def build(
    case: Case, seed: str | None = "study-1/radai-lung-0.1.0"
) -> tuple[hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
    seg = build_segmentation(case.ct, case.lung, case.labels, instance_uid_seed=seed, **ALGO)
    sr = build_measurement_report(
        case.ct,
        seg,
        case.lesions,
        lung_volume_ml=float(case.lung.sum() * np.prod(SPACING) / 1000),
        screening_probability=0.87,
        instance_uid_seed=seed,
        **ALGO,
    )
    return seg, sr


def save(dataset: pydicom.Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def assert_dciodvfy_clean(path: Path) -> list[str]:
    """No "Error" line from dciodvfy; returns its warnings."""
    if not os.access(DCIODVFY, os.X_OK):
        pytest.skip(f"{DCIODVFY} is missing: install dicom3tools to validate DICOM output")
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "dciodvfy reported errors:\n" + "\n".join(lines)
    return [line for line in lines if line.startswith("Warning")]


def dsrdump(path: Path) -> str:
    if not os.access(DSRDUMP, os.X_OK):
        pytest.skip(f"{DSRDUMP} is missing: install dcmtk to check SR output")
    # +Pl: print long text values in full rather than cut at 40 characters.
    run = subprocess.run([DSRDUMP, "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def lesion_groups(sr: hd.sr.Comprehensive3DSR) -> list:
    return [
        group
        for group in sr.content.get_volumetric_roi_measurement_groups()
        if group.tracking_identifier.startswith("Lesion ")
    ]


@pytest.fixture(scope="module")
def case() -> Case:
    return make_case()


@pytest.fixture(scope="module")
def written(case: Case, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    seg, sr = build(case)
    out = tmp_path_factory.mktemp("dicom_out")
    return save(seg, out / "seg.dcm"), save(sr, out / "sr.dcm")


def test_synthetic_ct_is_valid(case: Case, tmp_path: Path) -> None:
    # The writers copy patient, study and geometry from it: it must be a valid CT image itself.
    assert_dciodvfy_clean(save(case.ct[0], tmp_path / "ct.dcm"))


def test_seg_passes_dciodvfy(written: tuple[Path, Path]) -> None:
    warnings = assert_dciodvfy_clean(written[0])
    print("\n".join(warnings))


def test_seg_reads_back(case: Case, written: tuple[Path, Path]) -> None:
    raw = pydicom.dcmread(written[0])
    assert raw.Modality == "SEG" and raw.SegmentationType == "BINARY"
    assert "radai SEG - NOT FOR CLINICAL USE" in raw.SeriesDescription
    assert "NOT FOR CLINICAL USE" in raw.ContentDescription
    assert "NOT FOR CLINICAL USE" in raw.ImageComments
    assert (raw.Manufacturer, raw.ManufacturerModelName, raw.SoftwareVersions) == (
        "radai",
        ALGO["algorithm_name"],
        ALGO["algorithm_version"],
    )
    assert raw.StudyInstanceUID == case.ct[0].StudyInstanceUID
    assert raw.FrameOfReferenceUID == case.ct[0].FrameOfReferenceUID

    seg = hd.seg.segread(written[0])
    assert seg.segment_numbers == [1, 2, 3]
    described = [seg.get_segment_description(n) for n in seg.segment_numbers]
    assert [d.segment_label for d in described] == ["Lung", "Lesion 1", "Lesion 2"]
    assert described[0].segmented_property_type == codes.SCT.Lung
    assert described[0].segmented_property_category == codes.SCT.AnatomicalStructure
    for d in described[1:]:
        assert d.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
        assert d.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = d.algorithm_identification[0]
        assert algorithm.AlgorithmName == ALGO["algorithm_name"]
        assert algorithm.AlgorithmVersion == ALGO["algorithm_version"]
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"

    # Empty frames are left out: one frame per (slice, segment) with any pixel set.
    masks = [case.lung, case.labels == 1, case.labels == 2]
    assert raw.NumberOfFrames == sum(int(m.any(axis=(1, 2)).sum()) for m in masks)

    uids = [ds.SOPInstanceUID for ds in case.ct]
    pixels = seg.get_pixels_by_source_instance(
        uids, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True
    )
    for index, mask in enumerate(masks):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), mask)


def test_sr_passes_dciodvfy_and_dsrdump(case: Case, written: tuple[Path, Path]) -> None:
    warnings = assert_dciodvfy_clean(written[1])
    print("\n".join(warnings))
    dump = dsrdump(written[1])
    assert "NOT FOR CLINICAL USE" in dump
    for lesion in case.lesions:
        assert f'"Lesion {lesion["label"]}"' in dump
        assert f'"{DS(lesion["volume_mm3"], auto_format=True)}" (mm3,UCUM' in dump


def test_sr_reads_back(case: Case, written: tuple[Path, Path]) -> None:
    raw = pydicom.dcmread(written[1])
    assert raw.Modality == "SR"
    assert "radai SR - NOT FOR CLINICAL USE" in raw.SeriesDescription
    assert raw.StudyInstanceUID == case.ct[0].StudyInstanceUID

    seg = hd.seg.segread(written[0])
    segment_by_id = {item.TrackingID: item for item in seg.SegmentSequence}
    sr = hd.sr.srread(written[1])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    groups = lesion_groups(sr)
    assert len(groups) == len(case.lesions)
    for group, lesion in zip(groups, case.lesions, strict=True):
        segment = segment_by_id[f"Lesion {lesion['label']}"]
        assert group.tracking_identifier == f"Lesion {lesion['label']}"
        assert group.tracking_uid == segment.TrackingUID
        reference = group.referenced_segment
        assert reference.referenced_segment_numbers == [segment.SegmentNumber]
        item = reference[0].ReferencedSOPSequence[0]
        assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(lesion["volume_mm3"])
        assert volume.unit == codes.UCUM.CubicMillimeter
        (diameter,) = group.get_measurements(name=codes.IBSI.Maximum3DDiameterOfAMesh)
        assert diameter.value == pytest.approx(lesion["max_3d_diameter_mm"])
        (axial,) = group.get_measurements(name=codes.SCT.Diameter)
        assert axial.value == pytest.approx(lesion["max_2d_axial_diameter_mm"])
        assert axial.derivation == codes.SCT.Maximum
        (hu,) = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        assert hu.value == pytest.approx(lesion["mean_hu"])
        assert hu.derivation == codes.SCT.Mean
        assert hu.unit == codes.UCUM.HounsfieldUnit
        assert group.finding_sites[0].value == codes.SCT.Lung
        # The source images named are exactly the CT slices the lesion touches.
        named = {
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for i in reference
            if i.name == codes.DCM.SourceImageForSegmentation
        }
        touched = np.flatnonzero((case.labels == lesion["label"]).any(axis=(1, 2)))
        assert named == {case.ct[z].SOPInstanceUID for z in touched}
    right = groups[0].finding_sites[0].ContentSequence[0]
    assert right.ConceptCodeSequence[0].CodeValue == codes.SCT.Right.value

    (lung,) = [
        g
        for g in sr.content.get_volumetric_roi_measurement_groups()
        if g.tracking_identifier == "Lung"
    ]
    assert lung.referenced_segment.referenced_segment_numbers == [1]
    (screening,) = sr.content.get_image_measurement_groups()
    (probability,) = screening.get_measurements(name=codes.DCM.ProbabilityOfCancer)
    assert probability.value == pytest.approx(0.87)

    observer = sr.content.get_observer_contexts()[0]
    attributes = observer.observer_identifying_attributes
    assert (attributes.name, attributes.manufacturer_name, attributes.model_name) == (
        ALGO["algorithm_name"],
        "radai",
        ALGO["algorithm_name"],
    )
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in raw.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def all_uids(dataset: pydicom.Dataset, prefix: str = "") -> dict[str, str]:
    found = {}
    for element in dataset:
        if element.VR == "SQ":
            for i, item in enumerate(element.value):
                found |= all_uids(item, f"{prefix}{element.keyword}[{i}].")
        elif element.VR == "UI":
            found[prefix + element.keyword] = str(element.value)
    return found


def test_same_seed_gives_same_uids(case: Case) -> None:
    seg_a, sr_a = build(case, seed="study-1")
    seg_b, sr_b = build(case, seed="study-1")
    seg_c, sr_c = build(case, seed="study-2")
    assert all_uids(seg_a) == all_uids(seg_b)
    assert all_uids(sr_a) == all_uids(sr_b)
    for a, b, c in ((seg_a, seg_b, seg_c), (sr_a, sr_b, sr_c)):
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
        assert a.SOPInstanceUID != c.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID
        assert len(a.SOPInstanceUID) <= 64 and a.SOPInstanceUID.startswith("2.25.")
    assert seg_a.SOPInstanceUID != sr_a.SOPInstanceUID
    tracking = [[s.TrackingUID for s in seg.SegmentSequence] for seg in (seg_a, seg_b)]
    assert tracking[0] == tracking[1]
    unseeded = [build(case, seed=None)[0].SOPInstanceUID for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_zero_lesions(tmp_path: Path) -> None:
    case = make_case(lesion_labels=())
    seg, sr = build(case)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lung"]
    seg_path, sr_path = save(seg, tmp_path / "seg.dcm"), save(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(seg_path)
    assert_dciodvfy_clean(sr_path)
    dump = dsrdump(sr_path)
    assert "No lesion was found" in dump and "NOT FOR CLINICAL USE" in dump
    reread = hd.sr.srread(sr_path)
    assert lesion_groups(reread) == []
    seg_back = hd.seg.segread(seg_path)
    pixels = seg_back.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in case.ct], assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), case.lung)


def test_empty_label_makes_no_segment() -> None:
    case = make_case(lesion_labels=(1, 3))
    seg, sr = build(case)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [
        (1, "Lung"),
        (2, "Lesion 1"),
        (3, "Lesion 3"),
    ]
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    numbers = [g.referenced_segment.referenced_segment_numbers for g in lesion_groups(parsed)]
    assert numbers == [[2], [3]]


def test_bad_input_is_refused(case: Case) -> None:
    with pytest.raises(ValueError, match="shape"):
        build_segmentation(case.ct[:-1], case.lung, case.labels, **ALGO)
    seg = build_segmentation(case.ct, case.lung, case.labels, **ALGO)
    stray = dict(case.lesions[0], label=9)
    with pytest.raises(ValueError, match="no segment for lesion label 9"):
        build_measurement_report(
            case.ct, seg, [stray], lung_volume_ml=None, screening_probability=None, **ALGO
        )
    with pytest.raises(ValueError, match="repeat"):
        build_measurement_report(
            case.ct, seg, case.lesions * 2, lung_volume_ml=None, screening_probability=None, **ALGO
        )
    with pytest.raises(ValueError, match="outside"):
        build_measurement_report(
            case.ct, seg, case.lesions, lung_volume_ml=None, screening_probability=1.5, **ALGO
        )


def test_follow_up_tracking_change_and_prior_in_seg_and_sr(case: Case, tmp_path: Path) -> None:
    """A nodule tracked across studies: the SEG segment and the SR group carry its Tracking ID and
    UID from the prior; its change is measured; the prior study is named and its images are
    Pertinent Other Evidence."""
    tracking = {1: ("2.25.1111", "Nodule 3"), 2: ("2.25.2222", "Nodule 4")}
    lesions = [dict(lesion) for lesion in case.lesions]
    for lesion in lesions:
        lesion["tracking_uid"], lesion["tracking_id"] = tracking[lesion["label"]]
    lesions[0]["change"] = {
        "prior_study_uid": "1.2.826.0.1.3680043.8.498.77",
        "prior_volume_mm3": 100.0,
        "volume_change_pct": 45.5,
        "doubling_time_days": -350.0,  # a shrinking nodule's halving time, negative
        "diameter_change_mm": 1.5,
        "interval_days": 180.0,
    }
    prior = PriorReference(
        study_uid="1.2.826.0.1.3680043.8.498.77",
        series_uid="1.2.826.0.1.3680043.8.498.77.1",
        instances=(("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.77.1.1"),),
        study_date="20230615",
    )
    seg = build_segmentation(
        case.ct, case.lung, case.labels, instance_uid_seed="s", tracking=tracking, **ALGO
    )
    sr = build_measurement_report(
        case.ct,
        seg,
        lesions,
        lung_volume_ml=1.0,
        screening_probability=0.5,
        instance_uid_seed="s",
        prior=prior,
        **ALGO,
    )
    seg_path, sr_path = save(seg, tmp_path / "seg.dcm"), save(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(seg_path)
    assert_dciodvfy_clean(sr_path)
    segments = {str(s.SegmentLabel): s for s in hd.seg.segread(seg_path).SegmentSequence}
    assert (segments["Lesion 1"].TrackingID, segments["Lesion 1"].TrackingUID) == (
        "Nodule 3",
        "2.25.1111",
    )
    back = hd.sr.srread(sr_path)
    groups = {
        g.tracking_identifier: g for g in back.content.get_volumetric_roi_measurement_groups()
    }
    assert str(groups["Nodule 3"].tracking_uid) == "2.25.1111"
    assert str(groups["Nodule 4"].tracking_uid) == "2.25.2222"
    names = {m.name.meaning: m.value for m in groups["Nodule 3"].get_measurements()}
    assert names["Volume change since prior study"] == pytest.approx(45.5)
    assert names["Volume doubling time"] == pytest.approx(-350.0)
    assert "Volume change since prior study" not in {
        m.name.meaning for m in groups["Nodule 4"].get_measurements()
    }
    [study] = back.PertinentOtherEvidenceSequence
    assert study.StudyInstanceUID == prior.study_uid
    dump = dsrdump(sr_path)
    assert "Compared with prior study 1.2.826.0.1.3680043.8.498.77 of 20230615" in dump
    assert "(d,UCUM" in dump and "(%,UCUM" in dump


def test_sr_says_why_no_prior_was_compared(case: Case, tmp_path: Path) -> None:
    seg = build_segmentation(case.ct, case.lung, case.labels, instance_uid_seed="s", **ALGO)
    sr = build_measurement_report(
        case.ct,
        seg,
        case.lesions,
        lung_volume_ml=1.0,
        screening_probability=0.5,
        instance_uid_seed="s",
        prior=PriorReference(reason="the prior is of a different patient"),
        **ALGO,
    )
    path = save(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    assert "No prior study was compared: the prior is of a different patient" in dsrdump(path)
    assert "PertinentOtherEvidenceSequence" not in pydicom.dcmread(path)


def test_longest_axial_line_of_an_ellipse() -> None:
    labels = np.zeros((5, 64, 64), dtype=np.uint8)
    yy, xx = np.mgrid[:64, :64]
    # Widest on slice 2: an ellipse of semi-axes 12 px along x and 5 px along y.
    labels[2][((yy - 30) / 5.0) ** 2 + ((xx - 28) / 12.0) ** 2 <= 1] = 3
    labels[1][((yy - 30) / 3.0) ** 2 + ((xx - 28) / 6.0) ** 2 <= 1] = 3
    labels[4, 10, 10] = 1  # one pixel
    lines = longest_axial_lines(labels, (0.5, 0.8))
    assert set(lines) == {1, 3}
    line = lines[3]
    assert line.slice_index == 2
    # End points on the long (x) axis, 24 px apart: 24 * 0.8 mm.
    assert {line.start_rc, line.end_rc} == {(30.0, 16.0), (30.0, 40.0)}
    assert line.length_mm == pytest.approx(24 * 0.8)
    assert lines[1].length_mm == 0.0 and lines[1].slice_index == 4
    assert {tuple(p) for p in line.graphic_data().tolist()} == {(16.5, 30.5), (40.5, 30.5)}


def test_sr_draws_each_lesions_long_axis_on_its_slice(case: Case, tmp_path: Path) -> None:
    # OHIF draws only groups with image coordinates; each lesion gets one beside its volume group.
    seg = build_segmentation(case.ct, case.lung, case.labels, instance_uid_seed="s", **ALGO)
    lines = longest_axial_lines(case.labels, SPACING[1:])
    sr = build_measurement_report(
        case.ct,
        seg,
        case.lesions,
        lung_volume_ml=1.0,
        screening_probability=0.5,
        instance_uid_seed="s",
        axial_lines=lines,
        **ALGO,
    )
    path = save(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(path)
    assert "POLYLINE" in dsrdump(path)
    back = hd.sr.srread(str(path))
    planar = back.content.get_planar_roi_measurement_groups()
    # Tracked as the lesion itself: OHIF merges groups sharing a tracking UID into one
    # measurement, so the line it draws is labelled with the volumetric group's values too.
    volumetric = lesion_groups(back)
    assert [g.tracking_identifier for g in planar] == ["Lesion 1", "Lesion 2"]
    assert [g.tracking_uid for g in planar] == [g.tracking_uid for g in volumetric]
    # Lesions first (OHIF's SR viewport opens on the first group), each line before its volume.
    [imaging] = [
        item
        for item in back.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    ]
    order = [
        (
            next(i.TextValue for i in g.ContentSequence if i.name == codes.DCM.TrackingIdentifier),
            any(i.ValueType == "SCOORD" for i in g.ContentSequence),
        )
        for g in imaging.ContentSequence
    ]
    assert order == [
        ("Lesion 1", True),
        ("Lesion 1", False),
        ("Lesion 2", True),
        ("Lesion 2", False),
        ("Lung", False),
        ("Screening", False),
    ]
    for group, lesion in zip(planar, case.lesions, strict=True):
        line = lines[lesion["label"]]
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert np.allclose(region.value, line.graphic_data())
        ref = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert ref == case.ct[line.slice_index].SOPInstanceUID
        # the sphere's widest slice is its centre's, and the chord spans about its diameter
        centre_z = {1: 3, 2: 4}[lesion["label"]]
        assert line.slice_index == centre_z
        assert line.length_mm == pytest.approx(lesion["max_2d_axial_diameter_mm"], abs=1.5)
        [measurement] = group.get_measurements()
        assert measurement.value == pytest.approx(line.length_mm)


def test_long_string_values_split_at_spaces_and_one_value_keeps_a_digest() -> None:
    from workers.dicom_out import long_string

    short = "2.2.0 outline 1.0.0 rerank 1.0.0"
    assert long_string.as_values(short) == short and long_string.as_one(short) == short
    folds = "2.2.0#holdout-normal001 outline 1.0.0 rerank 1.0.0#holdout-normal001"
    values = long_string.as_values(folds)
    assert isinstance(values, list) and all(len(v) <= 64 for v in values)
    assert " ".join(values) == folds  # nothing lost
    assert long_string.as_values("x" * 130) == ["x" * 64, "x" * 64, "xx"]
    one = long_string.as_one(folds)
    assert len(one) == 64 and one.startswith(folds[:55])
    assert one != long_string.as_one(folds.replace("normal001", "cap001xxx"))


def test_a_version_longer_than_a_long_string_still_writes_valid_seg_and_sr(
    case: Case, tmp_path: Path
) -> None:
    # The evaluation's fold models name a CAD version of 68 characters.
    version = "2.2.0#holdout-normal001 outline 1.0.0 rerank 1.0.0#holdout-normal001"
    algo = {**ALGO, "algorithm_version": version}
    seg = build_segmentation(case.ct, case.lung, case.labels, instance_uid_seed="s", **algo)
    sr = build_measurement_report(
        case.ct, seg, case.lesions, lung_volume_ml=1.0, screening_probability=0.5,
        instance_uid_seed="s", **algo,
    )  # fmt: skip
    seg_path, sr_path = save(seg, tmp_path / "seg.dcm"), save(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(seg_path)
    assert_dciodvfy_clean(sr_path)
    for path in (seg_path, sr_path):
        assert " ".join(pydicom.dcmread(path).SoftwareVersions) == version
    assert version in dsrdump(sr_path)  # the SR's algorithm identification keeps it whole
