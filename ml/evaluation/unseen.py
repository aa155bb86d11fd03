"""The evaluation on patients no method saw (issue #11, items 5 and 6): real LIDC nodules of the
test-split patients inserted into each real anatomy, each real CT as it is, the two real expert
tumours and mirrored copies, scored for any detector.

A *detector* is a callable ``(hu, spacing) -> Detections``: a lesion label map (0 background,
candidate i labelled i) with one score per candidate and the score from which the pipeline reports
a call (its operating point). :func:`baseline_detector` wraps the classical pipeline (score: the
Lung-RADS size suspicion of each candidate; every candidate is reported); :func:`model_detector`
wraps a segmenter and screener (every lesion call of the segmenter, scored by the screener; those
at or above the screener's operating threshold are reported). Retrained fold models enter through
:func:`detector_for`: the fold model that held out an anatomy (registry file
``fold-holdout-<anatomy>.*``) scores that anatomy; where no fold held it out, the shipped models
do, and the results say which models saw which anatomy.

Studies (:func:`iter_studies`), all deterministic for one seed:

* ``composite``: K studies per anatomy, each with `NODULES_PER_STUDY` real LIDC nodules of test
  patients (``lidc_split("test", purpose="final-evaluation")``; nothing is tuned on them) inserted
  by :func:`ml.data.compose.insert_nodule` at their own size (scale 1). A nodule that touched its
  own chest wall goes in as ``pleural``; the others as ``free``, ``pleural`` or
  ``fissure_or_vessel`` by a seeded draw. The test nodules are dealt out in a seeded order so that
  each is used once before any is used again.
* ``as-is``: each real CT unchanged (the COVID-CT-MD ones: normal and pneumonia, no nodule;
  lung1 and lung2 with their expert-labelled tumour as the one truth lesion).
* ``mirrored``: the first composite study of each anatomy and the two tumour CTs flipped
  left-right (x), truth flipped with them.

Hit rule (as LUNA16, Setio et al. 2017, plus one case): a candidate hits a truth lesion when its
centroid lies within the lesion's radius (equivalent-sphere radius of its nominal volume) of the
lesion's centroid, or inside the lesion's label; a candidate that hits several takes the nearest.
FROC: composite studies only; per size band, candidates that hit a nodule of another band are
left out (neither true nor false positive), as LUNA16 does with excluded findings. Sizes are the
equivalent-sphere diameter of the readers' mask (nominal volume, as inserted). Intervals resample
anatomies (the background patient: its scans move together).

Dice and HD95 (what exactly is compared): for each inserted nodule, inside its label's bounding box
grown by `DICE_MARGIN_MM`, the union of the candidates that hit it (whatever their score: this
measures the outline, not the decision) against the nodule's label on the study's grid (the
readers' mask resampled there, see :mod:`ml.data.compose`). A missed nodule has Dice 0.

Imports `ml.data`, `ml.runtime`, `ml.runtime.baseline` and `ml.evaluation.froc` / `metrics`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ml.data import scanner_aug
from ml.data.backgrounds import ANATOMIES, PYRADIOMICS, load_anatomy
from ml.data.compose import PlacementError, PlacementIndex, attachment, insert_nodule
from ml.data.nodules import NoduleCrop, NoduleRow, load_crop, read_nodule_table
from ml.data.splits import FINAL_EVALUATION, rows_in
from ml.data.synth import Background, load_nrrd_case
from ml.evaluation import metrics
from ml.evaluation.froc import FP_RATES, Froc, ScanDetections, froc
from ml.runtime import cad, inference, nodule_outline
from ml.runtime.baseline import run_baseline
from ml.runtime.registry import LoadedModel
from ml.runtime.triage import lesion_probability

Spacing = tuple[float, float, float]
EVAL_SEED = 9_100_000  # never used by training or tuning
NODULES_PER_STUDY = 5
KIND_WEIGHTS = {"free": 0.5, "pleural": 0.25, "fissure_or_vessel": 0.25}
SIZE_BANDS_MM: tuple[tuple[str, float, float], ...] = (
    ("< 6 mm", 0.0, 6.0),
    ("6-10 mm", 6.0, 10.0),
    ("10-20 mm", 10.0, 20.0),
    (">= 20 mm", 20.0, math.inf),
    (">= 6 mm", 6.0, math.inf),
    ("all", 0.0, math.inf),
)
DICE_MARGIN_MM = 10.0
NORMAL = ("normal001",)
PNEUMONIA = ("cap001", "cap002", "P001")


@dataclass
class Detections:
    """One detector's output on one volume."""

    labels: np.ndarray  # int, candidate i is labelled i (1..n)
    scores: list[float]  # score of candidate i at index i - 1
    report_threshold: float = 0.0  # candidates scoring at least this are reported calls

    @property
    def reported(self) -> list[bool]:
        return [s >= self.report_threshold for s in self.scores]


Detector = Callable[[np.ndarray, Spacing], Detections]


@dataclass(frozen=True)
class Truth:
    """One truth lesion of a study: label value, centroid (voxels) and size."""

    label: int
    centre_voxel: tuple[float, float, float]
    diameter_mm: float
    source: str = ""  # e.g. LIDC-IDRI-0123 #2, or the expert tumour
    patient: str = ""
    kind: str = ""

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0


@dataclass
class Study:
    study_id: str
    anatomy: str
    kind: str  # composite | as-is | mirrored
    hu: np.ndarray
    labels: np.ndarray
    spacing: Spacing
    truths: list[Truth] = field(default_factory=list)


# --- detectors ----------------------------------------------------------------------------------


def baseline_detector(hu: np.ndarray, spacing: Spacing) -> Detections:
    """The classical pipeline: its candidates, scored by their size suspicion, all reported."""
    r = run_baseline(hu, spacing, threads=torch.get_num_threads())
    scores = [0.0] * len(r.lesions)
    for m in r.lesions:
        scores[m.label - 1] = float(lesion_probability(m))
    return Detections(r.lesion_labels, scores, 0.0)


def model_detector(segmenter: LoadedModel, screener: LoadedModel) -> Detector:
    """The models: every lesion call of the segmenter (after the size, density and lung-contact
    filters of :func:`ml.runtime.inference.lesion_components`), scored by the screener; reported
    from the screener's operating threshold, as :func:`ml.runtime.inference.analyse` does."""
    threshold = inference.operating_threshold(screener)

    @torch.no_grad()
    def run(hu: np.ndarray, spacing: Spacing) -> Detections:
        lung, lesion = inference.segment(segmenter, hu)
        labels, n = inference.lesion_components(lesion, spacing, hu, lung & ~lesion)
        if n == 0:
            return Detections(labels, [], threshold)
        x = torch.from_numpy(inference.candidate_inputs(hu, labels, n)[0])
        step = inference.BATCH * 4
        logits = torch.cat([screener.net(x[i : i + step]) for i in range(0, n, step)])
        return Detections(labels, torch.sigmoid(logits[:, 0]).tolist(), threshold)

    return run


def cad_detector(
    model: LoadedModel, outliner: LoadedModel | None = None, reranker: LoadedModel | None = None
) -> Detector:
    """The nodule CAD: its masses (reported by size, ranked first) and best-scoring outlined
    candidates (`ml.runtime.cad.OUTLINED` per scan in all), scored by its classifier or, where
    given, by the second stage ``reranker``, reported from the threshold of the last scorer's
    card; outlines drawn by ``outliner`` (an outline U-Net trained on LIDC crops only, so it saw
    none of the anatomies) or classically."""
    drawer = None if outliner is None else nodule_outline.Outliner(outliner)

    @torch.no_grad()
    def run(hu: np.ndarray, spacing: Spacing) -> Detections:
        r = cad.run_cad(hu, spacing, model, outliner=drawer, reranker=reranker)
        return Detections(r.lesion_labels, r.ranking, r.threshold)

    return run


def cad_for(
    shipped: LoadedModel,
    folds: dict[str, LoadedModel],
    outliner: LoadedModel | None = None,
    reranker: LoadedModel | None = None,
    fold_rerankers: dict[str, LoadedModel] | None = None,
) -> MethodChooser:
    """The fold classifier (and fold second stage) that held the anatomy out, else the shipped
    ones; the outline U-Net (never trained on any anatomy) with either."""
    saw = tuple(shipped.card.get("training", {}).get("data", {}).get("anatomies", ANATOMIES))
    drawn = "" if outliner is None else f", outlines by {outliner.ref}"
    fold_rerankers = fold_rerankers or {}

    def choose(anatomy: str) -> tuple[Detector, str, bool]:
        if anatomy in folds and (reranker is None or anatomy in fold_rerankers):
            second = "" if reranker is None else f" and its second stage {reranker.ref}"
            return (
                cad_detector(folds[anatomy], outliner, fold_rerankers.get(anatomy)),
                f"CAD fold model{second} holding out {anatomy}{drawn}",
                False,
            )
        second = "" if reranker is None else f" with {reranker.ref}"
        return (
            cad_detector(shipped, outliner, reranker),
            f"shipped CAD model{second}{drawn}",
            anatomy in saw,
        )

    return choose


@dataclass
class ModelSet:
    """Shipped models and fold models keyed by the anatomy they held out."""

    segmenter: LoadedModel
    screener: LoadedModel
    fold_segmenters: dict[str, LoadedModel] = field(default_factory=dict)
    fold_screeners: dict[str, LoadedModel] = field(default_factory=dict)
    shipped_saw: tuple[str, ...] = PYRADIOMICS  # anatomies in the shipped models' training


def detector_for(models: ModelSet, anatomy: str) -> tuple[Detector, str, bool]:
    """(detector, which models, whether they saw this anatomy in training) for one anatomy: the
    fold pair that held it out where both exist, else the shipped pair."""
    if anatomy in models.fold_segmenters and anatomy in models.fold_screeners:
        seg, scr = models.fold_segmenters[anatomy], models.fold_screeners[anatomy]
        return model_detector(seg, scr), f"fold models holding out {anatomy}", False
    det = model_detector(models.segmenter, models.screener)
    return det, "shipped models", anatomy in models.shipped_saw


# --- hits ---------------------------------------------------------------------------------------


def centroids(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) centroids in voxels of labels 1..n (NaN for an absent label)."""
    if n == 0:
        return np.zeros((0, 3))
    return np.array(ndimage.center_of_mass(labels > 0, labels, range(1, n + 1)), dtype=float)


def match(
    det_labels: np.ndarray, n: int, truth_labels: np.ndarray, truths: Sequence[Truth], spacing
) -> list[int | None]:
    """For each candidate 1..n, the index in ``truths`` of the lesion it hits, or None (see the
    module's hit rule)."""
    sp = np.asarray(spacing, dtype=float)
    cents = centroids(det_labels, n)
    out: list[int | None] = []
    t_centres = np.array([t.centre_voxel for t in truths], dtype=float).reshape(-1, 3)
    t_radius = np.array([t.radius_mm for t in truths], dtype=float)
    value_to_index = {t.label: i for i, t in enumerate(truths)}
    shape = np.array(truth_labels.shape)
    for c in cents:
        if not np.all(np.isfinite(c)) or not truths:
            out.append(None)
            continue
        dist = np.linalg.norm((t_centres - c) * sp, axis=1)
        near = dist <= t_radius
        v = np.clip(np.round(c).astype(int), 0, shape - 1)
        inside = value_to_index.get(int(truth_labels[tuple(v)]))
        if inside is not None:
            near[inside] = True
        out.append(int(np.argmin(np.where(near, dist, np.inf))) if near.any() else None)
    return out


# --- studies ------------------------------------------------------------------------------------


def test_rows(data_dir: Path) -> list:
    """The LIDC rows of the test patients, for this final evaluation only."""
    crop_dir = Path(data_dir) / "lidc-nodules"
    rows = read_nodule_table(crop_dir / "nodules.csv", crop_dir)
    return rows_in(rows, "test", purpose=FINAL_EVALUATION)


def _truths_of(labels: np.ndarray, spacing, meta: Sequence[dict]) -> list[Truth]:
    """Truths from a label map whose value i + 1 is ``meta[i]`` (centroid from the label)."""
    out = []
    for i, m in enumerate(meta):
        value = i + 1
        c = ndimage.center_of_mass(labels == value)
        out.append(Truth(value, tuple(float(v) for v in c), **m))  # type: ignore[arg-type]
    return out


def equivalent_diameter(volume_mm3: float) -> float:
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def compose_study(
    background, index: PlacementIndex, crops: Sequence[NoduleCrop], seed: int
) -> Study:
    """One composite study: ``crops`` inserted at scale 1, placements by ``seed``. A crop that
    fits nowhere (PlacementError) is skipped; its absence is in the study's truths."""
    rng = np.random.default_rng(seed)
    hu = np.array(background.hu, dtype=np.float32, copy=True)
    labels = np.zeros(hu.shape, dtype=np.int16)
    meta: list[dict] = []
    kinds = list(KIND_WEIGHTS)
    p = np.array(list(KIND_WEIGHTS.values()))
    for crop in crops:
        kind = "pleural" if attachment(crop) is not None else str(rng.choice(kinds, p=p / p.sum()))
        for attempt in (kind, "free", "pleural"):
            try:
                ins = insert_nodule(
                    hu, labels, index, crop, attempt, rng, label_value=len(meta) + 1, seed=seed
                )
            except (PlacementError, ValueError):
                continue
            meta.append(
                {
                    "diameter_mm": equivalent_diameter(ins.nominal_volume_mm3),
                    "source": f"{crop.row.patient_id} #{crop.row.nodule_id}",
                    "patient": crop.row.patient_id,
                    "kind": ins.kind,
                }
            )
            break
    truths = _truths_of(labels, background.spacing, meta)
    study_id = f"{background.name}-composite-{seed}"
    return Study(study_id, background.name, "composite", hu, labels, background.spacing, truths)


def mirrored(study: Study) -> Study:
    """``study`` flipped left-right (x), its labels and truth centres with it."""
    hu, labels = scanner_aug.mirror(study.hu, study.labels, axes=(2,))
    nx = study.hu.shape[2]
    truths = [
        Truth(
            t.label,
            (t.centre_voxel[0], t.centre_voxel[1], nx - 1 - t.centre_voxel[2]),
            t.diameter_mm,
            t.source,
            t.patient,
            t.kind,
        )
        for t in study.truths
    ]
    return Study(
        f"{study.study_id}-mirrored", study.anatomy, "mirrored", hu, labels, study.spacing, truths
    )


def deal(rows: Sequence, n: int, seed: int) -> list:
    """``n`` rows in a seeded order, each used once before any is used again."""
    if not rows:
        raise ValueError("no nodules to insert")
    order = list(np.random.default_rng(seed).permutation(len(rows)))
    return [rows[order[i % len(rows)]] for i in range(n)]


def iter_studies(
    data_dir: Path,
    anatomies: Sequence[str] = ANATOMIES,
    k: int = 10,
    *,
    rows: Sequence | None = None,
    nodules_per_study: int = NODULES_PER_STUDY,
    seed: int = EVAL_SEED,
    mirror_first: bool = True,
    load: Callable[[Path, str], Background] | None = None,
    crop_loader: Callable[[NoduleRow], NoduleCrop] | None = None,
    only: Sequence[str] | None = None,
) -> Iterator[Study]:
    """All studies, anatomy by anatomy: K composites (the first one also mirrored), then the CT as
    it is (lung1/lung2 with their tumour) and, for the tumour CTs, its mirrored copy. Studies are
    made one at a time so that memory stays at one volume per anatomy. ``only``: just these
    anatomies' studies, the very ones the whole run makes (nodules are dealt over all)."""
    data_dir = Path(data_dir)
    if rows is None:
        rows = test_rows(data_dir)
    dealt = deal(rows, len(anatomies) * k * nodules_per_study, seed)
    crop_dir = data_dir / "lidc-nodules"
    load = load or (lambda d, name: load_anatomy(d, name, seed=ANATOMIES.index(name)))
    crop_loader = crop_loader or (lambda row: load_crop(crop_dir, row))
    for a, name in enumerate(anatomies):
        if only is not None and name not in only:
            continue
        background = load(data_dir, name)
        index = PlacementIndex(background)
        for i in range(k):
            start = (a * k + i) * nodules_per_study
            crops = [crop_loader(r) for r in dealt[start : start + nodules_per_study]]
            study = compose_study(background, index, crops, seed + 1000 * a + i)
            yield study
            if i == 0 and mirror_first:
                yield mirrored(study)
        yield from as_is(data_dir, name, background)


def as_is(data_dir: Path, name: str, background) -> Iterator[Study]:
    """The real CT unchanged; for lung1/lung2 with the expert tumour, then mirrored."""
    if name in PYRADIOMICS:
        folder = Path(data_dir) / "pyradiomics-ct"
        hu, mask, spacing = load_nrrd_case(
            folder / f"{name}_image.nrrd", folder / f"{name}_label.nrrd"
        )
        labels = mask.astype(np.int16)
        vol = float(mask.sum()) * math.prod(spacing)
        truths = _truths_of(
            labels,
            spacing,
            [{"diameter_mm": equivalent_diameter(vol), "source": "expert tumour", "patient": name}],
        )
        study = Study(
            f"{name}-as-is", name, "as-is", hu.astype(np.float32), labels, spacing, truths
        )
        yield study
        yield mirrored(study)
    else:
        yield Study(
            f"{name}-as-is",
            name,
            "as-is",
            np.asarray(background.hu, dtype=np.float32),
            np.zeros(background.hu.shape, dtype=np.int16),
            background.spacing,
        )


# --- scoring ------------------------------------------------------------------------------------


@dataclass
class Scored:
    """One study scored by one method (no arrays: what the tables need)."""

    study_id: str
    anatomy: str
    kind: str
    method: str
    truths: list[Truth]
    candidates: list[tuple[float, int | None, bool]]  # (score, truth hit or None, reported)
    overlap: list[dict[str, float]]  # per truth: dice, hd95_mm
    seconds: float


def score_study(study: Study, method: str, detector: Detector) -> Scored:
    start = time.perf_counter()
    det = detector(study.hu, study.spacing)
    seconds = time.perf_counter() - start
    n = len(det.scores)
    hits = match(det.labels, n, study.labels, study.truths, study.spacing)
    cands = [(float(s), h, bool(r)) for s, h, r in zip(det.scores, hits, det.reported, strict=True)]
    return Scored(
        study.study_id,
        study.anatomy,
        study.kind,
        method,
        study.truths,
        cands,
        lesion_overlap(det.labels, hits, study, whole=study.kind != "composite"),
        seconds,
    )


def lesion_overlap(
    det_labels: np.ndarray, hits: Sequence[int | None], study: Study, *, whole: bool = False
) -> list[dict[str, float]]:
    """Dice and HD95 of each truth against the candidates that hit it, in the truth's box grown by
    `DICE_MARGIN_MM` (``whole``: over the whole volume, the real tumours)."""
    sp = np.asarray(study.spacing, dtype=float)
    out = []
    for i, t in enumerate(study.truths):
        truth = study.labels == t.label
        ids = [j + 1 for j, h in enumerate(hits) if h == i]
        pred = np.isin(det_labels, ids) if ids else np.zeros(truth.shape, dtype=bool)
        if not whole:
            box = ndimage.find_objects(truth.astype(np.uint8))[0]
            g = np.ceil(DICE_MARGIN_MM / sp).astype(int)
            box = tuple(slice(max(0, b.start - m), b.stop + m) for b, m in zip(box, g, strict=True))
            truth, pred = truth[box], pred[box]
        ov = metrics.overlap(pred, truth, study.spacing)
        out.append({"dice": ov["dice"], "hd95_mm": ov["hd95_mm"]})
    return out


def scan_detections(
    scored: Sequence[Scored], band: tuple[float, float] = (0.0, math.inf)
) -> list[ScanDetections]:
    """FROC input: candidates hitting a nodule outside ``band`` are left out; nodules reindexed."""
    lo, hi = band
    out = []
    for s in scored:
        keep = [i for i, t in enumerate(s.truths) if lo <= t.diameter_mm < hi]
        new = {old: j for j, old in enumerate(keep)}
        cands: list[tuple[float, int | None]] = []
        for score, hit, _ in s.candidates:
            if hit is None:
                cands.append((score, None))
            elif hit in new:
                cands.append((score, new[hit]))
        out.append(ScanDetections(s.study_id, len(keep), cands, s.anatomy))
    return out


def froc_with_intervals(scans: Sequence[ScanDetections], *, resamples: int = 1000) -> dict:
    """CPM and sensitivity at each FP rate, each with a 95 % interval over anatomies."""
    patients = sorted({s.patient or s.scan_id for s in scans})
    by_patient = {p: [s for s in scans if (s.patient or s.scan_id) == p] for p in patients}

    def curve(idx: np.ndarray) -> Froc:
        chosen = [
            ScanDetections(f"{s.scan_id}#{k}", s.nodules, s.candidates, f"{patients[i]}#{k}")
            for k, i in enumerate(idx)
            for s in by_patient[patients[i]]
        ]
        return froc(chosen)

    full = froc(scans)
    out: dict = {"scans": full.scans, "nodules": full.nodules}
    if not full.nodules:
        return out
    rng = np.random.default_rng(0)
    draws = [curve(rng.integers(0, len(patients), len(patients))) for _ in range(resamples)]

    def interval(point: float, values: list[float]) -> list[float]:
        v = [x for x in values if not math.isnan(x)]
        if len(patients) < 2 or not v:
            return [point, point, point]
        lo, hi = np.percentile(v, [2.5, 97.5])
        return [point, float(lo), float(hi)]

    out["cpm"] = interval(full.cpm, [d.cpm for d in draws])
    out["sensitivity_at"] = {
        str(r): interval(full.at_rates[r], [d.at_rates[r] for d in draws]) for r in FP_RATES
    }
    out["curve"] = {
        "fps_per_scan": [float(x) for x in full.fps_per_scan],
        "sensitivity": [float(x) for x in full.sensitivity],
    }
    return out


def summarise(scored: Sequence[Scored], method: str, *, resamples: int = 1000) -> dict:
    """Every figure of one method: FROC by size, false calls per real CT, Dice, tumours, mirror."""
    mine = [s for s in scored if s.method == method]
    comp = [s for s in mine if s.kind == "composite"]
    out: dict = {"froc": {}}
    for name, lo, hi in SIZE_BANDS_MM:
        out["froc"][name] = froc_with_intervals(
            scan_detections(comp, (lo, hi)), resamples=resamples
        )
    # Operating point: the reported calls only.
    found = [
        (t.diameter_mm, any(h == i and r for _, h, r in s.candidates))
        for s in comp
        for i, t in enumerate(s.truths)
    ]
    fp_reported = [sum(1 for _, h, r in s.candidates if r and h is None) for s in comp]
    out["operating_point"] = {
        "sensitivity_ge_6mm": _fraction([f for d, f in found if d >= 6.0]),
        "sensitivity_all": _fraction([f for _, f in found]),
        "false_calls_per_scan": float(np.mean(fp_reported)) if fp_reported else None,
    }
    dice = [(t.diameter_mm, o) for s in comp for t, o in zip(s.truths, s.overlap, strict=True)]
    found_dice = [o["dice"] for _, o in dice if o["dice"] > 0]
    out["dice"] = {
        "all_nodules": metrics.mean_ci([o["dice"] for _, o in dice]) if dice else None,
        "found_nodules": metrics.mean_ci(found_dice) if found_dice else None,
        "ge_6mm_found": metrics.mean_ci([o["dice"] for d, o in dice if d >= 6 and o["dice"] > 0])
        if any(d >= 6 and o["dice"] > 0 for d, o in dice)
        else None,
        "hd95_mm_found_median": metrics.median_ci([o["hd95_mm"] for _, o in dice if o["dice"] > 0])
        if found_dice
        else None,
        "nodules": len(dice),
        "found": len(found_dice),
    }
    out["real_ct"] = [
        {
            "anatomy": s.anatomy,
            "study": s.study_id,
            "kind": s.kind,
            "reported_calls": sum(1 for _, _, r in s.candidates if r),
            "false_calls": sum(1 for _, h, r in s.candidates if r and h is None),
            "all_candidates": len(s.candidates),
            "tumour_detected": (
                any(h == 0 and r for _, h, r in s.candidates) if s.truths else None
            ),
            "tumour_dice": s.overlap[0]["dice"] if s.truths else None,
            "tumour_hd95_mm": s.overlap[0]["hd95_mm"] if s.truths else None,
        }
        for s in mine
        if s.kind == "as-is" or (s.kind == "mirrored" and s.study_id.endswith("-as-is-mirrored"))
    ]
    pairs = []
    by_id = {s.study_id: s for s in mine}
    for s in mine:
        if s.kind != "mirrored":
            continue
        orig = by_id.get(s.study_id.removesuffix("-mirrored"))
        if orig is None:
            continue
        d0 = [o["dice"] for o in orig.overlap]
        d1 = [o["dice"] for o in s.overlap]
        pairs.append(
            {
                "study": orig.study_id,
                "dice": d0,
                "dice_mirrored": d1,
                "max_abs_dice_change": max(
                    (abs(a - b) for a, b in zip(d0, d1, strict=True)), default=0.0
                ),
                "found": sum(
                    any(h == i and r for _, h, r in orig.candidates)
                    for i in range(len(orig.truths))
                ),
                "found_mirrored": sum(
                    any(h == i and r for _, h, r in s.candidates) for i in range(len(s.truths))
                ),
                "false_calls": sum(1 for _, h, r in orig.candidates if r and h is None),
                "false_calls_mirrored": sum(1 for _, h, r in s.candidates if r and h is None),
            }
        )
    out["mirrored"] = pairs
    out["seconds_per_study"] = float(np.mean([s.seconds for s in mine])) if mine else None
    return out


def _fraction(flags: Sequence[bool]) -> list[float] | None:
    if not flags:
        return None
    arr = np.asarray(flags, dtype=float)
    return list(metrics.bootstrap(lambda idx: float(arr[idx].mean()), arr.size))


# --- robustness ---------------------------------------------------------------------------------


def _regrid(study: Study, target: Spacing, name: str) -> Study:
    hu, labels, new_sp = scanner_aug.resample_spacing(study.hu, study.labels, study.spacing, target)
    ratio = np.asarray(study.spacing) / np.asarray(new_sp)
    truths = [
        Truth(
            t.label,
            tuple(float(v) for v in (np.asarray(t.centre_voxel) + 0.5) * ratio - 0.5),  # type: ignore[arg-type]
            t.diameter_mm,
            t.source,
            t.patient,
            t.kind,
        )
        for t in study.truths
    ]
    # A nodule thinner than half a new voxel can vanish from the label: it still counts as truth.
    return Study(f"{study.study_id}-{name}", study.anatomy, name, hu, labels, new_sp, truths)


def conditions() -> dict[str, Callable[[Study, np.random.Generator], Study]]:
    """Scanner and protocol changes of the robustness table, including resolution and slice
    thickness (the grid changes; the truth moves with it). Noise, dose, streaks, rings and blur stay
    in the synthetic robustness table: each condition here costs a study per anatomy and method,
    and the bounded run (25 minutes on 2 shared cores) affords these two; add more here."""
    return {
        "clean": lambda s, r: s,
        "pixels 1.5x coarser": lambda s, r: _regrid(
            s, (s.spacing[0], 1.5 * s.spacing[1], 1.5 * s.spacing[2]), "pixels 1.5x coarser"
        ),
        "slices 2x thicker": lambda s, r: _regrid(
            s, (2.0 * s.spacing[0], s.spacing[1], s.spacing[2]), "slices 2x thicker"
        ),
    }


def robustness_row(scored: Sequence[Scored]) -> dict:
    """Reported-call sensitivity (all, >= 6 mm), false calls per scan and Dice of found nodules."""
    found = [
        (t.diameter_mm, any(h == i and r for _, h, r in s.candidates))
        for s in scored
        for i, t in enumerate(s.truths)
    ]
    ge6 = [f for d, f in found if d >= 6]
    dice = [o["dice"] for s in scored for o in s.overlap if o["dice"] > 0]
    return {
        "studies": len(scored),
        "nodules": len(found),
        "sensitivity_all": float(np.mean([f for _, f in found])) if found else None,
        "sensitivity_ge_6mm": float(np.mean(ge6)) if ge6 else None,
        "false_calls_per_scan": float(
            np.mean([sum(1 for _, h, r in s.candidates if r and h is None) for s in scored])
        )
        if scored
        else None,
        "dice_found": float(np.mean(dice)) if dice else None,
    }


# --- the whole run ------------------------------------------------------------------------------

MethodChooser = Callable[[str], tuple[Detector, str, bool]]


def run(
    data_dir: Path,
    methods: dict[str, MethodChooser],
    *,
    anatomies: Sequence[str] = ANATOMIES,
    k: int = 10,
    robust_k: int = 1,
    resamples: int = 1000,
    progress: Callable[[str], None] = lambda msg: None,
    studies: Iterable[Study] | None = None,
) -> tuple[dict, list[Scored]]:
    """Score every study with every method; ``robust_k`` composites per anatomy also go through
    each robustness condition. Returns the results (JSON-ready) and the scored studies.
    ``studies`` replaces :func:`iter_studies` (tests on phantoms)."""
    started = time.perf_counter()
    part = collect(
        data_dir, methods, anatomies=anatomies, k=k, robust_k=robust_k, progress=progress,
        studies=studies,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return results_of([part], anatomies, k, robust_k, resamples, seconds), part.scored


@dataclass
class Collected:
    """What :func:`collect` scored: studies, robustness conditions, which model per anatomy."""

    scored: list[Scored]
    robust: dict[str, dict[str, list[Scored]]]
    which: dict[str, dict[str, dict]]


def collect(
    data_dir: Path,
    methods: dict[str, MethodChooser],
    *,
    anatomies: Sequence[str] = ANATOMIES,
    k: int = 10,
    robust_k: int = 1,
    progress: Callable[[str], None] = lambda msg: None,
    studies: Iterable[Study] | None = None,
    only: Sequence[str] | None = None,
) -> Collected:
    """The scoring of :func:`run`; ``only`` some anatomies (parts of one run scored apart and
    joined by :func:`results_of`)."""
    scored: list[Scored] = []
    robust: dict[str, dict[str, list[Scored]]] = {}
    which: dict[str, dict[str, dict]] = {m: {} for m in methods}
    conds = conditions()
    current = None
    chosen: dict[str, tuple[Detector, str, bool]] = {}
    composites_seen = 0
    if studies is None:
        studies = iter_studies(data_dir, anatomies, k, only=only)
    for study in studies:
        if study.anatomy != current:
            current, composites_seen = study.anatomy, 0
            chosen = {m: choose(study.anatomy) for m, choose in methods.items()}
            for m, (_, label, saw) in chosen.items():
                which[m][study.anatomy] = {"models": label, "saw_anatomy": saw}
        for m, (det, _, _) in chosen.items():
            scored.append(score_study(study, m, det))
        if study.kind == "composite":
            if composites_seen < robust_k:
                for cname, degrade in conds.items():
                    if cname == "clean":
                        continue
                    rng = np.random.default_rng(EVAL_SEED + composites_seen)
                    changed = degrade(study, rng)
                    for m, (det, _, _) in chosen.items():
                        robust.setdefault(cname, {}).setdefault(m, []).append(
                            score_study(changed, m, det)
                        )
                for m in methods:
                    robust.setdefault("clean", {}).setdefault(m, []).append(
                        next(s for s in reversed(scored) if s.method == m)
                    )
            composites_seen += 1
        progress(f"{study.study_id}: {study.kind}, {len(study.truths)} truth lesion(s) done")
    return Collected(scored, robust, which)


def results_of(
    parts: Sequence[Collected],
    anatomies: Sequence[str],
    k: int,
    robust_k: int,
    resamples: int,
    seconds: float,
) -> dict:
    """The results (JSON-ready) of one run from its scored parts."""
    scored = [s for p in parts for s in p.scored]
    methods = list(dict.fromkeys(m for p in parts for m in p.which))
    which: dict[str, dict[str, dict]] = {m: {} for m in methods}
    robust: dict[str, dict[str, list[Scored]]] = {}
    for p in parts:
        for m, by in p.which.items():
            which[m].update(by)
        for c, by_m in p.robust.items():
            for m, rows in by_m.items():
                robust.setdefault(c, {}).setdefault(m, []).extend(rows)
    results = {
        "settings": {
            "anatomies": list(anatomies),
            "composites_per_anatomy": k,
            "nodules_per_study": NODULES_PER_STUDY,
            "robust_per_anatomy": robust_k,
            "seed": EVAL_SEED,
            "size_bands_mm": [b[0] for b in SIZE_BANDS_MM],
        },
        "lidc_test_nodules_inserted": sorted(
            {t.source for s in scored if s.kind == "composite" for t in s.truths}
        ),
        "methods": {
            m: {"by_anatomy": which[m], **summarise(scored, m, resamples=resamples)}
            for m in methods
        },
        "robustness": {
            c: {m: robustness_row(rows) for m, rows in by.items()} for c, by in robust.items()
        },
        "seconds": round(seconds, 1),
    }
    results["verdict"] = verdict(results)
    return results


TARGETS = {  # issue #11: reported beside the figures, never tuned for
    "CPM (all nodules)": ">= 0.80",
    "sensitivity at 1 FP/scan, nodules >= 6 mm": ">= 0.90",
    "Dice (found nodules)": ">= 0.75",
    "false calls on the normal CT": "<= 1",
    "false calls per pneumonia CT": "<= 1",
    "mirrored copies: largest Dice change": "<= 0.05",
}


def comparison_rows(results: dict) -> list[dict]:
    """The rows on which the pipelines are compared: (name, value per method, higher is better)."""
    rows = []

    def point(v) -> float | None:
        return None if v is None else v[0]

    def each(fn) -> dict[str, float | None]:
        out = {}
        for m, r in results["methods"].items():
            try:
                out[m] = fn(r)
            except (KeyError, TypeError, IndexError):
                out[m] = None
        return out

    rows.append(("CPM (all nodules)", each(lambda r: point(r["froc"]["all"].get("cpm"))), True))
    rows.append(
        ("CPM (nodules >= 6 mm)", each(lambda r: point(r["froc"][">= 6 mm"].get("cpm"))), True)
    )
    rows.append(
        (
            "sensitivity at 1 FP/scan, nodules >= 6 mm",
            each(lambda r: point(r["froc"][">= 6 mm"]["sensitivity_at"]["1.0"])),
            True,
        )
    )
    rows.append(
        (
            "sensitivity at the operating point, nodules >= 6 mm",
            each(lambda r: point(r["operating_point"]["sensitivity_ge_6mm"])),
            True,
        )
    )
    rows.append(
        (
            "false calls per composite scan at the operating point",
            each(lambda r: r["operating_point"]["false_calls_per_scan"]),
            False,
        )
    )
    rows.append(("Dice (found nodules)", each(lambda r: point(r["dice"]["found_nodules"])), True))
    rows.append(
        ("Dice (all nodules, missed = 0)", each(lambda r: point(r["dice"]["all_nodules"])), True)
    )

    def calls(names):
        def fn(r):
            v = [
                x["false_calls"]
                for x in r["real_ct"]
                if x["anatomy"] in names and x["kind"] == "as-is"
            ]
            return float(np.mean(v)) if v else None

        return fn

    rows.append(("false calls on the normal CT", each(calls(NORMAL)), False))
    rows.append(("false calls per pneumonia CT", each(calls(PNEUMONIA)), False))
    rows.append(("false calls per tumour CT (lung1, lung2)", each(calls(PYRADIOMICS)), False))

    def tumour_dice(r):
        v = [
            x["tumour_dice"]
            for x in r["real_ct"]
            if x["kind"] == "as-is" and x["tumour_dice"] is not None
        ]
        return float(np.mean(v)) if v else None

    rows.append(("real tumour Dice (lung1, lung2)", each(tumour_dice), True))
    rows.append(
        (
            "mirrored copies: largest Dice change",
            each(lambda r: max((p["max_abs_dice_change"] for p in r["mirrored"]), default=None)),
            False,
        )
    )
    return [{"row": n, "values": v, "higher_is_better": h} for n, v, h in rows]


def verdict(results: dict, baseline: str = "baseline") -> dict:
    """A trained pipeline is the default only if it beats the baseline on every compared row (a
    tie or a missing figure is not a win); otherwise the baseline is. With several challengers,
    each is judged against the baseline alone; the first that wins everything is the default."""
    challengers = [m for m in results["methods"] if m != baseline]
    if baseline not in results["methods"] or not challengers:
        return {"default": None, "sentence": "only one pipeline was evaluated"}
    each = {m: _verdict_of(results, m, baseline) for m in challengers}
    winners = [m for m, v in each.items() if v["default"] == m]
    if winners:
        out = dict(each[winners[0]])
    else:
        out = {
            "default": baseline,
            "sentence": (
                f"The classical baseline stays the default (`RADAI_PIPELINE={baseline}`): no "
                "other pipeline beats it on every compared row on unseen patients. "
                + " ".join(v["sentence"] for v in each.values())
            ),
        }
    out["by_challenger"] = each
    # Kept for readers of earlier unseen.json files: the models' rows.
    if "models" in each:
        out.setdefault("rows_not_won_by_models", each["models"]["rows_not_won_by_models"])
        out.setdefault("rows_won_by_models", each["models"]["rows_won_by_models"])
    return out


def _verdict_of(results: dict, models: str, baseline: str) -> dict:
    lost: list[str] = []
    tied: list[str] = []  # not a win either, but said apart: both may meet the target
    won: list[str] = []
    for row in comparison_rows(results):
        a, b = row["values"].get(models), row["values"].get(baseline)
        if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
            lost.append(row["row"] + " (no figure)")
            continue
        if a == b:
            tied.append(row["row"])
            continue
        better = a > b if row["higher_is_better"] else a < b
        (won if better else lost).append(row["row"])
    default = models if not lost and not tied else baseline
    if default == models:
        sentence = (
            f"`{models}` is better on unseen patients: it beats the classical baseline on every "
            f"compared row, so `RADAI_PIPELINE` defaults to `{models}`."
        )
    else:
        parts = [f"it loses on: {'; '.join(lost)}"] if lost else []
        parts += [f"it ties on: {'; '.join(tied)}"] if tied else []
        sentence = (
            f"`{models}` does not beat the classical baseline on every row on unseen patients; "
            + ". ".join(parts[:1] + [p[0].upper() + p[1:] for p in parts[1:]])
            + (f". It wins on: {'; '.join(won)}." if won else ".")
        )
    return {
        "default": default,
        "rows_not_won_by_models": lost + tied,
        "rows_tied": tied,
        "rows_won_by_models": won,
        "sentence": sentence,
    }


def carry_over(results: dict, earlier: dict) -> dict:
    """``results`` with the methods of ``earlier`` that it did not run, when both scored the
    same studies (same settings and inserted nodules: the studies are made deterministically);
    the verdict is taken again over all of them. Which methods were carried is recorded."""
    same = (
        earlier.get("settings") == results["settings"]
        and earlier.get("lidc_test_nodules_inserted") == results["lidc_test_nodules_inserted"]
    )
    if not same:
        raise ValueError("the earlier results scored other studies; run every method again")
    carried = [m for m in earlier["methods"] if m not in results["methods"]]
    out = dict(results)
    out["methods"] = {**{m: earlier["methods"][m] for m in carried}, **results["methods"]}
    out["robustness"] = {
        c: {**{m: r for m, r in earlier.get("robustness", {}).get(c, {}).items() if m in carried},
            **by}
        for c, by in results["robustness"].items()
    }  # fmt: skip
    out["carried_over"] = {m: earlier.get("seconds") for m in carried}
    out["verdict"] = verdict(out)
    return out


def standard_methods(root: Path | None = None) -> dict[str, MethodChooser]:
    """The classical baseline and the registry's models (fold models where they held the anatomy
    out, else the shipped ones)."""
    from ml.evaluation.methods import load_methods
    from ml.runtime import registry

    m = load_methods(root or registry.MODELS_DIR)
    saw = tuple(m.segmenter.card.get("training", {}).get("cases", PYRADIOMICS)) + tuple(
        m.screener.card.get("training", {}).get("cases", PYRADIOMICS)
    )
    models = ModelSet(m.segmenter, m.screener, m.fold_segmenters, m.fold_screeners, saw)
    out: dict[str, MethodChooser] = {
        "models": lambda anatomy: detector_for(models, anatomy),
    }
    if m.cad is not None:
        out["cad"] = cad_for(m.cad, m.fold_cad, m.outliner, m.reranker, m.fold_reranker)
    out["baseline"] = lambda anatomy: (baseline_detector, "classical baseline", False)
    return out
