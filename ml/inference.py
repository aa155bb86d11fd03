"""Run the registered models on one CT volume: lungs, lesions, screening probability, Grad-CAM.

Input is a (z, y, x) HU volume with its spacing; every slice is brought to the networks' 256 x 256
grid by area averaging, and the segmenter's class probabilities go back to the original grid by
bilinear interpolation before the arg-max, so outlines are not blocky. Lesions are the connected
components of the lesion class, measured by :mod:`ml.measure` on the original grid.

The screener scores every slice; the study's probability is the highest slice score (for the
shipped screener: the highest lesion probability among the lesion calls that passed the
false-positive filters). Grad-CAM (MONAI) on the most suspicious slices, weighted by their
scores, is the saliency map of that decision. A study's triage score is the larger of the
screening probability and the size-based suspicion of its largest segmented lesion (Lung-RADS
anchors, as in the baseline), so either can raise a study's priority: for triage a miss costs
more than a false alarm.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ml import networks
from ml.baseline import lesion_probability, priority_from_probability
from ml.measure import RegionMeasurement, measure_regions
from ml.registry import LoadedModel

MIN_LESION_MM3 = 30.0  # about a 3 mm nodule on 5 mm slices; smaller specks are noise
# False-positive filters measured on the real CTs: lesion calls in aerated lung (dependent
# density, mean far below any solid or part-solid nodule) and calls with no lung around them
# (heart, bowel, neck) were most of the first models' false positives.
MIN_MEAN_HU = -600.0
MIN_LUNG_CONTACT = 0.15  # share of the in-plane rim around a lesion that is lung
RIM_MM = 2.5
CAM_SLICES = 4  # Grad-CAM on the most suspicious slices only; the others contribute nothing
CAM_MIN_PROBABILITY = 0.05
BATCH = 16


@dataclass
class ModelResult:
    """What :func:`analyse` derived from one volume; arrays share its (z, y, x) shape."""

    lung_mask: np.ndarray
    lesion_labels: np.ndarray
    lesions: list[RegionMeasurement]
    lung_volume_ml: float
    probability: float
    screening_probability: float
    slice_probabilities: np.ndarray
    priority: int
    saliency: np.ndarray
    models: dict[str, str]
    timings_s: dict[str, float] = field(default_factory=dict)


def to_grid(volume_hu: np.ndarray) -> torch.Tensor:
    """(z, y, x) HU -> (z, GRID, GRID) float tensor by area averaging (or bilinear if smaller)."""
    t = torch.from_numpy(np.ascontiguousarray(volume_hu, dtype=np.float32))[None]
    if t.shape[-2:] == (networks.GRID, networks.GRID):
        return t[0]
    mode = "area" if min(t.shape[-2:]) >= networks.GRID else "bilinear"
    return F.interpolate(t, size=(networks.GRID, networks.GRID), mode=mode)[0]


def _inputs(grid_hu: torch.Tensor) -> torch.Tensor:
    """(z, GRID, GRID) HU -> (z, CONTEXT, GRID, GRID) scaled network input."""
    return torch.from_numpy(networks.stack_context(networks.scale_hu(grid_hu.numpy())))


@torch.no_grad()
def segment(model: LoadedModel, volume_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean lung and lesion masks on the volume's own grid."""
    x = _inputs(to_grid(volume_hu))
    z, h, w = volume_hu.shape
    classes = np.empty((z, h, w), dtype=np.uint8)
    for i in range(0, z, BATCH):
        logits = model.net(x[i : i + BATCH])
        if (h, w) != logits.shape[-2:]:
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        classes[i : i + BATCH] = logits.argmax(dim=1).numpy().astype(np.uint8)
    return classes > 0, classes == 2


def screen(
    model: LoadedModel, volume_hu: np.ndarray, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice lesion probabilities and a Grad-CAM saliency volume on the volume's grid.

    For our screener (the U-Net read as a classifier) a slice's probability is its highest
    lesion probability inside ``keep`` (the lesion calls that passed the false-positive
    filters), so a filtered-out call cannot raise the study's score; other models' own outputs
    are used as they are.
    """
    x = _inputs(to_grid(volume_hu))
    net = model.net
    with torch.no_grad():
        if isinstance(net, networks.LesionScreener) and keep is not None:
            allowed = to_grid(keep.astype(np.float32)) > 0
            chunks = []
            for i in range(0, len(x), BATCH):
                p = net.lesion_probability(x[i : i + BATCH]) * allowed[i : i + BATCH]
                chunks.append(torch.amax(p, dim=(1, 2)))
            probs = torch.cat(chunks)
        else:
            probs = torch.cat(
                [torch.sigmoid(net(x[i : i + BATCH])[:, 0]) for i in range(0, len(x), BATCH)]
            )
    probs_np = probs.numpy().astype(np.float32)
    saliency = np.zeros(volume_hu.shape, dtype=np.float32)
    if isinstance(net, torch.jit.ScriptModule):
        return probs_np, saliency  # no hooks on TorchScript: an external model gives no map
    from monai.visualize import GradCAM

    cam = GradCAM(nn_module=net, target_layers=networks.SCREENER_CAM_LAYER)
    order = np.argsort(probs_np)[::-1][:CAM_SLICES]
    h, w = volume_hu.shape[1:]
    for i in order:
        if probs_np[i] < CAM_MIN_PROBABILITY:
            break
        with torch.enable_grad():
            m = cam(x[i : i + 1], class_idx=0)
        m = F.interpolate(torch.as_tensor(m, dtype=torch.float32), size=(h, w), mode="bilinear")
        saliency[i] = m[0, 0].numpy() * probs_np[i]
    return probs_np, np.clip(saliency, 0.0, 1.0)


def lesion_components(
    lesion_mask: np.ndarray,
    spacing: tuple[float, float, float],
    hu: np.ndarray | None = None,
    lung: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Connected lesion components (26-connected), relabelled 1..n, keeping those of at least
    MIN_LESION_MM3 and, when ``hu`` and ``lung`` (lung without lesion) are given, with a mean
    above MIN_MEAN_HU and at least MIN_LUNG_CONTACT of their in-plane rim in the lung."""
    labels, n = ndimage.label(lesion_mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return labels.astype(np.int32), 0
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if sizes[i] * voxel_mm3 >= MIN_LESION_MM3]
    if hu is not None and lung is not None and keep:
        r = max(1, int(round(RIM_MM / spacing[1])))
        rim_struct = np.zeros((3, 2 * r + 1, 2 * r + 1), dtype=bool)
        rim_struct[1] = True
        boxes = ndimage.find_objects(labels)
        kept = []
        for i in keep:
            box = tuple(
                slice(max(0, b.start - (1 if k == 0 else r)), b.stop + (1 if k == 0 else r))
                for k, b in enumerate(boxes[i - 1])
            )
            comp = labels[box] == i
            rim = ndimage.binary_dilation(comp, structure=rim_struct) & ~comp
            contact = float(lung[box][rim].mean()) if rim.any() else 0.0
            if float(hu[box][comp].mean()) > MIN_MEAN_HU and contact >= MIN_LUNG_CONTACT:
                kept.append(i)
        keep = kept
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[labels], len(keep)


def triage_score(screening_probability: float, lesions: list[RegionMeasurement]) -> float:
    size_score = max((lesion_probability(m) for m in lesions), default=0.0)
    return float(max(screening_probability, size_score))


def analyse(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    segmenter: LoadedModel,
    screener: LoadedModel,
) -> ModelResult:
    """Both models on one volume, with measurements, priority and timings."""
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3 or volume_hu.shape[0] < 1:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume_hu.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    timings: dict[str, float] = {}
    t0 = start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = now - t0
        t0 = now

    lung, lesion = segment(segmenter, volume_hu)
    lap("segment")
    labels, _ = lesion_components(lesion, spacing, volume_hu, lung & ~lesion)
    lesions = measure_regions(labels, spacing, volume_hu)
    lap("measure")
    slice_probs, saliency = screen(screener, volume_hu, labels > 0)
    lap("screen_and_gradcam")
    p_screen = float(slice_probs.max()) if slice_probs.size else 0.0
    score = triage_score(p_screen, lesions)
    timings["total"] = time.perf_counter() - start
    voxel_ml = math.prod(spacing) / 1000.0
    return ModelResult(
        lung_mask=lung,
        lesion_labels=labels,
        lesions=lesions,
        lung_volume_ml=float(lung.sum(dtype=np.int64) * voxel_ml),
        probability=score,
        screening_probability=p_screen,
        slice_probabilities=slice_probs,
        priority=priority_from_probability(score),
        saliency=saliency,
        models={segmenter.name: segmenter.version, screener.name: screener.version},
        timings_s=timings,
    )
