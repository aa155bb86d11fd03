"""The screening CNN's inputs, its training set made from the segmenter's calls, a short run
that learns, the operating threshold, and registering it beside its segmenter."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ml.data import synth
from ml.runtime import candidates, networks, registry
from ml.training import screener as screen_training
from tests.kit.paths import SAMPLES

DATA = SAMPLES


def test_centres_are_on_the_largest_slice_of_each_component() -> None:
    labels = np.zeros((4, 30, 30), dtype=np.int32)
    labels[1, 10:12, 10:12] = 1
    labels[2, 8:15, 9:14] = 1  # larger here
    labels[3, 20:23, 2:5] = 2
    assert candidates.centres(labels, 2) == [(2, 11, 11), (3, 21, 3)]


def test_patches_carry_context_wide_view_and_outline() -> None:
    scaled = np.zeros((3, 256, 256), dtype=np.float32)
    scaled[1] = 0.5
    scaled[1, 100:104, 100:104] = 1.0
    calls = np.zeros(scaled.shape, dtype=bool)
    calls[1, 100:104, 100:104] = True
    x = candidates.patches(scaled, calls, [(1, 102, 102), (0, 2, 250)])
    assert x.shape == (2, candidates.CHANNELS, candidates.PATCH, candidates.PATCH)
    c = candidates.PATCH // 2
    near = x[0]
    assert near[1, c, c] == 1.0 and near[0, c, c] == 0.0 and near[2, c, c] == 0.0
    assert near[-1].sum() == 16 and near[-1, c, c] == 1.0
    # the wide view pools 2 x 2 blocks over 128 px: the 4 x 4 nodule is 2 x 2 there
    assert (near[3] > 0.9).sum() == 4 and near[3, 0, 0] == pytest.approx(0.5)
    edge = x[1]  # near the border: padded with air (0) beyond the volume; first slice repeated
    assert edge[0, c, c] == edge[1, c, c] == 0.0 and edge[1, c, -1] == 0.0
    maps = np.ones((2, candidates.PATCH, candidates.PATCH), dtype=np.float32)
    pasted = candidates.paste(maps, [(1, 102, 102), (0, 2, 250)], scaled.shape)
    assert pasted[1].sum() == candidates.PATCH**2 and pasted[2].sum() == 0
    assert pasted[0].sum() == (2 + c) * (256 - 250 + c)  # clipped at the volume's edges


def _padded_patches(scaled: np.ndarray, calls: np.ndarray, at) -> np.ndarray:
    """The patches' definition by padding the whole volume (as the code did before it cut each
    window out on its own)."""
    half, patch, r = candidates.HALF, candidates.PATCH, candidates.WIDE // 2
    out = np.zeros((len(at), candidates.CHANNELS, patch, patch), dtype=np.float32)
    vol = np.pad(scaled, ((half, half), (0, 0), (0, 0)), mode="edge")
    vol = np.pad(vol, ((0, 0), (r, r), (r, r)), mode="constant")
    mask = np.pad(calls.astype(np.float32), ((0, 0), (r, r), (r, r)), mode="constant")
    p, pool = patch // 2, candidates.WIDE // patch
    for j, (z, y, x) in enumerate(at):
        yc, xc = y + r, x + r
        out[j, : 2 * half + 1] = vol[z : z + 2 * half + 1, yc - p : yc + p, xc - p : xc + p]
        wide = vol[z + half, yc - r : yc + r, xc - r : xc + r]
        out[j, 2 * half + 1] = wide.reshape(patch, pool, patch, pool).mean(axis=(1, 3))
        out[j, 2 * half + 2] = mask[z, yc - p : yc + p, xc - p : xc + p]
    return out


def test_patches_cut_out_one_by_one_equal_the_padded_volumes() -> None:
    rng = np.random.default_rng(4)
    scaled = rng.random((9, 256, 256), dtype=np.float32)
    calls = rng.random(scaled.shape) < 0.1
    # inside, at each corner, on each side, on the first and last slices
    at = [(4, 128, 128), (0, 0, 0), (8, 255, 255), (0, 255, 3), (8, 2, 254), (3, 60, 255)]
    at += [(5, 0, 128), (1, 255, 100), (7, 31, 31), (2, 224, 32)]
    np.testing.assert_array_equal(
        candidates.patches(scaled, calls, at), _padded_patches(scaled, calls, at)
    )


def test_augmentation_moves_pixels_but_keeps_channels_in_place(monkeypatch) -> None:
    monkeypatch.setattr(screen_training, "AFFINE", False)
    monkeypatch.setattr(screen_training, "INTENSITY_SCALE", (1.0, 1.0))
    monkeypatch.setattr(screen_training, "INTENSITY_SHIFT", 0.0)
    monkeypatch.setattr(screen_training, "NOISE", 0.0)
    n, p = 200, candidates.PATCH
    x = torch.zeros(n, candidates.CHANNELS, p, p)
    for c in range(candidates.CHANNELS - 1):
        x[:, c] = 0.1 * (c + 1)  # each image channel its own level
    x[:, -1, 5:10, 40:50] = 1.0  # the outline, up and to the right
    out = screen_training._augment(x, np.random.default_rng(0))
    for c in range(candidates.CHANNELS - 1):
        assert torch.allclose(out[:, c], x[:, c])  # no channel swapped with another
    outline = out[:, -1]
    assert torch.equal(outline.sum(dim=(1, 2)), x[:, -1].sum(dim=(1, 2)))
    right = outline[:, :, p // 2 :].sum(dim=(1, 2)) > 0
    top = outline[:, : p // 2].sum(dim=(1, 2)) > 0
    assert 0.3 < 1 - right.float().mean() < 0.7  # left-right flips about half the time
    assert 0.1 < 1 - top.float().mean() < 0.5  # up-down flips less often


@pytest.fixture(scope="module")
def segmenter():
    return registry.load(registry.DEFAULT_REFS["segment"])


@pytest.fixture(scope="module")
def background():
    hu, mask, spacing = synth.load_nrrd_case(DATA / "lung2_image.nrrd", DATA / "lung2_label.nrrd")
    return synth.make_background("lung2", hu, mask, spacing, seed=1)[0]


@pytest.fixture(scope="module")
def candidate_set(segmenter, background):
    return screen_training.candidate_set(segmenter, [background], 10, seed_p=0.05)


def test_candidates_are_labelled_by_overlap_with_the_synthetic_truth(segmenter, background):
    hu, truth, record = synth.sample_study(background, 11, n_lesions=2, diameter_mm=25.0)
    x, y, kind = screen_training.study_candidates(segmenter, hu, truth, background.spacing, 0.05)
    assert len(record.lesions) == 2 and len(x) == len(y) == len(kind)
    assert (y == 1).sum() >= 2  # each 25 mm lesion is a call or added as a missed positive
    assert ((kind == 1) <= (y == 1)).all()  # missed lesions are positives only
    empty = np.zeros_like(truth)
    _, y0, kind0 = screen_training.study_candidates(
        segmenter, background.hu, empty, background.spacing, 0.05
    )
    assert not y0.any() and not kind0.any()  # no lesion: every call is a false positive


def test_a_short_screener_training_run_learns(candidate_set) -> None:
    s = candidate_set.summary()
    assert s["studies"] == 10 and s["false_positive_calls"] > 0
    assert s["lesion_calls"] + s["missed_lesions_added"] > 0
    train = ~candidate_set.validation
    x, y = candidate_set.x[train], candidate_set.y[train].astype(np.float32)
    loss = torch.nn.BCEWithLogitsLoss()

    def mean_loss(net) -> float:
        with torch.no_grad():
            p = net(torch.from_numpy(x.astype(np.float32)))[:, 0]
            return float(loss(p, torch.from_numpy(y)))

    torch.manual_seed(screen_training.SEED)
    before = mean_loss(networks.build("screen").eval())
    net, history = screen_training.train(candidate_set, steps=60, progress=False)
    assert history[-1]["step"] == 60
    assert mean_loss(net) < 0.7 * before, (before, mean_loss(net))


class _ByOutline(torch.nn.Module):
    """Scores a candidate by the size of its outline: known scores for the threshold test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, -1].sum(dim=(1, 2)) - 20.0)[:, None]


def test_the_operating_threshold_keeps_95_percent_of_lesion_calls() -> None:
    rng = np.random.default_rng(0)
    n = 200
    y = (np.arange(n) % 2).astype(np.uint8)
    area = np.where(y == 1, rng.integers(15, 60, n), rng.integers(0, 30, n))
    x = np.zeros((n, candidates.CHANNELS, candidates.PATCH, candidates.PATCH), dtype=np.float16)
    for i, a in enumerate(area):
        x[i, -1].flat[:a] = 1
    data = screen_training.CandidateSet(
        x=x,
        y=y,
        kind=np.zeros(n, dtype=np.uint8),
        study=np.arange(n),
        validation=np.ones(n, dtype=bool),
    )
    point = screen_training.operating_point(_ByOutline(), data)
    p = screen_training.predict(_ByOutline(), x)
    assert np.allclose(p, 1 / (1 + np.exp(-(area - 20.0))), atol=1e-6)
    kept = p >= point["threshold"]
    assert kept[y == 1].mean() >= 0.95
    assert point["validation_lesion_calls_kept"] == pytest.approx(kept[y == 1].mean(), abs=1e-3)
    assert point["validation_false_positives_kept"] < 1.0 and point["threshold"] <= 0.5


@pytest.mark.slow
def test_the_screener_is_registered_beside_its_segmenter(tmp_path) -> None:
    seg_dir = registry.MODELS_DIR / registry.SEGMENTER / registry.SEGMENTER_VERSION
    target = tmp_path / registry.SEGMENTER / registry.SEGMENTER_VERSION
    target.mkdir(parents=True)
    for f in seg_dir.iterdir():
        if f.suffix in (".pt", ".json"):
            shutil.copy(f, target / f.name)
    written = screen_training.train_and_register(
        DATA, root=tmp_path, studies=4, steps=3, folds=True, progress=False
    )
    assert sorted(p.name for p in written) == [
        "fold-holdout-lung1.pt",
        "fold-holdout-lung2.pt",
        "weights.pt",
    ]
    model = registry.load(registry.DEFAULT_REFS["screen"], tmp_path)
    assert model.task == "screen" and 0 < model.card["operating_point"]["threshold"] <= 0.5
    t = model.card["training"]
    assert t["segmenter"] == registry.DEFAULT_REFS["segment"] and t["candidates"]["studies"] == 4
    fold = model.card["folds"]["holdout-lung1"]
    assert fold["cases"] == ["lung2"] and fold["segmenter_weights"] == "fold-holdout-lung1.pt"
