"""Run the registered models on one CT volume: lungs, lesions, screening probability, Grad-CAM.

Input is a (z, y, x) HU volume with its spacing; every slice is brought to the networks' 256 x 256
grid by area averaging, and the segmenter's class probabilities go back to the original grid by
bilinear interpolation before the arg-max, so outlines are not blocky. Lesions are the connected
components of the lesion class, measured by :mod:`ml.measure` on the original grid.

Lesion calls that pass the size, density and lung-contact filters are candidates; the screening
CNN scores each one (:mod:`ml.candidates`), calls below the screener's operating threshold (from
its model card) are dropped, and the study's screening probability is the highest candidate
score. Grad-CAM (MONAI) on the most suspicious candidates, weighted by their scores, is the
saliency map of that decision. A study's triage score (its worklist priority) weighs each kept
lesion's size-based suspicion (Lung-RADS anchors, as in the baseline) by the screener's
probability for it, so a large call the screener doubts no longer makes every study urgent.

Batches: the segmenter sees ``batch`` slices at a time and the screener four times as many
patches; :func:`batch_for` picks the default by device (a few slices on a CPU, where a larger
batch only adds memory, many on a GPU, where it keeps the device busy). The networks run on the
device their weights are on: inputs are moved there and the outputs brought back, so a model a
worker moved to a GPU once stays there for every study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ml.image.measure import RegionMeasurement, measure_regions
from ml.image.morphology import compact_labels, label_compact, label_sizes
from ml.runtime import candidates, networks
from ml.runtime.laps import Laps
from ml.runtime.registry import LoadedModel
from ml.runtime.triage import lesion_probability, priority_from_probability, screen_probability

LESION_SEED_P = 0.5
LESION_EXTENT_P = 0.05
MIN_LESION_MM3 = 30.0  # about a 3 mm nodule on 5 mm slices; smaller specks are noise
# False-positive filters measured on the real CTs: lesion calls in aerated lung (dependent
# density, mean far below any solid or part-solid nodule) and calls with no lung around them
# (heart, bowel, neck) were most of the first models' false positives.
MIN_MEAN_HU = -600.0
MIN_LUNG_CONTACT = 0.15  # share of the in-plane rim around a lesion that is lung
RIM_MM = 2.5
CAM_SLICES = 4  # Grad-CAM on the most suspicious candidates only; the others add nothing
CAM_MIN_PROBABILITY = 0.05
CPU_BATCH = 16
CUDA_BATCH = 64  # 256 x 256 slices: about 2 GB of activations and outputs at 512 x 512
BATCH = CPU_BATCH


def batch_for(device: str | torch.device, setting: int = 0) -> int:
    """Slices per segmenter batch: ``setting`` when positive, else by device."""
    if setting > 0:
        return setting
    return CUDA_BATCH if torch.device(device).type == "cuda" else CPU_BATCH


def device_of(net: torch.nn.Module) -> torch.device:
    """Where the network's weights are (the CPU for one without parameters)."""
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class ModelResult:
    """What :func:`analyse` derived from one volume; arrays share its (z, y, x) shape."""

    lung_mask: np.ndarray
    lesion_labels: np.ndarray
    lesions: list[RegionMeasurement]
    lesion_probabilities: list[float]  # the screener's, for each of ``lesions``
    lung_volume_ml: float
    probability: float
    screening_probability: float
    candidate_probabilities: np.ndarray  # every lesion call, kept or not
    priority: int
    saliency: np.ndarray
    models: dict[str, str]
    timings_s: dict[str, float] = field(default_factory=dict)


def to_grid(volume_hu: np.ndarray, slab: int = 32) -> torch.Tensor:
    """(z, y, x) HU -> (z, GRID, GRID) float tensor by area averaging (or bilinear if smaller).

    Each slice is resized on its own, so a few slices at a time give the same result without a
    float32 copy of the whole volume (a mask passed here would need one)."""
    z, h, w = np.shape(volume_hu)
    g = networks.GRID
    if (h, w) == (g, g):
        return torch.from_numpy(np.ascontiguousarray(volume_hu, dtype=np.float32))
    mode = "area" if min(h, w) >= g else "bilinear"
    out = torch.empty((z, g, g), dtype=torch.float32)
    for i in range(0, z, slab):
        t = torch.from_numpy(np.ascontiguousarray(volume_hu[i : i + slab], dtype=np.float32))
        out[i : i + slab] = F.interpolate(t[None], size=(g, g), mode=mode)[0]
    return out


def _batch_inputs(scaled: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """The network input (batch, CONTEXT, GRID, GRID) of slices start..stop-1 of the scaled
    grid: each with its neighbours, edges repeated (as `networks.stack_context`), built per
    batch rather than for the whole volume at once (CONTEXT times the grid)."""
    half = networks.CONTEXT // 2
    rows = np.arange(start, stop)[:, None] + np.arange(-half, half + 1)[None, :]
    return torch.from_numpy(scaled[np.clip(rows, 0, len(scaled) - 1)])


@torch.no_grad()
def segment(
    model: LoadedModel,
    volume_hu: np.ndarray,
    seed_p: float = LESION_SEED_P,
    extent_p: float = LESION_EXTENT_P,
    batch: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean lung and lesion masks on the volume's own grid.

    Lesions by hysteresis on the lesion probability: a region where it reaches ``extent_p`` is
    a lesion call when it reaches ``seed_p`` somewhere. The arg-max alone outlined only about
    half of each real tumour (every missed voxel solid tissue, on its edge); the lower extent
    threshold recovers the edge without adding calls. The training of the screener lowers
    ``seed_p`` to collect the segmenter's near misses as well. ``batch``: slices per forward
    pass (0: :func:`batch_for` the model's device); the result does not depend on it.
    """
    device = device_of(model.net)
    step = batch_for(device, batch)
    scaled = np.asarray(networks.scale_hu(to_grid(volume_hu).numpy()))
    z, h, w = volume_hu.shape
    tissue = np.empty((z, h, w), dtype=bool)
    # Only the two thresholds of the lesion probability are used: two bool volumes instead of a
    # float32 one (half a gigabyte for a clinical CT).
    extent_mask = np.empty((z, h, w), dtype=bool)
    seed_mask = np.empty((z, h, w), dtype=bool)
    for i in range(0, z, step):
        x = _batch_inputs(scaled, i, min(i + step, z)).to(device, non_blocking=True)
        logits = model.net(x)
        if (h, w) != logits.shape[-2:]:
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        # arg-max > 0 without torch's arg-max over channels, which took 0.7 s per batch here
        tissue[i : i + step] = (logits[:, 0] < logits[:, 1:].amax(dim=1)).cpu().numpy()
        lesion_p = torch.softmax(logits, dim=1)[:, networks.LESION_CLASS]
        extent_mask[i : i + step] = (lesion_p >= extent_p).cpu().numpy()
        seed_mask[i : i + step] = (lesion_p >= seed_p).cpu().numpy()
    extent, n = label_compact(extent_mask, structure=np.ones((3, 3, 3), dtype=bool))
    del extent_mask
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[extent[seed_mask]] = True
    seeded[0] = False
    lesion = seeded[extent]
    return tissue | lesion, lesion


def candidate_inputs(
    volume_hu: np.ndarray, labels: np.ndarray, n: int
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The screener's input for lesion calls 1..n of ``labels`` and their centres on the grid."""
    g = networks.GRID
    h, w = volume_hu.shape[1:]
    grid = networks.scale_hu(to_grid(volume_hu).numpy())
    calls = to_grid(labels > 0).numpy() >= 0.25
    at = [
        (z, min(g - 1, int(y * g / h)), min(g - 1, int(x * g / w)))
        for z, y, x in candidates.centres(labels, n)
    ]
    return candidates.patches(grid, calls, at), at


def operating_threshold(screener: LoadedModel) -> float:
    """The candidate probability below which a lesion call is dropped (from the model card)."""
    card = screener.card
    return float(card.get("operating_point", {}).get("threshold", card.get("threshold", 0.5)))


def screen(
    model: LoadedModel, volume_hu: np.ndarray, labels: np.ndarray, n: int, batch: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Probability that each lesion call 1..n is a lesion, and a Grad-CAM saliency volume on the
    volume's grid (the most probable candidates' maps, weighted by their probability).

    The map is float16, the precision it is stored in: each slice is computed and clipped in
    float32 and rounded once, so the stored map is unchanged; a float32 map of a clinical CT is
    half a gigabyte of mostly zeros."""
    saliency = np.zeros(volume_hu.shape, dtype=np.float16)
    if n == 0:
        return np.zeros(0, dtype=np.float32), saliency
    x_np, at = candidate_inputs(volume_hu, labels, n)
    net = model.net
    device = device_of(net)
    x = torch.from_numpy(x_np).to(device)
    step = batch_for(device, batch) * 4
    with torch.no_grad():
        logits = torch.cat([net(x[i : i + step]) for i in range(0, n, step)])
    probs = torch.sigmoid(logits[:, 0]).cpu().numpy().astype(np.float32)
    if isinstance(net, torch.jit.ScriptModule):
        return probs, saliency  # no hooks on TorchScript: an external model gives no map
    from monai.visualize import GradCAM

    cam = GradCAM(nn_module=net, target_layers=networks.SCREENER_CAM_LAYER)
    order = [i for i in np.argsort(probs)[::-1][:CAM_SLICES] if probs[i] >= CAM_MIN_PROBABILITY]
    if not order:
        return probs, saliency
    maps = []
    for i in order:
        with torch.enable_grad():
            m = cam(x[i : i + 1], class_idx=0)
        maps.append(torch.as_tensor(m).detach().float().cpu().numpy()[0, 0] * probs[i])
    z, h, w = volume_hu.shape
    grid = candidates.paste(
        np.stack(maps), [at[i] for i in order], (z, networks.GRID, networks.GRID)
    )
    for k in sorted({at[i][0] for i in order}):
        up = F.interpolate(torch.from_numpy(grid[k])[None, None], size=(h, w), mode="bilinear")
        saliency[k] = np.clip(up[0, 0].numpy(), 0.0, 1.0)
    return probs, saliency


def lesion_components(
    lesion_mask: np.ndarray,
    spacing: tuple[float, float, float],
    hu: np.ndarray | None = None,
    lung: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Connected lesion components (26-connected), relabelled 1..n, keeping those of at least
    MIN_LESION_MM3 and, when ``hu`` and ``lung`` (lung without lesion) are given, with a mean
    above MIN_MEAN_HU and at least MIN_LUNG_CONTACT of their in-plane rim in the lung."""
    labels, n = label_compact(lesion_mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return labels.astype(np.int32), 0
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    sizes = label_sizes(labels, n)
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
    lut = np.zeros(n + 1, dtype=compact_labels(len(keep)))
    lut[keep] = np.arange(1, len(keep) + 1)
    return lut[labels], len(keep)


def triage_score(lesions: list[RegionMeasurement], probabilities: Sequence[float]) -> float:
    """Worklist suspicion of a study: the highest, over its kept lesions, of the screener's
    probability that the call is a lesion times the size-based suspicion of the lesion
    (Lung-RADS anchors, as in the baseline). A large call the screener doubts ranks below a
    large call it believes; with no lesion the score is the size mapping's floor."""
    floor = screen_probability([])  # the baseline's "nothing found" score
    scores = [p * lesion_probability(m) for m, p in zip(lesions, probabilities, strict=True)]
    return float(max(scores, default=floor))


def analyse(
    volume_hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    segmenter: LoadedModel,
    screener: LoadedModel,
    batch: int = 0,
) -> ModelResult:
    """Both models on one volume, with measurements, priority and timings. ``batch``: slices
    per segmenter pass (0: by device, :func:`batch_for`)."""
    volume_hu = np.asarray(volume_hu)
    if volume_hu.ndim != 3 or volume_hu.shape[0] < 1:
        raise ValueError(f"expected a (z, y, x) volume, got shape {volume_hu.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    laps = Laps()
    lap = laps.lap

    lung, lesion = segment(segmenter, volume_hu, batch=batch)
    lap("segment")
    labels, n = lesion_components(lesion, spacing, volume_hu, lung & ~lesion)
    probs, saliency = screen(screener, volume_hu, labels, n, batch=batch)
    lap("screen_and_gradcam")
    kept = np.flatnonzero(probs >= operating_threshold(screener)) + 1
    lut = np.zeros(n + 1, dtype=compact_labels(len(kept)))
    lut[kept] = np.arange(1, len(kept) + 1)
    labels = lut[labels]
    lesions = measure_regions(labels, spacing, volume_hu)
    lap("measure")
    p_screen = float(probs.max()) if probs.size else 0.0
    lesion_probs = [float(p) for p in probs[kept - 1]]
    score = triage_score(lesions, lesion_probs)
    timings = laps.done()
    voxel_ml = math.prod(spacing) / 1000.0
    return ModelResult(
        lung_mask=lung,
        lesion_labels=labels,
        lesions=lesions,
        lesion_probabilities=lesion_probs,
        lung_volume_ml=float(lung.sum(dtype=np.int64) * voxel_ml),
        probability=score,
        screening_probability=p_screen,
        candidate_probabilities=probs,
        priority=priority_from_probability(score),
        saliency=saliency,
        models={segmenter.name: segmenter.version, screener.name: screener.version},
        timings_s=timings,
    )
