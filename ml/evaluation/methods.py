"""The methods an evaluation compares: the shipped models, their fold models by held-out case (or
anatomy), read from the registry. Imports `ml.runtime`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ml.runtime import registry
from ml.runtime.registry import LoadedModel


@dataclass
class Methods:
    """The shipped models, the fold models by held-out case, and how to run the baseline."""

    segmenter: LoadedModel
    screener: LoadedModel
    fold_segmenters: dict[str, LoadedModel]
    fold_screeners: dict[str, LoadedModel]
    cad: LoadedModel | None = None  # the nodule CAD's classifier, where the registry has one
    fold_cad: dict[str, LoadedModel] = field(default_factory=dict)
    outliner: LoadedModel | None = None  # the U-Net drawing the CAD's outlines (else classical)
    reranker: LoadedModel | None = None  # the CAD's second stage (else the classifier's scores)
    fold_reranker: dict[str, LoadedModel] = field(default_factory=dict)


def load_methods(root: Path = registry.MODELS_DIR) -> Methods:
    seg = registry.load(registry.DEFAULT_REFS["segment"], root)
    scr = registry.load(registry.DEFAULT_REFS["screen"], root)
    try:
        cad = registry.load(registry.DEFAULT_REFS["cad"], root)
    except registry.ModelError:
        cad = None
    # The CAD's outlines as the service draws them by default.
    classical = registry.CAD_OUTLINER == registry.CLASSICAL_OUTLINE
    outliner = None if cad is None or classical else registry.load(registry.CAD_OUTLINER, root)

    def folds(model: LoadedModel) -> dict[str, LoadedModel]:
        return {
            run.removeprefix("holdout-"): registry.load(f"{model.ref}#{run}", root)
            for run in model.card.get("folds", {})
        }

    reranker = None
    if cad is not None and registry.CAD_RERANKER != registry.NO_RERANK:
        try:
            reranker = registry.load(registry.CAD_RERANKER, root)
        except registry.ModelError:  # a registry without one: the classifier's scores
            reranker = None
    return Methods(
        seg,
        scr,
        folds(seg),
        folds(scr),
        cad,
        folds(cad) if cad else {},
        outliner,
        reranker,
        folds(reranker) if reranker else {},
    )
