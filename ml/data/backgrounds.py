"""The six real chest anatomies that nodules are inserted into, on their own (native) grids.

- `lung1`, `lung2`: pyradiomics test CTs (`pyradiomics-ct/`, BSD-3), their expert-labelled tumour
  replaced by parenchyma texture (:func:`ml.data.synth.remove_tumour`, the same rule as
  :func:`ml.data.synth.make_background`, done here in a box around the tumour);
- `normal001`, `cap001`, `cap002`, `P001`: COVID-CT-MD sample CTs (`covid-ct-md/`) as they are;
  they contain no nodule outline (pneumonia in three of them, a hard negative, not a nodule).

:func:`load_anatomy` takes the data folder (`radai train --data DIR`, `../shared/data` here) and a
name; the service and the tests never read that folder. Unlike `make_background`, nothing is
pooled: the grid is the scan's own (0.57-1.0 mm pixels, 2-5 mm slices), and code using these must
not assume one. Measured on the shared 2-core machine: lung2 (512 x 512 x 61) loads in about 3.5 s
(reading 0.3 s, lung segmentation 2.6 s, tumour removal < 0.5 s). Imports `ml.image` and
`ml.data.synth`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ml.data.synth import TUMOUR_MARGIN_MM, Background, remove_tumour
from ml.image.lungs import segment_lungs

PYRADIOMICS = ("lung1", "lung2")
COVID_CT_MD = ("normal001", "cap001", "cap002", "P001")
ANATOMIES = PYRADIOMICS + COVID_CT_MD
LICENCES = {
    **{n: "BSD-3; pyradiomics test data, Harvard Medical School" for n in PYRADIOMICS},
    **{
        n: "COVID-CT-MD, Afshar et al. Sci Data 2021, doi:10.1038/s41597-021-00900-3 "
        "(licence not verified offline; check before redistributing)"
        for n in COVID_CT_MD
    },
}


def _read(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import SimpleITK as sitk

    if not path.is_file():
        raise FileNotFoundError(f"no such background file: {path}")
    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    sx, sy, sz = img.GetSpacing()
    return sitk.GetArrayFromImage(img), (float(sz), float(sy), float(sx))


def _remove_tumour_in_box(
    hu: np.ndarray,
    tumour: np.ndarray,
    lung: np.ndarray,
    spacing: tuple[float, float, float],
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`remove_tumour` on a box around the tumour (whole-volume noise is slow at native size)."""
    box = ndimage.find_objects(tumour.astype(np.uint8))
    if not box:
        return hu, np.zeros(hu.shape, dtype=bool)
    # The fill's ring reaches 3 voxels beyond the margin; keep the box a few voxels wider.
    pad = [int(np.ceil(TUMOUR_MARGIN_MM / s)) + 6 for s in spacing]
    sl = tuple(
        slice(max(0, b.start - p), min(n, b.stop + p))
        for b, p, n in zip(box[0], pad, hu.shape, strict=True)
    )
    rng = np.random.default_rng(seed)
    out = hu.copy()
    out[sl] = remove_tumour(hu[sl], tumour[sl], lung[sl] | tumour[sl], spacing, rng)
    margin = tuple(max(1, int(round(TUMOUR_MARGIN_MM / s))) for s in spacing)
    region = ndimage.binary_dilation(
        tumour[sl], structure=np.ones(tuple(2 * m + 1 for m in margin), dtype=bool)
    )
    filled = np.zeros(hu.shape, dtype=bool)
    filled[sl] = region
    return out, filled


def load_anatomy(data_dir: Path, name: str, seed: int = 0) -> Background:
    """One of :data:`ANATOMIES` from the data folder, on its native grid, with its lungs.

    For lung1/lung2 ``tumour`` is the removed expert mask; for the others it is empty."""
    data_dir = Path(data_dir)
    if name in PYRADIOMICS:
        raw, spacing = _read(data_dir / "pyradiomics-ct" / f"{name}_image.nrrd")
        label, _ = _read(data_dir / "pyradiomics-ct" / f"{name}_label.nrrd")
        hu = raw.astype(np.float32)
        tumour = label > 0
        lung = segment_lungs(hu, spacing)
        hu, filled = _remove_tumour_in_box(hu, tumour, lung, spacing, seed)
        # The filled region looks like parenchyma now: it is lung (segmentation includes lesions
        # inside the lung anyway; this saves segmenting the cleaned volume again).
        lung = lung | filled
        return Background(name, hu, lung, spacing, tumour)
    if name in COVID_CT_MD:
        raw, spacing = _read(data_dir / "covid-ct-md" / f"{name}.nrrd")
        hu = raw.astype(np.float32)
        return Background(
            name, hu, segment_lungs(hu, spacing), spacing, np.zeros(hu.shape, dtype=bool)
        )
    raise ValueError(f"unknown anatomy {name!r}; known: {ANATOMIES}")


def load_anatomies(data_dir: Path, names: Sequence[str] = ANATOMIES) -> dict[str, Background]:
    """:func:`load_anatomy` for each name (seed = its index, for the tumour fill)."""
    return {name: load_anatomy(data_dir, name, seed=i) for i, name in enumerate(names)}
