"""Training learns, repeats exactly for a seed, and the registry keeps what it wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ml.data import synth
from ml.runtime import candidates, networks, registry
from ml.training import segmenter as training
from tests.kit.paths import SAMPLES

DATA = SAMPLES


@pytest.fixture(scope="module")
def background():
    hu, mask, spacing = synth.load_nrrd_case(DATA / "lung1_image.nrrd", DATA / "lung1_label.nrrd")
    return synth.make_background("lung1", hu, mask, spacing, seed=0)[0]


def _held_out_loss(net, batch) -> float:
    from monai.losses import DiceCELoss

    x, y, _ = batch
    with torch.no_grad():
        return float(DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(net(x), y[:, None]))


def test_a_short_training_run_learns(background) -> None:
    held_out = training.SlabSampler([background], seed=999).batch(8)
    config = training.TrainingConfig("segment", steps=30, batch=8, learning_rate=3e-3, seed=1)
    torch.manual_seed(config.seed)
    untrained = networks.build("segment").eval()
    before = _held_out_loss(untrained, held_out)
    net, history = training.train(config, [background], progress=False)
    after = _held_out_loss(net, held_out)
    assert history[-1]["step"] == 30 and len(history) == 2
    assert after < 0.8 * before, (before, after)


def test_training_repeats_exactly_for_a_seed(background) -> None:
    config = training.TrainingConfig("segment", steps=2, batch=2, seed=5)
    a, _ = training.train(config, [background], progress=False)
    b, _ = training.train(config, [background], progress=False)
    c, _ = training.train(
        training.TrainingConfig("segment", steps=2, batch=2, seed=6), [background], progress=False
    )
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_the_sampler_labels_lesion_pixels_and_positive_slices(background) -> None:
    sampler = training.SlabSampler([background], seed=3)
    items = [sampler.sample() for _ in range(40)]
    for image, label, positive in items:
        assert image.shape == (networks.CONTEXT, training.PATCH, training.PATCH)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert positive == float((label == 2).any())
    share = np.mean([i[2] for i in items])
    assert 0.3 < share < 0.9  # both kinds of patch are seen
    whole = training.SlabSampler([background], seed=3, patch=None).sample()
    assert whole[0].shape == (networks.CONTEXT, networks.GRID, networks.GRID)


def test_registry_round_trip_and_refusal_of_changed_weights(tmp_path) -> None:
    torch.manual_seed(0)
    net = networks.build("screen").eval()
    registry.save(net, name="t-screen", version="0.0.1", task="screen", card={}, root=tmp_path)
    loaded = registry.load("t-screen@0.0.1", tmp_path)
    x = torch.rand(2, candidates.CHANNELS, candidates.PATCH, candidates.PATCH)
    with torch.no_grad():
        # Weights are stored as float16: outputs agree to float16 precision.
        assert torch.allclose(net(x), loaded.net(x), atol=2e-2)
    card = json.loads((tmp_path / "t-screen/0.0.1/card.json").read_text())
    assert card["sha256"] == registry.sha256_file(tmp_path / "t-screen/0.0.1/weights.pt")
    registry.check("t-screen@0.0.1", tmp_path)
    weights = tmp_path / "t-screen/0.0.1/weights.pt"
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(registry.ModelError, match="sha256"):
        registry.load("t-screen@0.0.1", tmp_path)
    with pytest.raises(registry.ModelError, match="sha256"):
        registry.check("t-screen@0.0.1", tmp_path)
    with pytest.raises(registry.ModelError, match="no model"):
        registry.load("t-screen@9.9.9", tmp_path)
    with pytest.raises(registry.ModelError, match="NAME@VERSION"):
        registry.load("t-screen", tmp_path)


def test_an_external_torchscript_model_is_loaded_with_its_card(tmp_path) -> None:
    torch.manual_seed(0)
    net = networks.build("segment").eval()
    example = torch.rand(1, networks.CONTEXT, networks.GRID, networks.GRID)
    path = tmp_path / "site-unet.pt"
    torch.jit.trace(net, example).save(str(path))
    with pytest.raises(registry.ModelError, match="card"):
        registry.load(f"torchscript:{path}")
    card = {"name": "site-unet", "version": "7", "task": "segment"}
    path.with_suffix(".json").write_text(json.dumps(card))
    loaded = registry.load(f"torchscript:{path}")
    assert (loaded.name, loaded.version, loaded.task) == ("site-unet", "7", "segment")
    with torch.no_grad():
        assert torch.allclose(loaded.net(example), net(example), atol=1e-5)
    path.with_suffix(".json").write_text(json.dumps({**card, "task": "detect"}))
    with pytest.raises(registry.ModelError, match="task"):
        registry.load(f"torchscript:{path}")
