"""`radai evaluate --followup` on a tiny synthetic data folder laid out like the shared one (one
phantom chest as `pyradiomics-ct/lung1`, phantom nodule crops of validation-split patient IDs in
`lidc-nodules/`): it writes followup.json and the report section. Never reads the shared data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ml.data.splits import lidc_split
from radai import cli
from tests.kit.phantoms import blob_chest, phantom_crop


def _write(array: np.ndarray, spacing_zyx, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _data(root: Path) -> Path:
    bg = blob_chest()
    _write(bg.hu.astype(np.int16), bg.spacing, root / "pyradiomics-ct" / "lung1_image.nrrd")
    _write(
        np.zeros(bg.hu.shape, np.uint8), bg.spacing, root / "pyradiomics-ct" / "lung1_label.nrrd"
    )
    crops_dir = root / "lidc-nodules"
    patients = lidc_split("validation")[:8]
    rows = []
    for i, (pid, r) in enumerate(
        zip(patients, (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 3.5, 4.0), strict=True)
    ):
        crop = phantom_crop((r, r, r), shape=(16, 44, 44), wall=False, seed=i, patient_id=pid)
        name = crop.row.crop_name
        _write(crop.hu.astype(np.int16), crop.spacing, crops_dir / "image" / name)
        _write(crop.mask.astype(np.uint8), crop.spacing, crops_dir / "mask" / name)
        rows.append({"patient_id": pid, "nodule_id": 1, "diameter_mm": 2 * r})
    with open(crops_dir / "nodules.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["patient_id", "nodule_id", "diameter_mm"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.mark.slow
def test_evaluate_followup_writes_its_json_and_report_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RADAI_HOME", str(tmp_path / "home"))
    data = _data(tmp_path / "data")
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("# Model evaluation\n\n## Earlier table\n\nkept\n")
    rc = cli.main(
        ["evaluate", "--followup", "--data", str(data), "--out", str(out)]
        + ["--followup-anatomies", "lung1", "--followup-pairs", "1", "--followup-threads", "1"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TRE median inside the lungs" in printed and "report:" in printed
    results = json.loads((out / "followup.json").read_text())
    assert results["settings"]["anatomies"] == ["lung1"]
    assert results["settings"]["lidc_split"] == "validation"
    (pair,) = results["pairs"]
    assert pair["truth_labels"]["refused"] is None
    assert pair["truth_labels"]["tre_mm"]["n"] == 300
    assert results["summary"]["truth_labels"]["tre_mm"]["n"] == 300
    assert "baseline" in results["summary"]
    assert len(results["targets"]) == 4
    text = (out / "report.md").read_text()
    assert "## Follow-up on real CT pairs" in text and "## Earlier table" in text
