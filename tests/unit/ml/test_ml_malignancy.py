"""The malignancy score: the fixed-grid patch, scoring per lesion, the patient split of its
training, a short training run into a temporary registry and the shipped model. Synthetic crops
only (the real LIDC crops are never read here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ml.data import splits
from ml.data.nodules import NoduleRow
from ml.runtime import malignancy, networks, registry
from ml.training import malignancy as training
from tests.kit.phantoms import phantom_crop, write_phantom_crop

CENTRE = (malignancy.PATCH - 1) / 2.0


def _ellipsoid(shape, spacing, centre_mm, radii_mm) -> np.ndarray:
    grids = np.meshgrid(
        *[(np.arange(n) + 0.5) * s - c for n, s, c in zip(shape, spacing, centre_mm, strict=True)],
        indexing="ij",
    )
    return sum((g / r) ** 2 for g, r in zip(grids, radii_mm, strict=True)) <= 1.0


def _mask_centroid_and_volume(patch: np.ndarray) -> tuple[np.ndarray, float]:
    m = patch[1].astype(np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in m.shape], indexing="ij"))
    centroid = (grid * m).reshape(3, -1).sum(axis=1) / m.sum()
    return centroid, float(m.sum()) * malignancy.PATCH_SPACING_MM**3


@pytest.mark.parametrize(
    ("spacing", "shape"),
    [
        ((2.5, 0.7, 0.7), (12, 44, 44)),
        ((1.0, 0.5, 0.5), (30, 60, 60)),
        ((1.25, 0.9, 0.9), (24, 34, 34)),
    ],
)
def test_the_patch_is_centred_on_the_nodule_and_keeps_its_size(spacing, shape) -> None:
    radii = (6.0, 5.0, 5.0)
    crop = phantom_crop(radii_mm=radii, spacing=spacing, shape=shape, wall=False)
    patch = malignancy.nodule_patch(crop.hu, crop.mask, crop.spacing)
    assert patch.shape == (2, malignancy.PATCH, malignancy.PATCH, malignancy.PATCH)
    centroid, volume = _mask_centroid_and_volume(patch)
    np.testing.assert_allclose(centroid, CENTRE, atol=0.5)
    true_volume = 4.0 / 3.0 * np.pi * np.prod(radii)
    assert abs(volume - true_volume) < 0.12 * true_volume, (volume, true_volume)
    # Extents in mm along z and y: the 12 mm axis stays 12 mm, the 10 mm axis 10 mm.
    inside = patch[1] > 0.5
    z_extent = np.ptp(np.flatnonzero(inside.any(axis=(1, 2)))) + 1
    y_extent = np.ptp(np.flatnonzero(inside.any(axis=(0, 2)))) + 1
    assert abs(z_extent - 12) <= 2.5 and abs(y_extent - 10) <= 1.5, (z_extent, y_extent)
    # The centre is the nodule's soft tissue, the corners are air or parenchyma.
    c = malignancy.PATCH // 2
    assert patch[0, c, c, c] == pytest.approx(malignancy.scale_hu(np.float32(30.0)), abs=0.03)
    assert patch[0, c, 0, 0] < malignancy.scale_hu(np.float32(-700.0))


def test_the_patch_follows_an_off_centre_nodule() -> None:
    spacing, shape = (2.0, 0.8, 0.8), (30, 80, 80)
    centre_mm = (20.0, 22.0, 41.0)
    mask = _ellipsoid(shape, spacing, centre_mm, (4.0, 4.0, 4.0))
    hu = np.where(mask, 20.0, -850.0).astype(np.float32)
    patch = malignancy.nodule_patch(hu, mask, spacing)
    centroid, _ = _mask_centroid_and_volume(patch)
    np.testing.assert_allclose(centroid, CENTRE, atol=0.5)


def test_the_patch_refuses_bad_input() -> None:
    hu = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="empty"):
        malignancy.nodule_patch(hu, np.zeros_like(hu, bool), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        malignancy.nodule_patch(hu, np.ones_like(hu, bool), (1, 0, 1))
    with pytest.raises(ValueError, match="shape"):
        malignancy.nodule_patch(hu, np.ones((4, 8, 7), bool), (1, 1, 1))


def _spiculated_and_smooth(spacing=(1.25, 0.7, 0.7), shape=(48, 96, 96), seed=0):
    """A volume of parenchyma with a large dense spiculated nodule (label 1, left) and a small
    smooth one (label 2, right)."""
    rng = np.random.default_rng(seed)
    extent = [n * s for n, s in zip(shape, spacing, strict=True)]
    big_c = (extent[0] / 2, extent[1] / 2, 18.0)
    small_c = (extent[0] / 2, extent[1] / 2, extent[2] - 16.0)
    big = _ellipsoid(shape, spacing, big_c, (9.0, 10.0, 10.0))
    grids = np.meshgrid(
        *[(np.arange(n) + 0.5) * s - c for n, s, c in zip(shape, spacing, big_c, strict=True)],
        indexing="ij",
    )
    for _ in range(14):  # spicules: thin rays out to 16 mm
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        along = sum(g * di for g, di in zip(grids, d, strict=True))
        off = np.sqrt(np.maximum(sum(g**2 for g in grids) - along**2, 0.0))
        big |= (along > 0) & (along < 16.0) & (off < 0.8)
    small = _ellipsoid(shape, spacing, small_c, (3.0, 3.0, 3.0))
    hu = np.full(shape, -850.0, np.float32)
    hu[big] = 60.0
    hu[small] = -20.0
    hu += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    labels[big] = 1
    labels[small] = 2
    return hu, labels, spacing


def test_score_lesions_gives_one_score_per_label_in_label_order() -> None:
    torch.manual_seed(0)
    net = networks.build("malignancy").eval()
    hu, labels, spacing = _spiculated_and_smooth()
    scores = malignancy.score_lesions(hu, spacing, labels, net)
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    swapped = np.where(labels == 1, 7, np.where(labels == 2, 3, 0))  # small first now
    again = malignancy.score_lesions(hu, spacing, swapped, net)
    assert again == pytest.approx(scores[::-1], abs=1e-6)
    assert malignancy.score_lesions(hu, spacing, np.zeros_like(labels), net) == []
    with pytest.raises(ValueError, match="differ"):
        malignancy.score_lesions(hu, spacing, labels[:, :, :-1], net)
    with pytest.raises(ValueError, match="negative"):
        malignancy.score_lesions(hu, spacing, np.where(labels == 2, -2, labels), net)


def _whole_volume_patch(hu: np.ndarray, mask: np.ndarray, spacing) -> np.ndarray:
    """The patch's definition, sampled from the whole volume (as the code did before it read
    only the lesion's neighbourhood)."""
    sp = np.asarray(spacing, dtype=np.float64)
    idx = np.argwhere(mask)
    centre_mm = (idx.mean(axis=0) + 0.5) * sp
    offsets = (np.arange(malignancy.PATCH) - CENTRE) * malignancy.PATCH_SPACING_MM
    axes_mm = [centre_mm[a] + offsets for a in range(3)]
    coords = np.stack(np.meshgrid(*[axes_mm[a] / sp[a] - 0.5 for a in range(3)], indexing="ij"))
    image = ndimage.map_coordinates(hu, coords, order=1, mode="constant", cval=malignancy.AIR_HU)
    label = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant")
    z_lo, z_hi = idx[:, 0].min() * sp[0], (idx[:, 0].max() + 1) * sp[0]
    outside = (axes_mm[0] < z_lo) | (axes_mm[0] > z_hi)
    image[outside] = malignancy.AIR_HU
    label[outside] = 0.0
    return np.stack([malignancy.scale_hu(image), np.clip(label, 0.0, 1.0)]).astype(np.float32)


def test_the_patch_from_the_lesions_neighbourhood_is_the_whole_volumes() -> None:
    # Lesions inside, at a corner (the patch reaches past three faces) and on a face.
    rng = np.random.default_rng(5)
    spacing = (1.25, 0.7, 0.8)
    shape = (40, 90, 80)
    hu = rng.normal(-500.0, 400.0, size=shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[18:23, 40:47, 30:36] = 1
    labels[0:3, 0:4, 0:5] = 2
    labels[20:24, 85:90, 38:42] = 3
    labels[10:12, 60:62, 70:72] = 5  # label 4 unused
    for value in (1, 2, 3, 5):
        expected = _whole_volume_patch(hu, labels == value, spacing)
        np.testing.assert_array_equal(
            malignancy.nodule_patch(hu, labels == value, spacing), expected
        )
    torch.manual_seed(2)
    net = networks.build("malignancy").eval()
    reference = malignancy.predict_patches(
        net, np.stack([_whole_volume_patch(hu, labels == v, spacing) for v in (1, 2, 3, 5)])
    )
    assert malignancy.score_lesions(hu, spacing, labels, net) == [float(r) for r in reference]
    # A boolean mask is one lesion, label 1 (a batch of one: the last bits may differ).
    assert malignancy.score_lesions(hu, spacing, labels == 1, net) == pytest.approx(
        [float(reference[0])], abs=1e-6
    )


def test_score_lesions_is_invariant_to_a_left_right_mirror() -> None:
    torch.manual_seed(1)  # an untrained network is not symmetric itself: the flips make it so
    net = networks.build("malignancy").eval()
    hu, labels, spacing = _spiculated_and_smooth(seed=3)
    scores = malignancy.score_lesions(hu, spacing, labels, net)
    mirrored = malignancy.score_lesions(hu[:, :, ::-1], spacing, labels[:, :, ::-1], net)
    assert mirrored == pytest.approx(scores, abs=1e-4)
    # Without the averaging over flips, the mirror does change an untrained network's output.
    one = malignancy.nodule_patch(hu, labels == 1, spacing)[None]
    with torch.no_grad():
        plain = float(net(torch.from_numpy(one)))
        flipped = float(net(torch.from_numpy(one).flip(4)))
    assert abs(plain - flipped) > 1e-4


def test_the_trainer_never_trains_or_chooses_on_a_test_patient() -> None:
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 1013)]
    rows = [NoduleRow(pid, k, 8.0, {"malignancy": 1 + k}) for pid in ids for k in (1, 3)]
    parts = training.partition(rows)
    assert parts["train"] and parts["validation"] and set(parts) == {"train", "validation"}
    assert {splits.split_of(r.patient_id) for r in parts["train"]} == {"train"}
    assert {splits.split_of(r.patient_id) for r in parts["validation"]} == {"validation"}
    assert any(splits.split_of(pid) == "test" for pid in ids)
    train_ids = {r.patient_id for r in parts["train"]}
    assert not train_ids & {r.patient_id for r in parts["validation"]}
    assert len(train_ids) == len(splits.lidc_split("train"))


def test_labels_of_ratings() -> None:
    assert [training.label_of(r) for r in (1, 2, 3, 4, 5, None)] == [0, 0, None, 1, 1, None]


def test_auc_and_patient_bootstrap() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    assert training.auc(np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7]), y) == 1.0
    assert training.auc(np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3]), y) == 0.0
    assert training.auc(np.array([0.5] * 6), y) == 0.5
    scores = np.array([0.1, 0.6, 0.4, 0.9, 0.3, 0.7])
    point, lo, hi = training.patient_bootstrap_auc(scores, y, ["a", "a", "b", "b", "c", "c"])
    assert point == pytest.approx(training.auc(scores, y)) and lo <= point <= hi


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory) -> Path:
    """Synthetic crops under real split IDs (2 patients per part), a 2-step training run."""
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
        out.writerow(["patient_id", "nodule_id", "diameter_mm", "Malignancy_value"])
        for pid in pids:
            for nodule, (radius, hu, rating) in enumerate(
                ((9.0, 60.0, 5), (3.0, -50.0, 1), (5.0, 0.0, 3)), start=1
            ):
                write_phantom_crop(data, pid, nodule, radius, hu_value=hu)
                out.writerow([pid, nodule, 2 * radius, rating])
    written = training.train_and_register(data, root=root, max_steps=2, progress=False)
    assert all(p.is_file() for p in written)
    return root


def test_a_two_step_run_writes_a_loadable_registry_entry(tiny_registry) -> None:
    model = registry.load(registry.DEFAULT_REFS["malignancy"], tiny_registry)
    registry.check(registry.DEFAULT_REFS["malignancy"], tiny_registry)
    card = model.card
    assert model.task == "malignancy" and card["training"]["steps"] == 2
    assert card["training"]["train"] == {"nodules": 4, "patients": 2, "rated_4_5": 2}
    assert card["metrics"]["test"]["nodules"] == 4  # the rating-3 nodules are not in the AUC
    assert card["metrics"]["test"]["mean_score_by_rating"]["3"]["n"] == 2
    assert 0.0 <= card["threshold"] <= 1.0
    md = (tiny_registry / model.name / model.version / "card.md").read_text()
    assert "not pathology" in md.lower() and "10.7937/K9/TCIA.2015.LO9QL9SX" in md
    hu, labels, spacing = _spiculated_and_smooth()
    assert len(malignancy.score_lesions(hu, spacing, labels, model)) == 2


def test_the_shipped_model_loads_and_its_card_tells_the_truth() -> None:
    ref = registry.DEFAULT_REFS["malignancy"]
    assert ref == "radai-nodule-malignancy-cnn@1.0.0"
    registry.check(ref)
    model = registry.load(ref)
    folder = registry.MODELS_DIR / model.name / model.version
    card = json.loads((folder / "card.json").read_text())
    assert registry.sha256_file(folder / "weights.pt") == card["sha256"]
    assert "NOT FOR CLINICAL USE" in card["intended_use"]
    assert "not pathology" in card["predicts"].lower()
    assert "CC BY 3.0" in card["training"]["licence"] and "Armato" in card["training"]["citation"]
    for part in ("validation", "test"):
        fig = card["metrics"][part]
        lo, hi = fig["auc_95ci_bootstrap_patients"]
        assert 0.5 < lo <= fig["auc"] <= hi <= 1.0
    assert (folder / "weights.pt").stat().st_size < 2 * 1024 * 1024


@pytest.mark.parametrize("spacing", [(1.25, 0.7, 0.7), (2.5, 0.8, 0.8)])
def test_the_shipped_model_ranks_a_large_spiculated_nodule_above_a_small_smooth_one(
    spacing,
) -> None:
    model = registry.load(registry.DEFAULT_REFS["malignancy"])
    hu, labels, spacing = _spiculated_and_smooth(spacing=spacing)
    big, small = malignancy.score_lesions(hu, spacing, labels, model)
    assert big > small + 0.5, (big, small)
