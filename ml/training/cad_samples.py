"""Training samples of the candidate classifier (`radai-nodule-cad`): real LIDC nodules of one
split composited into a real anatomy, the pipeline's own blob candidates on the result, and what
the classifier sees of each (:mod:`ml.runtime.cad_views`) with whether it hits a nodule.

One study is fixed by (anatomy, split, index): `NODULES_PER_STUDY` nodules of the split (train
patients for training, validation patients for choosing the operating point; test patients are
never read here), inserted by :mod:`ml.data.compose` as free, pleural or fissure/vessel nodules
at a scale in `NODULE_SCALE`, then :func:`ml.data.scanner_aug.random_scanner` (mirrors, rotation,
scale, pixel and slice size, dose, kernel). The lungs are segmented again and the candidates
found exactly as at run time (:func:`ml.runtime.cad.find_candidates`). A candidate is positive if
it hits a nodule by the evaluation's rule (centre inside its label or within its radius of its
centroid); negatives are all other candidates further than `AMBIGUOUS_MM` beyond every nodule's
radius, so vessels, the hilum, pleura, diaphragm and, in the pneumonia anatomies, consolidation
are the hard negatives they are at run time. Per study at most `NEGATIVES_PER_STUDY` negatives
are kept: half the strongest, half drawn from the rest.

Imports `ml.data` and `ml.runtime`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.data import scanner_aug, splits
from ml.data.backgrounds import ANATOMIES, load_anatomy
from ml.data.compose import KINDS, PlacementError, PlacementIndex, attachment, insert_nodule
from ml.data.nodules import NoduleCrop, load_crop, read_nodule_table
from ml.runtime import cad
from ml.runtime.cad_views import candidate_views

# 2: the views in the nine-plane layout (ml.runtime.cad_views.NINE_PLANES); 1: three planes.
RECIPE_VERSION = 2
NODULES_PER_STUDY = 12
# Each positive is seen again from centres moved by up to JITTER_MM (a candidate's centre is
# rarely the nodule's): more positive views per composited study, which is the costly part.
JITTERS = 4
JITTER_MM = 2.0
NODULE_SCALE = (0.85, 1.15)
KIND_P = {"free": 0.5, "pleural": 0.25, "fissure_or_vessel": 0.25}
NEGATIVES_PER_STUDY = 400
AMBIGUOUS_MM = 5.0
SEED_BASE = {"train": 46_000_000, "validation": 47_000_000}


@dataclass(frozen=True)
class Spec:
    anatomy: str
    split: str
    index: int

    @property
    def seed(self) -> int:
        return SEED_BASE[self.split] + 10_000 * ANATOMIES.index(self.anatomy) + self.index

    @property
    def key(self) -> str:
        return f"{self.anatomy}-{self.split}-{self.index}-r{RECIPE_VERSION}"


class Crops:
    """The LIDC crops of one split, loaded on first use."""

    def __init__(self, data_dir: Path, split: str) -> None:
        if split not in SEED_BASE:
            raise ValueError(f"samples come from the train or validation split, not {split!r}")
        folder = Path(data_dir) / "lidc-nodules"
        rows = read_nodule_table(folder / "nodules.csv", folder)
        self.rows = splits.rows_in(rows, split)  # type: ignore[arg-type]
        self.folder = folder
        self._loaded: dict[int, NoduleCrop] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> NoduleCrop:
        if i not in self._loaded:
            self._loaded[i] = load_crop(self.folder, self.rows[i])
        return self._loaded[i]


def hits(
    centres: np.ndarray, labels: np.ndarray, spacing, values: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(label value hit or 0, distance in mm to the nearest nodule's edge) per candidate."""
    n = len(centres)
    hit = np.zeros(n, dtype=np.int32)
    edge = np.full(n, np.inf)
    if n == 0 or not values:
        return hit, edge
    sp = np.asarray(spacing, dtype=float)
    shape = np.array(labels.shape)
    for v in values:
        where = np.argwhere(labels == v)
        if len(where) == 0:
            continue
        c = where.mean(axis=0)
        radius = 0.5 * (6.0 * len(where) * float(np.prod(sp)) / np.pi) ** (1 / 3)
        d = np.linalg.norm((centres - c) * sp, axis=1)
        edge = np.minimum(edge, d - radius)
        vox = np.clip(np.round(centres).astype(int), 0, shape - 1)
        inside = labels[tuple(vox.T)] == v
        hit[(hit == 0) & ((d <= radius) | inside)] = v
    return hit, edge


def make_study(spec: Spec, data_dir: Path, crops: Crops, cache: dict) -> dict:
    """One study's samples: views (m, CHANNELS, VIEW, VIEW) uint8, positive (m,) bool and the
    candidates' provenance."""
    rng = np.random.default_rng(spec.seed)
    if spec.anatomy not in cache:
        bg = load_anatomy(data_dir, spec.anatomy, seed=ANATOMIES.index(spec.anatomy))
        cache[spec.anatomy] = (bg, PlacementIndex(bg))
    bg, index = cache[spec.anatomy]
    hu = np.array(bg.hu, dtype=np.float32, copy=True)
    labels = np.zeros(hu.shape, dtype=np.int16)
    inserted: list[dict] = []
    kinds = list(KINDS)
    p = np.array([KIND_P[k] for k in kinds])
    for _ in range(NODULES_PER_STUDY):
        crop = crops[int(rng.integers(len(crops)))]
        kind = "pleural" if attachment(crop) is not None else str(rng.choice(kinds, p=p))
        try:
            ins = insert_nodule(
                hu, labels, index, crop, kind, rng,
                scale=float(rng.uniform(*NODULE_SCALE)), label_value=len(inserted) + 1,
                seed=spec.seed,
            )  # fmt: skip
        except (PlacementError, ValueError):
            continue
        inserted.append({"source": crop.source_file, "kind": ins.kind})
    hu, labels, spacing, done = scanner_aug.random_scanner(hu, labels, bg.spacing, rng)
    found = cad.find_candidates(hu, spacing)
    centres = np.array([b.centre_zyx for b in found.blobs], dtype=float).reshape(-1, 3)
    hit, edge = hits(centres, labels, spacing, list(range(1, len(inserted) + 1)))
    pos = np.flatnonzero(hit > 0)
    neg = np.flatnonzero((hit == 0) & (edge > AMBIGUOUS_MM))
    keep_neg = neg
    if len(neg) > NEGATIVES_PER_STUDY:
        half = NEGATIVES_PER_STUDY // 2
        strongest = neg[:half]  # candidates come strongest first
        rest = rng.choice(neg[half:], NEGATIVES_PER_STUDY - half, replace=False)
        keep_neg = np.concatenate([strongest, np.sort(rest)])
    sp = np.asarray(spacing, dtype=float)
    jittered = [
        centres[i] + rng.uniform(-JITTER_MM, JITTER_MM, 3) / sp for i in pos for _ in range(JITTERS)
    ]
    chosen = np.concatenate([pos, np.repeat(pos, JITTERS), keep_neg]).astype(int)
    at = np.concatenate([centres[pos], np.array(jittered).reshape(-1, 3), centres[keep_neg]])
    views = candidate_views(hu, spacing, at.tolist()) if len(chosen) else None
    return {
        "views": (
            np.round(views * 255).astype(np.uint8)
            if views is not None
            else np.zeros((0,) + cad.VIEW_SHAPE, np.uint8)
        ),
        "positive": hit[chosen] > 0,
        "jittered": np.concatenate(
            [
                np.zeros(len(pos), bool),
                np.ones(len(pos) * JITTERS, bool),
                np.zeros(len(keep_neg), bool),
            ]
        ),
        "features": np.array([cad.blob_features(found.blobs[i]) for i in chosen], np.float32),
        "meta": {
            "key": spec.key,
            "anatomy": spec.anatomy,
            "split": spec.split,
            "nodules": inserted,
            "augmentation": done,
            "candidates": len(found.blobs),
            "nodules_hit": int(len(set(hit[hit > 0].tolist()))),
        },
    }


def save(study: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{study['meta']['key']}.npz"
    np.savez_compressed(
        path,
        views=study["views"],
        positive=study["positive"],
        jittered=study["jittered"],
        features=study["features"],
        meta=json.dumps(study["meta"], default=str),
    )
    return path


def load(path: Path) -> dict:
    with np.load(path) as z:
        return {
            "views": z["views"],
            "positive": z["positive"],
            "jittered": z["jittered"],
            "features": z["features"],
            "meta": json.loads(str(z["meta"])),
        }


def build(
    data_dir: Path, folder: Path, anatomies: list[str], split: str, per_anatomy: int
) -> list[Path]:
    """Make (or reuse from ``folder``) ``per_anatomy`` studies of each anatomy."""
    crops = Crops(data_dir, split)
    cache: dict = {}
    out = []
    for a in anatomies:
        for i in range(per_anatomy):
            spec = Spec(a, split, i)
            path = folder / f"{spec.key}.npz"
            if not path.exists():
                study = make_study(spec, data_dir, crops, cache)
                save(study, folder)
                m = study["meta"]
                print(
                    f"cad samples {spec.key}: {m['candidates']} candidates, "
                    f"{m['nodules_hit']}/{len(m['nodules'])} nodules hit, "
                    f"{int(study['positive'].sum())} positive views",
                    flush=True,
                )
            out.append(path)
        cache.pop(a, None)
    return out
