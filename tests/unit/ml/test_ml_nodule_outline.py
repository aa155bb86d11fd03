"""The nodule outline U-Net: its cube in and out of a scan's grid at any spacing, the part kept
near the point, the outliner's mirror symmetry, its training examples, a short training run into
a temporary registry, and the shipped model on a phantom nodule. Synthetic crops only (the real
LIDC crops are never read here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.data import splits
from ml.evaluation import metrics, report
from ml.image.morphology import centroid
from ml.runtime import networks, registry
from ml.runtime import nodule_outline as no
from ml.training import nodule_outline as training
from tests.kit.phantoms import phantom_crop, write_phantom_crop

OUTLINE_REF = f"{registry.OUTLINER}@{registry.OUTLINER_VERSION}"
TINY_ARCH = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


class DensityNet(torch.nn.Module):
    """Stands in for the U-Net: a voxel is 'nodule' where the scaled HU passes half-way between
    air and soft tissue (a logit per voxel, as the U-Net gives)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = float(networks.scale_hu(np.array([-400.0]))[0])
        return self.gain * (x - cut)


def _sphere(shape, spacing, centre_zyx, radius_mm) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre_zyx, spacing, strict=True))
    return d2 <= radius_mm**2


@pytest.mark.parametrize(
    ("spacing", "shape", "centre"),
    [
        ((2.5, 0.7, 0.7), (16, 64, 64), (8.0, 32.0, 30.0)),
        ((1.0, 0.5, 0.5), (40, 80, 80), (20.0, 41.0, 39.0)),
        ((5.0, 0.9, 0.9), (10, 50, 50), (5.0, 25.0, 25.0)),
        ((1.25, 0.8, 0.8), (20, 40, 40), (3.0, 4.0, 36.0)),  # near the volume's edge
    ],
)
def test_a_mask_taken_into_the_cube_and_back_is_itself(spacing, shape, centre) -> None:
    mask = _sphere(shape, spacing, centre, 6.0)
    cube = no.sample_points(mask.astype(np.float32), spacing, centre, no.patch_offsets_mm(), cval=0)
    assert cube.shape == (no.PATCH,) * 3
    volume = float(mask.sum()) * np.prod(spacing)
    assert abs(float((cube >= 0.5).sum()) * no.PATCH_SPACING_MM**3 - volume) < 0.25 * volume
    box, back = no.to_volume(cube, spacing, centre, shape)
    full = np.zeros(shape, dtype=bool)
    full[box] = back >= 0.5
    assert metrics.overlap(full, mask, spacing)["dice"] > 0.9


def test_the_cube_reads_air_outside_the_scan() -> None:
    hu = np.zeros((10, 20, 20), dtype=np.float32)
    x = no.sample_patch(hu, (2.0, 1.0, 1.0), (5.0, 10.0, 10.0))
    assert x.shape == (1, no.PATCH, no.PATCH, no.PATCH)
    soft = float(networks.scale_hu(np.array([0.0]))[0])
    assert x[0, no.PATCH // 2, no.PATCH // 2, no.PATCH // 2] == pytest.approx(soft)
    assert x[0, 0, 0, 0] == 0.0  # air, beyond the 20 mm slab
    far = no.sample_patch(hu, (2.0, 1.0, 1.0), (500.0, 10.0, 10.0))
    assert (far == 0.0).all()


def test_only_the_part_near_the_point_is_kept() -> None:
    shape, spacing = (20, 40, 40), (1.0, 1.0, 1.0)
    a = _sphere(shape, spacing, (10, 10, 10), 4.0)
    b = _sphere(shape, spacing, (10, 30, 30), 4.0)
    kept = no.keep_near(a | b, spacing, (10, 30, 31), 2.0)
    assert (kept == b).all()
    assert not no.keep_near(a | b, spacing, (10, 20, 20), 2.0).any()


def _nodule_scan(spacing=(1.25, 0.7, 0.7), shape=(32, 80, 80), seed=0):
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -850.0, dtype=np.float32)
    centre = (shape[0] / 2, shape[1] / 2 - 3, shape[2] / 2 + 5)
    nodule = _sphere(shape, spacing, centre, 5.0)
    hu[nodule] = 20.0
    hu[:, :, :6] = 40.0  # chest wall
    hu += rng.normal(0, 10.0, size=shape).astype(np.float32)
    return hu, spacing, centre, nodule


def test_the_outliner_draws_the_nodule_at_the_point_and_mirrors_with_the_scan() -> None:
    hu, spacing, centre, nodule = _nodule_scan()
    outline = no.Outliner(DensityNet())
    box, mask = outline(hu, spacing, centre, 5.0)
    full = np.zeros(hu.shape, dtype=bool)
    full[box] = mask
    assert metrics.overlap(full, nodule, spacing)["dice"] > 0.85
    assert not full[:, :, :6].any()  # the wall is another part, not kept
    mirrored_centre = (centre[0], centre[1], hu.shape[2] - 1 - centre[2])
    box_m, mask_m = outline(hu[:, :, ::-1].copy(), spacing, mirrored_centre, 5.0)
    full_m = np.zeros(hu.shape, dtype=bool)
    full_m[box_m] = mask_m
    assert metrics.overlap(full_m[:, :, ::-1].copy(), full, spacing)["dice"] > 0.99


def test_training_examples_keep_the_label_on_the_nodule() -> None:
    crop = phantom_crop((4.0, 4.0, 4.0), (1.25, 0.7, 0.7), (16, 44, 44), wall=False)
    ex = training.Example(
        "LIDC-IDRI-9999",
        crop.hu,
        crop.mask,
        crop.spacing,
        centroid(crop.mask),
        no.equivalent_diameter_mm(crop.mask, crop.spacing),
    )
    offsets = no.patch_offsets_mm()
    rng = np.random.default_rng(3)
    true_volume = float(crop.mask.sum()) * np.prod(crop.spacing)
    for _ in range(6):
        x, y = training.augmented_pair(ex, rng, offsets)
        assert x.shape == y.shape == (1, no.PATCH, no.PATCH, no.PATCH)
        inside, outside = x[y > 0.5], x[(y < 0.5) & (x > 0.0)]
        assert inside.mean() > outside.mean() + 0.3  # the label lies on the dense nodule
        volume = float(y.sum()) * no.PATCH_SPACING_MM**3
        # Scaled by 0.85-1.15 per axis: the volume by 0.61-1.52, and resampling loses a little.
        assert 0.45 * true_volume < volume < 1.7 * true_volume
    again = training.augmented_pair(ex, np.random.default_rng(3), offsets)
    first = training.augmented_pair(ex, np.random.default_rng(3), offsets)
    np.testing.assert_array_equal(again[0], first[0])


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory) -> Path:
    """Synthetic crops under real split IDs (2 patients per part), a 3-step training run."""
    data = tmp_path_factory.mktemp("lidc-nodules")
    root = tmp_path_factory.mktemp("models")
    pids = (
        splits.lidc_split("train")[:2]
        + splits.lidc_split("validation")[:2]
        # The synthetic crops stand in for the trainer's own final-evaluation step.
        + splits.lidc_split("test", purpose=splits.FINAL_EVALUATION)[:2]
    )
    with open(data / "nodules.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["patient_id", "nodule_id", "diameter_mm"])
        for pid in pids:
            for nodule, radius in enumerate((3.0, 7.0), start=1):
                write_phantom_crop(data, pid, nodule, radius, (1.25, 0.7, 0.7), (16, 44, 44))
                out.writerow([pid, nodule, 2 * radius])
    written = training.train_and_register(
        data, root=root, steps=3, progress=False, arch=TINY_ARCH, validate_every=2
    )
    assert all(p.is_file() for p in written)
    return root


def test_a_short_run_writes_a_loadable_entry_with_both_outlines_scored(tiny_registry) -> None:
    registry.check(OUTLINE_REF, tiny_registry)
    model = registry.load(OUTLINE_REF, tiny_registry)
    card = model.card
    assert model.task == "outline" and card["training"]["steps"] == 3
    assert card["training"]["best_step"] in (2, 3)
    assert [c["step"] for c in card["training"]["validation_curve"]] == [2, 3]
    assert card["training"]["train"] == {"nodules": 4, "patients": 2}
    for part in ("validation", "test"):
        for method in ("unet", "classical"):
            fig = card["metrics"][part][method]["all"]
            assert fig["nodules"] == 4 and fig["patients"] == 2
            assert 0.0 <= fig["dice_mean"] <= 1.0
    # The classical outline finds these clean phantom nodules.
    assert card["metrics"]["test"]["classical"]["all"]["dice_mean"] > 0.6
    md = (tiny_registry / model.name / model.version / "card.md").read_text()
    assert "NOT FOR CLINICAL USE" in md and "10.7937/K9/TCIA.2015.LO9QL9SX" in md
    hu, spacing, centre, _ = _nodule_scan()
    box, mask = no.Outliner(model)(hu, spacing, centre, 5.0)
    assert mask.shape == hu[box].shape


def test_the_shipped_model_outlines_a_phantom_nodule_and_its_card_tells_the_truth() -> None:
    registry.check(OUTLINE_REF)
    model = registry.load(OUTLINE_REF)
    folder = registry.MODELS_DIR / model.name / model.version
    card = json.loads((folder / "card.json").read_text())
    assert "NOT FOR CLINICAL USE" in card["intended_use"]
    assert "CC BY 3.0" in card["training"]["licence"] and "Armato" in card["training"]["citation"]
    test = card["metrics"]["test"]["unet"]["all"]
    lo, hi = test["dice_95ci_patients"]
    assert 0.0 < lo <= test["dice_mean"] <= hi <= 1.0 and test["nodules"] > 100
    assert (folder / "weights.pt").stat().st_size < 2 * 1024 * 1024
    for spacing in ((1.25, 0.7, 0.7), (2.5, 0.9, 0.9)):
        hu, spacing, centre, nodule = _nodule_scan(spacing=spacing, shape=(24, 72, 72))
        box, mask = no.Outliner(model)(hu, spacing, centre, 5.0)
        full = np.zeros(hu.shape, dtype=bool)
        full[box] = mask
        assert metrics.overlap(full, nodule, spacing)["dice"] > 0.7


def test_the_outline_stays_in_the_lungs_and_within_reach_of_the_point() -> None:
    spacing, shape = (1.0, 0.8, 0.8), (30, 60, 60)
    hu = np.full(shape, -850.0, dtype=np.float32)
    hu[:, :, :10] = 40.0  # chest wall
    centre = (15.0, 30.0, 14.0)
    nodule = _sphere(shape, spacing, centre, 5.0)  # touches the wall
    hu[nodule] = 20.0
    vessel_centre = (15.0, 30.0, 45.0)
    hu[:, 29:32, 44:47] = 30.0  # a dense vessel along z through the second point
    lung = np.ones(shape, dtype=bool)
    lung[:, :, :10] = False
    free = no.Outliner(DensityNet(), in_lung=False, reach=None)
    limited = no.Outliner(DensityNet())
    box, mask = free(hu, spacing, centre, 5.0, lung)
    assert mask[:, :, : max(0, 10 - box[2].start)].any()  # the wall joined the nodule
    box, mask = limited(hu, spacing, centre, 5.0, lung)
    full = np.zeros(shape, dtype=bool)
    full[box] = mask
    assert not full[:, :, :10].any()
    assert metrics.overlap(full, nodule & lung, spacing)["dice"] > 0.85
    box, mask = limited(hu, spacing, vessel_centre, 2.0, lung)
    z = np.flatnonzero(mask.any(axis=(1, 2))) + box[0].start
    reach_mm = no.REACH * 2.0 + no.REACH_MM
    assert (z.max() - z.min() + 1) * spacing[0] <= 2 * reach_mm + 1.0  # not the whole vessel


def test_the_report_shows_the_test_crops_figures_of_the_card_in_size_order(tiny_registry) -> None:
    card = registry.read_card(registry.OUTLINER, registry.OUTLINER_VERSION, tiny_registry)
    lines = report.outline_lines(card)
    text = "\n".join(lines)
    assert "held-out LIDC patients' crops" in text and "read once" in text
    rows = [line for line in lines if line.startswith("| all") or line.startswith("| 0-6")]
    fig = card["metrics"]["test"]["unet"]["all"]
    assert rows[0].startswith("| all | U-Net | 4 | " + f"{fig['dice_mean']:.3f}")
    bands = [
        line.split("|")[1].strip() for line in lines if line.startswith("| ") and "U-Net" in line
    ]
    assert bands == ["all", "0-6 mm", "6-10 mm", "10-20 mm", ">= 20 mm"]
