"""Training of the segmenter and the screener on semi-synthetic slabs, reproducibly.

Every step draws a fresh batch: a background (a real CT with its tumour removed), a slice in its
lungs, zero to two synthetic lesions drawn near that slice, then flips, small rotations, intensity
and noise augmentation (MONAI transforms). Seeds fix the whole stream, so a run repeats exactly on
the same machine and library versions. Progress goes to a bar and a JSON-lines log.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import set_determinism

from ml.data.cases import CASES, TRAINING_DATA, load_backgrounds
from ml.data.synth import Background, insert_lesions, random_lesion
from ml.runtime import networks
from ml.training.log import TrainingLog

SLAB_REACH = 4  # slices either side of the sampled one that lesions may be centred in
# Both networks are fully convolutional, so they train on patches and run on whole slices.
# Patches put far more lesion pixels into each step than whole slices do: on whole slices
# the U-Net's lesion Dice was still about 0.1 after 200 steps.
PATCH = 96
PATCH_ON_LESION_P = 0.5
# Some samples anywhere in the volume and anywhere in the slice: the first patch-trained models
# never saw abdomen, neck or mediastinum up close and called bowel gas and heart lesions.
ANY_SLICE_P = 0.2
ANY_PATCH_P = 0.2
LESION_COUNTS = (0, 1, 2)
LESION_COUNT_P = (0.25, 0.5, 0.25)
DENSE_POS_WEIGHT = 10.0
SEG_CLASS_WEIGHTS = (
    1.0,
    1.0,
    5.0,
)  # background, lung, lesion  # lesion cells are rare on the evidence map


@dataclass(frozen=True)
class TrainingConfig:
    task: str
    steps: int
    batch: int
    learning_rate: float = 2e-3
    seed: int = 20261125

    def to_dict(self) -> dict:
        return dict(self.__dict__)


DEFAULTS = {
    "segment": TrainingConfig("segment", steps=2400, batch=16),
}
# The leave-one-patient-out fold models are trained shorter than the shipped ones to fit the CPU
# budget of a session; their figures therefore understate the shipped models slightly.
FOLD_STEPS = {"segment": 1600}


def _augment(seed: int) -> Compose:
    keys = ["image", "label"]
    aug = Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotated(keys, range_x=math.radians(10), prob=0.3, mode=("bilinear", "nearest")),
            RandScaleIntensityd("image", factors=0.03, prob=0.5),
            RandShiftIntensityd("image", offsets=20.0, prob=0.5),
            RandGaussianNoised("image", std=15.0, prob=0.3),
        ]
    )
    aug.set_random_state(seed=seed)
    return aug


class SlabSampler:
    """Training samples: 2.5-D input in HU, the middle slice's class map, slice label."""

    def __init__(
        self, backgrounds: Sequence[Background], seed: int, patch: int | None = PATCH
    ) -> None:
        if not backgrounds:
            raise ValueError("no background to train on")
        for b in backgrounds:
            if b.hu.shape[1:] != (networks.GRID, networks.GRID):
                raise ValueError(f"{b.name}: backgrounds must be on the {networks.GRID} grid")
        self.backgrounds = list(backgrounds)
        self.rng = np.random.default_rng(seed)
        self.augment = _augment(seed)
        self.lung_slices = [np.flatnonzero(b.lung.any(axis=(1, 2))) for b in self.backgrounds]
        self.patch = patch

    def _crop(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A patch centred on a lesion pixel (most of the time, when there is one), else on
        lung, else anywhere."""
        size, n = self.patch, label.shape[-1]
        rng = self.rng
        lesion = np.argwhere(label == 2)
        lung = np.argwhere(label == 1)
        u = rng.random()
        if len(lesion) and u < PATCH_ON_LESION_P:
            cy, cx = lesion[rng.integers(len(lesion))]
        elif u > 1 - ANY_PATCH_P:
            cy, cx = rng.integers(n, size=2)
        elif len(lung):
            cy, cx = lung[rng.integers(len(lung))]
        else:
            cy, cx = rng.integers(n, size=2)
        y0 = int(np.clip(cy - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, n - size))
        x0 = int(np.clip(cx - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, n - size))
        return image[:, y0 : y0 + size, x0 : x0 + size], label[y0 : y0 + size, x0 : x0 + size]

    def sample(self) -> tuple[np.ndarray, np.ndarray, float]:
        rng = self.rng
        k = int(rng.integers(len(self.backgrounds)))
        bg = self.backgrounds[k]
        slices = self.lung_slices[k]
        if rng.random() < ANY_SLICE_P:
            z = int(rng.integers(bg.hu.shape[0]))
        else:
            z = int(rng.choice(slices))
        z0, z1 = max(0, z - SLAB_REACH), min(bg.hu.shape[0], z + SLAB_REACH + 1)
        depth = None if bg.depth is None else bg.depth[z0:z1]
        slab = Background(
            bg.name, bg.hu[z0:z1], bg.lung[z0:z1], bg.spacing, bg.tumour[z0:z1], depth
        )
        n = int(rng.choice(LESION_COUNTS, p=LESION_COUNT_P))
        specs = []
        for _ in range(n * 3):
            if len(specs) == n:
                break
            spec = random_lesion(slab, rng, near_slice=z - z0)
            if spec is not None:
                specs.append(spec)
        hu, labels, _ = insert_lesions(slab.hu, slab.lung, slab.spacing, specs, rng)
        mid = z - z0
        context = networks.stack_context(hu)[mid]
        classes = np.where(labels[mid] > 0, 2, np.where(slab.lung[mid], 1, 0)).astype(np.float32)
        out = self.augment({"image": context, "label": classes[None]})
        image = np.asarray(out["image"], dtype=np.float32)
        label = np.asarray(out["label"], dtype=np.float32)[0]
        if self.patch:
            image, label = self._crop(image, label)
        positive = float((label == 2).any())
        return networks.scale_hu(image), label, positive

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return collate([self.sample() for _ in range(size)])


def collate(
    items: list[tuple[np.ndarray, np.ndarray, float]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples (image, label map, has-lesion) into the batch tensors the training step takes."""
    x = torch.from_numpy(np.stack([i[0] for i in items]))
    y = torch.from_numpy(np.stack([i[1] for i in items])).long()
    p = torch.tensor([i[2] for i in items], dtype=torch.float32)
    return x, y, p


class Sampler(Protocol):
    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def device_of(name: str | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when torch sees it, else the CPU); a clear
    error when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def train(
    config: TrainingConfig,
    backgrounds: Sequence[Background],
    *,
    log_path: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    sampler: Sampler | None = None,
    device: str | torch.device | None = None,
    validate: Callable[[torch.nn.Module], dict] | None = None,
    validate_every: int = 0,
    validation_key: str = "lesion_dice",
) -> tuple[torch.nn.Module, list[dict]]:
    """Train a fresh network for ``config.task``; return it (in eval mode, on the CPU) and the
    loss history. ``sampler`` replaces the semi-synthetic slab sampler of ``backgrounds``. With
    ``validate`` (a function of the network returning metrics) every ``validate_every`` steps and
    at the end, the weights with the highest ``validation_key`` are the ones returned: the
    validation split chooses the number of steps."""
    set_determinism(seed=config.seed)
    torch.manual_seed(config.seed)
    dev = device if isinstance(device, torch.device) else device_of(device)
    net = networks.build(config.task).to(dev)
    sampler = sampler or SlabSampler(backgrounds, config.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.learning_rate, total_steps=config.steps, pct_start=0.1
    )
    if config.task == "segment":
        # Dice over the whole batch, not per slice: most slices have no lesion, and a per-slice
        # Dice of an empty lesion class punishes any lesion probability so hard that the first
        # model (900 steps) never predicted a lesion at all. Cross-entropy weights lesions up.
        seg_loss = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            batch=True,
            weight=torch.tensor(SEG_CLASS_WEIGHTS, device=dev),
        )

        def loss_fn(x, y, p):
            return seg_loss(net(x), y[:, None])
    else:
        raise ValueError("the screener is trained by ml.training.screener, on candidates")

    best: tuple[float, int, dict] | None = None
    net.train()
    with TrainingLog(config.task, config.steps, log_path, progress) as log:
        for step in range(1, config.steps + 1):
            x, y, p = sampler.batch(config.batch)
            loss = loss_fn(x.to(dev), y.to(dev), p)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            if on_step:
                on_step(step, value)
            log.step(step, value, sched.get_last_lr()[0], positives_in_batch=int(p.sum()))
            if validate and (
                step == config.steps or (validate_every and step % validate_every == 0)
            ):
                metrics = validate(net)
                log.note({"step": step, "validation": metrics})
                score = float(metrics.get(validation_key, float("nan")))
                if best is None or (score == score and not score <= best[0]):
                    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                    best = (score, step, state)
    if best is not None and best[0] == best[0]:
        net.load_state_dict(best[2])
        log.history.append({"chosen_step": best[1], validation_key: best[0]})
    net.to("cpu").eval()
    return net, log.history


def train_and_register(
    task: str,
    data_dir: Path,
    *,
    root: Path | None = None,
    steps: int | None = None,
    folds: bool = True,
    progress: bool = True,
    log_dir: Path | None = None,
    only: Sequence[str] | None = None,
    fold_steps: int | None = None,
) -> list[Path]:
    """Train the shipped model for ``task`` on every case, and one per held-out case for the
    leave-one-patient-out evaluation; write weights and card to the registry. The screener has its
    own (:mod:`ml.training.screener`): it trains on this model's lesion calls."""
    from ml.runtime import registry

    root = root or registry.MODELS_DIR
    name = registry.SEGMENTER
    version = registry.SEGMENTER_VERSION
    base = DEFAULTS[task]
    config = TrainingConfig(task, steps or base.steps, base.batch, base.learning_rate, base.seed)
    backgrounds, _ = load_backgrounds(data_dir)
    log_dir = log_dir or (root / name / version)
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, list[str]]] = [("all", list(CASES))]
    if folds:
        runs += [(f"holdout-{c}", [o for o in CASES if o != c]) for c in CASES]
    if only is not None:
        runs = [r for r in runs if r[0] in only]
    written: list[Path] = []
    for run, cases in runs:
        log_path = log_dir / f"training-{run}.jsonl"
        log_path.unlink(missing_ok=True)
        start = time.perf_counter()
        run_config = config
        if run != "all":
            run_config = TrainingConfig(
                task,
                fold_steps or steps or FOLD_STEPS[task],
                config.batch,
                config.learning_rate,
                config.seed,
            )
        net, history = train(
            run_config, [backgrounds[c] for c in cases], log_path=log_path, progress=progress
        )
        seconds = time.perf_counter() - start
        summary = {
            "cases": cases,
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "first_loss": history[0]["running_loss"],
            "final_loss": history[-1]["running_loss"],
            "steps": run_config.steps,
        }
        if run == "all":
            continue_card = {
                "architecture": (
                    networks.SEGMENTER_ARCH if task == "segment" else networks.SCREENER_ARCH
                ),
                "input": {
                    "grid": networks.GRID,
                    "context_slices": networks.CONTEXT,
                    "hu_range": list(networks.HU_RANGE),
                    "classes": list(networks.SEG_CLASSES) if task == "segment" else ["lesion"],
                },
                "training": {"config": config.to_dict(), "data": TRAINING_DATA, **summary},
            }
            written.append(
                registry.save(
                    net, name=name, version=version, task=task, card=continue_card, root=root
                )
            )
        else:
            path = registry.save(
                net,
                name=name,
                version=version,
                task=task,
                card={},
                root=root,
                weights_name=f"fold-{run}.pt",
            )
            fold = {**summary, "weights": path.name, "sha256": registry.sha256_file(path)}
            registry.write_fold(name, version, run, fold, root)
            written.append(path)
    return written
