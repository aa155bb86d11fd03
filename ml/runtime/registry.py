"""Versioned model weights with their model cards, and loading them by name and version.

A model lives in ``<root>/<name>/<version>/``: ``weights.pt`` (a float16 state dict, to keep the
shipped files small), ``card.json`` (what built it, what it was trained on, its measured metrics
with intervals, intended use and limits, and the weights' sha256) and ``card.md`` (the same for
people). Loading checks the sha256, so a swapped or damaged file is refused rather than run.

A fold model (trained for the evaluation without one patient or anatomy, its files beside the
shipped ones) is loaded as ``name@version#run``, e.g. ``radai-nodule-cad-cnn@2.2.0#holdout-P001``,
so that the service can be run with the model that never saw a study's patient.

An external model can be plugged in as a TorchScript file with a ``.json`` card beside it that
declares the task and the same input contract (see :mod:`ml.networks`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ml.runtime import networks

MODELS_DIR = Path(__file__).parent.parent / "models"
SEGMENTER = "radai-lung-lesion-unet"
SCREENER = "radai-lesion-screen-cnn"
SEGMENTER_VERSION = "1.0.0"
SCREENER_VERSION = "2.0.0"  # 1.0.0 was the segmenter read as a slice classifier
MALIGNANCY = "radai-nodule-malignancy-cnn"
MALIGNANCY_VERSION = "1.0.0"
OUTLINER = "radai-nodule-outline-unet"
OUTLINER_VERSION = "1.0.0"
DEFAULT_REFS = {
    "segment": f"{SEGMENTER}@{SEGMENTER_VERSION}",
    "screen": f"{SCREENER}@{SCREENER_VERSION}",
    "malignancy": f"{MALIGNANCY}@{MALIGNANCY_VERSION}",
    "cad": "radai-nodule-cad-cnn@2.2.0",
    "outline": f"{OUTLINER}@{OUTLINER_VERSION}",
}
# What draws the nodule CAD's outlines by default (RADAI_CAD_OUTLINER): the reference of an
# outline U-Net, or CLASSICAL_OUTLINE for the local density outline. The U-Net draws only the
# nodules whose classical outline is at least ml.runtime.cad.LEARNT_OUTLINE_FROM_MM wide: so it
# outlined validation composites better than the classical outline alone at the same CPM
# (docs/models/cad-outliner-from18mm-validation.json).
CLASSICAL_OUTLINE = "classical"
CAD_OUTLINER = f"{OUTLINER}@{OUTLINER_VERSION}"
# What scores the nodule CAD's outlines again (RADAI_CAD_RERANKER): the reference of a second
# stage (ml.runtime.cad_rerank), or NO_RERANK for the classifier's scores as they are.
RERANKER = "radai-nodule-cad-rerank"
RERANKER_VERSION = "1.0.0"
NO_RERANK = "none"
CAD_RERANKER = f"{RERANKER}@{RERANKER_VERSION}"
REQUIRED_CARD_KEYS = ("name", "version", "task")


class ModelError(Exception):
    """A model reference that cannot be resolved, or weights that fail their checks."""


@dataclass
class LoadedModel:
    name: str
    version: str
    task: str
    net: torch.nn.Module
    card: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(
    net: torch.nn.Module,
    *,
    name: str,
    version: str,
    task: str,
    card: dict,
    root: Path = MODELS_DIR,
    weights_name: str = "weights.pt",
) -> Path:
    """Write weights (float16) and card; return the weights' path. The card gains the sha256."""
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float16) if v.is_floating_point() else v
        for k, v in net.state_dict().items()
    }
    weights = folder / weights_name
    torch.save(state, weights)
    if weights_name == "weights.pt":
        full = dict(card)
        full.update(name=name, version=version, task=task, sha256=sha256_file(weights))
        full.setdefault("weights", weights_name)
        (folder / "card.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return weights


def as_shipped(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with its weights rounded to float16 and back, as :func:`save` will ship them, so
    that figures measured after training are the shipped model's."""
    net.load_state_dict(
        {
            k: v.to(torch.float16).float() if v.is_floating_point() else v
            for k, v in net.state_dict().items()
        }
    )
    return net.eval()


def read_card(name: str, version: str, root: Path = MODELS_DIR) -> dict:
    """The card, with the leave-one-patient-out fold models (their own files) under "folds"."""
    folder = root / name / version
    path = folder / "card.json"
    if not path.is_file():
        raise ModelError(f"no model {name}@{version} in {root}")
    card = json.loads(path.read_text())
    card["folds"] = {
        p.stem.removeprefix("fold-"): json.loads(p.read_text())
        for p in sorted(folder.glob("fold-*.json"))
    }
    return card


def write_fold(name: str, version: str, run: str, info: dict, root: Path = MODELS_DIR) -> None:
    """Record a fold model (trained apart from the shipped one, so it has its own file)."""
    path = root / name / version / f"fold-{run}.json"
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def write_card(card: dict, root: Path = MODELS_DIR) -> None:
    card = {k: v for k, v in card.items() if k != "folds"}  # folds live in their own files
    path = root / card["name"] / card["version"] / "card.json"
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def load_weights(
    net: torch.nn.Module, path: Path, expected_sha: str | None = None
) -> torch.nn.Module:
    if expected_sha is not None and sha256_file(path) != expected_sha:
        raise ModelError(f"{path}: sha256 differs from its model card; refusing to load it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval()


def _parse(ref: str) -> tuple[str, str, str | None]:
    """``name@version[#run]`` -> (name, version, run or None)."""
    name, sep, rest = ref.partition("@")
    version, hash_, run = rest.partition("#")
    if not sep or not name or not version or (hash_ and not run):
        raise ModelError(
            f"model reference {ref!r} is not NAME@VERSION, NAME@VERSION#FOLD or torchscript:PATH"
        )
    return name, version, run if hash_ else None


def load(ref: str, root: Path = MODELS_DIR) -> LoadedModel:
    """Resolve ``name@version``, a fold model ``name@version#run`` (its card: the fold's record)
    in the registry, or ``torchscript:PATH`` for an external model."""
    if ref.startswith("torchscript:"):
        return load_torchscript(Path(ref.removeprefix("torchscript:")))
    name, version, run = _parse(ref)
    card = read_card(name, version, root)
    net = networks.build(card["task"], card.get("architecture"))
    if run is not None:
        info = _fold(card, name, version, run)
        load_weights(net, root / name / version / info["weights"], info["sha256"])
        return LoadedModel(name, f"{version}#{run}", card["task"], net, info)
    load_weights(net, root / name / version / card.get("weights", "weights.pt"), card["sha256"])
    return LoadedModel(name, version, card["task"], net, card)


def _fold(card: dict, name: str, version: str, run: str) -> dict:
    folds = card.get("folds", {})
    if run not in folds:
        have = ", ".join(sorted(folds)) or "none"
        raise ModelError(f"{name}@{version} has no fold model {run!r} (its folds: {have})")
    return folds[run]


def load_torchscript(path: Path) -> LoadedModel:
    """An external TorchScript model; its card is ``PATH`` with the suffix ``.json``."""
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise ModelError(f"TorchScript model needs {path} and its card {card_path}")
    card = json.loads(card_path.read_text())
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ModelError(f"{card_path} lacks {', '.join(missing)}")
    if card["task"] not in ("segment", "screen"):
        raise ModelError(f"{card_path}: task must be 'segment' or 'screen'")
    if "sha256" in card and sha256_file(path) != card["sha256"]:
        raise ModelError(f"{path}: sha256 differs from its card; refusing to load it")
    net = torch.jit.load(str(path), map_location="cpu").eval()
    return LoadedModel(card["name"], card["version"], card["task"], net, card)


def check(ref: str, root: Path = MODELS_DIR) -> None:
    """Raise ModelError unless ``ref`` resolves to a card and weights with a matching sha256."""
    if ref.startswith("torchscript:"):
        path = Path(ref.removeprefix("torchscript:"))
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise ModelError(
                f"TorchScript model needs {path} and its card {path.with_suffix('.json')}"
            )
        return
    name, version, run = _parse(ref)
    card = read_card(name, version, root)
    if run is not None:
        card = _fold(card, name, version, run)
    weights = root / name / version / card.get("weights", "weights.pt")
    if not weights.is_file() or sha256_file(weights) != card.get("sha256"):
        raise ModelError(f"{ref}: weights missing or not matching the card's sha256")


def available(root: Path = MODELS_DIR) -> list[dict]:
    """Cards of every model in the registry, sorted by name and version."""
    return [
        read_card(p.parent.parent.name, p.parent.name, root)
        for p in sorted(root.glob("*/*/card.json"))
    ]
