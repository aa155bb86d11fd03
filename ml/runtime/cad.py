"""The nodule CAD pipeline (`radai-nodule-cad`): candidates by multi-scale blob detection in the
lungs, a trained classifier that scores each candidate from nine planes through it (version
2.2.0; three orthogonal planes before) and the detector's own description of it (averaged
over mirrors of the body), and a local segmentation of each kept nodule, reported only where
solid on average (not ground glass); masses (over 3 cm) by the classical baseline's large-lesion
rule beside them; each outlined nodule then scored again from its outline by a second stage
(:mod:`ml.runtime.cad_rerank`, where one is given), whose threshold then decides what is
reported; then the same measurements and Lung-RADS size triage as the baseline. Candidate
generation, then false-positive reduction, as in most published lung-nodule CAD (Setio et al.,
Med Image Anal 2017).

Imports numpy, scipy, torch, ``ml.image`` and ``ml.runtime``. Research software, not for
clinical use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ml.image.blobs import Blob, detect_blobs
from ml.image.lungs import segment_lungs
from ml.image.measure import RegionMeasurement, measure_regions
from ml.image.morphology import check_volume
from ml.image.nodule_segment import segment_nodule
from ml.runtime import cad_rerank
from ml.runtime.baseline import detect_lesions
from ml.runtime.cad_views import CHANNELS, VIEW, candidate_views, transform
from ml.runtime.laps import Laps
from ml.runtime.networks import CadNet
from ml.runtime.nodule_outline import equivalent_diameter_mm
from ml.runtime.registry import LoadedModel
from ml.runtime.saliency import paint_scores

VIEW_SHAPE = (CHANNELS, VIEW, VIEW)
CAD_NAME = "radai-nodule-cad"


@dataclass
class Candidates:
    lung_mask: np.ndarray
    blobs: list[Blob]


def find_candidates(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    lung_mask: np.ndarray | None = None,
) -> Candidates:
    """The lungs (segmented unless given) and the blob candidates in them, strongest first;
    both on as many threads as torch is given."""
    spacing = check_volume(volume_hu, spacing_zyx)
    threads = torch.get_num_threads()
    if lung_mask is None:
        lung_mask = segment_lungs(volume_hu, spacing, threads=threads)
    return Candidates(lung_mask, detect_blobs(volume_hu, lung_mask, spacing, threads=threads))


def blob_features(b: Blob) -> list[float]:
    """The detector's own description of a candidate, beside the classifier's views."""
    return [
        b.response / 500.0,
        b.blobness,
        b.tubeness,
        b.negative / 3.0,
        (b.centre_hu + 1000.0) / 1000.0,
        b.in_lung,
        b.radius_mm / 15.0,
    ]


# --- the classifier's views of the body, mirrored ----------------------------------------------

_AXIS = {"z": 0, "y": 1, "x": 2}


def flip(x: torch.Tensor, axis: str) -> torch.Tensor:
    """The views of the body mirrored along ``axis`` ('x', 'y' or 'z')."""
    if axis not in _AXIS:
        raise ValueError(f"axis must be x, y or z, not {axis!r}")
    m = np.eye(3, dtype=int)
    m[_AXIS[axis], _AXIS[axis]] = -1
    return transform(x, m.tolist())


def swap_xy(x: torch.Tensor) -> torch.Tensor:
    """The views of the body with x and y exchanged (a transposed axial plane)."""
    return transform(x, [[1, 0, 0], [0, 0, 1], [0, 1, 0]])


# Mirrors of the body the classifier was trained with (its augmentation); a candidate's score is
# the mean over them, so a study mirrored left-right scores as the original does. All eight
# mirrors (z too) were tried on the validation composites (fold classifiers, 2026-12-02): CPM
# 0.397 against 0.381 by the classifier alone, but 0.467 against 0.469 after the second stage
# (ml.training.cad_rerank, refitted on their scores): not worth twice the classifier's time.
TTA_FLIPS: tuple[tuple[str, ...], ...] = ((), ("x",), ("y",), ("x", "y"))


@torch.no_grad()
def classify(
    net: torch.nn.Module, views: torch.Tensor, features: torch.Tensor | None = None
) -> torch.Tensor:
    """Probability per candidate from its views (n, C, 32, 32) and blob features (n, 7): the
    mean of the network's sigmoid over `TTA_FLIPS`. A version 1 classifier takes views only."""
    total = torch.zeros(len(views), device=views.device)
    for axes in TTA_FLIPS:
        x = views
        for axis in axes:
            x = flip(x, axis)
        logits = net(x, features) if isinstance(net, CadNet) else net(x)
        total += torch.sigmoid(logits[:, 0].float())
    return total / len(TTA_FLIPS)


# --- masses --------------------------------------------------------------------------------------

# A lesion over 3 cm across is a mass, not a nodule (Fleischner Society glossary: Hansell et al.,
# Radiology 2008;246:697-722). Masses lie beyond the blob detector's scales (radii up to about
# 16 mm) and beyond the LIDC nodules the classifier learnt from, so a mass the classifier never
# ranks would go unreported. The CAD takes them from the classical baseline's large-lesion path
# as it is (ml.runtime.baseline.detect_lesions: 5 mm opening, cores of a 10 mm-radius sphere or
# more, shape and hilum filters) and reports every lesion of it at least as large as a sphere
# 3 cm across, whatever the classifier says: a size rule, not a model's decision.
MASS_DIAMETER_MM = 30.0
MIN_MASS_VOLUME_MM3 = 4.0 / 3.0 * math.pi * (MASS_DIAMETER_MM / 2.0) ** 3


def find_masses(volume_hu: np.ndarray, spacing, lung: np.ndarray) -> np.ndarray:
    """Labels 1..k (uint8, largest first) of the lesions in ``lung`` over 3 cm across."""
    labels, lesions = detect_lesions(volume_hu, lung, spacing)
    lut = np.zeros(len(lesions) + 1, dtype=np.uint8)
    big = [m.label for m in lesions if m.voxel_volume_mm3 >= MIN_MASS_VOLUME_MM3]
    for new, old in enumerate(big[:255], start=1):
        lut[old] = new
    return lut[labels]


# --- scoring, outlining, measuring --------------------------------------------------------------

CAD_MODEL = "radai-nodule-cad-cnn"
CAD_VERSION = "2.2.0"
# Candidates outlined per study, best first, whatever their score: enough for the evaluation's
# FROC to reach 8 false positives per scan; the report keeps those at or above the threshold.
# More gain nothing: on validation outlines 60-100 per study gave a CPM of 0.377-0.376 against
# 0.381 (docs/models/cad-outline-limits.json), since the extra ones are dense false calls that
# rank above every faint outline, the ground-glass nodules' too.
OUTLINED = 40
# Outlines smaller than a 3 mm sphere are noise, not nodules (Lung-RADS measures from 4 mm).
MIN_VOLUME_MM3 = 4.0 / 3.0 * math.pi * 1.5**3
# An outline whose mean density stays below this is ground glass or a partial-volume speck, not
# a solid nodule: it is ranked below every denser outline and not reported. The persistent false
# calls of fold models on the anatomies they never saw were such outlines (a pneumonia's round
# ground-glass opacities, specks on vessels and pleura), and a pure ground-glass nodule under
# 3 cm is Lung-RADS category 2 (no action before the next annual scan) anyway. The value was
# chosen on validation studies only (ml.training.cad_outlines, from -500 to -300 HU in steps of
# 50, and a size floor of 0-6 mm that it made needless): chosen anatomy by anatomy on the other
# five, it was -400 HU for all six. It is the classical baseline's soft-tissue threshold too.
MIN_REPORTED_MEAN_HU = -400.0
# A learnt outliner (RADAI_CAD_OUTLINER) draws a nodule only where the classical outline is at
# least this wide; smaller ones keep the classical outline. On validation composites (fold
# models on anatomy they never saw, ml.training.cad_outlines) the outline U-Net drawing every
# nodule was worse than the classical outline (Dice 0.72 vs 0.79 on 117 nodules) but better
# on the nodules of 18 mm and more (0.85 vs 0.81, better on 14 of 20): it learnt from crops
# with air beyond them and over-reaches at small nodules in a whole scan.
LEARNT_OUTLINE_FROM_MM = 18.0


def is_faint(mean_hu: float | None, floor: float = MIN_REPORTED_MEAN_HU) -> bool:
    """Whether an outline of mean density ``mean_hu`` is too faint to report as a nodule."""
    return mean_hu is not None and mean_hu < floor


SCORE_BATCH = 512


@dataclass
class CadResult:
    """What :func:`run_cad` derived from one volume; arrays share its (z, y, x) shape."""

    lung_mask: np.ndarray
    lesion_labels: np.ndarray  # 1..n: the masses, then the outlined candidates, best score first
    lesions: list[RegionMeasurement]
    scores: list[float]  # the classifier's, per lesion (a mass: its best candidate's, or 0)
    threshold: float  # nodules scoring at least this are reported
    candidates: int
    timings_s: dict[str, float] = field(default_factory=dict)
    masses: int = 0  # lesions[:masses] are masses, reported by size whatever their score
    seeds: list[Blob | None] = field(default_factory=list)  # each lesion's candidate (a mass: None)
    # The first stage's probability per lesion where a second stage rescored them (``scores``
    # are then the second stage's); empty where ``scores`` are the classifier's.
    classifier_scores: list[float] = field(default_factory=list)

    def faint(self, i: int) -> bool:
        """Whether nodule ``i`` is fainter than `MIN_REPORTED_MEAN_HU` on average (a mass never
        is: it is reported by size)."""
        return i >= self.masses and is_faint(self.lesions[i].mean_hu)

    @property
    def reported(self) -> list[int]:
        """Indices into ``lesions`` of the reported ones: every mass, and the nodules scoring at
        least the threshold that are not faint."""
        return [
            i
            for i, s in enumerate(self.scores)
            if i < self.masses or (s >= self.threshold and not self.faint(i))
        ]

    @property
    def ranking(self) -> list[float]:
        """What the lesions rank by: a mass first (1.0, it is reported by rule), a nodule by its
        classifier score, a faint one below every other (its score - 1)."""
        return [
            1.0 if i < self.masses else s - 1.0 if self.faint(i) else s
            for i, s in enumerate(self.scores)
        ]

    @property
    def probabilities(self) -> list[float | None]:
        """The classifier's probability behind each reported decision: None for a mass."""
        return [None if i < self.masses else s for i, s in enumerate(self.scores)]


def view_channels(net: torch.nn.Module) -> int:
    """How many view channels the classifier ``net`` takes (its first convolution's inputs):
    12 (nine planes) from version 2.2.0, 6 (three planes) before."""
    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def threshold_of(model: LoadedModel) -> float:
    """The operating threshold written into the model card by training."""
    return float(model.card.get("operating_point", {}).get("threshold", 0.5))


@torch.no_grad()
def score(model: LoadedModel, volume_hu: np.ndarray, spacing, blobs: list[Blob]) -> np.ndarray:
    """The classifier's probability for each candidate (:func:`classify`)."""
    if not blobs:
        return np.zeros(0, dtype=np.float32)
    net = model.net.eval()
    device = next(net.parameters()).device
    channels = view_channels(net)
    out = []
    for i in range(0, len(blobs), SCORE_BATCH):
        part = blobs[i : i + SCORE_BATCH]
        views = candidate_views(
            volume_hu,
            spacing,
            [b.centre_zyx for b in part],
            channels,
            threads=torch.get_num_threads(),
        )
        x = torch.from_numpy(views).to(device)
        f = torch.tensor([blob_features(b) for b in part], dtype=torch.float32, device=device)
        out.append(classify(net, x, f).cpu().numpy())
    return np.concatenate(out)


# Draws one nodule: (volume, spacing, centre, radius mm, lung mask) -> (box, mask over the box),
# as ml.image.nodule_segment.segment_nodule does.
Segmenter = Callable[..., tuple[tuple[slice, ...], np.ndarray]]


def with_fallback(
    first: Segmenter, fallback: Segmenter = segment_nodule, *, from_mm: float = 0.0
) -> Segmenter:
    """``first``'s outline, or ``fallback``'s where ``first`` draws less than `MIN_VOLUME_MM3`
    (a learnt outliner that sees no nodule at a vessel candidate): which candidates are outlined
    then does not depend on the outliner. With ``from_mm``, ``first`` draws only where
    ``fallback``'s outline is at least that wide (the equivalent sphere's diameter)."""

    def segment(volume_hu, spacing, centre, radius_mm, lung=None):
        drawn = None
        if from_mm > 0:
            drawn = fallback(volume_hu, spacing, centre, radius_mm, lung)
            if equivalent_diameter_mm(drawn[1], spacing) < from_mm:
                return drawn
        box, mask = first(volume_hu, spacing, centre, radius_mm, lung)
        if mask.sum() * math.prod(spacing) >= MIN_VOLUME_MM3:
            return box, mask
        return drawn or fallback(volume_hu, spacing, centre, radius_mm, lung)

    return segment


def outline(
    volume_hu: np.ndarray,
    spacing,
    lung: np.ndarray,
    blobs: list[Blob],
    probabilities: np.ndarray,
    *,
    limit: int = OUTLINED,
    masses: np.ndarray | None = None,
    segment: Segmenter = segment_nodule,
) -> tuple[np.ndarray, list[RegionMeasurement], list[float], list[Blob | None]]:
    """Outline the best-scoring candidates (at most ``limit`` lesions in all) with ``segment``:
    a candidate whose centre falls in an outline already drawn is the same nodule and is
    skipped; outlines never overlap. ``masses`` (labels 1..k) come first, each scored with the
    best candidate inside it; a candidate whose outline would reach into a mass is the mass's
    edge and is skipped too. Returns the labels, their measurements, their scores and the
    candidate each was drawn from (None for a mass)."""
    shape = np.array(volume_hu.shape)
    labels = np.zeros(volume_hu.shape, dtype=np.uint8)
    kept_scores = _seed_masses(labels, masses, blobs, probabilities, limit)
    k = len(kept_scores)
    seeds: list[Blob | None] = [None] * k
    for i in np.argsort(-probabilities, kind="stable"):
        if len(kept_scores) >= min(limit, 255):
            break
        b = blobs[int(i)]
        v = tuple(np.clip(np.round(b.centre_zyx).astype(int), 0, shape - 1))
        if labels[v]:
            continue
        box, mask = segment(volume_hu, spacing, b.centre_zyx, b.radius_mm, lung)
        if k and (mask & (labels[box] > 0) & (labels[box] <= k)).any():
            continue
        mask &= labels[box] == 0
        if mask.sum() * math.prod(spacing) < MIN_VOLUME_MM3:
            continue
        labels[box][mask] = len(kept_scores) + 1
        kept_scores.append(float(probabilities[int(i)]))
        seeds.append(b)
    lesions = measure_regions(labels, spacing, volume_hu) if kept_scores else []
    return labels, lesions, kept_scores, seeds


def _seed_masses(
    labels: np.ndarray,
    masses: np.ndarray | None,
    blobs: list[Blob],
    probabilities: np.ndarray,
    limit: int,
) -> list[float]:
    """Write the first ``limit`` masses into ``labels``; the score of each: the best candidate
    whose centre lies in it (0 if none)."""
    if masses is None or not masses.any():
        return []
    k = min(int(masses.max()), limit, 255)
    inside = (masses > 0) & (masses <= k)
    labels[inside] = masses[inside]
    scores = [0.0] * k
    shape = np.array(labels.shape)
    for b, p in zip(blobs, probabilities, strict=True):
        m = int(labels[tuple(np.clip(np.round(b.centre_zyx).astype(int), 0, shape - 1))])
        if m:
            scores[m - 1] = max(scores[m - 1], float(p))
    return scores


@dataclass
class Scored:
    """The CAD before its outlines: the lungs, the candidates, the masses and the classifier's
    probability of each candidate (:func:`score_candidates`)."""

    found: Candidates
    masses: np.ndarray  # labels 1..k
    probabilities: np.ndarray
    threshold: float
    timings_s: dict[str, float] = field(default_factory=dict)


def score_candidates(
    volume_hu: np.ndarray, spacing_zyx: tuple[float, float, float], model: LoadedModel
) -> Scored:
    """Lungs, candidates, masses and the classifier's probabilities on one (z, y, x) volume."""
    spacing = check_volume(volume_hu, spacing_zyx)
    laps = Laps()
    found = find_candidates(volume_hu, spacing)
    laps.lap("lungs and candidates")
    masses = find_masses(volume_hu, spacing, found.lung_mask)
    laps.lap("masses")
    p = score(model, volume_hu, spacing, found.blobs)
    laps.lap("classifier")
    return Scored(found, masses, p, threshold_of(model), laps.done())


def outline_scored(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    scored: Scored,
    *,
    limit: int = OUTLINED,
    outliner: Segmenter | None = None,
    outliner_from_mm: float = LEARNT_OUTLINE_FROM_MM,
    reranker: LoadedModel | None = None,
) -> CadResult:
    """The outlines of ``scored``'s best candidates, drawn and scored as :func:`run_cad` says."""
    spacing = check_volume(volume_hu, spacing_zyx)
    laps = Laps()
    segment = (
        segment_nodule if outliner is None else with_fallback(outliner, from_mm=outliner_from_mm)
    )
    masses = scored.masses
    labels, lesions, scores, seeds = outline(
        volume_hu,
        spacing,
        scored.found.lung_mask,
        scored.found.blobs,
        scored.probabilities,
        limit=limit,
        masses=masses,
        segment=segment,
    )
    laps.lap("outlines")
    result = CadResult(
        scored.found.lung_mask,
        labels,
        lesions,
        scores,
        scored.threshold,
        len(scored.found.blobs),
        masses=min(int(masses.max()), limit, 255) if masses.any() else 0,
        seeds=seeds,
    )
    if reranker is not None:
        result = rerank(result, reranker)
        laps.lap("second stage")
    done = laps.done()
    result.timings_s = {**scored.timings_s, **{k: v for k, v in done.items() if k != "total"}}
    result.timings_s["total"] = scored.timings_s.get("total", 0.0) + done["total"]
    return result


def run_cad(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    model: LoadedModel,
    *,
    limit: int = OUTLINED,
    outliner: Segmenter | None = None,
    outliner_from_mm: float = LEARNT_OUTLINE_FROM_MM,
    reranker: LoadedModel | None = None,
) -> CadResult:
    """The whole pipeline on one (z, y, x) HU volume, before triage; nodules drawn by
    ``outliner`` where their classical outline is at least ``outliner_from_mm`` wide (the
    classical outline where it is smaller or the outliner draws none), or by the classical
    outline; scored by the second stage ``reranker`` where given (:func:`rerank`), else by the
    classifier."""
    scored = score_candidates(volume_hu, spacing_zyx, model)
    return outline_scored(
        volume_hu,
        spacing_zyx,
        scored,
        limit=limit,
        outliner=outliner,
        outliner_from_mm=outliner_from_mm,
        reranker=reranker,
    )


def rerank(result: CadResult, model: LoadedModel) -> CadResult:
    """``result`` with each outlined nodule scored by the second stage ``model``
    (:mod:`ml.runtime.cad_rerank`) from its outline, its candidate and the classifier's score,
    relabelled in the new order (masses first, as they were) and reported at the second stage's
    threshold. Masses keep their scores: they are reported by size."""
    k = result.masses
    nodules = range(k, len(result.lesions))
    rows = []
    for i in nodules:
        seed = result.seeds[i] if i < len(result.seeds) else None
        if seed is None:
            raise ValueError("every outlined nodule needs the candidate it was drawn from")
        rows.append(cad_rerank.outline_features(result.lesions[i], seed, result.scores[i]))
    x = cad_rerank.in_study(np.array(rows))
    new = list(result.scores[:k]) + cad_rerank.probabilities(model.net, x).tolist()
    order = list(range(k)) + sorted(nodules, key=lambda i: -new[i])
    lut = np.zeros(max(len(result.lesions), int(result.lesion_labels.max())) + 1, dtype=np.uint8)
    for label, i in enumerate(order, start=1):
        lut[result.lesions[i].label] = label
    return replace(
        result,
        lesion_labels=lut[result.lesion_labels],
        lesions=[replace(result.lesions[i], label=n) for n, i in enumerate(order, start=1)],
        scores=[new[i] for i in order],
        threshold=threshold_of(model),
        seeds=[result.seeds[i] for i in order],
        classifier_scores=[result.scores[i] for i in order],
    )


def reported_only(result: CadResult) -> CadResult:
    """``result`` with only its reported lesions, relabelled 1..n in their order (masses
    first)."""
    keep = result.reported
    lut = np.zeros(max(len(result.lesions), int(result.lesion_labels.max())) + 1, dtype=np.uint8)
    for new, i in enumerate(keep, start=1):
        lut[result.lesions[i].label] = new
    lesions = [replace(result.lesions[i], label=new) for new, i in enumerate(keep, start=1)]
    return replace(
        result,
        lesion_labels=lut[result.lesion_labels],
        lesions=lesions,
        scores=[result.scores[i] for i in keep],
        seeds=[result.seeds[i] for i in keep] if result.seeds else [],
        classifier_scores=[result.classifier_scores[i] for i in keep]
        if result.classifier_scores
        else [],
    )


def saliency(labels: np.ndarray, scores: list[float], spacing) -> np.ndarray:
    """Each lesion painted with its classifier score (lesion ``i + 1`` with ``scores[i]``)."""
    return paint_scores(labels, {i: s for i, s in enumerate(scores, start=1)}, spacing)
