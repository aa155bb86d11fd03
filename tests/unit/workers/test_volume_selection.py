"""Series selection rules and the volume loader on real sample slices and broken series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_io.series import UndecodablePixels, UnusableSeries, load_series
from dicom_node.samples import SAMPLES_DIR
from tests.helpers import copy_files
from workers.selection import SeriesHeader, load_rules, select_series, why_not


def _header(**kw) -> SeriesHeader:
    base = dict(
        series_uid="1.2.3",
        modality="CT",
        sop_class_uids=frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
        body_part="CHEST",
        slice_count=61,
        slice_thickness_mm=5.0,
        image_types=frozenset({"ORIGINAL", "PRIMARY", "AXIAL"}),
    )
    base.update(kw)
    return SeriesHeader(**base)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "MR"}, "modality MR is not CT"),
        ({"body_part": "HEAD"}, "body part HEAD"),
        ({"slice_count": 5}, "5 slices, fewer than 20"),
        ({"slice_thickness_mm": 10.0}, "slice thickness 10 mm exceeds 5 mm"),
        ({"image_types": frozenset({"ORIGINAL", "LOCALIZER"})}, "LOCALIZER is excluded"),
        ({"sop_class_uids": frozenset({"1.2.840.10008.5.1.4.1.1.88.22"})}, "other SOP classes"),
    ],
)
def test_rules_say_why_a_series_does_not_fit(change, reason):
    rules = load_rules()
    assert why_not(rules, _header()) is None
    assert reason in why_not(rules, _header(**change))


def test_selection_prefers_more_slices_and_explains_refusals():
    rules = load_rules()
    thin = _header(series_uid="1.1", slice_count=120, slice_thickness_mm=1.0)
    thick = _header(series_uid="1.2", slice_count=61)
    scout = _header(series_uid="1.3", slice_count=2)
    chosen = select_series(rules, [thick, thin, scout])
    assert chosen.chosen == thin and "1.3" in chosen.reasons
    none = select_series(rules, [_header(modality="MR")])
    assert none.chosen is None and "modality MR" in none.explain(rules)


@pytest.fixture(scope="module")
def lung1_files(samples):
    return samples["lung1"]


def test_volume_matches_the_source_ct(lung1_files):
    shuffled = list(reversed(lung1_files))  # order must come from positions, not from the caller
    vol = load_series(shuffled)
    ref = sitk.ReadImage(str(SAMPLES_DIR / "lung1_image.nrrd"))
    expected = sitk.GetArrayFromImage(ref).astype(np.float32)
    assert vol.hu.shape == expected.shape
    assert np.array_equal(vol.hu, expected)
    assert vol.spacing_zyx == pytest.approx(tuple(reversed(ref.GetSpacing())))
    assert vol.origin_xyz == pytest.approx(ref.GetOrigin())


def test_missing_slice_is_refused(lung1_files):
    with pytest.raises(UnusableSeries, match="irregular.*missing slices"):
        load_series(lung1_files[:20] + lung1_files[21:])


def test_mixed_sizes_are_refused(lung1_files, tmp_path):
    files = copy_files(lung1_files[:5], tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.PixelData = ds.pixel_array[:256, :256].tobytes()
    ds.Rows, ds.Columns = 256, 256
    ds.save_as(files[2])
    with pytest.raises(UnusableSeries, match="different sizes"):
        load_series(files)


def test_tilted_slice_is_refused(lung1_files, tmp_path):
    files = copy_files(lung1_files[:5], tmp_path)
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    ds.save_as(files[1])
    with pytest.raises(UnusableSeries, match="different orientations"):
        load_series(files)


def test_non_image_object_is_refused(lung1_files, tmp_path):
    files = copy_files(lung1_files[:5], tmp_path)
    ds = pydicom.dcmread(files[3])
    for kw in ("Rows", "Columns", "PixelData"):
        delattr(ds, kw)
    ds.save_as(files[3])
    with pytest.raises(UnusableSeries, match="not images"):
        load_series(files)


def test_undecodable_pixels_are_their_own_failure(lung1_files, tmp_path):
    files = copy_files(lung1_files[:3], tmp_path)
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG baseline, but raw bytes
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not a jpeg\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(files[0], enforce_file_format=True)
    with pytest.raises(UndecodablePixels, match="cannot be decoded"):
        load_series(files)
