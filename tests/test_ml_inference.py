"""The shipped models on the two real CTs: the real tumours are found and outlined, Grad-CAM
points at them, and the pieces of the analysis behave on known inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml import inference, metrics, networks, registry, synth

DATA = Path(__file__).resolve().parents[1] / "data" / "samples"


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
    for ref in registry.DEFAULT_REFS.values():
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
    assert result.models == {"radai-lung-lesion-unet": "1.0.0", "radai-lesion-screen-cnn": "1.0.0"}


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


def test_triage_score_takes_the_more_suspicious_of_screen_and_size() -> None:
    assert inference.triage_score(0.3, []) == pytest.approx(0.3)
    mask = np.zeros((8, 60, 60), dtype=np.uint8)
    mask[2:6, 10:40, 10:40] = 1  # 30 mm square lesion on 1 mm pixels, 5 mm slices
    from ml.measure import measure_regions

    [lesion] = measure_regions(mask, (5.0, 1.0, 1.0))
    assert inference.triage_score(0.1, [lesion]) > 0.9


def test_screen_saliency_is_zero_for_torchscript_models(tmp_path) -> None:
    # A fresh copy: Grad-CAM leaves hooks on a module it explained, and tracing refuses those.
    screener = registry.load(registry.DEFAULT_REFS["screen"])
    example = torch.rand(1, networks.CONTEXT, networks.GRID, networks.GRID)
    path = tmp_path / "screen.pt"
    torch.jit.trace(screener.net, example).save(str(path))
    path.with_suffix(".json").write_text('{"name": "ext", "version": "1", "task": "screen"}')
    external = registry.load(f"torchscript:{path}")
    vol = np.full((3, 64, 64), -800.0, dtype=np.float32)
    probs, saliency = inference.screen(external, vol)
    ours, _ = inference.screen(screener, vol)
    assert probs.shape == (3,) and np.allclose(probs, ours, atol=1e-4)
    assert not saliency.any()
