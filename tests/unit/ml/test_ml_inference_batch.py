"""Inference in batches: the segmenter's slices and the screener's candidates give the same
result whatever the batch size, and the batch size follows the device (CPU small, CUDA large,
a setting wins). Runs on the CPU; nothing here needs a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.runtime import inference, registry
from tests.kit.phantoms import chest_ct_phantom


@pytest.fixture(scope="module")
def models():
    return (
        registry.load(registry.DEFAULT_REFS["segment"]),
        registry.load(registry.DEFAULT_REFS["screen"]),
    )


def test_batch_size_follows_the_device_and_a_setting_wins() -> None:
    assert inference.batch_for("cpu") == inference.CPU_BATCH
    assert inference.batch_for("cuda") == inference.CUDA_BATCH
    assert inference.batch_for(torch.device("cuda", 1)) == inference.CUDA_BATCH
    assert inference.CUDA_BATCH > inference.CPU_BATCH
    assert inference.batch_for("cuda", 5) == 5
    assert inference.batch_for("cpu", 200) == 200


def test_the_models_run_where_their_weights_are(models) -> None:
    segmenter, _ = models
    assert inference.device_of(segmenter.net) == torch.device("cpu")
    assert inference.device_of(torch.nn.ReLU()) == torch.device("cpu")  # no weights at all


def test_segmenting_in_batches_gives_the_masks_of_one_slice_at_a_time(models) -> None:
    segmenter, _ = models
    hu, _ = chest_ct_phantom(slices=21, size=256, spacing=(2.5, 1.4, 1.4))
    one_by_one = inference.segment(segmenter, hu, batch=1)
    assert one_by_one[0].sum() > 0 and one_by_one[1].any()  # lungs and a lesion call to compare
    for batch in (4, 64):  # uneven batches (21 = 5 x 4 + 1), and the whole volume in one
        lung, lesion = inference.segment(segmenter, hu, batch=batch)
        assert np.array_equal(lung, one_by_one[0]), batch
        assert np.array_equal(lesion, one_by_one[1]), batch


def test_screening_in_batches_gives_the_probabilities_and_map_of_one_batch(models) -> None:
    _, screener = models
    vol = np.full((12, 128, 128), -850.0, dtype=np.float32)
    labels = np.zeros(vol.shape, dtype=np.int32)
    yy, xx = np.mgrid[:128, :128]
    rng = np.random.default_rng(3)
    for k in range(1, 10):  # nine calls of different sizes and densities
        z, y, x = int(rng.integers(1, 11)), int(rng.integers(15, 113)), int(rng.integers(15, 113))
        disc = (yy - y) ** 2 + (xx - x) ** 2 < int(rng.integers(6, 40))
        vol[z, disc & (labels[z] == 0)] = float(rng.uniform(-300, 80))
        labels[z, disc & (labels[z] == 0)] = k
    n = int(labels.max())
    small_probs, small_map = inference.screen(screener, vol, labels, n, batch=1)  # 4 per pass
    big_probs, big_map = inference.screen(screener, vol, labels, n, batch=64)  # all in one
    assert small_probs.shape == (n,)
    np.testing.assert_allclose(small_probs, big_probs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(small_map, big_map)
