"""The viewer's images on hand-made arrays: outlines and fills of SEG segments, the saliency
map's reading and cleaning."""

from __future__ import annotations

import numpy as np
import pytest

from dashboard.imaging import (
    CTVolume,
    ImagingError,
    Segment,
    SegOverlay,
    compose,
    load_saliency,
    outline,
)

RED = (255, 60, 60)


def _square(size: int = 9, lo: int = 2, hi: int = 7) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_outline_is_the_inner_border():
    mask = _square()  # 5x5
    ring = outline(mask, thickness=1)
    assert ring.sum() == 16 and not ring[4, 4] and ring[2, 2] and not (ring & ~mask).any()
    assert outline(mask, thickness=2).sum() == 24  # all but the centre pixel
    edge = np.ones((4, 4), dtype=bool)  # touching the image border: still outlined there
    assert outline(edge, thickness=1).sum() == 12


def test_compose_outlines_shown_segments_even_without_fill():
    hu = np.full((1, 9, 9), 40, dtype=np.int16)
    labels = np.where(_square(), 2, 0).astype(np.uint8)[None]
    seg = SegOverlay(
        segments=(Segment(number=2, label="Lesion 1", color=RED, layer=0, slices=(0,)),),
        layers=(labels,),
    )
    volume = CTVolume(hu=hu, sop_instance_uids=("1.2.3",))
    plain = compose(volume, 0, 40, 400)
    grey = tuple(plain[0, 0])
    assert grey[0] == grey[1] == grey[2]

    unfilled = compose(volume, 0, 40, 400, seg=seg, show_segments=(2,), seg_opacity=0.0)
    assert tuple(unfilled[2, 2]) == RED and tuple(unfilled[4, 4]) == grey  # border, centre
    filled = compose(volume, 0, 40, 400, seg=seg, show_segments=(2,), seg_opacity=0.5)
    assert tuple(filled[2, 2]) == RED and tuple(filled[4, 4]) != grey
    assert filled[4, 4, 0] > filled[4, 4, 1]  # tinted towards red
    hidden = compose(volume, 0, 40, 400, seg=seg, show_segments=(), seg_opacity=0.5)
    assert np.array_equal(hidden, plain)


def test_saliency_is_read_as_float16_with_nan_and_range_cleaned(tmp_path):
    raw = np.array(
        [0.0, 0.25, 1.0, 1.5, -0.5, -0.0, np.nan, -np.nan, np.inf, -np.inf, 0.999, 65504.0],
        dtype=np.float16,
    ).reshape(1, 3, 4)
    path = tmp_path / "saliency.npz"
    np.savez_compressed(path, saliency=raw)
    volume = CTVolume(hu=np.zeros((1, 3, 4), dtype=np.int16), sop_instance_uids=("1.2.3",))
    got = load_saliency(str(path), volume)
    assert got.dtype == np.float16 and not got.flags.writeable
    expected = [0.0, 0.25, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.999, 1.0]
    assert got.ravel().tolist() == np.array(expected, dtype=np.float16).tolist()
    assert not np.signbit(got).any()
    wrong = CTVolume(hu=np.zeros((2, 3, 4), dtype=np.int16), sop_instance_uids=("1", "2"))
    with pytest.raises(ImagingError, match="does not match"):
        load_saliency(str(path), wrong)
