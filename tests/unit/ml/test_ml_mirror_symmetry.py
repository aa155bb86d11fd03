"""A study mirrored left-right must be analysed as the mirror of the original: the same lung
mask and the same nodule candidates, mirrored. Checked on the bundled real CTs, whose pixels
(0.57 and 0.63 mm) are fine enough for the coarse-grid shortcuts that used to break it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from ml.image.blobs import detect_blobs
from ml.image.lungs import segment_lungs
from tests.kit.paths import SAMPLES


def _sample(name: str, z: slice) -> tuple[np.ndarray, tuple[float, float, float]]:
    image = sitk.ReadImage(str(SAMPLES / f"{name}_image.nrrd"))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    # An odd width, so that blocks laid from the left and from the right differ.
    hu = sitk.GetArrayFromImage(image)[z, :, 5:-2].astype(np.float32)
    return np.ascontiguousarray(hu), spacing  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["lung1", "lung2"])
def test_the_lung_mask_of_a_mirrored_study_is_the_mirrored_mask(name: str) -> None:
    hu, spacing = _sample(name, slice(None))
    assert hu.shape[2] % 2 == 1
    lungs = segment_lungs(hu, spacing)
    mirrored = segment_lungs(hu[:, :, ::-1].copy(), spacing)
    assert lungs.sum() > 1_000_000  # both lungs, at 0.6 mm pixels
    assert np.array_equal(mirrored[:, :, ::-1], lungs)


def test_a_mirrored_study_has_the_mirrored_candidates() -> None:
    hu, spacing = _sample("lung2", slice(15, 45))
    lungs = segment_lungs(hu, spacing)
    nx = hu.shape[2]
    blobs = detect_blobs(hu, lungs, spacing)
    mirrored = detect_blobs(hu[:, :, ::-1].copy(), lungs[:, :, ::-1].copy(), spacing)
    assert len(blobs) > 100

    def key(centre, flip):
        z, y, x = centre
        return (round(z, 3), round(y, 3), round(nx - 1 - x if flip else x, 3))

    assert {key(b.centre_zyx, False) for b in blobs} == {key(b.centre_zyx, True) for b in mirrored}
    by_centre = {key(b.centre_zyx, True): b for b in mirrored}
    for b in blobs:
        m = by_centre[key(b.centre_zyx, False)]
        assert m.response == pytest.approx(b.response, rel=1e-4)
        assert m.in_lung == pytest.approx(b.in_lung)
