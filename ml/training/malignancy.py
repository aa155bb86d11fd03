"""Training of the per-nodule malignancy CNN on the LIDC-IDRI readers' ratings.

Target: the readers' max-voted malignancy rating of `nodules.csv`, as a binary label: 4-5
("moderately"/"highly suspicious") = 1, 1-2 ("highly"/"moderately unlikely") = 0. Nodules rated
3 ("indeterminate") are left out of training and of the AUCs: it is the rating that readers
give when they do not know, so a 0.5 target would teach the network their indecision, and an
ordinal fit on five classes has too few nodules per class (~60-200) for this CPU budget. The
usual LIDC malignancy benchmarks make the same choice, so the figures are comparable. The score is
a radiologists' impression, not pathology.

Splits are by patient (:mod:`ml.data.splits`): the network learns on the train patients; the
epoch (best validation AUC) and the operating threshold (Youden's J) are chosen on the
validation patients only; the test patients are loaded once, after the model is final, for the
one reported figure (AUC with a bootstrap interval over patients). A size-only score (the
mask's equivalent diameter) is measured on the same nodules, to show how much of the readers'
impression is size.

Augmentation: flips on all three axes, 90-degree in-plane rotations, isotropic scale 0.9-1.1 with
a one-voxel shift, small intensity scale/shift and noise. Everything is seeded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import set_determinism
from scipy.stats import rankdata, spearmanr

from ml.data.nodules import LIDC_LICENCE, NoduleRow, load_crop, read_nodule_table
from ml.data.splits import FINAL_EVALUATION, rows_in
from ml.evaluation import metrics
from ml.runtime import malignancy, networks, registry
from ml.training.log import TrainingLog

NAME = registry.MALIGNANCY
VERSION = registry.MALIGNANCY_VERSION
EPOCHS = 30  # about 8 minutes on 2 busy CPU threads; the best epoch is chosen on validation
BATCH = 16
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.05
SEED = 20261130
SCALE = (0.9, 1.1)
SHIFT_VOXELS = 1.0
INTENSITY_SCALE = (0.95, 1.05)
INTENSITY_SHIFT = 0.02  # of the scaled range: 40 HU
NOISE = 0.01  # 20 HU
BOOTSTRAP = 2000
POSITIVE_FROM, NEGATIVE_UP_TO = 4, 2
CITATION = (
    "Armato SG III et al. The Lung Image Database Consortium (LIDC) and Image Database Resource "
    "Initiative (IDRI). Med Phys 2011;38(2):915-931. Data: TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX"
)
MEANING = (
    "Estimated probability that the LIDC-IDRI radiologists would give this nodule a max-voted "
    "malignancy rating of 4-5 (moderately/highly suspicious) rather than 1-2 (unlikely): a "
    "radiologists' impression learned from their ratings, NOT pathology, NOT a diagnosis."
)


def label_of(rating: int | None) -> int | None:
    """1 for a rating of 4-5, 0 for 1-2, None for 3 (indeterminate) or no rating."""
    if rating is None:
        return None
    if rating >= POSITIVE_FROM:
        return 1
    if rating <= NEGATIVE_UP_TO:
        return 0
    return None


def crop_folder(data: Path) -> Path:
    """The `lidc-nodules` folder: ``data`` itself or its `lidc-nodules` sub-folder."""
    for folder in (data, data / "lidc-nodules"):
        if (folder / "nodules.csv").is_file():
            return folder
    raise ValueError(f"{data}: no nodules.csv here or in lidc-nodules/")


def partition(rows: Sequence[NoduleRow]) -> dict[str, list[NoduleRow]]:
    """Train and validation rows by patient (the committed split); test rows are never here."""
    return {part: rows_in(rows, part) for part in ("train", "validation")}


@dataclass
class Examples:
    """Network inputs of labelled nodules with what the report needs about each."""

    x: np.ndarray  # (n, 2, P, P, P) float16
    y: np.ndarray  # (n,) 0/1
    rating: np.ndarray  # (n,) 1-5
    patient: list[str]
    diameter_mm: np.ndarray  # equivalent-sphere diameter of the readers' mask

    def __len__(self) -> int:
        return len(self.y)


def build_examples(folder: Path, rows: Sequence[NoduleRow], *, keep_unlabelled: bool = False):
    """Load and resample the crops of ``rows``; without ``keep_unlabelled`` only those rated
    1, 2, 4 or 5 (the label of a 3 is then -1)."""
    xs, ys, ratings, patients, diameters = [], [], [], [], []
    for row in rows:
        rating = row.ratings.get("malignancy")
        label = label_of(rating)
        if label is None and not keep_unlabelled:
            continue
        crop = load_crop(folder, row)
        xs.append(malignancy.nodule_patch(crop.hu, crop.mask, crop.spacing).astype(np.float16))
        ys.append(-1 if label is None else label)
        ratings.append(rating or 0)
        patients.append(row.patient_id)
        diameters.append((6.0 * crop.volume_mm3 / math.pi) ** (1 / 3))
    p = malignancy.PATCH
    return Examples(
        np.stack(xs) if xs else np.zeros((0, 2, p, p, p), np.float16),
        np.asarray(ys, dtype=np.int64),
        np.asarray(ratings, dtype=np.int64),
        patients,
        np.asarray(diameters, dtype=np.float64),
    )


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN with one class only."""
    y = np.asarray(labels) == 1
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def patient_bootstrap_auc(
    scores: np.ndarray, labels: np.ndarray, patients: Sequence[str], *, seed: int = 0
) -> tuple[float, float, float]:
    """AUC with a 95 % percentile interval from resampling patients (their nodules together)."""
    ids = sorted(set(patients))
    by_patient = [np.flatnonzero(np.asarray(patients) == p) for p in ids]

    def statistic(idx: np.ndarray) -> float:
        rows = np.concatenate([by_patient[i] for i in idx])
        return auc(scores[rows], labels[rows])

    return metrics.bootstrap(statistic, len(ids), resamples=BOOTSTRAP, seed=seed)


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold with the highest sensitivity + specificity - 1."""
    best, best_t = -1.0, 0.5
    for t in np.unique(scores):
        pred = scores >= t
        sens = float(pred[labels == 1].mean()) if (labels == 1).any() else 0.0
        spec = float((~pred[labels == 0]).mean()) if (labels == 0).any() else 0.0
        if sens + spec - 1 > best:
            best, best_t = sens + spec - 1, float(t)
    return best_t


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    pos, neg = labels == 1, labels == 0
    return {
        "threshold": round(threshold, 4),
        "sensitivity": round(float(pred[pos].mean()), 3) if pos.any() else None,
        "specificity": round(float((~pred[neg]).mean()), 3) if neg.any() else None,
    }


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips, in-plane 90-degree turns, scale and shift, intensity jitter of a batch."""
    n = x.shape[0]
    out = []
    for i in range(n):
        xi = x[i]
        for dim in (1, 2, 3):
            if torch.rand((), generator=gen) < 0.5:
                xi = xi.flip(dim)
        k = int(torch.randint(0, 4, (), generator=gen))
        out.append(torch.rot90(xi, k, dims=(2, 3)))
    x = torch.stack(out)
    scale = torch.empty(n).uniform_(*SCALE, generator=gen)
    shift = (torch.rand(n, 3, generator=gen) * 2 - 1) * SHIFT_VOXELS * 2 / x.shape[-1]
    theta = torch.zeros(n, 3, 4)
    theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1.0 / scale  # > 1 zooms in
    theta[:, :, 3] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    a = torch.empty(n, 1, 1, 1).uniform_(*INTENSITY_SCALE, generator=gen)
    b = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * INTENSITY_SHIFT
    noise = torch.randn(x[:, 0].shape, generator=gen) * NOISE
    image = (x[:, 0] * a + b + noise).clamp(0.0, 1.0)
    return torch.stack([image, x[:, 1]], dim=1)


def train(
    train_set: Examples,
    validation: Examples,
    *,
    epochs: int = EPOCHS,
    max_steps: int | None = None,
    seed: int = SEED,
    log_path: Path | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train; return the network of the epoch with the best validation AUC and the history."""
    set_determinism(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = networks.build("malignancy")
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    x_all = torch.from_numpy(train_set.x.astype(np.float32))
    y_all = torch.from_numpy(train_set.y.astype(np.float32))
    per_epoch = max(1, math.ceil(len(train_set) / BATCH))
    steps = epochs * per_epoch if max_steps is None else max_steps
    epochs = math.ceil(steps / per_epoch)
    best_auc, best_epoch, best_state = -math.inf, 0, _copy_state(net)
    curve = []
    step = 0
    with TrainingLog("malignancy", steps, log_path, progress) as log:
        for epoch in range(1, epochs + 1):
            net.train()
            order = torch.randperm(len(train_set), generator=gen)
            for start in range(0, len(order), BATCH):
                if step >= steps:
                    break
                idx = order[start : start + BATCH]
                x = augment(x_all[idx], gen)
                target = y_all[idx] * (1 - 2 * LABEL_SMOOTHING) + LABEL_SMOOTHING
                loss = F.binary_cross_entropy_with_logits(net(x).reshape(-1), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                log.step(step, float(loss.detach()), LEARNING_RATE, epoch=epoch)
            val_scores = malignancy.predict_patches(net, validation.x)
            val_auc = auc(val_scores, validation.y)
            curve.append({"epoch": epoch, "step": step, "validation_auc": round(val_auc, 4)})
            if best_epoch == 0 or (not math.isnan(val_auc) and val_auc > best_auc):
                best_auc, best_epoch, best_state = val_auc, epoch, _copy_state(net)
    net.load_state_dict(best_state)
    net.eval()
    return net, {"best_epoch": best_epoch, "epochs_run": epochs, "steps": step, "curve": curve}


def _copy_state(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _mean_by_rating(scores: np.ndarray, ratings: np.ndarray) -> dict[str, dict]:
    return {
        str(r): {
            "n": int((ratings == r).sum()),
            "mean_score": round(float(scores[ratings == r].mean()), 3),
        }
        for r in sorted(set(ratings.tolist()))
    }


def _figure(scores: np.ndarray, ex: Examples, threshold: float, seed: int) -> dict:
    labelled = ex.y >= 0
    s, y = scores[labelled], ex.y[labelled]
    pts = [p for p, keep in zip(ex.patient, labelled, strict=True) if keep]
    a, lo, hi = patient_bootstrap_auc(s, y, pts, seed=seed)
    size, size_lo, size_hi = patient_bootstrap_auc(ex.diameter_mm[labelled], y, pts, seed=seed)
    return {
        "auc": round(a, 3),
        "auc_95ci_bootstrap_patients": [round(lo, 3), round(hi, 3)],
        "nodules": int(labelled.sum()),
        "rated_4_5": int(y.sum()),
        "rated_1_2": int((y == 0).sum()),
        "patients": len(set(pts)),
        "at_threshold": operating_point(s, y, threshold),
        "size_only_auc": round(size, 3),
        "size_only_auc_95ci": [round(size_lo, 3), round(size_hi, 3)],
    }


def train_and_register(
    data: Path,
    *,
    root: Path = registry.MODELS_DIR,
    epochs: int = EPOCHS,
    max_steps: int | None = None,
    seed: int = SEED,
    progress: bool = True,
) -> list[Path]:
    """Train on the train patients, choose on validation, report the test figure once, and
    write ``NAME/VERSION`` (weights, card.json, card.md, training.jsonl) under ``root``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    folder = crop_folder(data)
    rows = read_nodule_table(folder / "nodules.csv", folder)
    parts = partition(rows)
    train_set = build_examples(folder, parts["train"])
    validation = build_examples(folder, parts["validation"])
    for part, ex in (("train", train_set), ("validation", validation)):
        if len(set(ex.y.tolist())) < 2:
            raise ValueError(f"{part} patients need nodules rated both 1-2 and 4-5")
    out = root / NAME / VERSION
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training.jsonl"
    log_path.unlink(missing_ok=True)
    net, history = train(
        train_set,
        validation,
        epochs=epochs,
        max_steps=max_steps,
        seed=seed,
        log_path=log_path,
        progress=progress,
    )
    net = registry.as_shipped(net)
    val_scores = malignancy.predict_patches(net, validation.x)
    threshold = youden_threshold(val_scores, validation.y)
    train_seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started

    # The one look at the test patients: the model and threshold are final by now.
    test_rows = rows_in(rows, "test", purpose=FINAL_EVALUATION)
    test = build_examples(folder, test_rows, keep_unlabelled=True)
    test_scores = malignancy.predict_patches(net, test.x) if len(test) else np.zeros(0)
    test_fig = _figure(test_scores, test, threshold, seed) if len(test) else {}
    if len(test):
        rho = spearmanr(test_scores, test.rating).statistic
        test_fig["mean_score_by_rating"] = _mean_by_rating(test_scores, test.rating)
        test_fig["spearman_score_vs_rating_1_to_5"] = round(float(rho), 3)
    val_fig = _figure(val_scores, validation, threshold, seed)
    val_fig["note"] = "used to choose the epoch and the threshold, so optimistic"

    card = {
        "architecture": networks.MALIGNANCY_ARCH,
        "predicts": MEANING,
        "output": "one score in [0, 1] per lesion (sigmoid, mean over 4 in-plane flips)",
        "input": {
            "patch": [malignancy.PATCH] * 3,
            "spacing_mm": malignancy.PATCH_SPACING_MM,
            "channels": ["HU clipped to [-1000, 1000] scaled to [0, 1]", "lesion mask"],
            "centre": "centroid of the lesion mask; any input spacing resampled (trilinear)",
            "context": "slices beyond the lesion's own z extent and outside the scan set to air",
        },
        "target": {
            "source": "LIDC-IDRI readers' max-voted malignancy rating (1-5), nodules.csv",
            "positive": "rating 4-5",
            "negative": "rating 1-2",
            "excluded": "rating 3 (indeterminate): left out of training and of the AUCs",
        },
        "threshold": round(threshold, 4),
        "threshold_rule": "Youden's J on the validation patients",
        "intended_use": (
            "NOT FOR CLINICAL USE. Research and demonstration: a second number beside a detected "
            "nodule saying how suspicious radiologists of the LIDC study would have found a "
            "nodule like it. It is not a probability of cancer and was never checked against "
            "pathology or follow-up."
        ),
        "training": {
            "data": (
                "881 LIDC-IDRI nodule crops with the readers' max-voted masks and ratings "
                "(shared/data/lidc-nodules, prepared by PabloLION/ct-slicing commit 07d32ab)"
            ),
            "licence": LIDC_LICENCE,
            "citation": CITATION,
            "split": "by patient, ml/data/splits.py (key radai-lidc-split-v1)",
            "train": {
                "nodules": len(train_set),
                "patients": len(set(train_set.patient)),
                "rated_4_5": int(train_set.y.sum()),
            },
            "validation": {
                "nodules": len(validation),
                "patients": len(set(validation.patient)),
                "rated_4_5": int(validation.y.sum()),
            },
            "test_nodules_all_ratings": len(test),
            "epochs_max": epochs,
            "best_epoch": history["best_epoch"],
            "steps": history["steps"],
            "batch": BATCH,
            "learning_rate": LEARNING_RATE,
            "weight_decay": WEIGHT_DECAY,
            "label_smoothing": LABEL_SMOOTHING,
            "augmentation": "flips (3 axes), in-plane 90-degree turns, scale 0.9-1.1, 1-voxel "
            "shift, intensity x0.95-1.05 +-40 HU, noise 20 HU",
            "seed": seed,
            "seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "validation_curve": history["curve"],
        },
        "metrics": {"validation": val_fig, "test": test_fig},
        "limitations": [
            "The target is the readers' impression, not pathology: LIDC has no diagnosis for "
            "most nodules, and the ratings were given without follow-up.",
            "Readers' malignancy ratings follow nodule size closely; size alone reaches a "
            "similar AUC (size_only_auc). The score adds little beyond size and should not be "
            "read as more than that.",
            "Nodules rated 3 were excluded, so the score is least meaningful for exactly the "
            "nodules readers found indeterminate.",
            "Trained on ~330 nodules of one public collection (scanners of 2000-2010); the "
            "lesion mask comes from the readers there and from the segmenter here.",
            "Context above and below the nodule is blanked because half of the training crops "
            "have none.",
        ],
    }
    weights = registry.save(
        net, name=NAME, version=VERSION, task="malignancy", card=card, root=root
    )
    full = registry.read_card(NAME, VERSION, root)
    (out / "card.md").write_text(card_markdown(full))
    return [weights, out / "card.json", out / "card.md", log_path]


def _ci(fig: dict, key: str = "auc") -> str:
    lo, hi = fig.get(f"{key}_95ci_bootstrap_patients", fig.get(f"{key}_95ci", [math.nan] * 2))
    return f"{fig.get(key)} (95 % CI {lo}-{hi})"


def card_markdown(card: dict) -> str:
    """The card for people."""
    t, m = card["training"], card["metrics"]
    val, test = m["validation"], m.get("test") or {}
    lines = [
        f"# {card['name']} {card['version']}",
        "",
        "**NOT FOR CLINICAL USE.**",
        "",
        "## What the score means",
        card["predicts"],
        "",
        f"Input: {card['input']['patch'][0]}³ voxels at {card['input']['spacing_mm']} mm around "
        "the lesion mask's centroid; channels HU and mask. Output: " + card["output"] + ". "
        f"Operating threshold {card['threshold']} ({card['threshold_rule']}).",
        "",
        "## Data",
        f"LIDC-IDRI: {card['training']['citation']}. Licence: {card['training']['licence']}.",
        f"{t['data']}. Split {t['split']}.",
        f"Target: {card['target']['positive']} vs {card['target']['negative']}; "
        f"{card['target']['excluded']}.",
        "",
        "| part | nodules (1-2 or 4-5) | of which 4-5 | patients |",
        "|---|---|---|---|",
        f"| train | {t['train']['nodules']} | {t['train']['rated_4_5']} | "
        f"{t['train']['patients']} |",
        f"| validation | {t['validation']['nodules']} | {t['validation']['rated_4_5']} | "
        f"{t['validation']['patients']} |",
        f"| test | {test.get('nodules')} | {test.get('rated_4_5')} | {test.get('patients')} |",
        "",
        "## Performance (AUC, 4-5 vs 1-2; intervals: bootstrap over patients)",
        f"- validation: {_ci(val)}; {val['note']}",
        f"- **test (reported once, after every choice was made): {_ci(test)}**",
        f"- test at the threshold: sensitivity {test.get('at_threshold', {}).get('sensitivity')}, "
        f"specificity {test.get('at_threshold', {}).get('specificity')}",
        "- size alone (mask's equivalent diameter) on the same test nodules: "
        + _ci(test, "size_only_auc"),
        f"- Spearman of score vs rating 1-5 (rating 3 included), test: "
        f"{test.get('spearman_score_vs_rating_1_to_5')}",
        "",
        "Mean test score by readers' rating: "
        + ", ".join(
            f"{r}: {v['mean_score']} (n={v['n']})"
            for r, v in (test.get("mean_score_by_rating") or {}).items()
        ),
        "",
        "## Training",
        f"{t['steps']} steps (best validation epoch {t['best_epoch']} of at most "
        f"{t['epochs_max']}), "
        f"batch {t['batch']}, AdamW {t['learning_rate']}, {t['augmentation']}; "
        f"{t['seconds']} s wall clock ({t.get('cpu_seconds')} CPU-seconds) on "
        f"{t['torch_threads']} CPU thread(s), seed {t['seed']}. {t.get('timing_note', '')}",
        "",
        "## Intended use",
        card["intended_use"],
        "",
        "## Known limits",
        *[f"- {item}" for item in card["limitations"]],
        "",
        f"Weights sha256: `{card['sha256']}`",
        "",
    ]
    return "\n".join(lines)
