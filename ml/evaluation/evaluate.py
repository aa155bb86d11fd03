"""The evaluation report: models against the classical baseline, on synthetic and real data.

Three kinds of figures, never mixed:

* **Synthetic, held-out patient** (leave-one-patient-out): studies made by :mod:`ml.synth` from one
  patient's CT (tumour removed, new lesions with seeds never used in training), scored by the fold
  models trained on the other patient only. These measure the method on lesions like the
  synthetic ones, not clinical performance.
* **Real expert-labelled tumours**: the two real CTs at full resolution with their expert masks,
  scored by the fold model that never saw that patient, and by the shipped model, which saw the
  patient's anatomy (tumour removed) but never the tumour.
* **Robustness**: the synthetic held-out set under noise, simulated low dose (with and without
  denoising), streak and ring artefacts, blur and thicker slices.

Every figure carries a 95 % bootstrap interval over studies. The baseline runs on the same data.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ml.data import perturb
from ml.data.cases import CASES, load_backgrounds
from ml.data.synth import Background, load_nrrd_case, sample_study
from ml.evaluation import metrics
from ml.evaluation.methods import Methods, load_methods
from ml.image import preprocess
from ml.runtime import inference, registry
from ml.runtime.baseline import BASELINE_NAME, BASELINE_VERSION, run_baseline
from ml.runtime.registry import LoadedModel

TEST_SEED = 7_000_000  # training streams are seeded elsewhere; these seeds are never trained on
SIZE_BINS_MM = ((3, 6), (6, 10), (10, 20), (20, 40), (40, 61))


@dataclass
class StudyOutcome:
    """One study scored by one method."""

    case: str
    condition: str
    method: str
    has_lesion: int
    score: float
    detection: metrics.Detection
    lesion_overlap: dict[str, float] | None
    lung_dice: float | None
    truth_sizes_mm: list[float] = field(default_factory=list)
    found_sizes_mm: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _sizes(labels: np.ndarray, spacing) -> dict[int, float]:
    """Volume-equivalent diameter (mm) of each labelled lesion."""
    counts = np.bincount(labels.ravel())
    vox = math.prod(spacing)
    return {
        i: (6 * counts[i] * vox / math.pi) ** (1 / 3) for i in range(1, counts.size) if counts[i]
    }


def _score_one(
    case: str,
    condition: str,
    method: str,
    hu: np.ndarray,
    truth: np.ndarray,
    truth_lung: np.ndarray | None,
    spacing,
    run: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]],
) -> StudyOutcome:
    start = time.perf_counter()
    score, pred_labels, pred_lung = run(hu)
    seconds = time.perf_counter() - start
    det = metrics.match_lesions(pred_labels, truth)
    overlap = metrics.overlap(pred_labels > 0, truth > 0, spacing) if truth.any() else None
    lung_dice = None
    if truth_lung is not None and pred_lung is not None:
        lung_dice = metrics.overlap(pred_lung, truth_lung, spacing)["dice"]
    sizes = _sizes(truth, spacing)
    found = set(np.unique(truth[(truth > 0) & (pred_labels > 0)]).tolist())
    return StudyOutcome(
        case=case,
        condition=condition,
        method=method,
        has_lesion=int(truth.any()),
        score=score,
        detection=det,
        lesion_overlap=overlap,
        lung_dice=lung_dice,
        truth_sizes_mm=[round(v, 1) for v in sizes.values()],
        found_sizes_mm=[round(v, 1) for k, v in sizes.items() if k in found],
        seconds=seconds,
    )


def model_runner(segmenter: LoadedModel, screener: LoadedModel, spacing):
    def run(hu: np.ndarray):
        r = inference.analyse(hu, spacing, segmenter, screener)
        return r.screening_probability, r.lesion_labels, r.lung_mask

    return run


def baseline_runner(spacing):
    def run(hu: np.ndarray):
        r = run_baseline(hu, spacing)
        return r.probability, r.lesion_labels, r.lung_mask

    return run


def synthetic_set(background: Background, n: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``n`` held-out studies of one background: 60 % with 1-3 lesions, the rest without."""
    out = []
    for i in range(n):
        seed = TEST_SEED + 1000 * CASES.index(background.name) + i
        k = 0 if i >= math.ceil(0.6 * n) else 1 + i % 3
        hu, labels, _ = sample_study(background, seed, n_lesions=k)
        out.append((seed, hu, labels))
    return out


def conditions(spacing) -> dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]:
    """The degradations of the robustness table (clean first)."""
    return {
        "clean": lambda v, r: v,
        "gaussian noise 40 HU": lambda v, r: perturb.gaussian_noise(v, 40.0, r),
        "low dose 25 %": lambda v, r: perturb.low_dose(v, 0.25, r, spacing=spacing),
        "low dose 25 % + denoise": lambda v, r: preprocess.denoise(
            perturb.low_dose(v, 0.25, r, spacing=spacing), spacing, "curvature_flow"
        ),
        "streaks (8, 300 HU)": lambda v, r: perturb.streaks(v, 8, 300.0, r),
        "rings (5, 60 HU)": lambda v, r: perturb.rings(v, 5, 60.0, r),
        "blur 1.5 mm": lambda v, r: perturb.blur(v, 1.5, spacing),
        "slices 2x thicker": lambda v, r: perturb.thick_slices_on_grid(v, spacing, 2),
    }


def summarise(outcomes: list[StudyOutcome], *, seed: int = 0) -> dict[str, object]:
    """Study-level classification, lesion detection and overlap figures with 95 % intervals."""
    n = len(outcomes)
    scores = np.array([o.score for o in outcomes])
    labels = np.array([o.has_lesion for o in outcomes])
    out: dict[str, object] = {"studies": n, "with_lesions": int(labels.sum())}
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        out[key] = metrics.bootstrap(
            lambda idx, key=key: metrics.classification(scores[idx], labels[idx])[key],
            n,
            seed=seed,
        )
    tp = np.array([o.detection.true_positives for o in outcomes])
    fn = np.array([o.detection.false_negatives for o in outcomes])
    fp = np.array([o.detection.false_positives for o in outcomes])

    def lesion_sensitivity(idx):
        total = tp[idx].sum() + fn[idx].sum()
        return tp[idx].sum() / total if total else math.nan

    out["lesion_sensitivity"] = metrics.bootstrap(lesion_sensitivity, n, seed=seed)
    out["false_positives_per_study"] = metrics.mean_ci(fp, seed=seed)
    with_lesion = [o for o in outcomes if o.lesion_overlap is not None]
    for key in ("dice", "iou"):
        out[key] = metrics.mean_ci([o.lesion_overlap[key] for o in with_lesion], seed=seed)
    out["hd95_mm"] = metrics.median_ci(
        [o.lesion_overlap["hd95_mm"] for o in with_lesion], seed=seed
    )
    lung = [o.lung_dice for o in outcomes if o.lung_dice is not None]
    out["lung_dice"] = metrics.mean_ci(lung, seed=seed) if lung else None
    by_size = {}
    truth_sizes = [s for o in outcomes for s in o.truth_sizes_mm]
    found_sizes = [s for o in outcomes for s in o.found_sizes_mm]
    for lo, hi in SIZE_BINS_MM:
        t = sum(lo <= s < hi for s in truth_sizes)
        f = sum(lo <= s < hi for s in found_sizes)
        by_size[f"{lo}-{hi} mm"] = [f, t]
    out["found_by_size"] = by_size
    out["seconds_per_study"] = float(np.mean([o.seconds for o in outcomes])) if outcomes else None
    return out


def _run_synthetic(
    backgrounds: dict[str, Background],
    methods: Methods,
    n_per_case: int,
    robust_per_case: int,
    progress: Callable[[str], None],
) -> list[StudyOutcome]:
    outcomes: list[StudyOutcome] = []
    for case in CASES:
        bg = backgrounds[case]
        seg, scr = methods.fold_segmenters[case], methods.fold_screeners[case]
        runners = {
            "models (held-out patient)": model_runner(seg, scr, bg.spacing),
            "baseline": baseline_runner(bg.spacing),
        }
        studies = synthetic_set(bg, n_per_case)
        for cond, degrade in conditions(bg.spacing).items():
            if cond != "clean" and robust_per_case <= 0:
                continue
            subset = studies if cond == "clean" else _robust_subset(studies, robust_per_case)
            for seed, hu, labels in subset:
                img = degrade(hu, np.random.default_rng(seed)).astype(np.float32)
                for method, run in runners.items():
                    outcomes.append(
                        _score_one(case, cond, method, img, labels, bg.lung, bg.spacing, run)
                    )
            progress(f"{case}: {cond} done ({len(subset)} studies)")
    return outcomes


def _robust_subset(studies, k: int):
    """Half with lesions, half without, so AUC stays defined."""
    pos = [s for s in studies if s[2].any()][: (k + 1) // 2]
    neg = [s for s in studies if not s[2].any()][: k // 2]
    return pos + neg


def _run_real(data_dir: Path, methods: Methods, progress) -> tuple[list[dict], dict]:
    rows = []
    arrays = {}
    for case in CASES:
        hu, mask, spacing = load_nrrd_case(
            data_dir / f"{case}_image.nrrd", data_dir / f"{case}_label.nrrd"
        )
        truth = mask.astype(np.int32)
        arrays[case] = {"hu": hu, "truth": mask, "spacing": spacing}
        runners = {
            "model, patient held out": (
                methods.fold_segmenters[case],
                methods.fold_screeners[case],
            ),
            "shipped model": (methods.segmenter, methods.screener),
        }
        for label, (seg, scr) in runners.items():
            start = time.perf_counter()
            r = inference.analyse(hu, spacing, seg, scr)
            seconds = time.perf_counter() - start
            rows.append(
                _real_row(case, label, r.probability, r.lesion_labels, truth, spacing, seconds)
            )
            arrays[case][label] = r.lesion_labels > 0
        start = time.perf_counter()
        b = run_baseline(hu, spacing)
        seconds = time.perf_counter() - start
        rows.append(
            _real_row(case, "baseline", b.probability, b.lesion_labels, truth, spacing, seconds)
        )
        arrays[case]["baseline"] = b.lesion_labels > 0
        progress(f"real {case} done")
    return rows, arrays


def _real_row(case, method, score, pred_labels, truth, spacing, seconds) -> dict:
    det = metrics.match_lesions(pred_labels, truth)
    ov = metrics.overlap(pred_labels > 0, truth > 0, spacing)
    # The overlapping components alone: the outline of the tumour, without false positives.
    hit = np.unique(pred_labels[(pred_labels > 0) & (truth > 0)])
    own = metrics.overlap(np.isin(pred_labels, hit[hit > 0]), truth > 0, spacing)
    return {
        "case": case,
        "method": method,
        "score": round(float(score), 4),
        "detected": bool(det.true_positives),
        "false_positives": det.false_positives,
        "dice": round(ov["dice"], 3),
        "iou": round(ov["iou"], 3),
        "hd95_mm": round(ov["hd95_mm"], 1) if math.isfinite(ov["hd95_mm"]) else None,
        "dice_of_matched_component": round(own["dice"], 3),
        "seconds": round(seconds, 2),
    }


def evaluate(
    data_dir: Path,
    out_dir: Path,
    *,
    root: Path = registry.MODELS_DIR,
    n_per_case: int = 20,
    robust_per_case: int = 6,
    progress: Callable[[str], None] = lambda msg: None,
    update_cards: bool = True,
) -> dict:
    """Run the whole evaluation, write ``report.md``, ``results.json`` and plots to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    methods = load_methods(root)
    backgrounds, _ = load_backgrounds(data_dir)
    outcomes = _run_synthetic(backgrounds, methods, n_per_case, robust_per_case, progress)
    real_rows, real_arrays = _run_real(data_dir, methods, progress)
    table: dict[str, dict[str, dict]] = {}
    for cond in conditions((1.0, 1.0, 1.0)):
        for method in ("models (held-out patient)", "baseline"):
            sel = [o for o in outcomes if o.condition == cond and o.method == method]
            if sel:
                table.setdefault(cond, {})[method] = summarise(sel)
    results = {
        "models": {m.ref: m.card.get("sha256") for m in (methods.segmenter, methods.screener)},
        "baseline": f"{BASELINE_NAME}@{BASELINE_VERSION}",
        "synthetic": table,
        "real": real_rows,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {"n_per_case": n_per_case, "robust_per_case": robust_per_case},
    }
    from ml.evaluation import report as evaluation_report

    evaluation_report.write(out_dir, results, outcomes, real_arrays, backgrounds)
    if update_cards:
        evaluation_report.update_cards(root, methods, results)
    return results
