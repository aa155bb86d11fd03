"""The six real chest anatomies that nodules are inserted into, on their own (native) grids.

- `lung1`, `lung2`: pyradiomics test CTs (`pyradiomics-ct/`, BSD-3), their expert-labelled tumour
  replaced by parenchyma texture (the region of :func:`ml.data.synth.remove_tumour`, with a
  texture measured on the native grid, see :func:`_remove_tumour_in_box`);
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

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ml.data.synth import TUMOUR_MARGIN_MM, Background
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


def _robust_sd(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def _texture(sub: np.ndarray, ring: np.ndarray) -> tuple[float, float]:
    """(SD, in-plane correlation length in pixels) of the parenchyma's fine texture in ``ring``:
    the robust SD of what a 4-pixel Gaussian does not keep, and the sigma of the Gaussian-filtered
    white noise whose lag-1 autocorrelation rho matches: exp(-1 / (4 sigma^2)) = rho."""
    residual = sub - ndimage.gaussian_filter(sub, (0.0, 4.0, 4.0))
    zz, yy, xx = np.nonzero(ring[:, :, :-1])
    if zz.size < 50:
        return 20.0, 1.0
    a, b = residual[zz, yy, xx], residual[zz, yy, xx + 1]
    rho = float(np.clip(np.corrcoef(a, b)[0, 1], 0.2, 0.98))
    sigma = float(np.clip(math.sqrt(-1.0 / (4.0 * math.log(rho))), 0.5, 3.0))
    return min(_robust_sd(residual[ring]), 80.0), sigma


def _noise(shape, sigma_px, sd: float, rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
    return n * np.float32(sd / max(float(n.std()), 1e-6))


def _remove_tumour_in_box(
    hu: np.ndarray,
    tumour: np.ndarray,
    lung: np.ndarray,
    spacing: tuple[float, float, float],
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the tumour and a `TUMOUR_MARGIN_MM` margin by parenchyma, in a box around it.

    The region and its soft edge are those of :func:`ml.data.synth.remove_tumour`, but the texture
    is measured on the native grid: the fill is the surrounding aerated lung's median plus noise
    with the SD and in-plane correlation length of the surrounding parenchyma's fine texture
    (:func:`_texture`; lung1 and lung2: about 47 HU and 1.6 pixels). `remove_tumour`'s noise of
    one pixel, scaled to the ring's plain SD, made a visibly speckled patch at 0.6 mm pixels."""
    box = ndimage.find_objects(tumour.astype(np.uint8))
    if not box:
        return hu, np.zeros(hu.shape, dtype=bool)
    margin = tuple(max(1, int(round(TUMOUR_MARGIN_MM / s))) for s in spacing)
    pad = [m + 8 for m in margin]
    sl = tuple(
        slice(max(0, b.start - p), min(n, b.stop + p))
        for b, p, n in zip(box[0], pad, hu.shape, strict=True)
    )
    sub = hu[sl]
    region = ndimage.binary_dilation(
        tumour[sl], structure=np.ones(tuple(2 * m + 1 for m in margin), dtype=bool)
    )
    aerated = (lung[sl] | tumour[sl]) & (sub < -500) & ~region
    ring = ndimage.binary_dilation(region, iterations=4) & aerated
    if ring.sum() < 50:
        ring = aerated
    level = float(np.median(sub[ring])) if ring.any() else -850.0
    sd, corr_px = _texture(sub, ring)
    rng = np.random.default_rng(seed)
    fill = level + _noise(sub.shape, (0.0, corr_px, corr_px), sd, rng)
    weight = ndimage.gaussian_filter(region.astype(np.float32), 1.0)
    weight[region] = 1.0
    out = hu.copy()
    out[sl] = sub * (1 - weight) + fill * weight
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
