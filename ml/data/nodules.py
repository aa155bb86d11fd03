"""The LIDC-IDRI nodule crops: the table (`nodules.csv`) and loading a crop with its readers' mask.

Each crop is a nodule-centred box of a real LIDC-IDRI chest CT (int16 HU NIfTI, the scan's own
spacing, e.g. 0.70 x 0.70 x 2.5 mm) with the readers' max-voted binary mask on the same grid. A
crop is loaded in LPS orientation (`SimpleITK.DICOMOrient`), as (z, y, x) float32 HU, a boolean
mask and the (z, y, x) spacing in mm: a few crops are stored with flipped x and y axes and would
otherwise be mirrored relative to the others.

Quirks of `nodules.csv` (as found in the copy under `shared/data/lidc-nodules`): it has rows for
which there is no crop file (LIDC-IDRI-1002 nodules 1 and 2); :func:`read_nodule_table` drops them
when given the crop folder. One patient (LIDC-IDRI-0332) has nodules in two series. The table's
`diameter_mm` is smaller than the mask's equivalent-sphere diameter (median ratio about 1.12, up to
2.4): use the mask, not the table, for sizes. In about half the crops the mask reaches the first
and last slice (the crop was cut at the nodule's z extent), so there is no context above or below.

Source: LIDC-IDRI (Armato et al., Med Phys 2011; TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX),
licence CC BY 3.0, attribution required. Imports nothing of ours.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIDC_LICENCE = "CC BY 3.0; LIDC-IDRI, Armato et al. 2011, doi:10.7937/K9/TCIA.2015.LO9QL9SX"
REQUIRED_COLUMNS = ("patient_id", "nodule_id", "diameter_mm")
# Ratings kept from the table (their numeric `_value` columns), for stratifying and reporting.
RATINGS = ("Malignancy", "Calcification", "Spiculation", "Texture", "Subtlety")


@dataclass(frozen=True)
class NoduleRow:
    """One row of `nodules.csv`: which crop, the table's diameter and the readers' ratings."""

    patient_id: str
    nodule_id: int
    diameter_mm: float
    ratings: dict[str, int]

    @property
    def crop_name(self) -> str:
        return f"{self.patient_id}_R_{self.nodule_id}.nii.gz"


@dataclass(frozen=True)
class NoduleCrop:
    """A loaded crop: HU image and readers' mask on the crop's own grid, (z, y, x)."""

    row: NoduleRow
    hu: np.ndarray  # float32
    mask: np.ndarray  # bool
    spacing: tuple[float, float, float]
    source_file: str  # path relative to the data folder, for provenance

    @property
    def volume_mm3(self) -> float:
        return float(self.mask.sum()) * math.prod(self.spacing)


def read_nodule_table(csv_path: Path, crop_dir: Path | None = None) -> list[NoduleRow]:
    """Rows of `nodules.csv` in file order; with ``crop_dir`` (the `lidc-nodules` folder) only
    those whose image and mask files exist. Raises ValueError on a missing column, a bad number or
    a duplicate (patient, nodule)."""
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}")
        rows: list[NoduleRow] = []
        seen: set[tuple[str, int]] = set()
        for line, rec in enumerate(reader, start=2):
            try:
                nodule_id = int(rec["nodule_id"])
                diameter = float(rec["diameter_mm"])
                ratings = {
                    r.lower(): int(rec[f"{r}_value"]) for r in RATINGS if rec.get(f"{r}_value")
                }
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{csv_path}:{line}: {exc}") from None
            patient = (rec["patient_id"] or "").strip()
            if not patient or not math.isfinite(diameter) or diameter <= 0:
                raise ValueError(f"{csv_path}:{line}: empty patient or bad diameter")
            if (patient, nodule_id) in seen:
                raise ValueError(f"{csv_path}:{line}: duplicate nodule {nodule_id}")
            seen.add((patient, nodule_id))
            rows.append(NoduleRow(patient, nodule_id, diameter, ratings))
    if crop_dir is not None:
        rows = [
            r
            for r in rows
            if (crop_dir / "image" / r.crop_name).is_file()
            and (crop_dir / "mask" / r.crop_name).is_file()
        ]
    return rows


def load_crop(crop_dir: Path, row: NoduleRow) -> NoduleCrop:
    """Image and mask of ``row`` from ``crop_dir`` (`image/` and `mask/`), in LPS orientation.
    Raises ValueError when the two grids differ or the mask is empty."""
    import SimpleITK as sitk

    image_path = crop_dir / "image" / row.crop_name
    mask_path = crop_dir / "mask" / row.crop_name
    img = sitk.DICOMOrient(sitk.ReadImage(str(image_path)), "LPS")
    msk = sitk.DICOMOrient(sitk.ReadImage(str(mask_path)), "LPS")
    if img.GetSize() != msk.GetSize() or not np.allclose(img.GetSpacing(), msk.GetSpacing()):
        raise ValueError(f"{row.crop_name}: image and mask grids differ")
    mask = sitk.GetArrayFromImage(msk) > 0
    if not mask.any():
        raise ValueError(f"{row.crop_name}: empty mask")
    sx, sy, sz = img.GetSpacing()
    return NoduleCrop(
        row=row,
        hu=sitk.GetArrayFromImage(img).astype(np.float32),
        mask=mask,
        spacing=(float(sz), float(sy), float(sx)),
        source_file=f"lidc-nodules/image/{row.crop_name}",
    )
