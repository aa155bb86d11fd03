"""The analysers a site can run (`RADAI_PIPELINE`): the trained models, the nodule CAD or the
classical baseline.
Each turns a Hounsfield volume into an `Analysis` of one shape, so that everything after
inference (SEG, SR, findings, triage) is the same whichever ran.

- `models`: the segmentation U-Net and the screening CNN from the registry (`workers/models.py`).
- `cad`: `ml.runtime.cad` (blob candidates in the lungs, the trained candidate classifier of
  `RADAI_CAD_MODEL`, outlines by the U-Net of `RADAI_CAD_OUTLINER` from 18 mm and classical ones
  below, each outline scored again by the second stage of `RADAI_CAD_RERANKER`, Lung-RADS size
  triage of the reported nodules).
- `baseline`: `ml.runtime.baseline` (HU-threshold lungs, shape-filtered lesion candidates,
  Lung-RADS size triage); no per-lesion screening probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ml.image.measure import RegionMeasurement
from ml.runtime import baseline, cad, inference, nodule_outline, registry, triage
from ml.runtime.registry import LoadedModel
from workers.models import ModelSet, load_models, resolve_device

PIPELINES = ("models", "cad", "baseline")
DEFAULT_CAD_MODEL = registry.DEFAULT_REFS["cad"]


@dataclass(frozen=True)
class Analysis:
    """What an analyser derived from one volume; arrays share its (z, y, x) shape."""

    lung_mask: np.ndarray
    lesion_labels: np.ndarray  # 0 background, 1..n the kept lesions in `lesions` order
    lesions: list[RegionMeasurement]
    lesion_probabilities: list[float | None]  # a screening model's, where one ran
    lung_volume_ml: float
    screening_probability: float  # the study's
    triage_score: float
    priority: int
    saliency: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)


class Analyser(Protocol):
    @property
    def name(self) -> str: ...  # the pipeline's name: "models" or "baseline"

    @property
    def versions(self) -> dict[str, str]: ...  # algorithm name -> version, for the job

    @property
    def tag(self) -> str: ...  # short, for the job key

    @property
    def segmentation_algorithm(self) -> tuple[str, str]: ...  # (name, version) for SEG and SR

    @property
    def screening_algorithm(self) -> tuple[str, str] | None: ...

    @property
    def saliency_method(self) -> str: ...

    def analyse(
        self, volume_hu: np.ndarray, spacing_zyx: tuple[float, float, float]
    ) -> Analysis: ...


@dataclass(frozen=True)
class ModelsAnalyser:
    models: ModelSet
    name: str = "models"
    batch: int = 0  # slices per segmenter pass; 0: by the models' device (RADAI_INFER_BATCH)

    @property
    def versions(self) -> dict[str, str]:
        return self.models.versions

    @property
    def tag(self) -> str:
        return self.models.pipeline_tag

    @property
    def segmentation_algorithm(self) -> tuple[str, str]:
        return self.models.segmenter.name, self.models.segmenter.version

    @property
    def screening_algorithm(self) -> tuple[str, str] | None:
        return self.models.screener.name, self.models.screener.version

    @property
    def saliency_method(self) -> str:
        return "Grad-CAM of " + self.models.screener.ref

    def analyse(self, volume_hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Analysis:
        r = inference.analyse(
            volume_hu,
            spacing_zyx,
            self.models.segmenter,
            self.models.screener,
            batch=inference.batch_for(self.models.device, self.batch),
        )
        return Analysis(
            lung_mask=r.lung_mask,
            lesion_labels=r.lesion_labels,
            lesions=r.lesions,
            lesion_probabilities=list(r.lesion_probabilities),
            lung_volume_ml=r.lung_volume_ml,
            screening_probability=r.screening_probability,
            triage_score=r.probability,
            priority=r.priority,
            saliency=r.saliency,
            timings_s=r.timings_s,
        )


@dataclass(frozen=True)
class BaselineAnalyser:
    name: str = "baseline"

    @property
    def versions(self) -> dict[str, str]:
        return {baseline.BASELINE_NAME: baseline.BASELINE_VERSION}

    @property
    def tag(self) -> str:
        return f"baseline-{baseline.BASELINE_VERSION}"

    @property
    def segmentation_algorithm(self) -> tuple[str, str]:
        return baseline.BASELINE_NAME, baseline.BASELINE_VERSION

    @property
    def screening_algorithm(self) -> tuple[str, str] | None:
        return None

    @property
    def saliency_method(self) -> str:
        return "each lesion painted with its size-suspicion score and blurred (classical baseline)"

    def analyse(self, volume_hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Analysis:
        r = baseline.run_baseline(volume_hu, spacing_zyx, threads=torch.get_num_threads())
        return Analysis(
            lung_mask=r.lung_mask,
            lesion_labels=r.lesion_labels,
            lesions=r.lesions,
            lesion_probabilities=[None] * len(r.lesions),
            lung_volume_ml=r.lung_volume_ml,
            screening_probability=r.probability,
            triage_score=r.probability,
            priority=r.priority,
            saliency=r.saliency,
            timings_s=r.timings_s,
        )


@dataclass(frozen=True)
class CadAnalyser:
    model: LoadedModel
    outliner: LoadedModel | None = None  # None: classical outlines
    reranker: LoadedModel | None = None  # None: the classifier's scores as they are
    name: str = "cad"

    @property
    def versions(self) -> dict[str, str]:
        out = {self.model.name: self.model.version}
        for extra in (self.outliner, self.reranker):
            if extra is not None:
                out[extra.name] = extra.version
        return out

    @property
    def tag(self) -> str:
        return f"cad-{self.model.version}"[:24]

    @property
    def segmentation_algorithm(self) -> tuple[str, str]:
        # Outlines from 18 mm are the outline U-Net's and the scores the second stage's: the
        # SEG and SR name their versions too.
        version = self.model.version
        if self.outliner is not None:
            version += f" outline {self.outliner.version}"
        if self.reranker is not None:
            version += f" rerank {self.reranker.version}"
        return cad.CAD_NAME, version

    @property
    def screening_algorithm(self) -> tuple[str, str] | None:
        # The last scorer decides which nodules are reported, and so the study's probability.
        last = self.model if self.reranker is None else self.reranker
        return last.name, last.version

    @property
    def saliency_method(self) -> str:
        scorer = "classifier" if self.reranker is None else "second stage's"
        return (
            f"each reported nodule painted with its {scorer} score, each mass (over 3 cm, "
            "reported by size) with 1, and blurred (nodule CAD)"
        )

    def analyse(self, volume_hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Analysis:
        drawer = None if self.outliner is None else nodule_outline.Outliner(self.outliner)
        r = cad.reported_only(
            cad.run_cad(volume_hu, spacing_zyx, self.model, outliner=drawer, reranker=self.reranker)
        )
        probability = triage.screen_probability(r.lesions)
        return Analysis(
            lung_mask=r.lung_mask,
            lesion_labels=r.lesion_labels,
            lesions=r.lesions,
            lesion_probabilities=r.probabilities,
            lung_volume_ml=float(r.lung_mask.sum(dtype=np.int64) * np.prod(spacing_zyx) / 1000),
            screening_probability=probability,
            triage_score=probability,
            priority=triage.priority_from_probability(probability),
            saliency=cad.saliency(r.lesion_labels, r.ranking, spacing_zyx),
            timings_s=r.timings_s,
        )


_cad_models: dict[tuple[str, str], LoadedModel] = {}


def load_cad(ref: str, device: str = "auto", task: str = "cad") -> LoadedModel:
    """The CAD's model of ``ref`` (its classifier, or with ``task`` 'outline' its outline
    U-Net), loaded once per process and checked to be one."""
    key = (ref, device)
    if key not in _cad_models:
        model = registry.load(ref)
        model.net.to(resolve_device(device)).eval()
        _cad_models[key] = model
    model = _cad_models[key]
    if model.task != task:
        raise registry.ModelError(f"{model.ref} is a {model.task} model, not {task}")
    return model


def make_analyser(
    pipeline: str,
    segment_ref: str = "",
    screen_ref: str = "",
    device: str = "auto",
    batch: int = 0,
    cad_ref: str = DEFAULT_CAD_MODEL,
    cad_outliner: str = registry.CAD_OUTLINER,
    cad_reranker: str = registry.CAD_RERANKER,
) -> Analyser:
    """The analyser of `RADAI_PIPELINE`; the models are loaded (and moved to their device) once
    per process and stay there for every later study."""
    if pipeline == "baseline":
        return BaselineAnalyser()
    if pipeline == "cad":
        classical = cad_outliner.lower() == registry.CLASSICAL_OUTLINE
        outliner = None if classical else load_cad(cad_outliner, device, task="outline")
        rescored = cad_reranker.lower() != registry.NO_RERANK
        reranker = load_cad(cad_reranker, device, task="cad-rerank") if rescored else None
        return CadAnalyser(load_cad(cad_ref, device), outliner, reranker)
    if pipeline == "models":
        return ModelsAnalyser(load_models(segment_ref, screen_ref, device), batch=batch)
    raise ValueError(f"unknown pipeline {pipeline!r}; one of {', '.join(PIPELINES)}")
