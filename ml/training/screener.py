"""Training of the screening CNN on the segmenter's own lesion calls.

The training set is made the way the screener is used: semi-synthetic studies (:mod:`ml.synth`,
seeds apart from the evaluation's) go through a trained segmenter and its false-positive
filters; every lesion call that survives is a candidate, labelled a lesion when it overlaps a
synthetic lesion and a false positive otherwise. Synthetic lesions the segmenter missed are added
as extra positives (outlined by their true mask), so the CNN also learns what small lesions look
like. Some studies are degraded first (noise, low dose, blur, thicker slices) so that the false
positives of poorer images are in the set too.

The CNN (MONAI ``Classifier``) trains with binary cross-entropy on balanced batches, flips,
intensity jitter and noise. A fifth of the studies is held back; on their candidates the
operating threshold is chosen: the highest that still keeps 95 % of the true lesion calls,
because for triage a missed lesion costs more than a false alarm. Everything is seeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import set_determinism

from ml.data import perturb
from ml.data.synth import Background, sample_study
from ml.evaluation import metrics
from ml.runtime import candidates, inference, networks
from ml.runtime.registry import LoadedModel
from ml.training.log import TrainingLog

STUDY_SEED = 30_000_000  # the evaluation's held-out studies use 7_000_000 onwards
STUDIES = 160
STEPS = 600  # longer runs fit the training patient's own false calls and transfer worse
BATCH = 64
LEARNING_RATE = 1e-3
SEED = 20261125
VALIDATION_EVERY = 5  # every fifth study is held back to choose the threshold
KEEP_SENSITIVITY = 0.95
DEGRADE_P = 0.4
AFFINE = True
AFFINE_SCALE = (0.8, 1.25)
AFFINE_DEGREES = 15.0
AFFINE_SHIFT = 0.1  # of the patch's half width
INTENSITY_SCALE = (0.9, 1.1)
INTENSITY_SHIFT = 0.05  # of the scaled range: 70 HU
NOISE = 0.03
LABEL_SMOOTHING = 0.1  # targets 0.05 / 0.95: keeps the network from saturating on few patients
LESION_COUNT_P = (0.2, 0.4, 0.25, 0.15)  # 0, 1, 2, 3 lesions


@dataclass
class CandidateSet:
    """Screener inputs with their truth: ``kind`` 0 = a segmenter call, 1 = a missed lesion."""

    x: np.ndarray  # (n, CHANNELS, PATCH, PATCH) float16
    y: np.ndarray  # (n,) 1 = lesion
    kind: np.ndarray
    study: np.ndarray
    validation: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.y)

    def save(self, path: Path) -> None:
        np.savez(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> CandidateSet:
        with np.load(path) as f:
            return cls(**{k: f[k] for k in cls.__dataclass_fields__})

    def summary(self) -> dict[str, int]:
        calls = self.kind == 0
        return {
            "studies": int(len(np.unique(self.study))),
            "lesion_calls": int((calls & (self.y == 1)).sum()),
            "false_positive_calls": int((calls & (self.y == 0)).sum()),
            "missed_lesions_added": int((self.kind == 1).sum()),
        }


def _degrade(hu: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    if rng.random() >= DEGRADE_P:
        return hu
    kind = int(rng.integers(4))
    if kind == 0:
        return perturb.gaussian_noise(hu, float(rng.uniform(10, 40)), rng)
    if kind == 1:
        return perturb.low_dose(hu, float(rng.uniform(0.25, 0.6)), rng, spacing=spacing)
    if kind == 2:
        return perturb.blur(hu, float(rng.uniform(0.5, 1.5)), spacing)
    return perturb.thick_slices_on_grid(hu, spacing, 2)


def study_candidates(
    segmenter: LoadedModel,
    hu: np.ndarray,
    truth: np.ndarray,
    spacing,
    seed_p: float = inference.LESION_SEED_P,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of one grid-sized study: inputs, labels (1 = lesion) and kinds."""
    lung, lesion = inference.segment(segmenter, hu, seed_p)
    labels, n = inference.lesion_components(lesion, spacing, hu, lung & ~lesion)
    at = candidates.centres(labels, n)
    y = [int(truth[labels == i].any()) for i in range(1, n + 1)]
    kinds = [0] * n
    calls = labels > 0
    found = set(np.unique(truth[calls & (truth > 0)]).tolist())
    missed = [j for j in range(1, int(truth.max()) + 1) if j not in found and (truth == j).any()]
    if missed:
        miss_labels = np.where(np.isin(truth, missed), truth, 0)
        at += [c for c in candidates.centres(miss_labels, int(miss_labels.max())) if any(c)]
        y += [1] * (len(at) - len(y))
        kinds += [1] * (len(at) - len(kinds))
        calls = calls | (miss_labels > 0)
    x = candidates.patches(networks.scale_hu(hu), calls, at)
    return x, np.array(y, dtype=np.uint8), np.array(kinds, dtype=np.uint8)


def candidate_set(
    segmenter: LoadedModel,
    backgrounds: Sequence[Background],
    studies: int = STUDIES,
    *,
    seed_p: float = inference.LESION_SEED_P,
    progress: Callable[[int, int], None] | None = None,
) -> CandidateSet:
    """Candidates of ``studies`` semi-synthetic studies made from ``backgrounds`` in turn."""
    xs, ys, kinds, study, val = [], [], [], [], []
    for i in range(studies):
        bg = backgrounds[i % len(backgrounds)]
        seed = STUDY_SEED + i
        rng = np.random.default_rng(seed)
        k = int(rng.choice(len(LESION_COUNT_P), p=LESION_COUNT_P))
        hu, truth, _ = sample_study(bg, seed, n_lesions=k)
        hu = _degrade(hu, bg.spacing, rng).astype(np.float32)
        x, y, kind = study_candidates(segmenter, hu, truth, bg.spacing, seed_p)
        xs.append(x.astype(np.float16))
        ys.append(y)
        kinds.append(kind)
        study += [i] * len(y)
        val += [i % VALIDATION_EVERY == VALIDATION_EVERY - 1] * len(y)
        if progress:
            progress(i + 1, studies)
    shape = (0, candidates.CHANNELS, candidates.PATCH, candidates.PATCH)
    return CandidateSet(
        x=np.concatenate(xs) if xs else np.zeros(shape, dtype=np.float16),
        y=np.concatenate(ys) if ys else np.zeros(0, dtype=np.uint8),
        kind=np.concatenate(kinds) if kinds else np.zeros(0, dtype=np.uint8),
        study=np.array(study, dtype=np.int32),
        validation=np.array(val, dtype=bool),
    )


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flips, a random similarity transform (scale, rotation, shift: anatomy and pixel size
    differ between patients), intensity scale and shift, noise; the outline is moved with the
    image but never blurred."""
    x = x.clone()
    n = len(x)
    for dim, flips in ((3, rng.random(n) < 0.5), (2, rng.random(n) < 0.3)):  # x, then y
        idx = torch.from_numpy(np.flatnonzero(flips))
        if len(idx):
            x[idx] = torch.flip(x[idx], dims=(dim,))
    if AFFINE:
        scale = rng.uniform(*AFFINE_SCALE, n)
        angle = np.radians(rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES, n))
        shift = rng.uniform(-AFFINE_SHIFT, AFFINE_SHIFT, (n, 2))
        theta = np.zeros((n, 2, 3), dtype=np.float32)
        theta[:, 0, 0] = theta[:, 1, 1] = np.cos(angle) / scale
        theta[:, 0, 1] = -np.sin(angle) / scale
        theta[:, 1, 0] = np.sin(angle) / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=False)
        image = F.grid_sample(x[:, :-1], grid, mode="bilinear", align_corners=False)
        outline = F.grid_sample(x[:, -1:], grid, mode="nearest", align_corners=False)
        x = torch.cat([image, outline], dim=1)
    image = x[:, :-1]
    lo, hi = INTENSITY_SCALE
    scale = torch.from_numpy(rng.uniform(lo, hi, (n, 1, 1, 1)).astype(np.float32))
    shift = torch.from_numpy(
        rng.uniform(-INTENSITY_SHIFT, INTENSITY_SHIFT, (n, 1, 1, 1)).astype(np.float32)
    )
    sigma = rng.uniform(0, NOISE, (n, 1, 1, 1))
    noise = torch.from_numpy((rng.standard_normal(image.shape) * sigma).astype(np.float32))
    x[:, :-1] = (image * scale + shift + noise).clamp(0, 1)
    return x


def train(
    data: CandidateSet,
    *,
    steps: int = STEPS,
    seed: int = SEED,
    log_path: Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train a fresh screening CNN on the training part of ``data``; returned on the CPU."""
    from ml.training.segmenter import device_of

    dev = device if isinstance(device, torch.device) else device_of(device)
    set_determinism(seed=seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_idx = np.flatnonzero(~data.validation)
    pos = train_idx[data.y[train_idx] == 1]
    neg = train_idx[data.y[train_idx] == 0]
    if not len(train_idx):
        raise ValueError("no candidates to train on")
    if not len(pos) or not len(neg):  # a barely trained segmenter: one kind only; still train
        pos = neg = train_idx
    net = networks.build("screen").to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    net.train()
    with TrainingLog("screen", steps, log_path, progress) as log:
        for step in range(1, steps + 1):
            idx = np.concatenate([rng.choice(pos, BATCH // 2), rng.choice(neg, BATCH - BATCH // 2)])
            x = _augment(torch.from_numpy(data.x[idx].astype(np.float32)), rng)
            y = torch.from_numpy(data.y[idx].astype(np.float32))[:, None]
            y = y * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / 2
            loss = loss_fn(net(x.to(dev)), y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            log.step(step, float(loss.detach()), sched.get_last_lr()[0])
    net.to("cpu").eval()
    return net, log.history


@torch.no_grad()
def predict(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    out = [
        torch.sigmoid(net(torch.from_numpy(x[i : i + 256].astype(np.float32)))[:, 0])
        for i in range(0, len(x), 256)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def operating_point(net: torch.nn.Module, data: CandidateSet) -> dict[str, float]:
    """The threshold that keeps KEEP_SENSITIVITY of the held-back lesion calls, and what it
    does to the held-back false positives."""
    sel = data.validation & (data.kind == 0)
    p = predict(net, data.x[sel])
    y = data.y[sel]
    if not (y == 1).any() or not (y == 0).any():
        return {"threshold": 0.5}
    ranked = np.sort(p[y == 1])
    k = int(np.floor((1 - KEEP_SENSITIVITY) * len(ranked)))
    threshold = float(min(0.5, ranked[k]))
    kept = p >= threshold
    return {
        "threshold": threshold,  # not rounded: rounding up would drop the boundary lesions
        "validation_auc": round(float(metrics.classification(p, y)["auc"]), 4),
        "validation_lesion_calls": int((y == 1).sum()),
        "validation_false_positive_calls": int((y == 0).sum()),
        "validation_lesion_calls_kept": round(float(kept[y == 1].mean()), 4),
        "validation_false_positives_kept": round(float(kept[y == 0].mean()), 4),
    }


TRAIN_SEED_P = 0.1  # near misses too: the segmenter's own patient gives it few false calls
INPUT_CARD = {
    "patch": candidates.PATCH,
    "wide": candidates.WIDE,
    "context_slices": 2 * candidates.HALF + 1,
    "channels": [
        "slice above",
        "slice",
        "slice below",
        f"slice, {candidates.WIDE} px pooled",
        "lesion calls",
    ],
    "grid": networks.GRID,
    "hu_range": list(networks.HU_RANGE),
    "classes": ["lesion call is a lesion"],
}


def train_and_register(
    data_dir: Path,
    *,
    root: Path | None = None,
    studies: int = STUDIES,
    steps: int = STEPS,
    folds: bool = True,
    only: Sequence[str] | None = None,
    progress: bool = True,
    cache: Path | None = None,
) -> list[Path]:
    """Train the shipped screener on candidates of the shipped segmenter (all cases) and one
    per held-out case on the matching fold segmenter; write weights and cards to the registry.
    With ``cache``, candidate sets are kept there (by segmenter weights and study count) and
    reused, so the CNN can be retrained without running the segmenter again."""
    from ml.data.cases import CASES, TRAINING_DATA, load_backgrounds
    from ml.runtime import registry

    root = root or registry.MODELS_DIR
    seg_card = registry.read_card(registry.SEGMENTER, registry.SEGMENTER_VERSION, root)
    seg_dir = root / registry.SEGMENTER / registry.SEGMENTER_VERSION
    backgrounds, _ = load_backgrounds(data_dir)
    runs = [("all", list(CASES), seg_card["weights"], seg_card["sha256"])]
    if folds:
        runs += [
            (run, f["cases"], f["weights"], f["sha256"]) for run, f in seg_card["folds"].items()
        ]
    if only is not None:
        runs = [r for r in runs if r[0] in only]
    folder = root / registry.SCREENER / registry.SCREENER_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for run, cases, seg_weights, seg_sha in runs:
        made = time.perf_counter()
        candidate_seconds = None
        seg_net = registry.load_weights(
            networks.build("segment", seg_card["architecture"]), seg_dir / seg_weights, seg_sha
        )
        seg = LoadedModel(registry.SEGMENTER, registry.SEGMENTER_VERSION, "segment", seg_net, {})
        cached = cache / f"{seg_sha[:16]}-{studies}-{TRAIN_SEED_P}.npz" if cache else None
        if cached is not None and cached.is_file():
            data = CandidateSet.load(cached)
        else:
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=studies, desc=f"candidates {run}", unit="study")
            data = candidate_set(
                seg,
                [backgrounds[c] for c in cases],
                studies,
                seed_p=TRAIN_SEED_P,
                progress=(lambda i, n, bar=bar: bar.update(1)) if bar else None,
            )
            if bar:
                bar.close()
            candidate_seconds = round(time.perf_counter() - made, 1)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                data.save(cached)
        log_path = folder / f"training-{run}.jsonl"
        log_path.unlink(missing_ok=True)
        start = time.perf_counter()
        net, history = train(data, steps=steps, log_path=log_path, progress=progress)
        summary = {
            "cases": cases,
            "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),
            "first_loss": history[0]["running_loss"],
            "final_loss": history[-1]["running_loss"],
            "steps": steps,
            "candidates": data.summary(),
            # None: the candidates came from the cache (docs/PERFORMANCE.md gives their time)
            "candidate_seconds": candidate_seconds,
            "candidate_seed_p": TRAIN_SEED_P,
            "segmenter": f"{registry.SEGMENTER}@{registry.SEGMENTER_VERSION}",
            "segmenter_weights": seg_weights,
            "segmenter_sha256": seg_sha,
        }
        point = operating_point(net, data)
        if run == "all":
            card = {
                "architecture": networks.SCREENER_ARCH,
                "input": INPUT_CARD,
                "operating_point": point,
                "training": {
                    "config": {
                        "studies": studies,
                        "steps": steps,
                        "batch": BATCH,
                        "learning_rate": LEARNING_RATE,
                        "seed": SEED,
                        "study_seed": STUDY_SEED,
                    },
                    "data": TRAINING_DATA,
                    **summary,
                },
            }
            written.append(
                registry.save(
                    net,
                    name=registry.SCREENER,
                    version=registry.SCREENER_VERSION,
                    task="screen",
                    card=card,
                    root=root,
                )
            )
        else:
            path = registry.save(
                net,
                name=registry.SCREENER,
                version=registry.SCREENER_VERSION,
                task="screen",
                card={},
                root=root,
                weights_name=f"fold-{run}.pt",
            )
            info = {
                **summary,
                "operating_point": point,
                "weights": path.name,
                "sha256": registry.sha256_file(path),
            }
            registry.write_fold(registry.SCREENER, registry.SCREENER_VERSION, run, info, root)
            written.append(path)
    return written
