"""The per-slice disk closing against the definition it implements: scipy's exact Euclidean
distance transforms (dilate to every pixel within the radius, erode to the pixels further than
the radius from the rest), through each of the two transforms the closing chooses between by
slice size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ml.image import morphology
from ml.image.morphology import RIM_TOLERANCE, close_2d

# Both distance transforms behind the closing: ITK's for every slice, scipy's for every slice.
TRANSFORMS = pytest.mark.parametrize("itk_min_pixels", [0, 10**9], ids=["itk", "scipy"])


def _closing_by_scipy(
    mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]
) -> np.ndarray:
    pad = int(np.ceil(radius_mm / min(spacing))) + 2
    padded = np.pad(mask, pad)
    # in float64; a pixel on the disk's rim (within the tolerance) is inside the disk
    limit = radius_mm**2 * (1 + RIM_TOLERANCE)
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) ** 2 <= limit
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) ** 2 > limit
    return closed[pad:-pad, pad:-pad]


def _blobs(seed: int, shape: tuple[int, int] = (90, 110)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 4.0)
    return noise > np.quantile(noise, 0.7)


@TRANSFORMS
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("radius_mm", "spacing"), [(5.0, (1.0, 1.0)), (6.0, (0.7, 0.62695)), (9.0, (1.25, 0.8))]
)
def test_closing_equals_the_exact_distance_transform_definition(
    seed: int,
    radius_mm: float,
    spacing: tuple[float, float],
    itk_min_pixels: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(morphology, "ITK_MIN_PIXELS", itk_min_pixels)
    mask = _blobs(seed)
    closed = close_2d(mask, radius_mm, spacing)
    assert closed.shape == mask.shape and closed.dtype == bool
    np.testing.assert_array_equal(closed, _closing_by_scipy(mask, radius_mm, spacing))
    assert (closed >= mask).all()
    assert closed.sum() > mask.sum()  # gaps between the blobs narrower than the disk are filled


@TRANSFORMS
def test_closing_is_mirror_symmetric_and_leaves_an_empty_slice_empty(
    itk_min_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(morphology, "ITK_MIN_PIXELS", itk_min_pixels)
    mask = _blobs(11)
    spacing = (0.8, 0.6)
    np.testing.assert_array_equal(
        close_2d(mask[:, ::-1], 7.0, spacing)[:, ::-1], close_2d(mask, 7.0, spacing)
    )
    empty = np.zeros((40, 50), dtype=bool)
    assert not close_2d(empty, 7.0, spacing).any()


@TRANSFORMS
def test_a_gap_wider_than_the_disk_stays_open(
    itk_min_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(morphology, "ITK_MIN_PIXELS", itk_min_pixels)
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:50, 5:25] = True
    mask[10:50, 55:75] = True  # 30 pixels apart: 30 mm at 1 mm pixels
    assert not close_2d(mask, 10.0, (1.0, 1.0))[30, 40]
    assert close_2d(mask, 20.0, (1.0, 1.0))[30, 40]


def test_compact_labelling_numbers_like_scipy_and_widens_when_it_must() -> None:
    rng = np.random.default_rng(8)
    mask = rng.random((6, 40, 50)) < 0.3
    labels, n = morphology.label_compact(mask)
    expected, m = ndimage.label(mask)
    assert labels.dtype == np.uint16 and n == m
    np.testing.assert_array_equal(labels, expected)
    # More components than uint16 can number: every other voxel of every other slice, alone.
    many = np.zeros((5, 300, 300), dtype=bool)
    many[::2, ::2, ::2] = True
    labels, n = morphology.label_compact(many)
    assert n == 3 * 150 * 150 and labels.dtype == np.int32 and labels.max() == n
