"""Training of the nodule CAD's candidate classifier (`radai-nodule-cad-cnn`).

Samples come from :mod:`ml.training.cad_samples` (train-split LIDC nodules composited into the
training anatomies, the pipeline's own candidates). Each batch is half positives, half negatives;
views are flipped and transposed as the body could be (a flip of x flips the axial and coronal
planes' columns; swapping x and y transposes the axial plane and swaps the coronal and sagittal
channels), with a little noise and contrast change. The operating threshold is chosen on the
validation-split studies of the same anatomies: the lowest score at which the estimated false
calls per study stay at most `TARGET_FP_PER_STUDY` (each kept negative weighted by how many
candidates of its study it stands for).

Imports `ml.runtime` and `ml.training.cad_samples`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ml.runtime import cad, cad_views, networks, registry
from ml.training import cad_samples, real_training

TARGET_FP_PER_STUDY = 1.0
# Composited studies per anatomy: version 1 learnt from 3-4 per anatomy (about 250 nodules) and
# ranked held-out anatomies' candidates little better than its blob features alone.
TRAIN_STUDIES = 30
VALIDATION_STUDIES = 4
STEPS = 3000
HARD_STEPS = 1500
BATCH = 64
LR = 1e-3
NOISE_SD = 0.01  # about 14 HU on the [0, 1] scale of the views
CONTRAST = (0.9, 1.1)


@dataclass
class SampleSet:
    views: np.ndarray  # (m, C, V, V) uint8
    positive: np.ndarray  # (m,) bool
    weight: np.ndarray  # (m,) candidates of its study each sample stands for (negatives)
    study: np.ndarray  # (m,) index of its study
    jittered: np.ndarray  # (m,) bool: a positive seen from a moved centre
    studies: list[dict] = field(default_factory=list)
    features: np.ndarray | None = None  # (m, 7) the blob detector's features of each candidate


def load_samples(paths: Sequence[Path]) -> SampleSet:
    views, pos, weight, study, jit, metas, feats = [], [], [], [], [], [], []
    for k, p in enumerate(paths):
        s = cad_samples.load(p)
        positive = s["positive"]
        neg = np.flatnonzero(~positive)
        w = np.ones(len(positive))
        # Negatives were kept as the strongest half, then a random draw from the rest.
        half = cad_samples.NEGATIVES_PER_STUDY // 2
        rest = neg[half:]
        n_rest_all = max(0, s["meta"]["candidates"] - int(positive.sum()) - half)
        if len(rest):
            w[rest] = max(1.0, n_rest_all / len(rest))
        views.append(s["views"])
        pos.append(positive)
        weight.append(w)
        study.append(np.full(len(positive), k))
        jit.append(s["jittered"])
        metas.append(s["meta"])
        feats.append(s["features"])
    return SampleSet(
        np.concatenate(views),
        np.concatenate(pos),
        np.concatenate(weight),
        np.concatenate(study),
        np.concatenate(jit),
        metas,
        np.concatenate(feats).astype(np.float32)
        if feats
        else np.zeros((0, networks.CAD_FEATURES), np.float32),
    )


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random body-consistent flips and transposition of a batch of views, noise and contrast."""
    for axis in ("x", "y", "z"):
        if rng.random() < 0.5:
            x = cad.flip(x, axis)
    if rng.random() < 0.5:
        x = cad.swap_xy(x)
    x = x * float(rng.uniform(*CONTRAST)) + NOISE_SD * torch.randn_like(x)
    return x.clamp(0.0, 1.0)


def _batch(
    s: SampleSet, rng: np.random.Generator, size: int, hard_p: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half positives, half negatives; with ``hard_p`` (a probability per negative) half of the
    negatives are drawn by it, the hardest most often."""
    pos = np.flatnonzero(s.positive)
    neg = np.flatnonzero(~s.positive)
    n_neg = size - size // 2
    if hard_p is None:
        negs = rng.choice(neg, n_neg)
    else:
        negs = np.concatenate(
            [rng.choice(neg, n_neg // 2), rng.choice(neg, n_neg - n_neg // 2, p=hard_p)]
        )
    idx = np.concatenate([rng.choice(pos, size // 2), negs])
    x = torch.from_numpy(s.views[idx].astype(np.float32) / 255.0)
    y = torch.from_numpy(s.positive[idx].astype(np.float32))[:, None]
    return x, torch.from_numpy(_features(s)[idx]), y


def _features(s: SampleSet) -> np.ndarray:
    if s.features is None:
        return np.zeros((len(s.positive), networks.CAD_FEATURES), np.float32)
    return s.features


@torch.no_grad()
def scores(
    net: torch.nn.Module, views: np.ndarray, features: np.ndarray, step: int = 512
) -> np.ndarray:
    """The run-time score (:func:`ml.runtime.cad.classify`) of each sample."""
    net.eval()
    out = []
    for i in range(0, len(views), step):
        x = torch.from_numpy(views[i : i + step].astype(np.float32) / 255.0)
        f = torch.from_numpy(np.asarray(features[i : i + step], dtype=np.float32))
        out.append(cad.classify(net, x, f).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def operating_threshold(
    s: SampleSet, p: np.ndarray, target_fp: float = TARGET_FP_PER_STUDY
) -> dict[str, float]:
    """The lowest threshold with estimated false calls per study <= ``target_fp``, and the
    validation sensitivity there (over the nodules hit by a candidate at all: un-jittered)."""
    studies = max(1, len(s.studies))
    neg = ~s.positive
    order = np.argsort(-p[neg])
    fp_curve = np.cumsum(s.weight[neg][order]) / studies
    over = np.flatnonzero(fp_curve > target_fp)
    # Just above the first negative that would take the false calls over the target.
    threshold = float(np.nextafter(p[neg][order][over[0]], 2.0)) if len(over) else 0.0
    real = s.positive & ~s.jittered
    sens = float((p[real] >= threshold).mean()) if real.any() else float("nan")
    return {"threshold": threshold, "fp_per_study": target_fp, "sensitivity_of_found": sens}


def false_calls_per_study(s: SampleSet, p: np.ndarray, threshold: float) -> float:
    """Estimated false calls per study of ``s`` at ``threshold`` (each kept negative weighted by
    the candidates of its study it stands for)."""
    neg = ~s.positive
    return float(s.weight[neg][p[neg] >= threshold].sum()) / max(1, len(s.studies))


def sensitivity_at(s: SampleSet, p: np.ndarray, threshold: float) -> float:
    """The fraction of the nodule-centred (un-jittered) positives scoring at least ``threshold``."""
    real = s.positive & ~s.jittered
    return float((p[real] >= threshold).mean()) if real.any() else float("nan")


def threshold_for_sensitivity(s: SampleSet, p: np.ndarray, sensitivity: float) -> float:
    """The highest threshold that keeps at least ``sensitivity`` of the un-jittered positives."""
    real = np.sort(p[s.positive & ~s.jittered])[::-1]
    if not len(real):
        raise ValueError("no positives to keep")
    keep = min(len(real), max(1, int(np.ceil(sensitivity * len(real)))))
    return float(real[keep - 1])


def auc(p: np.ndarray, y: np.ndarray) -> float:
    pos, neg = p[y], p[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]))) + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def train(
    train_set: SampleSet,
    val_set: SampleSet,
    *,
    steps: int = STEPS,
    seed: int = 0,
    log: Callable[[str], None] = print,
    hard_steps: int = HARD_STEPS,
) -> tuple[torch.nn.Module, dict]:
    """``steps`` on balanced batches, then ``hard_steps`` more in which half the negatives are
    mined: drawn in proportion to the square of the score the network gave them (the false
    calls that survive a high threshold are what the operating point pays for)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = networks.build("cad")
    _fit(net, train_set, rng, steps, LR, None, log)
    if hard_steps:
        neg = ~train_set.positive
        p = scores(net, train_set.views[neg], _features(train_set)[neg]).astype(np.float64) ** 2
        p += 1e-6
        _fit(net, train_set, rng, hard_steps, 0.3 * LR, p / p.sum(), log)
    start = time.perf_counter()
    p = scores(net, val_set.views, _features(val_set))
    real = ~val_set.jittered
    report = {
        "steps": steps,
        "hard_negative_steps": hard_steps,
        "train_samples": int(len(train_set.positive)),
        "train_positive": int(train_set.positive.sum()),
        "validation_auc": auc(p[real], val_set.positive[real]),
        **operating_threshold(val_set, p),
    }
    log(f"validated in {time.perf_counter() - start:.0f}s")
    return net.eval(), report


def _fit(
    net: torch.nn.Module,
    train_set: SampleSet,
    rng: np.random.Generator,
    steps: int,
    lr: float,
    hard_p: np.ndarray | None,
    log: Callable[[str], None],
) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    loss_sum = 0.0
    for step in range(1, steps + 1):
        net.train()
        x, f, y = _batch(train_set, rng, BATCH, hard_p)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(augment(x, rng), f), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach())
        if step % 250 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss_sum / 250:.4f} {time.perf_counter() - start:.0f}s")
            loss_sum = 0.0


def _card_data(anatomies: Sequence[str], train_set: SampleSet, val_set: SampleSet) -> dict:
    return real_training.data_card(
        anatomies,
        len(train_set.studies),
        len(val_set.studies),
        description=(
            "Real LIDC-IDRI nodules (readers' masks) composited into real chest CTs of the "
            "anatomies listed (ml.data.compose), scanner augmentation (ml.data.scanner_aug), and "
            "the pipeline's own blob candidates on each study: those hitting an inserted nodule "
            "are positives, the others (vessels, hilum, pleura, diaphragm, consolidation) "
            "negatives. Labels are true by construction, not clinical reads."
        ),
        validation_use="the operating threshold chosen on them",
        recipe_version=cad_samples.RECIPE_VERSION,
    )


# Anatomy folds of the classifier: each model trained on one group is evaluated on the other
# group's anatomies, which it never saw (leave-one-anatomy-out would need six trainings).
FOLD_GROUPS = (("lung1", "normal001", "cap002"), ("lung2", "cap001", "P001"))


def calibrate(
    samples: dict[str, dict[str, list[Path]]],
    *,
    root: Path,
    version: str,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Operating thresholds that carry over to anatomy never seen in training.

    A threshold chosen at `TARGET_FP_PER_STUDY` on the training anatomies' own validation studies
    makes several times more false calls on anatomy the classifier never saw (on the other
    anatomy group's validation studies: 3.6 and 9.9 per study for the two 2.0.0 fold models): it
    has learnt its training backgrounds, and its own validation studies cannot show that. What
    did carry over between the two fold models was how many of their own validation nodules
    they keep at the threshold where they make the target on unseen anatomy (0.140 and 0.148).
    So each fold model measures that sensitivity on the other group's validation studies
    (anatomies it never saw; validation-split nodules only); a fold model's threshold keeps the
    mean of the *other* folds' figure on its own validation studies (no fold's threshold reads
    the anatomies it is evaluated on), the shipped model's the mean of all. Cards and fold
    records are rewritten in place."""
    folder = root / cad.CAD_MODEL / version
    card = registry.read_card(cad.CAD_MODEL, version, root)
    runs: dict[str, list[str]] = {}
    for info in card["folds"].values():
        runs[info["weights"]] = list(info["cases"])
    if len(runs) < 2:
        raise ValueError("calibration needs at least two fold models")
    anatomies = list(samples)

    def validation(names: Sequence[str]) -> SampleSet:
        return load_samples(usable([p for a in names for p in samples[a]["validation"]]))

    nets, own, kept = {}, {}, {}
    for weights, names in runs.items():
        net = registry.load_weights(networks.build("cad", card["architecture"]), folder / weights)
        own[weights] = validation(names)
        unseen = validation([a for a in anatomies if a not in names])
        p_unseen = scores(net, unseen.views, _features(unseen))
        t = operating_threshold(unseen, p_unseen, TARGET_FP_PER_STUDY)["threshold"]
        p_own = scores(net, own[weights].views, _features(own[weights]))
        nets[weights], kept[weights] = net, sensitivity_at(own[weights], p_own, t)
        log(f"{weights}: keeps {kept[weights]:.3f} of its own validation nodules at {t:.4f}")
    out = {}
    for weights in runs:
        others = float(np.mean([k for w, k in kept.items() if w != weights]))
        out[weights] = _operating_point(nets[weights], own[weights], others)
    shipped = registry.load(f"{cad.CAD_MODEL}@{version}", root)
    out["weights.pt"] = _operating_point(
        shipped.net, validation(anatomies), float(np.mean(list(kept.values())))
    )
    for path in sorted(folder.glob("fold-*.json")):
        info = json.loads(path.read_text())
        _set_operating_point(info, out[info["weights"]])
        path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    plain = {k: v for k, v in card.items() if k != "folds"}
    _set_operating_point(plain["training"], out["weights.pt"])
    plain["operating_point"] = plain["training"]["operating_point"]
    registry.write_card(plain, root)
    return out


def _operating_point(net: torch.nn.Module, own: SampleSet, sensitivity: float) -> dict:
    p = scores(net, own.views, _features(own))
    threshold = threshold_for_sensitivity(own, p, sensitivity)
    return {
        "threshold": threshold,
        "fp_per_study": TARGET_FP_PER_STUDY,
        "sensitivity_of_found": sensitivity_at(own, p, threshold),
        "own_anatomies_fp_per_study": false_calls_per_study(own, p, threshold),
    }


def _set_operating_point(record: dict, op: dict) -> None:
    record["operating_point"] = {
        "threshold": op["threshold"],
        "fp_per_study": op["fp_per_study"],
        "sensitivity_of_found": op["sensitivity_of_found"],
        "chosen": "to keep the share of its own validation nodules that fold models kept where "
        "they made 1 false call per study on validation studies of anatomies they never saw "
        f"(ml.training.cad.calibrate); {op['own_anatomies_fp_per_study']:.2f} false calls per "
        "study on its own anatomies' validation studies",
    }
    record["threshold"] = op["threshold"]
    record["sensitivity_of_found"] = op["sensitivity_of_found"]


def build_samples(
    data_dir: Path,
    samples_dir: Path,
    anatomies: Sequence[str],
    per_anatomy: int,
    validation_per_anatomy: int,
) -> dict[str, dict[str, list[Path]]]:
    """Make (or reuse) the samples: {anatomy: {"train": paths, "validation": paths}}."""
    return {
        a: {
            "train": cad_samples.build(data_dir, samples_dir, [a], "train", per_anatomy),
            "validation": cad_samples.build(
                data_dir, samples_dir, [a], "validation", validation_per_anatomy
            ),
        }
        for a in anatomies
    }


def usable(paths: Sequence[Path]) -> list[Path]:
    """Studies that gave candidates at all (an augmented volume whose lungs were not found
    gives none, and teaches nothing)."""
    return [p for p in paths if cad_samples.load(p)["meta"]["candidates"] > 0]


def train_and_register(
    samples: dict[str, dict[str, list[Path]]],
    *,
    root: Path,
    version: str,
    folds: bool,
    steps: int = STEPS,
    log: Callable[[str], None] = print,
    only: Sequence[str] | None = None,
) -> list[Path]:
    """Train the shipped classifier on every anatomy of ``samples`` and, with ``folds``, one per
    group of `FOLD_GROUPS` (registered as the fold model of each anatomy it never saw); each
    with its operating point on its own anatomies' validation studies. ``only``: just the runs
    of these names ("all", "trained-on-..."), so that processes can train them side by side
    (each writes its own files)."""
    anatomies = list(samples)
    runs: list[tuple[str, list[str]]] = [("all", anatomies)]
    if folds:
        for group in FOLD_GROUPS:
            names = [a for a in group if a in samples]
            if names and len(names) < len(anatomies):
                runs.append(("trained-on-" + "-".join(names), names))
    if only is not None:
        runs = [r for r in runs if r[0] in only]
    written = []
    for run, names in runs:
        tr = load_samples(usable([p for a in names for p in samples[a]["train"]]))
        va = load_samples(usable([p for a in names for p in samples[a]["validation"]]))
        log(f"{run}: {len(tr.positive)} samples ({int(tr.positive.sum())} positive)")

        def run_log(message: str, run: str = run) -> None:
            log(f"{run}: {message}")

        net, report = train(tr, va, steps=steps, log=run_log)
        op = {k: report[k] for k in ("threshold", "fp_per_study", "sensitivity_of_found")}
        summary = {
            **report,
            "threads": torch.get_num_threads(),
            "data": _card_data(names, tr, va),
            "operating_point": op,
        }
        if run == "all":
            card = {
                "architecture": networks.CAD_ARCH,
                "input": {
                    "views": "axial, coronal, sagittal planes at 1.25 mm and 2.5 mm",
                    "view": cad_views.VIEW,
                    "hu_range": list(cad_views.HU_RANGE),
                    "features": "the blob detector's 7 features of the candidate "
                    "(ml.runtime.cad.blob_features)",
                    "score": "mean sigmoid over mirrors of the body (ml.runtime.cad.TTA_FLIPS)",
                },
                "operating_point": op,
                "training": summary,
                "intended_use": "research only; NOT FOR CLINICAL USE",
            }
            written.append(
                registry.save(net, name=cad.CAD_MODEL, version=version, task="cad", card=card,
                              root=root)
            )  # fmt: skip
        else:
            path = registry.save(
                net, name=cad.CAD_MODEL, version=version, task="cad", card={}, root=root,
                weights_name=f"fold-{run}.pt",
            )  # fmt: skip
            info = {**summary, "cases": names, "weights": path.name}
            info["sha256"] = registry.sha256_file(path)
            for held_out in (a for a in anatomies if a not in names):
                registry.write_fold(cad.CAD_MODEL, version, f"holdout-{held_out}", info, root)
            written.append(path)
        log(f"{run}: {report}")
    if only is None and len(runs) > 2:
        calibrate(samples, root=root, version=version, log=log)
    return written
