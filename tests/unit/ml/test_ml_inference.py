"""The shipped models on the two real CTs: the real tumours are found and outlined, Grad-CAM
points at them, and the pieces of the analysis behave on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.data import synth
from ml.evaluation import metrics
from ml.runtime import candidates, inference, networks, registry
from tests.kit.paths import SAMPLES

DATA = SAMPLES


@pytest.fixture(scope="module")
def models():
    return (
        registry.load(registry.DEFAULT_REFS["segment"]),
        registry.load(registry.DEFAULT_REFS["screen"]),
    )


@pytest.fixture(scope="module")
def analysed(models):
    out = {}
    for case in ("lung1", "lung2"):
        hu, mask, spacing = synth.load_nrrd_case(
            DATA / f"{case}_image.nrrd", DATA / f"{case}_label.nrrd"
        )
        out[case] = (inference.analyse(hu, spacing, *models), mask, spacing)
    return out


def test_shipped_models_are_registered_with_cards_and_matching_weights() -> None:
    cards = {c["name"]: c for c in registry.available()}
    for task in ("segment", "screen"):  # the malignancy CNN learns from real LIDC crops instead
        ref = registry.DEFAULT_REFS[task]
        registry.check(ref)
        name = ref.split("@")[0]
        card = cards[name]
        assert "synthetic" in card["training"]["data"].lower()
        assert card["intended_use"] and "NOT FOR CLINICAL USE" in card["intended_use"]
        assert set(card["folds"]) == {"holdout-lung1", "holdout-lung2"}
    total = sum(p.stat().st_size for p in registry.MODELS_DIR.rglob("*.pt"))
    assert total < 20 * 1024 * 1024


def test_the_real_lung1_nodule_is_detected(analysed) -> None:
    result, mask, spacing = analysed["lung1"]
    det = metrics.match_lesions(result.lesion_labels, mask.astype(np.int32))
    assert det.true_positives == 1
    assert result.lung_volume_ml > 2000
    assert result.models == {"radai-lung-lesion-unet": "1.0.0", "radai-lesion-screen-cnn": "2.0.0"}


def test_the_real_lung2_mass_is_outlined(analysed) -> None:
    result, mask, spacing = analysed["lung2"]
    hit = np.unique(result.lesion_labels[mask & (result.lesion_labels > 0)])
    outline = np.isin(result.lesion_labels, hit[hit > 0])
    assert metrics.overlap(outline, mask, spacing)["dice"] > 0.6
    assert result.priority == 1  # a 5 cm mass is the most urgent class


def test_gradcam_points_at_the_slices_of_the_mass(analysed) -> None:
    result, mask, _ = analysed["lung2"]
    assert result.saliency.shape == mask.shape
    assert 0.0 <= result.saliency.min() and result.saliency.max() <= 1.0
    hottest = int(np.argmax(result.saliency.max(axis=(1, 2))))
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    assert slices[0] - 1 <= hottest <= slices[-1] + 1


def test_to_grid_averages_pixel_blocks() -> None:
    vol = np.arange(2 * 512 * 512, dtype=np.float32).reshape(2, 512, 512)
    grid = inference.to_grid(vol).numpy()
    assert grid.shape == (2, networks.GRID, networks.GRID)
    assert grid[0, 0, 0] == pytest.approx(vol[0, :2, :2].mean())
    small = inference.to_grid(np.zeros((1, 128, 128), dtype=np.float32))
    assert tuple(small.shape) == (1, networks.GRID, networks.GRID)


class _LesionWhereDense(torch.nn.Module):
    """A segmenter whose lesion logit rises with the middle slice's density."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lesion = 40.0 * (x[:, 1] - 0.72)  # 0.72 of the scaled range is about 0 HU
        zero = torch.zeros_like(lesion)
        return torch.stack([zero, zero, lesion], dim=1)


def test_lesions_are_seeded_high_and_reach_as_far_as_the_low_threshold() -> None:
    model = registry.LoadedModel("t", "1", "segment", _LesionWhereDense(), {})
    vol = np.full((3, 256, 256), -900.0, dtype=np.float32)
    yy, xx = np.mgrid[:256, :256]
    r1 = np.hypot(yy - 80, xx - 80)
    vol[:, r1 < 12] = -30.0  # halo: lesion probability between the thresholds
    vol[:, r1 < 6] = 50.0  # core: above the seed threshold
    far = np.hypot(yy - 180, xx - 180) < 10
    vol[:, far] = -30.0  # the same halo density with no core: never a call
    lung, lesion = inference.segment(model, vol)
    assert lesion[1][r1 < 11].all() and not lesion[1][r1 > 14].any()
    assert lung[lesion].all()
    _, argmax_like = inference.segment(model, vol, extent_p=inference.LESION_SEED_P)
    assert argmax_like[1][r1 < 5].all() and not argmax_like[1][(r1 > 7) & (r1 < 11)].any()
    _, near_misses = inference.segment(model, vol, seed_p=0.1)
    assert near_misses[1][far].all()


def test_tiny_components_are_dropped_and_the_rest_relabelled() -> None:
    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[1, 2:8, 2:8] = True  # 36 voxels x 1 mm3 -> kept
    mask[1, 15, 15] = True  # 1 mm3 -> dropped
    labels, n = inference.lesion_components(mask, (1.0, 1.0, 1.0))
    assert n == 1 and set(np.unique(labels)) == {0, 1} and labels.sum() == 36


def test_lesion_calls_need_density_and_lung_around_them() -> None:
    mask = np.zeros((3, 20, 20), dtype=bool)
    mask[1, 2:8, 2:8] = True
    hu = np.full(mask.shape, -850.0, dtype=np.float32)
    hu[mask] = 30.0
    spacing = (1.0, 1.0, 1.0)
    assert inference.lesion_components(mask, spacing, hu, ~mask)[1] == 1  # nodule in lung
    no_lung = np.zeros_like(mask)
    assert inference.lesion_components(mask, spacing, hu, no_lung)[1] == 0  # e.g. in the heart
    hu[mask] = -720.0  # aerated: dependent lung density, not a nodule
    assert inference.lesion_components(mask, spacing, hu, ~mask)[1] == 0


def test_triage_score_weighs_lesion_size_by_the_screeners_belief() -> None:
    from ml.image.measure import measure_regions

    assert inference.triage_score([], []) == pytest.approx(0.02)  # nothing found: the floor
    mask = np.zeros((8, 60, 60), dtype=np.uint8)
    mask[2:6, 10:40, 10:40] = 1  # 30 mm square lesion on 1 mm pixels, 5 mm slices
    mask[2:4, 50:55, 50:55] = 2  # 5 mm
    big, small = measure_regions(mask, (5.0, 1.0, 1.0))
    assert inference.triage_score([big], [1.0]) > 0.9
    assert inference.triage_score([big], [0.4]) == pytest.approx(0.4 * 0.98, abs=0.01)
    from ml.runtime.triage import lesion_probability

    believed_small = inference.triage_score([big, small], [0.1, 0.95])
    assert lesion_probability(small) < 0.6  # about 8 mm
    assert believed_small == pytest.approx(0.95 * lesion_probability(small))
    with pytest.raises(ValueError):
        inference.triage_score([big], [])


def _one_call() -> tuple[np.ndarray, np.ndarray]:
    vol = np.full((5, 128, 128), -850.0, dtype=np.float32)
    labels = np.zeros(vol.shape, dtype=np.int32)
    yy, xx = np.mgrid[:128, :128]
    r2 = (yy - 60) ** 2 + (xx - 70) ** 2
    for z, size in ((1, 16), (2, 36), (3, 16)):  # largest on slice 2
        vol[z, r2 < size] = 20.0
        labels[z, r2 < size] = 1
    return vol, labels


def test_screen_saliency_is_zero_for_torchscript_models(tmp_path) -> None:
    # A fresh copy: Grad-CAM leaves hooks on a module it explained, and tracing refuses those.
    screener = registry.load(registry.DEFAULT_REFS["screen"])
    example = torch.rand(1, candidates.CHANNELS, candidates.PATCH, candidates.PATCH)
    path = tmp_path / "screen.pt"
    torch.jit.trace(screener.net, example).save(str(path))
    path.with_suffix(".json").write_text('{"name": "ext", "version": "1", "task": "screen"}')
    external = registry.load(f"torchscript:{path}")
    vol, labels = _one_call()
    probs, saliency = inference.screen(external, vol, labels, 1)
    ours, our_map = inference.screen(screener, vol, labels, 1)
    assert probs.shape == (1,) and np.allclose(probs, ours, atol=1e-4)
    assert not saliency.any()
    if ours[0] >= inference.CAM_MIN_PROBABILITY:
        assert our_map[2].any() and not our_map[0].any()  # on the call's largest slice only
    assert inference.operating_threshold(external) == 0.5  # no threshold in its card


class _Constant(torch.nn.Module):
    """A screener that gives every candidate the same logit."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :1] * 0.0 + self.logit


def test_calls_the_screener_rejects_are_dropped(models) -> None:
    segmenter, _ = models
    hu, mask, spacing = synth.load_nrrd_case(DATA / "lung2_image.nrrd", DATA / "lung2_label.nrrd")
    card = {"operating_point": {"threshold": 0.3}}
    # Traced, not scripted: an external TorchScript model as it would be loaded (no Grad-CAM), and
    # tracing does not compile this file's source, which TorchScript's frontend failed on once
    # the whole suite had run in the same process.
    example = torch.zeros(2, 3, 8, 8)
    keep_all = registry.LoadedModel(
        "t", "1", "screen", torch.jit.trace(_Constant(2.0), example), card
    )
    none = registry.LoadedModel("t", "1", "screen", torch.jit.trace(_Constant(-2.0), example), card)
    kept = inference.analyse(hu, spacing, segmenter, keep_all)
    dropped = inference.analyse(hu, spacing, segmenter, none)
    assert len(kept.lesions) == len(kept.candidate_probabilities) > 0
    assert kept.screening_probability == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert dropped.lesions == [] and not dropped.lesion_labels.any()
    assert dropped.screening_probability < 0.3
    assert len(dropped.candidate_probabilities) == len(kept.candidate_probabilities)
