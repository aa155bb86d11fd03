"""Input quality checks run on every study before a model sees it: is this volume a chest CT in
Hounsfield units that the lung models can analyse? :func:`assess` returns a :class:`QAReport` with
a yes/no, reasons written for people, and the values it measured.

Checks (each threshold is in :data:`THRESHOLDS`, with why it has its value):
- HU range: values look like HU (air near -1000 present, not constant, not absurd), all finite.
- Noise: robust high-frequency noise estimate in homogeneous soft tissue.
- Geometry: slice spacing not too thick, pixel size plausible, slice positions regular.
- Truncation: aerated lung cut by the edge of the field of view.
- Body part: enough aerated lung inside the body.

About 0.5 s for a 512x512x61 volume (and for 244 slices of 1.25 mm) on one core of a loaded
machine: the lung and truncation checks run on ~2.5 mm in-plane block means of slices about
5 mm apart, the noise check on at most 12 full-resolution slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from ml.image.lungs import AIR_THRESHOLD_HU, segment_lungs

__all__ = ["THRESHOLDS", "QAReport", "QAThresholds", "assess", "estimate_noise_hu"]


@dataclass(frozen=True)
class QAThresholds:
    # High-frequency noise (see estimate_noise_hu) in soft tissue. The sample CTs measure 3-6 HU;
    # sharp lung kernels reach 50-100 HU and are still read for nodules (800 HU contrast against
    # parenchyma). Above 150 HU a 6 mm nodule is no longer several noise SDs above its neighbours.
    max_noise_hu: float = 150.0
    # Thicker slices average a 6 mm nodule with 4+ mm of parenchyma, so its contrast and shape are
    # lost: Fleischner/Lung-RADS measurement assumes thin sections; 5 mm is the thickest our
    # baseline and the sample studies work with.
    max_slice_spacing_mm: float = 5.0
    # Above 2.5 mm a warning only: nodules under about 6 mm may appear on one slice.
    warn_slice_spacing_mm: float = 2.5
    # A 512 matrix over a 50 cm field gives 0.98 mm; 2 mm pixels mean a 1 m field or a 256
    # matrix over 50 cm, too coarse for 6 mm nodules.
    max_pixel_spacing_mm: float = 2.0
    # Gaps between slice positions may differ from their median by this fraction (plus 0.05 mm
    # of rounding in the DICOM positions) before the series is called irregular (missing or
    # duplicated slices break 3-D shape measurements).
    max_gap_deviation_fraction: float = 0.1
    # Air is -1000 HU; reconstruction noise and beam hardening spread it over about +-100 HU.
    air_range_hu: tuple[float, float] = (-1100.0, -900.0)
    # At least this fraction of voxels must be air: the samples have 32-47 %; a tight field of
    # view still has trachea and lung below -900. Raw 0..4095 data has none.
    min_air_fraction: float = 0.01
    # Padding outside the reconstruction circle is stored at -1024 to -3072 HU on common
    # scanners, and extended-scale CT tops out near +30710 HU; beyond either, it is not HU.
    min_plausible_hu: float = -4000.0
    max_plausible_hu: float = 31000.0
    # A constant volume (range below this) carries no image.
    min_hu_range: float = 100.0
    # Aerated lung inside the body: adult lungs hold 2-8 l; an abdomen CT with lung bases has a
    # few hundred ml at most, and 300 ml is the bar the lung models need to have something to
    # look at. Above 12 l the "lung" is something else (a phantom, air in a container).
    min_lung_volume_ml: float = 300.0
    max_lung_volume_ml: float = 12000.0
    # An air component cut by the image edge that is denser than this on average is lung
    # (parenchyma is -700 to -900 HU), not the air around the patient (-950 to -1000 HU).
    cut_lung_min_mean_hu: float = -920.0
    # ... and larger than this (smaller cut pockets are skin folds or clothing).
    cut_lung_min_volume_ml: float = 50.0
    # Outside a circular reconstruction the image is padded with -1024 to -3072 HU (-2000 is
    # common): block means below this are padding, the edge of the field of view.
    padding_below_hu: float = -1500.0
    # The patient table is an extrusion along z: its air pockets have the same cross-section
    # 20 mm apart (IoU 0.97-0.99 on the samples), a lung's changes (0.4-0.8). Components above
    # this median IoU are not lung.
    z_invariant_distance_mm: float = 20.0
    z_invariant_min_iou: float = 0.95
    # Fraction of slices with lung on which the lung is cut by the field of view before the
    # study fails: one or two slices of apex or base cut leave the rest analysable.
    max_truncated_fraction: float = 0.1
    # In-plane size of the block means used for the lung and truncation checks, and the slice
    # spacing they need: thinner series use every k-th slice (the lung mask works at 5 mm).
    coarse_pixel_mm: float = 2.5
    coarse_slice_mm: float = 5.0
    # Slices used by the noise estimate (spread evenly over the volume).
    noise_slices: int = 12


THRESHOLDS = QAThresholds()

# Soft tissue (fat -100 to muscle/organs +60, with margin) is where noise is measured.
_SOFT_TISSUE_HU = (-200.0, 200.0)
# Tissue mask is chosen on a 7x7 mean so that heavy noise does not truncate the sample itself.
_SELECT_SIZE = 7
# Residual of a 3x3 mean: for white noise of SD s its SD is s * sqrt(8/9).
_RESIDUAL_GAIN = math.sqrt(8.0 / 9.0)
_MIN_NOISE_PIXELS = 500


@dataclass(frozen=True)
class QAReport:
    """Result of :func:`assess`. ``failed`` holds machine codes of the failed checks (``hu_range``,
    ``noise``, ``spacing``, ``truncated``, ``not_chest``), ``reasons`` the same for people;
    ``warnings`` do not stop analysis. Volumes in ml, HU in HU, spacing (z, y, x) in mm."""

    analysable: bool
    reasons: list[str]
    failed: list[str]
    warnings: list[str]
    noise_hu: float
    hu_min: float
    hu_max: float
    air_fraction: float
    lung_volume_ml: float
    truncated_fraction: float
    spacing: tuple[float, float, float]
    measures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """Strict-JSON-serialisable: unmeasured (NaN) values become None, as PostgreSQL's JSON
        types and most parsers reject NaN."""

        def clean(value: object) -> object:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return {k: clean(v) for k, v in asdict(self).items()}


def estimate_noise_hu(volume_hu: np.ndarray, *, max_slices: int = THRESHOLDS.noise_slices) -> float:
    """High-frequency noise SD (HU) in homogeneous soft tissue; NaN if there is too little.

    On up to ``max_slices`` evenly spread slices, the residual of a 3x3 in-plane mean is taken
    inside soft tissue (-200..200 HU on a 7x7 mean, eroded by 2 pixels so edges stay out); its
    median absolute deviation times 1.4826 is a robust SD (anatomy edges are outliers), divided
    by sqrt(8/9) so white noise of SD s reads s. CT noise is correlated by the reconstruction
    kernel, so this reads lower than the pixel SD in a uniform region (more so for soft
    kernels); it is a consistent measure, not a physical one.
    """
    arr = np.asarray(volume_hu)
    if arr.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {arr.shape}")
    nz = arr.shape[0]
    picks = np.unique(np.linspace(0, nz - 1, min(nz, max(1, max_slices))).round().astype(int))
    residuals = []
    structure = np.ones((3, 3), dtype=bool)
    for z in picks:
        plane = arr[z].astype(np.float32)
        smooth = ndimage.uniform_filter(plane, _SELECT_SIZE)
        tissue = (smooth > _SOFT_TISSUE_HU[0]) & (smooth < _SOFT_TISSUE_HU[1])
        tissue = ndimage.binary_erosion(tissue, structure, iterations=2)
        if tissue.any():
            residuals.append((plane - ndimage.uniform_filter(plane, 3))[tissue])
    if not residuals:
        return float("nan")
    r = np.concatenate(residuals)
    if r.size < _MIN_NOISE_PIXELS:
        return float("nan")
    mad = float(np.median(np.abs(r - np.median(r))))
    return 1.4826 * mad / _RESIDUAL_GAIN


def _block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return arr.astype(np.float32)
    nz, ny, nx = arr.shape
    ny2, nx2 = ny // factor * factor, nx // factor * factor
    if ny2 == 0 or nx2 == 0:
        return arr.astype(np.float32)
    blocks = arr[:, :ny2, :nx2].reshape(nz, ny2 // factor, factor, nx2 // factor, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def _edge_runs_enclosed(on_edge: np.ndarray, body_on_edge: np.ndarray | None = None) -> bool:
    """Whether a 1-D edge profile of a component has a run that starts and ends away from the
    corners: the component meets the edge between two stretches of tissue, as a lung cut by a
    narrow field of view does (air under the table runs into a corner instead).

    With ``body_on_edge`` (the same profile of the slice's body, its largest tissue component),
    both stretches must be body: air that meets the edge between the body and the table, or
    between the folds of a blanket, is outside the patient (CTs cropped to the body, as archives
    and data sets store them, put that air on the edge)."""
    if not on_edge.any():
        return False
    padded = np.concatenate([[False], on_edge, [False]])
    steps = np.flatnonzero(np.diff(padded.astype(np.int8)))
    starts, ends = steps[::2], steps[1::2]
    inner = (starts > 0) & (ends < on_edge.size)
    if body_on_edge is not None:
        before = body_on_edge[np.maximum(starts - 1, 0)]
        after = body_on_edge[np.minimum(ends, on_edge.size - 1)]
        inner &= before & after
    return bool(inner.any())


def _body(coarse: np.ndarray) -> np.ndarray:
    """Per slice, the largest connected tissue component (everything not air): the patient,
    with anything that touches it."""
    body = np.zeros(coarse.shape, dtype=bool)
    for z in range(coarse.shape[0]):
        labels, n = ndimage.label(coarse[z] >= AIR_THRESHOLD_HU)
        if n:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            body[z] = labels == int(sizes.argmax())
    return body


def _is_z_invariant(mask: np.ndarray, step: int, min_iou: float) -> bool:
    """Whether a component keeps the same cross-section ``step`` slices apart (median IoU)."""
    present = mask.any(axis=(1, 2))
    ious = []
    for z in range(mask.shape[0] - step):
        if present[z] and present[z + step]:
            a, b = mask[z], mask[z + step]
            ious.append((a & b).sum() / max(int((a | b).sum()), 1))
    return bool(ious) and float(np.median(ious)) >= min_iou


def _cut_lungs(
    coarse: np.ndarray, voxel_ml: float, slice_mm: float, t: QAThresholds
) -> tuple[np.ndarray, np.ndarray, float]:
    """Air components that look like lung cut by the edge of the field of view: denser than
    the air around the patient, large, changing along z (unlike the table), and either meeting
    an image edge between stretches of tissue or touching the padding outside a circular
    reconstruction. Returns per-slice flags (such a cut is on the slice; such a lung is on the
    slice) and their volume in ml."""
    padding = coarse < t.padding_below_hu
    if padding.any():
        # Blocks straddling the circle average padding with what is inside; as air they would
        # bridge a cut lung to the air around the patient.
        padding = ndimage.binary_dilation(padding, np.ones((1, 3, 3), dtype=bool))
    air = (coarse < AIR_THRESHOLD_HU) & ~padding
    labels, n = ndimage.label(air)
    flags = np.zeros(coarse.shape[0], dtype=bool)
    present = np.zeros(coarse.shape[0], dtype=bool)
    if n == 0:
        return flags, present, 0.0
    edges = (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1])
    touching = [np.concatenate([e.ravel() for e in edges])]
    by_padding = None
    if padding.any():
        rim = ndimage.binary_dilation(padding, np.ones((1, 3, 3), dtype=bool)) & ~padding
        by_padding = np.where(rim, labels, 0)
        touching.append(by_padding.ravel())
    on_edge = np.unique(np.concatenate(touching))
    on_edge = on_edge[on_edge > 0]
    if on_edge.size == 0:
        return flags, present, 0.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sums = np.bincount(labels.ravel(), weights=coarse.ravel(), minlength=n + 1)
    means = sums[on_edge] / np.maximum(sizes[on_edge], 1)
    candidates = on_edge[
        (means > t.cut_lung_min_mean_hu) & (sizes[on_edge] * voxel_ml >= t.cut_lung_min_volume_ml)
    ]
    cut_ml = 0.0
    step = max(1, round(t.z_invariant_distance_mm / slice_mm))
    boxes = ndimage.find_objects(labels)
    body = _body(coarse)
    body_edges = (body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1])
    for label in candidates:
        box = boxes[label - 1]
        component = labels[box] == label
        if _is_z_invariant(component, step, t.z_invariant_min_iou):
            continue
        hit = np.array(
            [
                any(
                    _edge_runs_enclosed(e[z] == label, b[z])
                    for e, b in zip(edges, body_edges, strict=True)
                )
                for z in range(len(flags))
            ]
        )
        if by_padding is not None:
            hit |= (by_padding == label).any(axis=(1, 2))
        if hit.any():
            flags |= hit
            present[box[0]] |= component.any(axis=(1, 2))
            # Only the slices where it is cut: the air around a patient can meet the edge
            # between two stretches of body in one skin fold, and is not lung elsewhere.
            per_slice = component.sum(axis=(1, 2), dtype=np.int64)
            cut_ml += float(per_slice[hit[box[0]]].sum()) * voxel_ml
    return flags, present, cut_ml


def _spacing_checks(
    spacing: Sequence[float],
    nz: int,
    slice_positions_mm: Sequence[float] | None,
    t: QAThresholds,
) -> tuple[list[str], list[str]]:
    reasons: list[str] = []
    warnings: list[str] = []
    sz, sy, sx = spacing
    thickest = sz
    if slice_positions_mm is not None:
        pos = np.sort(np.asarray(slice_positions_mm, dtype=np.float64).ravel())
        if pos.size != nz:
            reasons.append(f"{pos.size} slice positions given for {nz} slices")
        elif nz >= 2:
            gaps = np.diff(pos)
            median = float(np.median(gaps))
            tolerance = t.max_gap_deviation_fraction * median + 0.05
            if median <= 0 or np.abs(gaps - median).max() > tolerance:
                reasons.append(
                    f"irregular slice spacing: gaps from {gaps.min():.2f} to {gaps.max():.2f} mm "
                    "(missing or duplicated slices)"
                )
            elif abs(median - sz) > tolerance:
                reasons.append(
                    f"slice positions are {median:.2f} mm apart but the spacing says {sz:.2f} mm"
                )
            thickest = max(thickest, float(gaps.max()))
    if thickest > t.max_slice_spacing_mm:
        reasons.append(f"slice spacing {thickest:.1f} mm exceeds {t.max_slice_spacing_mm:.1f} mm")
    elif thickest > t.warn_slice_spacing_mm:
        warnings.append(
            f"slice spacing {thickest:.1f} mm is above {t.warn_slice_spacing_mm:.1f} mm: "
            "nodules under about 6 mm may be missed"
        )
    if max(sy, sx) > t.max_pixel_spacing_mm:
        reasons.append(
            f"pixel spacing {max(sy, sx):.2f} mm exceeds {t.max_pixel_spacing_mm:.1f} mm"
        )
    return reasons, warnings


def assess(
    volume_hu: np.ndarray,
    spacing: Sequence[float],
    *,
    slice_positions_mm: Sequence[float] | None = None,
    thresholds: QAThresholds = THRESHOLDS,
) -> QAReport:
    """Check that a (z, y, x) HU volume is a chest CT the lung models can analyse.

    ``spacing`` is (z, y, x) in mm; ``slice_positions_mm`` (optional, e.g. from the DICOM
    Image Position along the slice normal) lets irregular or missing slices be found. Raises
    ValueError only for a non-3-D array; every problem with the data itself is a reason.
    """
    t = thresholds
    arr = np.asarray(volume_hu)
    if arr.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {arr.shape}")
    sp = tuple(float(s) for s in spacing)
    reasons: list[str] = []
    failed: list[str] = []
    warnings: list[str] = []
    measures: dict[str, float] = {}

    def fail(code: str, text: str) -> None:
        reasons.append(text)
        if code not in failed:
            failed.append(code)

    nan = float("nan")
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        fail("spacing", f"spacing {spacing} is not three positive numbers (z, y, x) in mm")
    if arr.size == 0:
        fail("hu_range", f"volume is empty (shape {arr.shape})")
    if failed:
        return QAReport(False, reasons, failed, warnings, nan, nan, nan, nan, nan, nan,
                        (nan, nan, nan))  # fmt: skip
    spacing_zyx: tuple[float, float, float] = sp  # type: ignore[assignment]

    # HU range. A stride keeps the statistics cheap; 1 voxel in 8 in-plane is ample for fractions.
    sample = arr[:, ::4, ::2].astype(np.float32)
    finite = np.isfinite(sample)
    if not finite.all() or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
        fail("hu_range", "volume contains NaN or infinite values")
        sample = np.where(finite, sample, 0.0)
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    hu_min, hu_max = float(arr.min()), float(arr.max())
    lo, hi = t.air_range_hu
    air_fraction = float(((sample >= lo) & (sample <= hi)).mean())
    if hu_max - hu_min < t.min_hu_range:
        fail("hu_range", f"volume is almost constant ({hu_min:g} to {hu_max:g}): no image")
    elif air_fraction < t.min_air_fraction:
        hint = (
            ": values start at 0, which looks like raw stored values (0..4095) without the "
            "rescale slope/intercept"
            if hu_min >= 0
            else ""
        )
        fail(
            "hu_range",
            f"only {100 * air_fraction:.2f} % of voxels are air ({lo:g}..{hi:g} HU), below "
            f"{100 * t.min_air_fraction:g} %{hint}",
        )
    if hu_min < t.min_plausible_hu or hu_max > t.max_plausible_hu:
        fail(
            "hu_range",
            f"values from {hu_min:g} to {hu_max:g} are outside the plausible HU range "
            f"{t.min_plausible_hu:g}..{t.max_plausible_hu:g}",
        )

    noise = estimate_noise_hu(arr, max_slices=t.noise_slices)
    if math.isfinite(noise) and noise > t.max_noise_hu:
        fail("noise", f"noise {noise:.0f} HU exceeds {t.max_noise_hu:.0f} HU")

    r, w = _spacing_checks(spacing_zyx, arr.shape[0], slice_positions_mm, t)
    for text in r:
        fail("spacing", text)
    warnings.extend(w)

    # Lungs and truncation on block means: noise averages out and the lung mask is 10x faster.
    # Thin-slice series keep every k-th slice (volumes stay unbiased with the spacing scaled).
    factor = max(1, int(t.coarse_pixel_mm / max(spacing_zyx[1:])))
    z_step = max(1, int(t.coarse_slice_mm / spacing_zyx[0]))
    coarse = _block_mean(arr[::z_step], factor)
    coarse_sp = (spacing_zyx[0] * z_step, spacing_zyx[1] * factor, spacing_zyx[2] * factor)
    voxel_ml = coarse_sp[0] * coarse_sp[1] * coarse_sp[2] / 1000.0
    lungs = segment_lungs(coarse, coarse_sp)
    inside_ml = float(lungs.sum(dtype=np.int64) * voxel_ml)
    cut_flags, cut_present, cut_ml = _cut_lungs(coarse, voxel_ml, coarse_sp[0], t)
    lung_ml = inside_ml + cut_ml
    lung_slices = lungs.any(axis=(1, 2)) | cut_present
    truncated_fraction = float(cut_flags.sum() / lung_slices.sum()) if lung_slices.any() else 0.0
    measures.update(lung_inside_ml=inside_ml, lung_cut_ml=cut_ml)
    if truncated_fraction > t.max_truncated_fraction:
        fail(
            "truncated",
            f"lungs are cut by the edge of the field of view on {100 * truncated_fraction:.0f} % "
            f"of the slices with lung (more than {100 * t.max_truncated_fraction:.0f} %)",
        )
    if lung_ml < t.min_lung_volume_ml:
        fail(
            "not_chest",
            f"aerated lung volume {lung_ml:.0f} ml is below {t.min_lung_volume_ml:.0f} ml: "
            "not a chest CT, or the lungs are not in the field of view",
        )
    elif lung_ml > t.max_lung_volume_ml:
        fail(
            "not_chest",
            f"aerated 'lung' volume {lung_ml:.0f} ml exceeds {t.max_lung_volume_ml:.0f} ml: "
            "implausible for human lungs",
        )
    if lungs.any() and (lungs[0].any() or lungs[-1].any()):
        warnings.append("lungs reach the first or last slice: apex or base may be outside the scan")

    return QAReport(
        analysable=not failed,
        reasons=reasons,
        failed=failed,
        warnings=warnings,
        noise_hu=noise,
        hu_min=hu_min,
        hu_max=hu_max,
        air_fraction=air_fraction,
        lung_volume_ml=lung_ml,
        truncated_fraction=truncated_fraction,
        spacing=spacing_zyx,
        measures=measures,
    )
