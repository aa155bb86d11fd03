"""Training both networks on real data (:mod:`ml.training.real_samples`) and registering them with
cards that name the data: `radai train segment|screen --data DIR` (the default source).

Segmenter: the U-Net trains on patches of composited studies of the training anatomies (real
LIDC nodules of the train-split patients, drawn lesions as a minority, hard-negative patches);
every `VALIDATE_EVERY` steps its lesion Dice is measured on studies composited with nodules of the
validation-split patients, and the best checkpoint is kept (the validation split chooses the
steps). Screener: the screening CNN trains on the new segmenter's own lesion calls (and near
misses) on other composited studies of the same anatomies, the pneumonia anatomies' empty studies
among them, plus hard-negative candidates from the hard zones; its operating threshold is chosen
on the calls of validation-split studies only. Folds: leave-one-anatomy-out
(:func:`ml.data.splits.anatomy_folds`), each fold model trained without its held-out anatomy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ml.data import splits
from ml.data.backgrounds import ANATOMIES, LICENCES
from ml.data.nodules import LIDC_LICENCE
from ml.runtime import candidates, networks, registry
from ml.runtime.registry import LoadedModel
from ml.training import real_samples as rs
from ml.training import screener as scr
from ml.training import segmenter as seg

TRAIN_PER_ANATOMY = 8  # U-Net training studies per anatomy
VALIDATION_PER_ANATOMY = 2  # validation-split studies per anatomy (steps, thresholds)
SCREEN_PER_ANATOMY = 12  # screener studies per anatomy (apart from the U-Net's): fits the hour
SCREEN_FIRST = 1000  # index of the screener's first study (seeds apart from the U-Net's)
SEG_STEPS = 2400
SEG_BATCH = 16
VALIDATE_EVERY = 400  # each check: about 1 min for the 12 validation studies on one thread
HARD_CANDIDATES_PER_STUDY = 6
HARD_CALL_RADIUS_PX = 3

CITATIONS = [
    "LIDC-IDRI: Armato SG III et al., Med Phys 38(2):915-931, 2011; TCIA, "
    "doi:10.7937/K9/TCIA.2015.LO9QL9SX; licence CC BY 3.0 (nodule crops as prepared in "
    "PabloLION/ct-slicing, commit 07d32ab)",
    "COVID-CT-MD: Afshar P et al., Sci Data 8:121, 2021, doi:10.1038/s41597-021-00900-3 "
    "(sample cases normal001, cap001, cap002, P001 from ShahinSHH/COVID-CT-MD, commit 5269979; "
    "licence not verified offline)",
    "pyradiomics test data lung1, lung2 (Harvard Medical School, BSD-3), their tumours removed",
]


REAL_DATA_DESCRIPTION = (
    "Real LIDC-IDRI nodules (readers' masks) composited into real chest CTs of the "
    "anatomies listed (ml.data.compose), with drawn lesions as a minority "
    f"({rs.DRAWN_P:.0%}), scanner augmentation (ml.data.scanner_aug) and hard-negative "
    "patches (vessels and hilum, mediastinum and heart border, diaphragm and liver dome, "
    "pneumonia consolidation). Labels are true by construction, not clinical reads."
)


def data_card(
    anatomies: Sequence[str],
    training_studies: object,
    validation_studies: object,
    *,
    description: str = REAL_DATA_DESCRIPTION,
    validation_use: str = "steps and thresholds chosen on them",
    recipe_version: object = rs.RECIPE_VERSION,
) -> dict:
    """What a card says about the data a real-data model was trained and validated on: LIDC
    nodules in the ``anatomies``, split by patient. The defaults are the U-Net's and the
    screener's, whose studies are described by `real_samples.summary`; the nodule CAD's
    classifier passes its own description, threshold, recipe and study counts
    (`ml.training.cad`)."""
    return {
        "source": "real",
        "description": description,
        "citations": CITATIONS,
        "licences": {"lidc": LIDC_LICENCE, **{a: LICENCES[a] for a in anatomies}},
        "anatomies": list(anatomies),
        "split": {
            "key": splits.SPLIT_KEY,
            "train": "LIDC train-split patients: the nodules trained on",
            "validation": f"LIDC validation-split patients: {validation_use}",
            "test": "never read",
        },
        "training_studies": training_studies,
        "validation_studies": validation_studies,
        "recipe_version": recipe_version,
    }


def _progress_bar(desc: str, total: int, progress: bool):  # noqa: ANN202
    if not progress:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="study")
    return bar, (lambda i, n: bar.update(1))


def _studies(specs, sources, cache, progress: bool, desc: str) -> list[rs.GridStudy]:  # noqa: ANN001
    bar, cb = _progress_bar(desc, len(specs), progress)
    try:
        return rs.studies(specs, sources, cache, progress=cb)
    finally:
        if bar:
            bar.close()


def _runs(anatomies: Sequence[str], folds: bool) -> list[tuple[str, list[str]]]:
    runs = [("all", list(anatomies))]
    if folds:
        runs += [(f"holdout-{out}", rest) for rest, out in splits.anatomy_folds(anatomies)]
    return runs


def train_segmenter(
    data_dir: Path | None,
    *,
    root: Path | None = None,
    version: str = registry.SEGMENTER_VERSION,
    anatomies: Sequence[str] = ANATOMIES,
    steps: int = SEG_STEPS,
    batch: int = SEG_BATCH,
    folds: bool = False,
    per_anatomy: int = TRAIN_PER_ANATOMY,
    validation_per_anatomy: int = VALIDATION_PER_ANATOMY,
    validate_every: int = VALIDATE_EVERY,
    cache: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    sources: rs.Sources | None = None,
) -> list[Path]:
    """Train the shipped U-Net (all ``anatomies``) and, with ``folds``, one per held-out anatomy;
    write weights and cards under ``root``."""
    root = root or registry.MODELS_DIR
    name = registry.SEGMENTER
    sources = sources or rs.Sources(data_dir)
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for run, names in _runs(anatomies, folds):
        made = time.perf_counter()
        train = _studies(rs.plan(names, "train", per_anatomy), sources, cache, progress, run)
        val = _studies(
            rs.plan(names, "validation", validation_per_anatomy), sources, cache, progress, "val"
        )
        study_seconds = round(time.perf_counter() - made, 1)
        config = seg.TrainingConfig("segment", steps, batch)
        sampler = rs.RealSlabSampler(train, config.seed)
        log_path = folder / f"training-{run}.jsonl"
        log_path.unlink(missing_ok=True)
        start = time.perf_counter()
        net, history = seg.train(
            config,
            [],
            sampler=sampler,
            device=device,
            log_path=log_path,
            progress=progress,
            validate=partial(rs.lesion_dice, studies_=val) if val else None,
            validate_every=validate_every,
        )
        losses = [h for h in history if "running_loss" in h]
        checks = [h for h in history if "validation" in h]
        chosen = next((h for h in history if "chosen_step" in h), {})
        summary = {
            "anatomies": names,
            "seconds": round(time.perf_counter() - start, 1),
            "study_seconds": study_seconds,
            "device": str(seg.device_of(device)),
            "threads": torch.get_num_threads(),
            "first_loss": losses[0]["running_loss"],
            "final_loss": losses[-1]["running_loss"],
            "steps": steps,
            "chosen_step": chosen.get("chosen_step"),
            "validation": checks[-1]["validation"] if checks else None,
            "validation_curve": [{"step": h["step"], **h["validation"]} for h in checks],
            "patches": dict(sampler.counts),
        }
        if run == "all":
            card = {
                "architecture": networks.SEGMENTER_ARCH,
                "input": {
                    "grid": networks.GRID,
                    "context_slices": networks.CONTEXT,
                    "hu_range": list(networks.HU_RANGE),
                    "classes": list(networks.SEG_CLASSES),
                },
                "training": {
                    "config": {**config.to_dict(), "patch": rs.PATCH, "batch": batch},
                    "data": data_card(names, rs.summary(train), rs.summary(val)),
                    **summary,
                },
            }
            if chosen:
                best = next(h for h in checks if h["step"] == chosen["chosen_step"])
                card["training"]["validation"] = best["validation"]
            written.append(
                registry.save(net, name=name, version=version, task="segment", card=card, root=root)
            )
        else:
            path = registry.save(
                net, name=name, version=version, task="segment", card={}, root=root,
                weights_name=f"fold-{run}.pt",
            )  # fmt: skip
            fold = {**summary, "cases": names, "weights": path.name}
            fold["sha256"] = registry.sha256_file(path)
            registry.write_fold(name, version, run, fold, root)
            written.append(path)
    return written


def hard_candidates(
    study: rs.GridStudy, rng: np.random.Generator, n: int = HARD_CANDIDATES_PER_STUDY
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` screener inputs centred in the study's hard zones (none near a lesion), the
    "call" a small disc of the dense tissue there; and their zones."""
    hard = np.asarray(study.hard)
    hu = np.asarray(study.hu, dtype=np.float32)
    lesion = np.asarray(study.classes) == 2
    at, zones = [], []
    present = [z for z in rs.HARD_ZONES if (hard == z).any()]
    calls = np.zeros(hu.shape, dtype=bool)
    r = HARD_CALL_RADIUS_PX
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = yy * yy + xx * xx <= r * r
    g = hu.shape[-1]
    p = candidates.PATCH // 2
    for i in range(n if present else 0):
        zone = present[i % len(present)]
        idx = np.flatnonzero(hard == zone)
        z, y, x = np.unravel_index(idx[rng.integers(idx.size)], hard.shape)
        if lesion[z, max(0, y - p) : y + p, max(0, x - p) : x + p].any():
            continue
        if not (r <= y < g - r and r <= x < g - r):
            continue
        calls[z, y - r : y + r + 1, x - r : x + r + 1] |= disc & (
            hu[z, y - r : y + r + 1, x - r : x + r + 1] > -500
        )
        at.append((int(z), int(y), int(x)))
        zones.append(zone)
    x_in = candidates.patches(np.asarray(networks.scale_hu(hu)), calls, at)
    return x_in, np.array(zones, dtype=np.uint8)


def candidate_set(
    segmenter: LoadedModel,
    studies: Sequence[rs.GridStudy],
    *,
    seed_p: float = scr.TRAIN_SEED_P,
    seed: int = scr.SEED,
    progress: bool = True,
) -> scr.CandidateSet:
    """The screener's training set: per study its segmenter calls (kind 0), the lesions it missed
    (kind 1) and hard-negative candidates (kind 2); validation = the study is of the validation
    split (its nodules are validation patients')."""
    rng = np.random.default_rng(seed)
    xs, ys, kinds, study_ids, val = [], [], [], [], []
    bar, cb = _progress_bar("candidates", len(studies), progress)
    for i, s in enumerate(studies):
        hu = np.asarray(s.hu, dtype=np.float32)
        truth = np.asarray(s.lesions).astype(np.int32)
        x, y, kind = scr.study_candidates(segmenter, hu, truth, s.spacing, seed_p)
        hx, _ = hard_candidates(s, rng)
        x = np.concatenate([x, hx])
        y = np.concatenate([y, np.zeros(len(hx), dtype=np.uint8)])
        kind = np.concatenate([kind, np.full(len(hx), 2, dtype=np.uint8)])
        xs.append(x.astype(np.float16))
        ys.append(y)
        kinds.append(kind)
        study_ids += [i] * len(y)
        val += [s.split == "validation"] * len(y)
        if cb:
            cb(i + 1, len(studies))
    if bar:
        bar.close()
    shape = (0, candidates.CHANNELS, candidates.PATCH, candidates.PATCH)
    return scr.CandidateSet(
        x=np.concatenate(xs) if xs else np.zeros(shape, dtype=np.float16),
        y=np.concatenate(ys) if ys else np.zeros(0, dtype=np.uint8),
        kind=np.concatenate(kinds) if kinds else np.zeros(0, dtype=np.uint8),
        study=np.array(study_ids, dtype=np.int32),
        validation=np.array(val, dtype=bool),
    )


def train_screener(
    data_dir: Path | None,
    *,
    root: Path | None = None,
    version: str = registry.SCREENER_VERSION,
    segmenter_version: str = registry.SEGMENTER_VERSION,
    anatomies: Sequence[str] = ANATOMIES,
    steps: int = scr.STEPS,
    folds: bool = False,
    per_anatomy: int = SCREEN_PER_ANATOMY,
    validation_per_anatomy: int = VALIDATION_PER_ANATOMY,
    cache: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    sources: rs.Sources | None = None,
) -> list[Path]:
    """Train the shipped screener on the calls of the segmenter ``segmenter_version`` in
    ``root`` (and, with ``folds``, one per held-out anatomy on the matching fold segmenter)."""
    root = root or registry.MODELS_DIR
    sources = sources or rs.Sources(data_dir)
    seg_card = registry.read_card(registry.SEGMENTER, segmenter_version, root)
    seg_dir = root / registry.SEGMENTER / segmenter_version
    runs = [
        (run, names, seg_card["weights"], seg_card["sha256"])
        for run, names in _runs(anatomies, False)
    ]
    if folds:
        for run, names in _runs(anatomies, True)[1:]:
            fold = seg_card["folds"].get(run)
            if fold is None:
                raise ValueError(f"no segmenter fold {run} in {seg_dir}: train it first (--folds)")
            runs.append((run, names, fold["weights"], fold["sha256"]))
    folder = root / registry.SCREENER / version
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for run, names, weights, sha in runs:
        made = time.perf_counter()
        train = _studies(
            rs.plan(names, "train", per_anatomy, first=SCREEN_FIRST), sources, cache, progress, run
        )
        val = _studies(
            rs.plan(names, "validation", validation_per_anatomy, first=SCREEN_FIRST),
            sources, cache, progress, "val",
        )  # fmt: skip
        study_seconds = round(time.perf_counter() - made, 1)
        seg_net = registry.load_weights(
            networks.build("segment", seg_card["architecture"]), seg_dir / weights, sha
        )
        segmenter = LoadedModel(registry.SEGMENTER, segmenter_version, "segment", seg_net, {})
        made = time.perf_counter()
        data = candidate_set(segmenter, [*train, *val], progress=progress)
        candidate_seconds = round(time.perf_counter() - made, 1)
        log_path = folder / f"training-{run}.jsonl"
        log_path.unlink(missing_ok=True)
        start = time.perf_counter()
        net, history = scr.train(
            data, steps=steps, log_path=log_path, progress=progress, device=device
        )
        point = scr.operating_point(net, data)
        summary = {
            "anatomies": names,
            "seconds": round(time.perf_counter() - start, 1),
            "study_seconds": study_seconds,
            "candidate_seconds": candidate_seconds,
            "device": str(seg.device_of(device)),
            "threads": torch.get_num_threads(),
            "first_loss": history[0]["running_loss"],
            "final_loss": history[-1]["running_loss"],
            "steps": steps,
            "candidates": {
                **data.summary(),
                "hard_negatives_added": int((data.kind == 2).sum()),
                "validation_candidates": int(data.validation.sum()),
            },
            "candidate_seed_p": scr.TRAIN_SEED_P,
            "segmenter": f"{registry.SEGMENTER}@{segmenter_version}",
            "segmenter_weights": weights,
            "segmenter_sha256": sha,
            "threshold_chosen_on": "calls of validation-split studies only (kind 0)",
        }
        if run == "all":
            card = {
                "architecture": networks.SCREENER_ARCH,
                "input": scr.INPUT_CARD,
                "operating_point": point,
                "training": {
                    "config": {
                        "steps": steps,
                        "batch": scr.BATCH,
                        "learning_rate": scr.LEARNING_RATE,
                        "seed": scr.SEED,
                        "studies_per_anatomy": per_anatomy,
                    },
                    "data": data_card(names, rs.summary(train), rs.summary(val)),
                    **summary,
                },
            }
            written.append(
                registry.save(
                    net,
                    name=registry.SCREENER,
                    version=version,
                    task="screen",
                    card=card,
                    root=root,
                )  # fmt: skip
            )
        else:
            path = registry.save(
                net, name=registry.SCREENER, version=version, task="screen", card={}, root=root,
                weights_name=f"fold-{run}.pt",
            )  # fmt: skip
            info = {**summary, "cases": names, "operating_point": point, "weights": path.name}
            info["sha256"] = registry.sha256_file(path)
            registry.write_fold(registry.SCREENER, version, run, info, root)
            written.append(path)
    return written
