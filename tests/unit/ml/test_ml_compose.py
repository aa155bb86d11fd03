"""The nodule compositor (ml.data.compose) on phantoms: volume across grids and scales, placement
kinds, the blend rule, determinism and provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from ml.data.compose import (
    EDGE_MM,
    CompositeSample,
    PlacementError,
    PlacementIndex,
    attachment,
    blend,
    compose,
    nodule_on_grid,
    rotation_between,
    scale_for_volume,
)
from ml.data.nodules import NoduleCrop
from tests.kit.phantoms import phantom_background, phantom_crop

SPACINGS = [(2.5, 0.7, 0.7), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (5.0, 0.6, 0.6), (3.0, 0.8, 0.8)]
OFFSETS = np.random.default_rng(0).uniform(-0.5, 0.5, size=(6, 3))


@pytest.fixture(scope="module")
def crop():
    return phantom_crop(radii_mm=(7.0, 6.0, 6.0), shape=(10, 40, 40))


@pytest.fixture(scope="module")
def background():
    return phantom_background()


@pytest.fixture(scope="module")
def index(background):
    return PlacementIndex(background)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_resampling_keeps_physical_volume(crop, spacing):
    for offset in OFFSETS:
        _, fraction = nodule_on_grid(crop, spacing, offset_voxels=offset)
        volume = (fraction >= 0.5).sum() * np.prod(spacing)
        assert volume == pytest.approx(crop.volume_mm3, rel=0.10), (spacing, offset)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (5.0, 0.6, 0.6)])
def test_scale_two_gives_eight_times_the_volume(crop, spacing):
    for offset in OFFSETS[:3]:
        _, fraction = nodule_on_grid(crop, spacing, scale=2.0, offset_voxels=offset)
        volume = (fraction >= 0.5).sum() * np.prod(spacing)
        assert volume == pytest.approx(8.0 * crop.volume_mm3, rel=0.05)


def test_target_volume_sets_the_scale(crop):
    scale = scale_for_volume(crop, 2.0 * crop.volume_mm3)
    assert scale == pytest.approx(2.0 ** (1 / 3))
    with pytest.raises(ValueError):
        scale_for_volume(crop, 0.0)


def test_free_nodule_lies_inside_the_lung_away_from_its_border(background, index, crop):
    for seed in range(4):
        hu, labels, sample = compose(background, [crop], ["free"], seed, index=index)
        label = labels == 1
        assert label.any()
        assert not (label & ~index.lung).any()
        assert not (label & index.surface).any()
        nod = sample.nodules[0]
        assert nod.volume_mm3 == pytest.approx(label.sum() * np.prod(background.spacing))
        assert nod.volume_mm3 == pytest.approx(nod.nominal_volume_mm3, rel=0.15)


def test_pleural_nodule_touches_the_lung_border(background, index, crop):
    for seed in range(4):
        _, labels, sample = compose(background, [crop], ["pleural"], seed, index=index)
        label = labels == 1
        assert (label & index.surface).any()
        assert not (label & ~index.lung).any()
        assert sample.nodules[0].kind == "pleural"


def test_fissure_or_vessel_nodule_is_next_to_a_vessel(background, index, crop):
    _, labels, sample = compose(background, [crop], ["fissure_or_vessel"], 3, index=index)
    vessels = index.lung & (background.hu > 0)
    near = ndimage.binary_dilation(labels == 1, iterations=2)
    assert (near & vessels).any()


def test_blend_leaves_voxels_outside_the_soft_mask_untouched(background, index, crop):
    hu, labels, _ = compose(background, [crop], ["free"], 5, index=index)
    label = labels == 1
    changed = hu != background.hu
    assert changed.any()
    dist = ndimage.distance_transform_edt(~label, sampling=background.spacing)
    # Soft edge plus partial volume of one voxel: nothing further away is touched, in particular
    # not the crop's own chest wall, which lies 7-12 mm from the nodule in the crop.
    assert dist[changed].max() <= EDGE_MM + max(background.spacing) + 0.5
    # The nodule brightens what it covers and never darkens anything.
    assert (hu >= background.hu - 1e-3).all()


def test_blend_keeps_the_background_noise_and_the_denser_vessel():
    rng = np.random.default_rng(1)
    spacing = (1.0, 1.0, 1.0)
    noise = rng.normal(0.0, 20.0, size=(20, 20, 20)).astype(np.float32)
    bg = -850.0 + noise
    bg[:, 10, :] = 300.0 + noise[:, 10, :]  # a dense vessel through the nodule
    nodule = np.full(bg.shape, -850.0, dtype=np.float32)
    fraction = np.zeros(bg.shape, dtype=np.float32)
    fraction[6:14, 6:14, 6:14] = 1.0
    nodule[6:14, 6:14, 6:14] = 30.0
    out, w = blend(bg, nodule, fraction, np.ones(bg.shape, bool), spacing)
    assert np.array_equal(out[w == 0], bg[w == 0])
    core = np.zeros(bg.shape, bool)
    core[8:12, 7:9, 8:12] = True
    # Inside: the nodule's level with the background's own voxel-to-voxel noise.
    assert np.mean(out[core]) == pytest.approx(30.0, abs=15.0)
    assert np.corrcoef(out[core], noise[core])[0, 1] > 0.9
    # The vessel crossing the nodule keeps its density (the max rule).
    assert np.mean(out[8:12, 10, 8:12]) > 250.0
    # Outside the lung (rim) nothing changes.
    out2, w2 = blend(bg, nodule, fraction, np.zeros(bg.shape, bool), spacing)
    assert not w2.any() and np.array_equal(out2, bg)


def test_same_seed_same_study_other_seed_other_position(background, index, crop):
    a = compose(background, [crop, crop], ["free", "pleural"], 11, index=index)
    b = compose(background, [crop, crop], ["free", "pleural"], 11, index=PlacementIndex(background))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2] == b[2]
    c = compose(background, [crop, crop], ["free", "pleural"], 12, index=index)
    assert c[2].nodules[0].centre_voxel != a[2].nodules[0].centre_voxel
    assert set(np.unique(a[1])) == {0, 1, 2}


def test_provenance_round_trips_through_json(background, index, crop):
    _, _, sample = compose(background, [crop], ["pleural"], 2, scales=[1.3], index=index)
    text = sample.to_json()
    assert CompositeSample.from_json(text) == sample
    d = json.loads(text)["nodules"][0]
    assert d["patient_id"] == "LIDC-IDRI-9999" and d["nodule_id"] == 1
    assert d["scale"] == 1.3 and d["kind"] == "pleural" and d["background"] == "phantom"
    assert d["source_file"].endswith("LIDC-IDRI-9999_R_1.nii.gz")
    assert "CC BY 3.0" in d["licence"]
    assert d["seed"] == 2 and len(d["centre_mm"]) == 3


def test_attached_source_goes_only_to_the_pleura_face_first(background, index):
    crop = phantom_crop(radii_mm=(7.0, 6.0, 6.0), shape=(10, 40, 40), wall=False)
    # Chest wall under the nodule, touching the mask: the source nodule is juxtapleural.
    hu = crop.hu.copy()
    low = np.argwhere(crop.mask)[:, 1].max()
    hu[:, low + 1 :, :] = 50.0
    attached = NoduleCrop(crop.row, hu, crop.mask, crop.spacing, crop.source_file)
    direction = attachment(attached)
    assert direction is not None and direction[1] > 0.9  # towards +y, where the wall is
    assert attachment(crop) is None
    with pytest.raises(ValueError, match="pleural"):
        compose(background, [attached], ["free"], 0, index=index)
    _, labels, sample = compose(background, [attached], ["pleural"], 0, index=index)
    nod = sample.nodules[0]
    assert nod.source_attached
    turned = np.asarray(nod.rotation) @ direction
    assert turned @ index.towards_border(np.asarray(nod.centre_voxel)) > 0.99
    assert ((labels == 1) & index.surface).any()


def test_rotation_between_turns_a_into_b():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=3), rng.normal(size=3)
        r = rotation_between(a, b)
        assert np.allclose(r @ (a / np.linalg.norm(a)), b / np.linalg.norm(b))
        assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)
    r = rotation_between(np.array([0.0, 1.0, 0.0]), np.array([0.0, -1.0, 0.0]))
    assert np.allclose(r @ [0, 1, 0], [0, -1, 0]) and np.linalg.det(r) == pytest.approx(1.0)


def test_impossible_request_is_a_clear_error(background, index, crop):
    with pytest.raises(PlacementError):
        compose(background, [crop], ["free"], 0, scales=[6.0], index=index)
    with pytest.raises(ValueError):
        compose(background, [crop], ["fissure"], 0, index=index)
