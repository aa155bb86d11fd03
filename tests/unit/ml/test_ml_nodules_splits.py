"""The LIDC crop table and loader (ml.data.nodules) on files written here, and the patient splits
(ml.data.splits), including the committed split file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ml.data import splits
from ml.data.nodules import load_crop, read_nodule_table

HEADER = "patient_id,nodule_id,seriesuid,diameter_mm,Malignancy,Malignancy_value,Texture_value\n"


def _write_csv(path, lines):
    path.write_text(HEADER + "".join(line + "\n" for line in lines))
    return path


def _write_crop(folder, name, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    arr = np.full((4, 6, 8), -800, dtype=np.int16)
    arr[1:3, 2:4, 2:5] = 40
    arr[0, 0, 0] = 500  # a marker in the first stored voxel
    mask = (arr == 40).astype(np.int16)
    for sub, a in (("image", arr), ("mask", mask)):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((0.7, 0.8, 2.5))
        img.SetDirection(direction)
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(folder / sub / name))


def test_table_reads_rows_and_drops_those_without_a_crop(tmp_path):
    csv = _write_csv(
        tmp_path / "nodules.csv",
        [
            "LIDC-IDRI-0001,1,1.2.3,7.5,Indeterminate,3,5",
            "LIDC-IDRI-0001,2,1.2.3,4.1,Highly Unlikely,1,5",
            "LIDC-IDRI-0002,1,1.2.4,12.0,Highly Suspicious,5,1",
        ],
    )
    rows = read_nodule_table(csv)
    assert [(r.patient_id, r.nodule_id) for r in rows] == [
        ("LIDC-IDRI-0001", 1),
        ("LIDC-IDRI-0001", 2),
        ("LIDC-IDRI-0002", 1),
    ]
    assert rows[2].diameter_mm == 12.0 and rows[2].ratings == {"malignancy": 5, "texture": 1}
    _write_crop(tmp_path, "LIDC-IDRI-0001_R_2.nii.gz")
    kept = read_nodule_table(csv, tmp_path)
    assert [r.crop_name for r in kept] == ["LIDC-IDRI-0001_R_2.nii.gz"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (["LIDC-IDRI-0001,1,x,7.5,a,3,5", "LIDC-IDRI-0001,1,x,6.0,a,3,5"], "duplicate"),
        (["LIDC-IDRI-0001,one,x,7.5,a,3,5"], "nodules.csv:2"),
        (["LIDC-IDRI-0001,1,x,-1,a,3,5"], "bad diameter"),
    ],
)
def test_table_rejects_bad_rows_with_their_line(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        read_nodule_table(_write_csv(tmp_path / "nodules.csv", lines))


def test_table_without_required_column_is_refused(tmp_path):
    path = tmp_path / "nodules.csv"
    path.write_text("patient_id,diameter_mm\nLIDC-IDRI-0001,4\n")
    with pytest.raises(ValueError, match="nodule_id"):
        read_nodule_table(path)


def test_crop_loads_in_lps_whatever_its_stored_direction(tmp_path):
    name = "LIDC-IDRI-0003_R_1.nii.gz"
    _write_csv(tmp_path / "nodules.csv", ["LIDC-IDRI-0003,1,x,5.0,a,3,5"])
    row = read_nodule_table(tmp_path / "nodules.csv")[0]
    _write_crop(tmp_path / "plain", name)
    _write_crop(tmp_path / "flipped", name, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    plain = load_crop(tmp_path / "plain", row)
    flipped = load_crop(tmp_path / "flipped", row)
    assert plain.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert plain.hu.dtype == np.float32 and plain.mask.dtype == bool
    assert plain.hu[0, 0, 0] == 500
    # Stored with x and y reversed: in LPS the marker is at the far y and x end.
    assert flipped.hu[0, -1, -1] == 500
    assert plain.volume_mm3 == pytest.approx(12 * 2.5 * 0.8 * 0.7)
    assert plain.source_file == f"lidc-nodules/image/{name}"


def test_split_is_by_patient_with_at_least_a_fifth_for_test():
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 501)]
    split = splits.make_split(ids + ids[:10])  # repeated patients count once
    parts = [set(v) for v in split.values()]
    assert sum(len(p) for p in parts) == len(ids)
    assert set().union(*parts) == set(ids)
    assert len(split["test"]) >= 0.2 * len(ids)
    assert len(split["validation"]) > 0 and len(split["train"]) > len(split["test"])


def test_adding_a_patient_moves_no_one_else():
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 201)]
    before = splits.make_split(ids)
    after = splits.make_split(ids + ["LIDC-IDRI-5000"])
    for part in before:
        assert set(before[part]) <= set(after[part])


def test_test_patients_need_the_final_evaluation_purpose(tmp_path):
    path = tmp_path / "split.json"
    splits.write_split([f"P{i}" for i in range(40)], path)
    with pytest.raises(PermissionError):
        splits.lidc_split("test", path=path)
    with pytest.raises(PermissionError):
        splits.lidc_split("test", purpose="tuning", path=path)
    test = splits.lidc_split("test", purpose="final-evaluation", path=path)
    assert test and all(splits.split_of(p) == "test" for p in test)
    assert not set(test) & set(splits.lidc_split("train", path=path))


def test_rows_of_a_part_are_those_of_its_patients(tmp_path):
    path = tmp_path / "split.json"
    ids = [f"P{i}" for i in range(40)]
    splits.write_split(ids, path)

    class Row:
        def __init__(self, pid):
            self.patient_id = pid

    rows = [Row(p) for p in ids for _ in range(2)]
    train = splits.rows_in(rows, "train", path=path)
    assert len(train) == 2 * len(splits.lidc_split("train", path=path))
    assert all(splits.split_of(r.patient_id) == "train" for r in train)


def test_committed_split_agrees_with_the_rule():
    doc = json.loads(splits.SPLIT_FILE.read_text())
    assert doc["key"] == splits.SPLIT_KEY
    seen: set[str] = set()
    for part in ("train", "validation", "test"):
        assert not seen & set(doc[part])
        seen |= set(doc[part])
        assert all(splits.split_of(p) == part for p in doc[part])
    assert len(doc["test"]) >= 0.2 * len(seen)


def test_leave_one_anatomy_out():
    names = ["lung1", "lung2", "normal001", "cap001", "cap002", "P001"]
    folds = list(splits.anatomy_folds(names))
    assert [held for _, held in folds] == names
    for train, held in folds:
        assert held not in train and len(train) == len(names) - 1
    with pytest.raises(ValueError):
        list(splits.anatomy_folds(["lung1", "lung1"]))


def _write_nrrd(path, arr, spacing_zyx):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def test_anatomies_load_from_the_data_folder_layout(tmp_path):
    from ml.data.backgrounds import ANATOMIES, load_anatomy
    from tests.kit.phantoms import phantom_background

    ph = phantom_background(seed=3)
    hu = np.round(ph.hu).astype(np.int16)
    tumour = np.zeros(hu.shape, dtype=np.int16)
    tumour[28:36, 40:50, 22:30] = 1  # inside the left lung
    hu[tumour > 0] = 40
    _write_nrrd(tmp_path / "pyradiomics-ct" / "lung1_image.nrrd", hu, ph.spacing)
    _write_nrrd(tmp_path / "pyradiomics-ct" / "lung1_label.nrrd", tumour, ph.spacing)
    _write_nrrd(tmp_path / "covid-ct-md" / "normal001.nrrd", hu, ph.spacing)
    assert len(ANATOMIES) == 6

    clean = load_anatomy(tmp_path, "lung1")
    assert clean.spacing == pytest.approx(ph.spacing)
    assert np.array_equal(clean.tumour, tumour > 0)
    # The tumour is replaced by parenchyma and counted as lung; the rest is the scan as it was.
    assert np.median(clean.hu[tumour > 0]) < -600
    assert clean.lung[tumour > 0].all()
    assert np.array_equal(clean.hu[:, :, 60:], hu[:, :, 60:].astype(np.float32))

    as_is = load_anatomy(tmp_path, "normal001")
    assert np.array_equal(as_is.hu, hu.astype(np.float32)) and not as_is.tumour.any()
    assert as_is.lung.sum() > 0.8 * ph.lung.sum()

    with pytest.raises(FileNotFoundError):
        load_anatomy(tmp_path, "cap001")
    with pytest.raises(ValueError, match="unknown anatomy"):
        load_anatomy(tmp_path, "lung3")
