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
STEPS = 4000
HARD_STEPS = 2000
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
    s: SampleSet,
    rng: np.random.Generator,
    size: int,
    hard_p: np.ndarray | None = None,
    channels: int | None = None,
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
    x = torch.from_numpy(s.views[idx, :channels].astype(np.float32) / 255.0)
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
    # Samples hold the nine-plane layout; its first six channels are the three-plane one.
    channels = cad.view_channels(net)
    out = []
    for i in range(0, len(views), step):
        x = torch.from_numpy(views[i : i + step, :channels].astype(np.float32) / 255.0)
        f = torch.from_numpy(np.asarray(features[i : i + step], dtype=np.float32))
        out.append(cad.classify(net, x, f).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def operating_threshold(
    s: SampleSet, p: np.ndarray, target_fp: float = TARGET_FP_PER_STUDY
) -> dict[str, float]:
    """The lowest threshold with estimated false calls per study <= ``target_fp``, and the
    validation sensitivity there (over the nodules hit by a candidate at all: un-jittered)."""
    neg = ~s.positive
    threshold = _threshold_at(p[neg], s.weight[neg], max(1, len(s.studies)), target_fp)
    real = s.positive & ~s.jittered
    sens = float((p[real] >= threshold).mean()) if real.any() else float("nan")
    return {"threshold": threshold, "fp_per_study": target_fp, "sensitivity_of_found": sens}


def _threshold_at(neg_p: np.ndarray, neg_weight: np.ndarray, studies: int, rate: float) -> float:
    """Just above the first negative (by falling score) that takes the estimated false calls
    per study over ``rate``; 0 if none does."""
    order = np.argsort(-neg_p, kind="stable")
    over = np.flatnonzero(np.cumsum(neg_weight[order]) / studies > rate)
    return float(np.nextafter(neg_p[order][over[0]], 2.0)) if len(over) else 0.0


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
    # Samples hold the nine-plane layout; its first six channels are the three-plane one.
    channels = cad.view_channels(net)
    for step in range(1, steps + 1):
        net.train()
        x, f, y = _batch(train_set, rng, BATCH, hard_p, channels)
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


def fold_runs(anatomies: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Leave-one-anatomy-out: (run name, anatomies trained on) for each anatomy, trained on all
    the others. Each fold model is what stands in for the shipped one on the anatomy it never
    saw, so it should be as near the shipped model as it can be: with six anatomies, five (two
    groups of three, as in 2.0.0, learnt three patients' backgrounds and made 2-3 times the
    false calls on a fourth)."""
    if len(anatomies) < 2:
        return []
    return [(f"without-{a}", [b for b in anatomies if b != a]) for a in anatomies]


def calibrate(
    samples: dict[str, dict[str, list[Path]]],
    *,
    root: Path,
    version: str,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Operating thresholds that carry over to anatomy never seen in training.

    A threshold chosen at `TARGET_FP_PER_STUDY` on the training anatomies' own validation studies
    makes several times more false calls on anatomy the classifier never saw (3.6 and 9.9 per
    study for the two 2.0.0 fold models): it has learnt its training backgrounds, and its own
    validation studies cannot show that. So the operating point is a share of its own validation
    nodules to keep (:func:`pooled_share`), measured with the fold models on the validation
    studies of the anatomies they never saw (validation-split nodules only). A fold model keeps
    the share chosen with the *other* folds (no fold's threshold reads the anatomy it is evaluated
    on), the shipped model the share chosen with all. Cards and fold records are rewritten in
    place."""
    folder = root / cad.CAD_MODEL / version
    card = registry.read_card(cad.CAD_MODEL, version, root)
    runs, nets, own, curves = fold_curves(samples, root=root, version=version)
    for weights, c in curves.items():
        t = operating_threshold(c.unseen, c.p_unseen, TARGET_FP_PER_STUDY)["threshold"]
        log(
            f"{weights}: at {TARGET_FP_PER_STUDY:g} false call per unseen study ({t:.4f}) keeps "
            f"{sensitivity_at(c.own, c.p_own, t):.3f} of its own validation nodules"
        )
    froc = unseen_froc(list(curves.values()))
    log(f"validation FROC of the fold models on the anatomies they never saw: {froc}")
    anatomies = list(samples)

    out = {}
    for weights in runs:
        share = pooled_share([c for w, c in curves.items() if w != weights])
        out[weights] = _operating_point(nets[weights], own[weights], share)
    shipped = registry.load(f"{cad.CAD_MODEL}@{version}", root)
    out["weights.pt"] = _operating_point(
        shipped.net, _validation(samples, anatomies), pooled_share(list(curves.values()))
    )
    for path in sorted(folder.glob("fold-*.json")):
        info = json.loads(path.read_text())
        _set_operating_point(info, out[info["weights"]])
        path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    plain = {k: v for k, v in card.items() if k != "folds"}
    _set_operating_point(plain["training"], out["weights.pt"])
    plain["training"]["validation_unseen_froc"] = froc
    plain["operating_point"] = plain["training"]["operating_point"]
    registry.write_card(plain, root)
    return out


def _validation(samples: dict[str, dict[str, list[Path]]], names: Sequence[str]) -> SampleSet:
    """The usable validation studies of these anatomies."""
    return load_samples(usable([p for a in names for p in samples[a]["validation"]]))


def fold_curves(
    samples: dict[str, dict[str, list[Path]]], *, root: Path, version: str
) -> tuple[
    dict[str, list[str]], dict[str, torch.nn.Module], dict[str, SampleSet], dict[str, FalseCalls]
]:
    """Each fold model of ``version`` (by weights file: the anatomies it was trained on, the
    network, its own anatomies' validation samples) and its :class:`FalseCalls`."""
    folder = root / cad.CAD_MODEL / version
    card = registry.read_card(cad.CAD_MODEL, version, root)
    runs: dict[str, list[str]] = {}
    for info in card["folds"].values():
        runs[info["weights"]] = list(info["cases"])
    if len(runs) < 2:
        raise ValueError("calibration needs at least two fold models")
    anatomies = list(samples)

    nets, own, curves = {}, {}, {}
    for weights, names in runs.items():
        net = registry.load_weights(networks.build("cad", card["architecture"]), folder / weights)
        own[weights] = _validation(samples, names)
        unseen = _validation(samples, [a for a in anatomies if a not in names])
        p_own = scores(net, own[weights].views, _features(own[weights]))
        p_unseen = scores(net, unseen.views, _features(unseen))
        nets[weights] = net
        curves[weights] = FalseCalls(own[weights], p_own, unseen, p_unseen)
    return runs, nets, own, curves


FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def unseen_froc(folds: Sequence[FalseCalls], rates: Sequence[float] = FROC_RATES) -> dict:
    """Validation FROC, leave one anatomy out: the fold models' scores on the validation studies
    of the anatomies they never saw, pooled (one threshold for all, as the unseen-patient
    evaluation pools its studies); the sensitivity over the candidates centred on a nodule at
    each rate of estimated false calls per study, and their mean (a validation CPM of the
    nodules the detector found). What versions of the classifier are compared by."""
    studies = max(1, sum(len(f.unseen.studies) for f in folds))
    p = np.concatenate([f.p_unseen for f in folds] + [np.zeros(0)])
    positive = np.concatenate([f.unseen.positive for f in folds] + [np.zeros(0, bool)])
    real = positive & ~np.concatenate([f.unseen.jittered for f in folds] + [np.zeros(0, bool)])
    weight = np.concatenate([f.unseen.weight for f in folds] + [np.zeros(0)])
    out: dict[str, float] = {}
    for rate in rates:
        t = _threshold_at(p[~positive], weight[~positive], studies, rate)
        out[f"{rate:g}"] = float((p[real] >= t).mean()) if real.any() else float("nan")
    out["mean"] = float(np.mean([out[f"{r:g}"] for r in rates]))
    out["studies"] = float(studies)
    out["positives"] = float(real.sum())
    return out


@dataclass
class FalseCalls:
    """One fold model's scores on its own anatomies' validation studies and on those of the
    anatomies it never saw."""

    own: SampleSet
    p_own: np.ndarray
    unseen: SampleSet
    p_unseen: np.ndarray

    def shares(self) -> np.ndarray:
        """The shares of its own validation nodules a threshold can keep (k / n)."""
        n = int((self.own.positive & ~self.own.jittered).sum())
        return np.arange(1, n + 1) / n if n else np.zeros(0)

    def on_unseen(self, share: float) -> float:
        """False calls in all (not per study) on the unseen studies at the threshold keeping
        ``share`` of its own validation nodules."""
        t = threshold_for_sensitivity(self.own, self.p_own, share)
        return false_calls_per_study(self.unseen, self.p_unseen, t) * len(self.unseen.studies)


def pooled_share(folds: Sequence[FalseCalls], target: float = TARGET_FP_PER_STUDY) -> float:
    """The largest share of their own validation nodules that fold models can all keep while
    their false calls, summed over the unseen studies of all of them, stay within ``target`` per
    study. Pooled, not a mean of each fold's own share: false calls grow much faster than
    sensitivity near the top, so a mean of shares costs far more than the target where one
    anatomy is hard (the 2.1.0 fold models' shares at 1 false call per study ranged 0.21-0.37;
    their mean gave 0-11, on average 3.1, false calls per study on the unseen validation
    studies; that check on validation data was prompted by the 4.17 false calls per scan the
    mean rule gave in the unseen-patient evaluation, and this rule was then chosen and checked on
    validation studies only). 0 if not even the first nodule can be kept within the target."""
    studies = max(1, sum(len(f.unseen.studies) for f in folds))
    candidates = np.unique(np.concatenate([f.shares() for f in folds] + [np.zeros(0)]))
    best = 0.0
    for share in candidates:  # false calls only grow with the share
        if sum(f.on_unseen(float(share)) for f in folds) / studies > target + 1e-9:
            break
        best = float(share)
    return best


def _operating_point(net: torch.nn.Module, own: SampleSet, sensitivity: float) -> dict:
    p = scores(net, own.views, _features(own))
    # A share of 0 (no nodule can be kept within the target) reports nothing: scores are <= 1.
    threshold = (
        threshold_for_sensitivity(own, p, sensitivity)
        if sensitivity > 0
        else float(np.nextafter(1.0, 2.0))
    )
    return {
        "share": sensitivity,
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
        "chosen": "to keep the largest share of their own validation nodules at which fold "
        "models made at most 1 false call per study, pooled over the validation studies of "
        "anatomies they never saw (ml.training.cad.calibrate, pooled_share); "
        f"{op['own_anatomies_fp_per_study']:.2f} false calls per "
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
    anatomy left out (:func:`fold_runs`, registered as the fold model of that anatomy); each
    with its operating point on its own anatomies' validation studies. ``only``: just the runs
    of these names ("all", "without-..."), so that processes can train them side by side
    (each writes its own files)."""
    anatomies = list(samples)
    runs: list[tuple[str, list[str]]] = [("all", anatomies)]
    if folds:
        runs += fold_runs(anatomies)
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
                    "views": "axial, coronal, sagittal planes at 1.25 mm and 2.5 mm, and the six "
                    "diagonal planes of a cube at 1.25 mm (ml.runtime.cad_views.NINE_PLANES)",
                    "channels": cad_views.CHANNELS,
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
