"""Training of the nodule outline U-Net (`radai-nodule-outline-unet`) on the LIDC-IDRI readers'
outlines, and its Dice and HD95 on the crops of patients it never saw.

Examples are the LIDC nodule crops themselves (each a real CT around a real nodule, with the
readers' max-voted mask): the U-Net learns on the train-split patients; the step kept (best mean
Dice) is chosen on the validation-split patients; the test-split patients are read once, after
the model is final, for the reported figures. It never sees any of the six anatomies of the
composite studies, so no leave-one-anatomy-out folds are needed for it.

Each training cube is drawn around the mask's centroid moved by up to `JITTER_MM` (at inference
the point is a blob candidate's centre, not the nodule's), turned in-plane by any angle,
mirrored on any axis, scaled by `SCALE` (nodule size), with scanner augmentation on the crop
before it is sampled: thicker slices (to `MAX_SLICE_MM`), smooth or sharp kernels, noise. Beyond
the crop the cube reads air: beyond its sides (crops are about 3 cm across) and, where a crop ends
at the nodule's first or last slice (about half of them), above and below. So the network never
learnt what lies around a nodule in a whole scan (chest wall, vessels, consolidation), which is
why the CAD limits its outline (:class:`ml.runtime.nodule_outline.Outliner`).

The classical outline (:func:`ml.image.nodule_segment.segment_nodule`, what the CAD draws with
today) is scored beside it on the same crops from the same point and the mask's equivalent
radius. Imports ``ml.data``, ``ml.image``, ``ml.evaluation``, ``ml.runtime`` and ``ml.training``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from scipy import ndimage

from ml.data.nodules import LIDC_LICENCE, NoduleRow, load_crop, read_nodule_table
from ml.data.splits import FINAL_EVALUATION, rows_in
from ml.evaluation import metrics
from ml.evaluation.report import outline_table
from ml.image.morphology import centroid
from ml.image.nodule_segment import segment_nodule
from ml.runtime import networks, registry
from ml.runtime import nodule_outline as no
from ml.training.log import TrainingLog
from ml.training.malignancy import CITATION, crop_folder

NAME = registry.OUTLINER
VERSION = registry.OUTLINER_VERSION
STEPS = 2400
BATCH = 8
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
VALIDATE_EVERY = 300
SEED = 20261201
JITTER_MM = 3.0  # and at most a third of the nodule's radius
SCALE = (0.85, 1.15)
THICK_P, MAX_SLICE_MM = 0.3, 5.0
SMOOTH_P, SHARP_P = 0.2, 0.2
NOISE_HU = (0.0, 25.0)
BOOTSTRAP = 1000
SIZE_BANDS = ((0.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, math.inf))


@dataclass(frozen=True)
class Example:
    """A crop with what training and scoring need of it."""

    patient: str
    hu: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    centre: np.ndarray  # the mask's centroid, voxel coordinates (z, y, x)
    diameter_mm: float  # equivalent-sphere diameter of the mask

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0


def load_examples(folder: Path, rows: Sequence[NoduleRow]) -> list[Example]:
    out = []
    for row in rows:
        crop = load_crop(folder, row)
        out.append(
            Example(
                row.patient_id,
                crop.hu,
                crop.mask,
                crop.spacing,
                centroid(crop.mask),
                no.equivalent_diameter_mm(crop.mask, crop.spacing),
            )
        )
    return out


def scanner_augment(hu: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """The crop as another scanner might have shown it: thicker slices, a smooth or a sharp
    kernel (in-plane), before the cube is sampled."""
    sz, sy, sx = (float(s) for s in spacing)
    if rng.random() < THICK_P and sz < MAX_SLICE_MM:
        t = rng.uniform(sz, MAX_SLICE_MM)
        sigma = math.sqrt(max(t * t - sz * sz, 0.0)) / 2.355 / sz  # FWHM t, in slices
        hu = ndimage.gaussian_filter1d(hu, sigma, axis=0, mode="nearest")
    r = rng.random()
    if r < SMOOTH_P:
        s = rng.uniform(0.3, 0.8)
        hu = ndimage.gaussian_filter(hu, (0.0, s / sy, s / sx), mode="nearest")
    elif r < SMOOTH_P + SHARP_P:
        blur = ndimage.gaussian_filter(hu, (0.0, 0.6 / sy, 0.6 / sx), mode="nearest")
        hu = hu + rng.uniform(0.3, 1.0) * (hu - blur)
    return hu


def augmented_pair(
    ex: Example, rng: np.random.Generator, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(input (1, P, P, P), label (1, P, P, P)) of one randomly moved, turned, mirrored and
    scaled cube of ``ex``."""
    hu = scanner_augment(ex.hu, ex.spacing, rng)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    scale = rng.uniform(*SCALE)
    flips = np.where(rng.random(3) < 0.5, -1.0, 1.0)
    oz, oy, ox = offsets
    moved = (
        np.stack([oz * flips[0], (c * oy - s * ox) * flips[1], (s * oy + c * ox) * flips[2]])
        * scale
    )
    reach = min(JITTER_MM, ex.radius_mm / 3.0)
    direction = rng.normal(size=3)
    jitter_mm = (
        direction / max(float(np.linalg.norm(direction)), 1e-9) * reach * rng.random() ** (1 / 3)
    )
    centre = ex.centre + jitter_mm / np.asarray(ex.spacing)
    image = no.sample_points(hu, ex.spacing, centre, moved)
    image = image + rng.normal(0.0, rng.uniform(*NOISE_HU), size=image.shape).astype(np.float32)
    label = no.sample_points(ex.mask.astype(np.float32), ex.spacing, centre, moved, cval=0.0)
    x = np.asarray(networks.scale_hu(image), dtype=np.float32)[None]
    return x, (label >= 0.5).astype(np.float32)[None]


def outline_crop(
    outline: Callable[..., tuple[tuple[slice, ...], np.ndarray]], ex: Example
) -> np.ndarray:
    """The outline drawn from the crop's centre, as a mask over the whole crop."""
    box, mask = outline(ex.hu, ex.spacing, tuple(ex.centre), ex.radius_mm, None)
    full = np.zeros(ex.mask.shape, dtype=bool)
    full[box] = mask
    return full


def scores(
    outline: Callable[..., tuple[tuple[slice, ...], np.ndarray]], examples: Sequence[Example]
) -> list[dict[str, float]]:
    """Dice, IoU and HD95 (mm) of ``outline`` against the readers' mask of each crop."""
    return [metrics.overlap(outline_crop(outline, ex), ex.mask, ex.spacing) for ex in examples]


def crop_outliner(net: torch.nn.Module) -> no.Outliner:
    """The network's own outline on a crop: no lung mask there, and no reach limit (the limit
    keeps it off the chest wall in a whole scan; a crop's nodule lies well within it)."""
    return no.Outliner(net, reach=None)


def mean_dice(outline, examples: Sequence[Example]) -> float:
    return float(np.mean([s["dice"] for s in scores(outline, examples)])) if examples else 0.0


def train(
    train_set: Sequence[Example],
    validation: Sequence[Example],
    *,
    steps: int = STEPS,
    seed: int = SEED,
    log_path: Path | None = None,
    progress: bool = True,
    arch: dict | None = None,
    validate_every: int = VALIDATE_EVERY,
) -> tuple[torch.nn.Module, dict]:
    """Train; return the network at the check with the best validation Dice, and the history."""
    set_determinism(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = networks.build("outline", arch)
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps)
    loss_fn = DiceCELoss(sigmoid=True)
    offsets = no.patch_offsets_mm()
    best, best_step, best_state = -math.inf, 0, {}
    curve = []
    with TrainingLog("outline", steps, log_path, progress) as log:
        for step in range(1, steps + 1):
            net.train()
            pairs = [
                augmented_pair(train_set[int(i)], rng, offsets)
                for i in rng.integers(0, len(train_set), BATCH)
            ]
            x = torch.from_numpy(np.stack([p[0] for p in pairs]))
            y = torch.from_numpy(np.stack([p[1] for p in pairs]))
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            log.step(step, float(loss.detach()), float(sched.get_last_lr()[0]))
            if step % validate_every == 0 or step == steps:
                dice = mean_dice(crop_outliner(net), validation)
                curve.append({"step": step, "validation_dice": round(dice, 4)})
                log.note(curve[-1])
                if dice > best:
                    best, best_step = dice, step
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval(), {"best_step": best_step, "steps": steps, "curve": curve}


def figure(results: Sequence[dict], examples: Sequence[Example], *, seed: int = 0) -> dict:
    """Mean Dice and median HD95 with 95 % intervals from resampling patients, all and by size."""

    def summary(idx: np.ndarray) -> dict:
        if idx.size == 0:
            return {"nodules": 0}
        dice = np.array([results[i]["dice"] for i in idx])
        hd = np.array([results[i]["hd95_mm"] for i in idx])
        pts = [examples[i].patient for i in idx]
        ids = sorted(set(pts))
        groups = [idx[np.asarray(pts) == p] for p in ids]
        pos = {int(i): k for k, i in enumerate(idx)}

        def stat(values: np.ndarray, fn) -> Callable[[np.ndarray], float]:
            return lambda sel: float(
                fn(values[[pos[int(i)] for i in np.concatenate([groups[j] for j in sel])]])
            )

        d, d_lo, d_hi = metrics.bootstrap(
            stat(dice, np.mean), len(ids), resamples=BOOTSTRAP, seed=seed
        )
        h, h_lo, h_hi = metrics.bootstrap(
            stat(hd, np.median), len(ids), resamples=BOOTSTRAP, seed=seed
        )
        return {
            "nodules": int(idx.size),
            "patients": len(ids),
            "dice_mean": round(d, 3),
            "dice_95ci_patients": [round(d_lo, 3), round(d_hi, 3)],
            "hd95_mm_median": round(h, 2),
            "hd95_mm_95ci_patients": [round(h_lo, 2), round(h_hi, 2)],
        }

    diam = np.array([ex.diameter_mm for ex in examples])
    out = {"all": summary(np.arange(len(examples)))}
    for lo, hi in SIZE_BANDS:
        key = f"{lo:g}-{hi:g} mm" if math.isfinite(hi) else f">= {lo:g} mm"
        out[key] = summary(np.flatnonzero((diam >= lo) & (diam < hi)))
    return out


def train_and_register(
    data: Path,
    *,
    root: Path = registry.MODELS_DIR,
    steps: int = STEPS,
    seed: int = SEED,
    progress: bool = True,
    arch: dict | None = None,
    validate_every: int = VALIDATE_EVERY,
) -> list[Path]:
    """Train on the train patients, choose the step on validation, report the test figures
    once, and write ``NAME/VERSION`` (weights, card.json, card.md, training.jsonl) under
    ``root``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    folder = crop_folder(data)
    rows = read_nodule_table(folder / "nodules.csv", folder)
    train_set = load_examples(folder, rows_in(rows, "train"))
    validation = load_examples(folder, rows_in(rows, "validation"))
    if not train_set or not validation:
        raise ValueError("need nodules of both train and validation patients")
    out = root / NAME / VERSION
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training.jsonl"
    log_path.unlink(missing_ok=True)
    net, history = train(
        train_set,
        validation,
        steps=steps,
        seed=seed,
        log_path=log_path,
        progress=progress,
        arch=arch,
        validate_every=validate_every,
    )
    net = registry.as_shipped(net)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    unet = crop_outliner(net)
    val = {
        "unet": figure(scores(unet, validation), validation, seed=seed),
        "classical": figure(scores(segment_nodule, validation), validation, seed=seed),
    }
    # The one look at the test patients: the model is final by now.
    test_set = load_examples(folder, rows_in(rows, "test", purpose=FINAL_EVALUATION))
    test = {
        "unet": figure(scores(unet, test_set), test_set, seed=seed),
        "classical": figure(scores(segment_nodule, test_set), test_set, seed=seed),
    }
    card = {
        "architecture": arch or networks.OUTLINE_ARCH,
        "predicts": "per voxel, whether the LIDC-IDRI readers would have outlined it as part of "
        "the nodule at the given point (their max-voted mask)",
        "input": {
            "patch": [no.PATCH] * 3,
            "spacing_mm": no.PATCH_SPACING_MM,
            "channels": ["HU clipped to [-1000, 400] scaled to [0, 1]"],
            "centre": "a point inside the nodule (a candidate's centre); any input spacing "
            "resampled (trilinear); outside the scan is air",
            "output": f"probability per voxel, mean over 4 in-plane flips, resampled onto the "
            f"scan's grid; kept: >= {no.THRESHOLD}, the connected part nearest the point",
        },
        "intended_use": "NOT FOR CLINICAL USE. Research: the outline of a nodule another stage "
        "has found (the nodule CAD's candidates); it does not decide whether there is one.",
        "training": {
            "data": "LIDC-IDRI nodule crops with the readers' max-voted masks "
            "(shared/data/lidc-nodules, prepared by PabloLION/ct-slicing commit 07d32ab)",
            "licence": LIDC_LICENCE,
            "citation": CITATION,
            "split": "by patient, ml/data/splits.py (key radai-lidc-split-v1): train to learn, "
            "validation to choose the step, test read once for the figures",
            "train": {"nodules": len(train_set), "patients": len({e.patient for e in train_set})},
            "validation": {
                "nodules": len(validation),
                "patients": len({e.patient for e in validation}),
            },
            "steps": steps,
            "best_step": history["best_step"],
            "batch": BATCH,
            "learning_rate": LEARNING_RATE,
            "loss": "Dice + cross-entropy (MONAI DiceCELoss, sigmoid)",
            "augmentation": f"centre moved up to {JITTER_MM} mm (a third of the radius at most), "
            f"any in-plane angle, mirrors on 3 axes, scale {SCALE[0]}-{SCALE[1]}, slices "
            f"thickened to {MAX_SLICE_MM} mm (p {THICK_P}), smooth or sharp kernel (p {SMOOTH_P} "
            f"each), noise up to {NOISE_HU[1]} HU",
            "seed": seed,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "validation_curve": history["curve"],
        },
        "metrics": {
            "how": "per crop, the outline drawn from the readers' mask centroid (the classical "
            "outline also given the mask's equivalent radius) against the readers' mask on the "
            "crop's own grid (the network's own outline: the lung-mask and reach limits the CAD "
            "adds in a whole scan are not applied); mean Dice and median HD95 with 95 % "
            "intervals over patients",
            "validation": {**val, "note": "used to choose the step, so optimistic"},
            "test": test,
        },
        "limitations": [
            "Learnt from ~500 nodules of one public collection (scanners of 2000-2010); the "
            "readers' max-voted mask is the reference, and readers agree with each other at "
            "a Dice of about 0.8-0.9.",
            "About half of the crops end at the nodule's first and last slice: the network "
            "learnt there with air beyond the crop.",
            "It outlines what is at the point it is given; whether that is a nodule is the "
            "CAD classifier's decision.",
            "In whole scans it reaches beyond small nodules (it learnt from crops with air around "
            "them): the nodule CAD has it redraw only the nodules whose classical outline is at "
            "least 18 mm wide (ml.runtime.cad.LEARNT_OUTLINE_FROM_MM, chosen on validation "
            "composites; docs/models/report.md).",
        ],
    }
    weights = registry.save(net, name=NAME, version=VERSION, task="outline", card=card, root=root)
    full = registry.read_card(NAME, VERSION, root)
    (out / "card.md").write_text(card_markdown(full))
    return [weights, out / "card.json", out / "card.md", log_path]


def card_markdown(card: dict) -> str:
    """The card for people."""
    t, m = card["training"], card["metrics"]
    return "\n".join(
        [
            f"# {card['name']} {card['version']}",
            "",
            "**NOT FOR CLINICAL USE.**",
            "",
            "## What it does",
            f"Predicts {card['predicts']}. Input: {card['input']['patch'][0]}³ voxels at "
            f"{card['input']['spacing_mm']} mm about {card['input']['centre']}. Output: "
            f"{card['input']['output']}.",
            "",
            "## Data",
            f"LIDC-IDRI: {t['citation']}. Licence: {t['licence']}.",
            f"{t['data']}. Split {t['split']}. Train: {t['train']['nodules']} nodules of "
            f"{t['train']['patients']} patients; validation: {t['validation']['nodules']} of "
            f"{t['validation']['patients']}.",
            "",
            "## Performance against the readers' outlines",
            m["how"] + ".",
            "",
            "**Test patients (read once, after the model was final):**",
            "",
            *outline_table(m["test"]),
            "",
            f"Validation patients ({m['validation']['note']}):",
            "",
            *outline_table(m["validation"]),
            "",
            "## Training",
            f"{t['steps']} steps (kept: step {t['best_step']}, best validation Dice), batch "
            f"{t['batch']}, AdamW {t['learning_rate']} one-cycle, {t['loss']}; augmentation: "
            f"{t['augmentation']}; {t['seconds']} s wall clock ({t['cpu_seconds']} CPU-seconds) "
            f"on {t['torch_threads']} CPU thread(s), seed {t['seed']}.",
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
    )
