"""Training samples from real data: real LIDC nodules composited into the real anatomies, scanner
augmentation, the models' grid, hard negatives, and a disk cache of the composited studies.

A *study* is one draw of a recipe, fixed by (anatomy, split, seed):

1. the anatomy (:mod:`ml.data.backgrounds`, native grid) gets 0-3 lesions (`LESION_COUNT_P`; a
   pneumonia anatomy (`PNEUMONIA`) is left without any in `PNEUMONIA_EMPTY_P` of its studies, so
   its consolidations are seen as whole negative studies). Each lesion is a real LIDC nodule of
   the study's split (train patients for training, validation patients for choosing steps and
   thresholds; the test patients are never read) with probability 1 - `DRAWN_P`, else a drawn
   lesion (:mod:`ml.data.synth`). Real nodules are inserted by :mod:`ml.data.compose` as
   ``free`` / ``pleural`` / ``fissure_or_vessel`` (`KIND_P`; a nodule that touches its own chest
   wall always as ``pleural``), scaled by a factor in `NODULE_SCALE`; a nodule with no place of its
   kind is skipped and recorded as such;
2. :func:`ml.data.scanner_aug.random_scanner` (mirrors, rotation, scale, pixel 0.5-1.0 mm, slices
   1-5 mm, dose, kernel) on the volume, its lesion instances and its lungs together;
3. every slice to the networks' GRID x GRID grid, as :func:`ml.runtime.inference.to_grid` does at
   run time (area average; masks kept where their fraction is >= 1/2), so the grid is whatever
   the study's field of view makes it: nothing assumes a spacing;
4. the hard-negative zones on the grid (`HARD_ZONES`): dense structures inside the lungs
   (vessels, hilum), the soft tissue along the mediastinum and heart border, the soft tissue just
   beyond the lung bases and apices along z (diaphragm, liver dome) and, in the pneumonia
   anatomies, consolidation and ground glass. They are where the first models made their false
   calls; :class:`RealSlabSampler` centres `HARD_P` of its patches on them, never on a patch that
   holds a lesion pixel.

A composited study is cached under ``cache/<key>/`` as ``.npy`` files (read memory-mapped, so a
run holds only the slices it samples) plus ``meta.json`` with the full provenance: which nodule
from which patient, kind, scale, position, label value and its voxels on the grid, the drawn
lesions' parameters and the augmentation applied. Repeated runs (and the fold runs, which share
the anatomies' studies) never composite a study twice. Imports `ml.data` and `ml.runtime`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ml.data import scanner_aug, splits, synth
from ml.data.backgrounds import ANATOMIES, load_anatomy
from ml.data.compose import KINDS, PlacementError, PlacementIndex, attachment, insert_nodule
from ml.data.nodules import NoduleCrop, NoduleRow, load_crop, read_nodule_table
from ml.runtime import networks
from ml.training.segmenter import collate

RECIPE_VERSION = 2  # part of the cache key: change it when the recipe changes
PNEUMONIA = ("cap001", "cap002", "P001")
LESION_COUNT_P = (0.2, 0.4, 0.25, 0.15)  # 0, 1, 2, 3 lesions
PNEUMONIA_EMPTY_P = 0.5
DRAWN_P = 0.15  # share of lesions drawn by ml.data.synth instead of real LIDC nodules
# Asked-for kinds; a third of the LIDC crops touch their own chest wall and always go in as
# pleural, so the inserted mix comes out near free 1/3, pleural 1/2, fissure or vessel 1/5
# (measured on 12 studies of the first recipe, free 0.4 / pleural 0.35: 3 free, 6 pleural, 1 other).
KIND_P = {"free": 0.5, "pleural": 0.2, "fissure_or_vessel": 0.3}
NODULE_SCALE = (0.85, 1.15)
SEED_BASE = {"train": 40_000_000, "validation": 41_000_000}
# Hard-negative zones on the grid (values of the ``hard`` volume; later ones win).
HARD_ZONES = {
    1: "vessel_or_hilum",
    2: "mediastinum_heart_border",
    3: "diaphragm_or_apex",
    4: "consolidation",
}
DENSE_IN_LUNG_HU = -500.0
SOFT_TISSUE_HU = -300.0
BORDER_MM = 10.0  # width of the mediastinal / heart-border band beside the lungs
BASE_MM = 20.0  # reach below the lung bases (and above the apices) along z
CONSOLIDATION_HU = -600.0
HARD_INDEX_MAX = 20_000  # voxels kept per zone for sampling
LUNG_VALUE = 255  # lung (not lesion) in the label volume that goes through the augmentation
# U-Net patch sampling
PATCH = 96
LESION_P = 0.4
HARD_P = 0.3
LUNG_P = 0.15  # the rest: anywhere in any slice
HARD_TRIES = 10


@dataclass(frozen=True)
class StudySpec:
    anatomy: str
    split: str  # "train" | "validation"
    seed: int

    @property
    def key(self) -> str:
        return f"{self.anatomy}-{self.split}-{self.seed}-r{RECIPE_VERSION}"


def plan(anatomies: Sequence[str], split: str, per_anatomy: int, first: int = 0) -> list[StudySpec]:
    """``per_anatomy`` studies of each anatomy (indices ``first`` onwards), interleaved. A study's
    seed depends only on its anatomy, split and index, so the folds (subsets of the anatomies)
    reuse the same studies; the screener's studies start at another ``first``."""
    if split not in SEED_BASE:
        raise ValueError(f"studies are made from the train or validation split, not {split!r}")
    unknown = [a for a in anatomies if a not in ANATOMIES]
    if unknown:
        raise ValueError(f"unknown anatomies {unknown}; known: {ANATOMIES}")
    return [
        StudySpec(a, split, SEED_BASE[split] + 10_000 * ANATOMIES.index(a) + i)
        for i in range(first, first + per_anatomy)
        for a in anatomies
    ]


@dataclass
class GridStudy:
    """A composited study on the networks' grid (arrays may be memory-mapped)."""

    key: str
    hu: np.ndarray  # (z, GRID, GRID) int16 HU
    classes: np.ndarray  # uint8: 0 background, 1 lung, 2 lesion
    lesions: np.ndarray  # uint8 lesion instances 1..n (0 elsewhere)
    hard: np.ndarray  # uint8 hard-negative zone (HARD_ZONES), 0 elsewhere
    spacing: tuple[float, float, float]  # of the grid, mm
    meta: dict = field(default_factory=dict)

    @property
    def split(self) -> str:
        return str(self.meta.get("split", "train"))


class Sources:
    """Anatomies (loaded once each) and LIDC crops of one split, from the data folder; or given
    directly (tests: phantoms)."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        anatomies: dict | None = None,
        crops: dict[str, Sequence[NoduleCrop]] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir else None
        self._anatomies: dict = dict(anatomies or {})
        self._indices: dict[str, PlacementIndex] = {}
        self._depth: dict = {}
        self._crops_given = crops
        self._rows: dict[str, list[NoduleRow]] = {}
        self._loaded: dict[str, NoduleCrop] = {}
        self._attached: dict[str, bool] = {}

    def anatomy(self, name: str):  # noqa: ANN201
        if name not in self._anatomies:
            if self.data_dir is None:
                raise ValueError(f"no anatomy {name!r} given and no data folder")
            self._anatomies[name] = load_anatomy(self.data_dir, name, seed=ANATOMIES.index(name))
        return self._anatomies[name]

    def index(self, name: str) -> PlacementIndex:
        if name not in self._indices:
            self._indices[name] = PlacementIndex(self.anatomy(name))
        return self._indices[name]

    def with_depth(self, name: str):  # noqa: ANN201
        if name not in self._depth:
            self._depth[name] = self.anatomy(name).with_depth()
        return self._depth[name]

    def crop_count(self, split: str) -> int:
        if self._crops_given is not None:
            return len(self._crops_given.get(split, ()))
        return len(self._table(split))

    def _table(self, split: str) -> list[NoduleRow]:
        if split not in self._rows:
            assert self.data_dir is not None
            folder = self.data_dir / "lidc-nodules"
            rows = read_nodule_table(folder / "nodules.csv", folder)
            # splits.rows_in refuses "test" without the final-evaluation purpose.
            self._rows[split] = splits.rows_in(rows, split)  # type: ignore[arg-type]
        return self._rows[split]

    def crop(self, split: str, i: int) -> NoduleCrop:
        if self._crops_given is not None:
            return self._crops_given[split][i]
        row = self._table(split)[i]
        if row.crop_name not in self._loaded:
            assert self.data_dir is not None
            self._loaded[row.crop_name] = load_crop(self.data_dir / "lidc-nodules", row)
        return self._loaded[row.crop_name]

    def attached(self, crop: NoduleCrop) -> bool:
        name = crop.source_file
        if name not in self._attached:
            self._attached[name] = attachment(crop) is not None
        return self._attached[name]


def composite(
    spec: StudySpec, sources: Sources, *, augment: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float], dict]:
    """Steps 1-2 of the module docstring on the native grid: (HU, lesion instances 1..n, lung,
    spacing, provenance)."""
    rng = np.random.default_rng(spec.seed)
    bg = sources.anatomy(spec.anatomy)
    p = LESION_COUNT_P
    n = int(rng.choice(len(p), p=p))
    if spec.anatomy in PNEUMONIA and rng.random() < PNEUMONIA_EMPTY_P:
        n = 0
    n_drawn = int((rng.random(n) < DRAWN_P).sum())
    hu = np.array(bg.hu, dtype=np.float32, copy=True)
    labels = np.zeros(hu.shape, dtype=np.int16)
    lesions: list[dict] = []
    if n_drawn:
        deep = sources.with_depth(spec.anatomy)
        specs = [s for s in (synth.random_lesion(deep, rng) for _ in range(n_drawn)) if s]
        hu, labels, drawn = synth.insert_lesions(hu, bg.lung, bg.spacing, specs, rng)
        for value, s in enumerate(drawn, start=1):
            lesions.append({"origin": "drawn (ml.data.synth)", "label_value": value, **vars(s)})
    skipped: list[dict] = []
    n_crops = sources.crop_count(spec.split)
    if n - n_drawn and not n_crops:
        raise ValueError(f"no LIDC crops of the {spec.split} split")
    for _ in range(n - n_drawn):
        crop = sources.crop(spec.split, int(rng.integers(n_crops)))
        kind = str(rng.choice(KINDS, p=[KIND_P[k] for k in KINDS]))
        if sources.attached(crop):
            kind = "pleural"
        scale = float(rng.uniform(*NODULE_SCALE))
        value = len(lesions) + 1
        try:
            inserted = insert_nodule(
                hu, labels, sources.index(spec.anatomy), crop, kind, rng,
                scale=scale, label_value=value, seed=spec.seed,
            )  # fmt: skip
        except PlacementError as exc:
            skipped.append({"source_file": crop.source_file, "kind": kind, "reason": str(exc)})
            continue
        record = inserted.to_dict()
        lesions.append({**record, "origin": "LIDC-IDRI nodule", "insertion": record["origin"]})
    meta: dict = {
        "key": spec.key,
        "anatomy": spec.anatomy,
        "split": spec.split,
        "seed": spec.seed,
        "recipe_version": RECIPE_VERSION,
        "native_spacing": list(bg.spacing),
        "lesions": lesions,
        "skipped": skipped,
        "augmentation": {},
    }
    spacing = tuple(float(s) for s in bg.spacing)
    lung = bg.lung
    if augment:
        merged = np.where(labels > 0, labels, np.where(lung, LUNG_VALUE, 0)).astype(np.int16)
        hu, merged, spacing, done = scanner_aug.random_scanner(hu, merged, spacing, rng)
        labels = np.where(merged == LUNG_VALUE, 0, merged).astype(np.int16)
        lung = merged > 0
        meta["augmentation"] = done
    return hu, labels, lung, spacing, meta  # type: ignore[return-value]


def _grid_fraction(mask: np.ndarray) -> np.ndarray:
    from ml.runtime.inference import to_grid

    return to_grid(mask.astype(np.float32)).numpy()


def to_model_grid(
    hu: np.ndarray, labels: np.ndarray, lung: np.ndarray, spacing
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Step 3: (HU int16, classes, lesion instances, grid spacing) on the GRID x GRID grid."""
    from ml.runtime.inference import to_grid

    g = networks.GRID
    grid_hu = np.clip(np.rint(to_grid(hu).numpy()), -32768, 32767).astype(np.int16)
    instances = np.zeros(grid_hu.shape, dtype=np.uint8)
    for v in [int(v) for v in np.unique(labels) if v > 0]:
        instances[_grid_fraction(labels == v) >= 0.5] = v
    lung_g = _grid_fraction(lung | (labels > 0)) >= 0.5
    classes = np.where(instances > 0, 2, np.where(lung_g, 1, 0)).astype(np.uint8)
    z, h, w = hu.shape
    grid_spacing = (float(spacing[0]), float(spacing[1]) * h / g, float(spacing[2]) * w / g)
    return grid_hu, classes, instances, grid_spacing


def hard_zones(hu: np.ndarray, classes: np.ndarray, spacing, pneumonia: bool) -> np.ndarray:
    """Step 4: the hard-negative zone of every grid voxel (0 = none), never on a lesion."""
    lung = classes == 1
    lesion = classes == 2
    hard = np.zeros(hu.shape, dtype=np.uint8)
    hard[lung & (hu > DENSE_IN_LUNG_HU)] = 1
    soft = (hu > SOFT_TISSUE_HU) & ~lung & ~lesion
    # In-plane distance to the lung, slice by slice (a 3-D transform costs ten times more).
    band = np.zeros(hu.shape, dtype=bool)
    for z in np.flatnonzero(lung.any(axis=(1, 2))):
        to_lung = ndimage.distance_transform_edt(~lung[z], sampling=spacing[1:])
        band[z] = soft[z] & (to_lung <= BORDER_MM)
    # Medial: between the two lungs' centres of the slice (mediastinum, hilum, heart border);
    # the lateral band is chest wall, already plenty in the lung patches.
    for z in np.flatnonzero(band.any(axis=(1, 2))):
        xs = np.nonzero(lung[z])[1]
        if xs.size < 20:
            continue
        mid = 0.5 * (xs.min() + xs.max())
        left, right = xs[xs < mid], xs[xs >= mid]
        if left.size and right.size:
            cols = np.zeros(hu.shape[2], dtype=bool)
            cols[int(left.mean()) : int(right.mean()) + 1] = True
            hard[z][band[z] & cols[None, :]] = 2
    k = max(1, int(round(BASE_MM / spacing[0])))
    near_z = ndimage.maximum_filter1d(lung.view(np.uint8), size=2 * k + 1, axis=0) > 0
    hard[soft & near_z] = 3
    if pneumonia:
        hull = np.stack([ndimage.binary_fill_holes(s) for s in lung | lesion])
        dense = ndimage.binary_opening(hull & (hu > CONSOLIDATION_HU), structure=_disc(1))
        hard[dense & ~lesion] = 4
    hard[lesion] = 0
    return hard


def _disc(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx <= r * r)[None]


def make_study(spec: StudySpec, sources: Sources, *, augment: bool = True) -> GridStudy:
    """Steps 1-4, not cached."""
    hu, labels, lung, spacing, meta = composite(spec, sources, augment=augment)
    grid_hu, classes, instances, grid_spacing = to_model_grid(hu, labels, lung, spacing)
    hard = hard_zones(grid_hu, classes, grid_spacing, spec.anatomy in PNEUMONIA)
    for lesion in meta["lesions"]:
        lesion["grid_voxels"] = int((instances == lesion["label_value"]).sum())
    meta["grid_spacing"] = list(grid_spacing)
    meta["native_shape"] = list(hu.shape)
    return GridStudy(spec.key, grid_hu, classes, instances, hard, grid_spacing, meta)


ARRAYS = ("hu", "classes", "lesions", "hard")


def save_study(study: GridStudy, folder: Path) -> None:
    """Write atomically: a half-written study is never read as a whole one."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(study, name))
    (tmp / "meta.json").write_text(json.dumps(study.meta, indent=1, default=_json))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_study(folder: Path) -> GridStudy:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ARRAYS}
    return GridStudy(meta["key"], spacing=tuple(meta["grid_spacing"]), meta=meta, **arrays)


def _json(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def studies(
    specs: Sequence[StudySpec],
    sources: Sources,
    cache: Path | None,
    *,
    progress=None,  # noqa: ANN001
) -> list[GridStudy]:
    """The studies of ``specs``, from ``cache`` where they are, else made (and cached)."""
    out = []
    for i, spec in enumerate(specs):
        folder = cache / spec.key if cache else None
        if folder is not None and (folder / "meta.json").is_file():
            out.append(load_study(folder))
        else:
            study = make_study(spec, sources)
            if folder is not None:
                save_study(study, folder)
                study = load_study(folder)
            out.append(study)
        if progress:
            progress(i + 1, len(specs))
    return out


class RealSlabSampler:
    """U-Net training samples from grid studies, with the interface of
    :class:`ml.training.segmenter.SlabSampler`: (scaled 2.5-D patch, class map, positive)."""

    def __init__(self, studies_: Sequence[GridStudy], seed: int, patch: int | None = PATCH):
        from ml.training.segmenter import _augment

        if not studies_:
            raise ValueError("no study to train on")
        self.studies = list(studies_)
        self.rng = np.random.default_rng(seed)
        self.augment = _augment(seed)
        self.patch = patch
        self.counts: dict[str, int] = {"lesion": 0, "hard": 0, "lung": 0, "any": 0}
        self._index = [self._index_of(s) for s in self.studies]
        # Lesion patches come from the studies that have lesions, so LESION_P is the share of
        # lesion patches whatever the share of empty studies.
        self._with_lesion = [k for k, ix in enumerate(self._index) if ix["lesion"].size]

    def _index_of(self, s: GridStudy) -> dict:
        rng = np.random.default_rng(0)

        def some(idx: np.ndarray) -> np.ndarray:
            if idx.size > HARD_INDEX_MAX:
                idx = np.sort(rng.choice(idx, HARD_INDEX_MAX, replace=False))
            return idx.astype(np.int64)

        hard = np.asarray(s.hard)
        return {
            "lesion": np.flatnonzero(np.asarray(s.lesions)).astype(np.int64),
            "lung_slices": np.flatnonzero(np.asarray(s.classes == 1).any(axis=(1, 2))),
            "hard": {z: some(np.flatnonzero(hard == z)) for z in HARD_ZONES if (hard == z).any()},
        }

    def _window(self, n: int, c: int) -> int:
        size = self.patch or n
        jitter = int(self.rng.integers(-size // 4, size // 4 + 1)) if self.patch else 0
        return int(np.clip(c - size // 2 + jitter, 0, n - size))

    def draw(self) -> tuple[int, int, int, int, str]:
        """(study, z, y0, x0, what): where the next patch comes from."""
        rng = self.rng
        u = rng.random()
        if u < LESION_P and self._with_lesion:
            k = self._with_lesion[int(rng.integers(len(self._with_lesion)))]
        else:
            k = int(rng.integers(len(self.studies)))
        s, ix = self.studies[k], self._index[k]
        shape = s.hu.shape
        n = shape[-1]
        if u < LESION_P and ix["lesion"].size:
            z, y, x = np.unravel_index(ix["lesion"][rng.integers(ix["lesion"].size)], shape)
            return k, int(z), self._window(n, int(y)), self._window(n, int(x)), "lesion"
        if u < LESION_P + HARD_P and ix["hard"]:
            zones = sorted(ix["hard"])
            for _ in range(HARD_TRIES):
                idx = ix["hard"][zones[int(rng.integers(len(zones)))]]
                z, y, x = np.unravel_index(idx[rng.integers(idx.size)], shape)
                y0, x0 = self._window(n, int(y)), self._window(n, int(x))
                size = self.patch or n
                if not (s.classes[z, y0 : y0 + size, x0 : x0 + size] == 2).any():
                    return k, int(z), y0, x0, "hard"
        if u < LESION_P + HARD_P + LUNG_P and ix["lung_slices"].size:
            z = int(rng.choice(ix["lung_slices"]))
            lung = np.argwhere(s.classes[z] == 1)
            y, x = lung[rng.integers(len(lung))]
            return k, z, self._window(n, int(y)), self._window(n, int(x)), "lung"
        z = int(rng.integers(shape[0]))
        y, x = rng.integers(n, size=2)
        return k, z, self._window(n, int(y)), self._window(n, int(x)), "any"

    def sample(self) -> tuple[np.ndarray, np.ndarray, float]:
        k, z, y0, x0, what = self.draw()
        self.counts[what] += 1
        s = self.studies[k]
        size = self.patch or s.hu.shape[-1]
        zs = np.clip(np.arange(z - 1, z + 2), 0, s.hu.shape[0] - 1)
        image = np.asarray(s.hu[zs, y0 : y0 + size, x0 : x0 + size], dtype=np.float32)
        label = np.asarray(s.classes[z, y0 : y0 + size, x0 : x0 + size], dtype=np.float32)
        out = self.augment({"image": image, "label": label[None]})
        image = np.asarray(out["image"], dtype=np.float32)
        label = np.asarray(out["label"], dtype=np.float32)[0]
        return networks.scale_hu(image), label, float((label == 2).any())  # type: ignore[return-value]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return collate([self.sample() for _ in range(size)])


@torch.no_grad()
def lesion_dice(
    net: torch.nn.Module, studies_: Sequence[GridStudy], *, stride: int = 2, batch: int = 16
) -> dict[str, float]:
    """Lesion Dice of ``net`` (arg-max == lesion) over ``studies_``: every slice holding a lesion
    and every ``stride``-th other slice, pooled over the studies (so one empty study's false calls
    count against it). Also the share of lesions touched by a call."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    inter = pred_sum = true_sum = 0
    hit = total = 0
    for s in studies_:
        classes = np.asarray(s.classes)
        with_lesion = (classes == 2).any(axis=(1, 2))
        zs = np.flatnonzero(with_lesion | (np.arange(len(classes)) % stride == 0))
        scaled = np.asarray(networks.scale_hu(np.asarray(s.hu, dtype=np.float32)))
        x = networks.stack_context(scaled)[zs]
        pred = np.concatenate(
            [
                net(torch.from_numpy(x[i : i + batch]).to(device)).argmax(1).cpu().numpy() == 2
                for i in range(0, len(zs), batch)
            ]
        )
        truth = classes[zs] == 2
        inter += int((pred & truth).sum())
        pred_sum += int(pred.sum())
        true_sum += int(truth.sum())
        inst = np.asarray(s.lesions)[zs]
        for v in [int(v) for v in np.unique(inst) if v]:
            total += 1
            hit += int(pred[inst == v].any())
    if was_training:
        net.train()
    denom = pred_sum + true_sum
    return {
        "lesion_dice": round(2.0 * inter / denom, 4) if denom else float("nan"),
        "lesions_touched": round(hit / total, 4) if total else float("nan"),
        "lesion_voxels": true_sum,
        "predicted_voxels": pred_sum,
    }


def summary(studies_: Sequence[GridStudy]) -> dict:
    """What a card says about the studies a model saw."""
    lesions = [les for s in studies_ for les in s.meta.get("lesions", [])]
    real = [les for les in lesions if les.get("origin") == "LIDC-IDRI nodule"]
    return {
        "studies": len(studies_),
        "anatomies": sorted({s.meta.get("anatomy", "") for s in studies_}),
        "lesions": len(lesions),
        "real_nodules": len(real),
        "drawn_lesions": len(lesions) - len(real),
        "lidc_patients": len({les["patient_id"] for les in real}),
        "kinds": {k: sum(les["kind"] == k for les in real) for k in KINDS},
        "studies_without_lesion": sum(not s.meta.get("lesions") for s in studies_),
        "mean_slices": round(float(np.mean([s.hu.shape[0] for s in studies_])), 1)
        if studies_
        else 0.0,
    }


def grid_mm(study: GridStudy) -> float:
    """In-plane pixel of the grid (mm): the field of view over GRID."""
    return float(math.sqrt(study.spacing[1] * study.spacing[2]))
