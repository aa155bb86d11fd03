"""Tests for ml.measure: pyradiomics 3.0.1 shape features on the expert masks of the sample CTs,
and geometric sanity on synthetic spheres and cubes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import pdist

from ml.image.measure import RegionMeasurement, max_pairwise_distance, measure_regions
from tests.kit.paths import SAMPLES

SAMPLES = SAMPLES

# pyradiomics 3.0.1, "original" image type, default settings, no resampling, label 1.
PYRADIOMICS_REFERENCE = {
    "lung1": {
        "voxel_volume_mm3": 1361.20,
        "mesh_volume_mm3": 1330.98,
        "max_3d_diameter_mm": 21.34,
        "max_2d_axial_diameter_mm": 16.63,
        "major_axis_mm": 17.37,
        "surface_area_mm2": 782.24,
        "sphericity": 0.748,
    },
    "lung2": {
        "voxel_volume_mm3": 48434.11,
        "mesh_volume_mm3": 48292.52,
        "max_3d_diameter_mm": 68.98,
        "max_2d_axial_diameter_mm": 55.80,
        "major_axis_mm": 55.77,
        "surface_area_mm2": 9537.54,
        "sphericity": 0.672,
    },
}


def _load(case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image = sitk.ReadImage(str(SAMPLES / f"{case}_image.nrrd"))
    label = sitk.ReadImage(str(SAMPLES / f"{case}_label.nrrd"))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label), spacing


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    shape = tuple(int(math.ceil(3 * radius_mm / s)) + 3 for s in spacing)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g - (n - 1) / 2) * s) ** 2 for g, n, s in zip(grids, shape, spacing, strict=True))
    return (d2 <= radius_mm**2).astype(np.uint8)


@pytest.fixture(scope="module", params=["lung1", "lung2"])
def expert(request: pytest.FixtureRequest) -> tuple[str, RegionMeasurement, np.ndarray]:
    image, label, spacing = _load(request.param)
    (m,) = measure_regions(label, spacing, image)
    return request.param, m, image[label == 1]


@pytest.mark.parametrize("feature", sorted(PYRADIOMICS_REFERENCE["lung1"]))
def test_matches_pyradiomics_within_one_percent(expert, feature: str) -> None:
    case, m, _ = expert
    reference = PYRADIOMICS_REFERENCE[case][feature]
    assert getattr(m, feature) == pytest.approx(reference, rel=0.01), (case, feature)


def test_expert_mask_intensity_and_geometry(expert) -> None:
    case, m, hu = expert
    assert m.label == 1
    assert m.voxel_count == hu.size
    assert m.mean_hu == pytest.approx(float(hu.mean()))
    assert (m.min_hu, m.max_hu) == (float(hu.min()), float(hu.max()))
    assert m.major_axis_mm >= m.minor_axis_mm >= m.least_axis_mm > 0
    z0, y0, x0, z1, y1, x1 = m.bbox
    assert z0 <= m.centroid_zyx[0] < z1 and y0 <= m.centroid_zyx[1] < y1
    assert x0 <= m.centroid_zyx[2] < x1
    # The largest axial diameter cannot exceed the 3-D one.
    assert m.max_2d_axial_diameter_mm <= m.max_3d_diameter_mm


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (2.5, 0.8, 0.8)])
def test_voxelised_sphere(spacing: tuple[float, float, float]) -> None:
    r = 10.0
    (m,) = measure_regions(_ball(r, spacing), spacing)
    true_volume = 4.0 / 3.0 * math.pi * r**3
    assert m.voxel_volume_mm3 == pytest.approx(true_volume, rel=0.03)
    assert m.mesh_volume_mm3 == pytest.approx(true_volume, rel=0.04)
    # Mesh vertices sit up to half a voxel outside the sphere.
    assert 2 * r - 0.5 <= m.max_3d_diameter_mm <= 2 * r + max(spacing)
    assert 2 * r - 1.0 <= m.max_2d_axial_diameter_mm <= 2 * r + max(spacing)
    assert m.sphericity > 0.85
    # A solid ball has variance r²/5 along every axis.
    for axis in (m.major_axis_mm, m.minor_axis_mm, m.least_axis_mm):
        assert axis == pytest.approx(4 * r / math.sqrt(5), rel=0.05)
    assert m.mean_hu is None and m.min_hu is None and m.max_hu is None


def test_cube() -> None:
    labels = np.zeros((14, 14, 14), dtype=np.int16)
    labels[2:12, 2:12, 2:12] = 7
    (m,) = measure_regions(labels, (1.0, 1.0, 1.0))
    assert m.label == 7 and m.voxel_count == 1000
    assert m.voxel_volume_mm3 == pytest.approx(1000.0)
    # Marching cubes bevels the edges and corners: a little less than the voxel volume.
    assert 950 < m.mesh_volume_mm3 < 1000
    assert 16.0 < m.max_3d_diameter_mm <= 10 * math.sqrt(3)
    assert 13.0 < m.max_2d_axial_diameter_mm <= 10 * math.sqrt(2)
    # Discrete uniform along each axis: variance (n² - 1) / 12.
    expected_axis = 4 * math.sqrt(99 / 12)
    assert m.major_axis_mm == pytest.approx(expected_axis, rel=1e-6)
    assert m.least_axis_mm == pytest.approx(expected_axis, rel=1e-6)
    assert m.sphericity < 0.9
    assert m.centroid_zyx == pytest.approx((6.5, 6.5, 6.5))
    assert m.bbox == (2, 2, 2, 12, 12, 12)


def test_several_labels_with_image_and_to_dict() -> None:
    labels = np.zeros((10, 20, 20), dtype=np.int32)
    labels[2:5, 2:6, 2:6] = 3
    labels[6:8, 10:15, 12:18] = 1
    image = np.full(labels.shape, -800, dtype=np.int16)
    image[labels == 3] = 40
    image[6:8, 10:15, 12:18] = np.arange(60).reshape(2, 5, 6)
    out = measure_regions(labels, (2.0, 0.5, 0.5), image)
    assert [m.label for m in out] == [1, 3]
    one, three = out
    assert one.voxel_count == 60 and one.voxel_volume_mm3 == pytest.approx(60 * 0.5)
    assert (one.min_hu, one.max_hu, one.mean_hu) == (0.0, 59.0, pytest.approx(29.5))
    assert three.mean_hu == 40.0
    assert three.bbox == (2, 2, 2, 5, 6, 6)
    d = three.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["bbox"] == [2, 2, 2, 5, 6, 6] and d["label"] == 3


def test_bool_mask_and_single_voxel() -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[2, 2, 2] = True
    (m,) = measure_regions(mask, (1.0, 1.0, 1.0))
    assert m.label == 1 and m.voxel_count == 1
    assert m.mesh_volume_mm3 > 0 and m.surface_area_mm2 > 0
    assert m.major_axis_mm == 0.0 and m.least_axis_mm == 0.0
    assert m.max_3d_diameter_mm > 0


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, bool])
def test_empty_labels_give_empty_list(dtype) -> None:
    assert measure_regions(np.zeros((4, 5, 6), dtype=dtype), (1.0, 1.0, 1.0)) == []


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        measure_regions(np.ones((5, 5), dtype=np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        measure_regions(np.ones((2, 5, 5), dtype=np.uint8), (1.0, 1.0))
    with pytest.raises(ValueError):
        measure_regions(np.ones((2, 5, 5), dtype=np.uint8), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        measure_regions(np.ones((2, 5, 5), dtype=np.uint8), (1, 1, 1), np.ones((2, 5, 4)))
    with pytest.raises(ValueError):
        measure_regions(np.ones((2, 5, 5), dtype=np.float32), (1.0, 1.0, 1.0))


def test_max_pairwise_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for dim in (2, 3):
        points = rng.normal(size=(500, dim)) * [3.0, 1.0, 0.5][:dim]
        assert max_pairwise_distance(points) == pytest.approx(pdist(points).max())
    # Degenerate sets where Qhull cannot build a hull.
    line = np.outer(np.arange(10.0), [1.0, 2.0, 2.0])
    assert max_pairwise_distance(line) == pytest.approx(27.0)
    square = np.array([[0, 0, 0], [0, 3, 0], [0, 0, 4], [0, 3, 4]], dtype=float)
    assert max_pairwise_distance(square) == pytest.approx(5.0)
    assert max_pairwise_distance(np.zeros((1, 3))) == 0.0
    assert max_pairwise_distance(np.zeros((4, 3))) == 0.0
