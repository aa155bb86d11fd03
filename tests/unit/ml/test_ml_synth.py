"""Semi-synthetic data: the real tumour is gone, drawn lesions are labelled truthfully."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.data import synth
from tests.kit.paths import SAMPLES

DATA = SAMPLES


@pytest.fixture(scope="module")
def lung1():
    hu, mask, spacing = synth.load_nrrd_case(DATA / "lung1_image.nrrd", DATA / "lung1_label.nrrd")
    return synth.make_background("lung1", hu, mask, spacing, seed=0)


def test_working_grid_halves_the_pixels_and_keeps_the_field_of_view(lung1) -> None:
    background, real = lung1
    assert background.hu.shape == (48, 256, 256) == real.hu.shape
    assert background.spacing[1] == pytest.approx(2 * 0.5703, abs=1e-3)
    assert real.tumour.any() and background.tumour.sum() == real.tumour.sum()


def test_removing_the_tumour_leaves_lung_density_where_it_was(lung1) -> None:
    background, real = lung1
    region = real.tumour
    assert real.hu[region].mean() > -300  # the real nodule is soft tissue
    assert background.hu[region].mean() < -600  # now aerated lung
    # Away from the tumour (beyond its margin and the soft seam) nothing changed.
    zs = np.nonzero(region.any(axis=(1, 2)))[0]
    far = np.ones(region.shape, dtype=bool)
    far[max(0, zs[0] - 6) : zs[-1] + 7] = False
    assert np.array_equal(background.hu[far], real.hu[far])
    assert background.lung[region].mean() > 0.9  # the filled region is lung now


def test_drawn_lesions_are_labelled_inside_the_lung_and_brighten_it(lung1) -> None:
    background, _ = lung1
    hu, labels, record = synth.sample_study(background, seed=11, n_lesions=3)
    assert record.synthetic and record.background == "lung1"
    assert 1 <= len(record.lesions) <= 3
    assert set(np.unique(labels)) == set(range(len(record.lesions) + 1))
    assert background.lung[labels > 0].all()
    assert (hu[labels > 0] - background.hu[labels > 0]).mean() > 100
    outside = ~np.pad(background.lung, 1)[1:-1, 1:-1, 1:-1]
    outside &= ~np.roll(background.lung, 1, axis=1) & ~np.roll(background.lung, -1, axis=1)
    outside &= ~np.roll(background.lung, 1, axis=2) & ~np.roll(background.lung, -1, axis=2)
    outside &= ~np.roll(background.lung, 1, axis=0) & ~np.roll(background.lung, -1, axis=0)
    assert np.array_equal(hu[outside], background.hu[outside])  # nothing drawn outside the lung


def test_a_round_solid_lesion_has_the_volume_of_its_diameter(lung1) -> None:
    background, _ = lung1
    rng = np.random.default_rng(3)
    for _ in range(20):
        spec = synth.random_lesion(background, rng, diameter_mm=20.0)
        if spec is not None and not spec.attached:
            break
    spec = synth.LesionSpec(**{**spec.__dict__, "shape": "round", "kind": "solid"})
    _, labels, drawn = synth.insert_lesions(
        background.hu, background.lung, background.spacing, [spec], rng
    )
    assert drawn == [spec]
    volume = labels.astype(bool).sum() * math.prod(background.spacing)
    expected = math.pi / 6 * 20.0**3
    assert volume == pytest.approx(expected, rel=0.25)  # 5 mm slices quantise the sphere


def test_studies_repeat_exactly_for_a_seed_and_differ_between_seeds(lung1) -> None:
    background, _ = lung1
    a = synth.sample_study(background, seed=5, n_lesions=2)
    b = synth.sample_study(background, seed=5, n_lesions=2)
    c = synth.sample_study(background, seed=6, n_lesions=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2].lesions == b[2].lesions != c[2].lesions


def test_negative_studies_have_no_label_and_no_lesion(lung1) -> None:
    background, _ = lung1
    hu, labels, record = synth.sample_study(background, seed=9, n_lesions=0)
    assert not labels.any() and record.lesions == []
    assert np.array_equal(hu, background.hu)
