"""Real-data training (ml.training.real_samples, ml.training.real_training) on phantoms: labels
match the provenance, hard-negative patches hold no lesion, the cache is reused, folds leave their
anatomy out, and a few steps of both trainings write weights and a card that names the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ml.data import splits
from ml.runtime import registry
from ml.training import real_samples as rs
from ml.training import real_training
from ml.training.segmenter import device_of
from tests.kit.phantoms import phantom_background, phantom_crop

ANATOMIES = ["lung1", "cap001"]


def _sources() -> rs.Sources:
    train = [
        phantom_crop(
            radii_mm=(5.0, 4.0, 4.0), wall=False, seed=i, patient_id=f"LIDC-IDRI-90{i:02d}"
        )
        for i in range(3)
    ]
    validation = [phantom_crop(wall=False, seed=7, patient_id="LIDC-IDRI-9100")]
    return rs.Sources(
        anatomies={
            "lung1": phantom_background(seed=0, name="lung1"),
            "cap001": phantom_background(seed=1, name="cap001"),
        },
        crops={"train": train, "validation": validation},
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-studies")


@pytest.fixture(scope="module")
def sources():
    return _sources()


@pytest.fixture(scope="module")
def train_studies(sources, cache):
    return rs.studies(rs.plan(ANATOMIES, "train", 2), sources, cache)


@pytest.fixture(scope="module")
def validation_studies(sources, cache):
    return rs.studies(rs.plan(ANATOMIES, "validation", 1), sources, cache)


def test_grid_labels_match_the_provenance(train_studies, validation_studies) -> None:
    real = 0
    for s in [*train_studies, *validation_studies]:
        assert s.hu.shape[1:] == (256, 256) and s.hu.dtype == np.int16
        lesions, classes = np.asarray(s.lesions), np.asarray(s.classes)
        assert np.array_equal(classes == 2, lesions > 0)
        values = {int(v) for v in np.unique(lesions) if v}
        recorded = {les["label_value"]: les for les in s.meta["lesions"]}
        assert values == {v for v, les in recorded.items() if les["grid_voxels"] > 0}
        for v, les in recorded.items():
            assert int((lesions == v).sum()) == les["grid_voxels"]
            if les["origin"] == "LIDC-IDRI nodule":
                real += 1
                assert les["kind"] in ("free", "pleural", "fissure_or_vessel")
                want = "LIDC-IDRI-91" if s.split == "validation" else "LIDC-IDRI-90"
                assert les["patient_id"].startswith(want), (s.split, les["patient_id"])
                assert 0.85 <= les["scale"] <= 1.15
        # the lungs went through the same augmentation as the lesions: lesions sit in lung
        assert (classes == 1).sum() > 1000
    assert real >= 2  # the fixture's seeds insert real nodules (a test that could fail)


def test_hard_zones_and_hard_patches_never_hold_a_lesion(train_studies) -> None:
    for s in train_studies:
        assert not (np.asarray(s.hard)[np.asarray(s.classes) == 2]).any()
    sampler = rs.RealSlabSampler(train_studies, seed=1)
    hard = 0
    for _ in range(300):
        k, z, y0, x0, what = sampler.draw()
        if what == "hard":
            hard += 1
            patch = np.asarray(sampler.studies[k].classes)[
                z, y0 : y0 + rs.PATCH, x0 : x0 + rs.PATCH
            ]
            assert patch.shape == (rs.PATCH, rs.PATCH)
            assert not (patch == 2).any()
    assert hard > 50  # about HARD_P of the draws
    image, label, positive = sampler.sample()
    assert image.shape == (3, rs.PATCH, rs.PATCH) and 0.0 <= image.min() and image.max() <= 1.0
    assert positive == float((label == 2).any())


def test_pneumonia_anatomies_get_consolidation_zones_and_others_do_not(train_studies) -> None:
    hu = np.full((4, 64, 64), -850.0, dtype=np.float32)
    classes = np.ones(hu.shape, dtype=np.uint8)
    hu[:, 20:40, 20:40] = -200.0  # a consolidation inside the lung
    classes[:, 20:40, 20:40] = 0  # which the lung segmentation leaves out, as it does
    classes[:, 0, :] = classes[:, -1, :] = classes[:, :, 0] = classes[:, :, -1] = 0
    assert (rs.hard_zones(hu, classes, (2.0, 1.0, 1.0), True)[:, 25:35, 25:35] == 4).all()
    assert not (rs.hard_zones(hu, classes, (2.0, 1.0, 1.0), False) == 4).any()


def test_the_cache_is_reused_without_compositing_again(train_studies, cache) -> None:
    empty = rs.Sources(anatomies={}, crops={})  # any recompositing would fail
    again = rs.studies(rs.plan(ANATOMIES, "train", 2), empty, cache)
    for a, b in zip(train_studies, again, strict=True):
        assert a.meta == b.meta
        assert np.array_equal(a.hu, b.hu)


def test_test_patients_and_unknown_anatomies_are_refused() -> None:
    with pytest.raises(ValueError, match="train or validation"):
        rs.plan(ANATOMIES, "test", 1)
    with pytest.raises(ValueError, match="unknown anatomies"):
        rs.plan(["lung9"], "train", 1)


def test_folds_never_include_the_held_out_anatomy() -> None:
    runs = real_training._runs(["lung1", "lung2", "cap001"], folds=True)
    assert runs[0] == ("all", ["lung1", "lung2", "cap001"])
    assert len(runs) == 4
    for run, names in runs[1:]:
        held_out = run.removeprefix("holdout-")
        assert held_out not in names and len(names) == 2
        assert all(s.anatomy != held_out for s in rs.plan(names, "train", 3))
    # the same anatomy's studies are the same in every run: the cache is shared
    assert rs.plan(["lung2"], "train", 2) == [
        s for s in rs.plan(["lung1", "lung2"], "train", 2) if s.anatomy == "lung2"
    ]


def test_a_short_training_of_both_models_writes_weights_and_cards(tmp_path, cache) -> None:
    torch.set_num_threads(1)
    sources = _sources()
    written = real_training.train_segmenter(
        None, root=tmp_path, version="9.0.0", anatomies=ANATOMIES, steps=4, batch=2,
        folds=True, per_anatomy=2, validation_per_anatomy=1, validate_every=2, cache=cache,
        progress=False, sources=sources,
    )  # fmt: skip
    assert [p.name for p in written] == [
        "weights.pt",
        "fold-holdout-lung1.pt",
        "fold-holdout-cap001.pt",
    ]
    card = registry.read_card(registry.SEGMENTER, "9.0.0", tmp_path)
    text = json.dumps(card)
    for needed in ("CC BY 3.0", "COVID-CT-MD", "BSD-3", "Armato", "Afshar", splits.SPLIT_KEY):
        assert needed in text, needed
    data = card["training"]["data"]
    assert data["anatomies"] == ANATOMIES and data["split"]["test"] == "never read"
    assert data["training_studies"]["studies"] == 4
    assert card["training"]["chosen_step"] in (2, 4)
    assert [c["step"] for c in card["training"]["validation_curve"]] == [2, 4]
    assert card["folds"]["holdout-lung1"]["cases"] == ["cap001"]
    assert card["folds"]["holdout-cap001"]["cases"] == ["lung1"]
    registry.load(f"{registry.SEGMENTER}@9.0.0", tmp_path)

    written = real_training.train_screener(
        None, root=tmp_path, version="9.0.1", segmenter_version="9.0.0", anatomies=ANATOMIES,
        steps=3, per_anatomy=1, validation_per_anatomy=1, cache=cache, progress=False,
        sources=sources,
    )  # fmt: skip
    card = registry.read_card(registry.SCREENER, "9.0.1", tmp_path)
    assert "threshold" in card["operating_point"]
    assert card["training"]["segmenter"] == f"{registry.SEGMENTER}@9.0.0"
    assert card["training"]["candidates"]["hard_negatives_added"] > 0
    assert "COVID-CT-MD" in json.dumps(card["training"]["data"])
    registry.load(f"{registry.SCREENER}@9.0.1", tmp_path)


def test_the_loss_falls_on_phantom_studies(train_studies) -> None:
    from monai.losses import DiceCELoss

    from ml.runtime import networks
    from ml.training import segmenter as seg

    torch.set_num_threads(1)
    x, y, _ = rs.RealSlabSampler(train_studies, seed=99).batch(8)

    def held_out_loss(net) -> float:
        with torch.no_grad():
            return float(DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(net(x), y[:, None]))

    config = seg.TrainingConfig("segment", steps=20, batch=4, learning_rate=3e-3, seed=1)
    torch.manual_seed(config.seed)
    before = held_out_loss(networks.build("segment").eval())
    sampler = rs.RealSlabSampler(train_studies, seed=2)
    net, history = seg.train(config, [], sampler=sampler, progress=False)
    assert history[-1]["step"] == 20
    assert held_out_loss(net) < before
    assert sum(sampler.counts.values()) == 80 and sampler.counts["hard"] > 0


def test_cuda_asked_for_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        device_of("cuda")
    assert device_of("auto").type == "cpu"
    assert device_of(None).type == "cpu"
