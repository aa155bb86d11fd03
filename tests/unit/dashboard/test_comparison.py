"""Prior and current side by side, on hand-made findings and arrays: which nodules pair up, the
linked slice (around a nodule, by the registration's offset, by relative position) and one
nodule outlined in the comparison's colour."""

from __future__ import annotations

import numpy as np
import pytest

from dashboard.comparison import (
    BY_NODULE,
    BY_POSITION,
    BY_REGISTRATION,
    HIGHLIGHT,
    SliceLink,
    current_slice_for,
    describe,
    link_slice,
    nodule_segment,
    outlined,
    registration_z_offset,
    tracked_nodules,
)
from dashboard.imaging import CTVolume, Segment, SegOverlay
from db.findings import Findings, Lesion, LesionChange

PRIOR_UID = "1.2.3.1"


def _lesion(label: int, z: int, uid: str | None = None, change: LesionChange | None = None):
    return Lesion(
        label=label,
        volume_mm3=500.0,
        max_3d_diameter_mm=10.0,
        max_2d_axial_diameter_mm=9.0,
        slice_index=z,
        centroid_zyx=(float(z), 10.0, 10.0),
        tracking_uid=uid,
        tracking_id=None if uid is None else f"Nodule {uid[-1]}",
        change=change,
    )


def _change(pct: float, dt: float | None, prior_label: int | None = None) -> LesionChange:
    return LesionChange(
        prior_study_uid=PRIOR_UID,
        prior_volume_mm3=400.0,
        volume_change_pct=pct,
        doubling_time_days=dt,
        prior_label=prior_label,
    )


def _findings(*lesions: Lesion) -> Findings:
    return Findings(screening_probability=0.5, priority=2, lung_volume_ml=4000, lesions=lesions)


def test_nodules_pair_by_tracking_uid_then_prior_label_and_unmatched_ones_are_kept():
    current = _findings(
        _lesion(1, 20, "2.25.A", _change(25.0, 400.0)),  # prior has it as lesion 2
        _lesion(2, 30, None, _change(-10.0, None, prior_label=1)),  # no UID: by prior label
        _lesion(3, 40, "2.25.N"),  # new
    )
    prior = _findings(_lesion(1, 12), _lesion(2, 15, "2.25.A"), _lesion(3, 5, "2.25.R"))
    got = tracked_nodules(current, prior)
    assert [(n.current and n.current.label, n.prior and n.prior.label) for n in got] == [
        (1, 2),
        (2, 1),
        (3, None),
        (None, 3),
    ]
    assert [describe(n) for n in got] == [
        "Nodule A · volume +25% · doubling time 400 d",
        "Lesion 2 · volume -10% · no growth",
        "Nodule N · new since the prior",
        "Nodule R · not found in this study",
    ]
    assert [n.current.label for n in tracked_nodules(current, None) if n.current] == [1, 2, 3]


def test_link_around_a_nodule_keeps_the_distance_in_mm_not_in_slices():
    # Current: 1 mm slices from z=100; prior: 2 mm slices from z=-50 (another table position).
    cur = tuple(100.0 + k for k in range(60))
    pri = tuple(-50.0 + 2 * k for k in range(30))
    kw = {"current_slices": 60, "prior_slices": 30}
    anchor = (40, 12)  # the nodule: current slice 40, prior slice 12
    assert link_slice(40, cur, pri, anchor=anchor, **kw) == SliceLink(12, BY_NODULE, False)
    # 10 mm further in the current is 5 prior slices further, not 10.
    assert link_slice(50, cur, pri, anchor=anchor, **kw).prior_index == 17
    assert link_slice(30, cur, pri, anchor=anchor, **kw).prior_index == 7
    # Past the prior's coverage: its last slice, said so.
    assert link_slice(59, cur, pri, anchor=(10, 25), **kw) == SliceLink(29, BY_NODULE, True)
    # Without positions (hand-made volumes) slice counts stand in for millimetres.
    assert link_slice(45, (), (), anchor=anchor, **kw).prior_index == 17


def test_link_by_registration_offset_else_by_relative_position():
    cur = tuple(100.0 + 2.5 * k for k in range(41))  # 100..200 mm
    pri = tuple(150.0 + 5.0 * k for k in range(21))  # 150..250 mm
    kw = {"current_slices": 41, "prior_slices": 21}
    # prior z = current z + 50: current z=150 (slice 20) is prior z=200 (slice 10).
    assert link_slice(20, cur, pri, z_offset_mm=50.0, **kw) == SliceLink(10, BY_REGISTRATION, False)
    assert link_slice(0, cur, pri, z_offset_mm=-10.0, **kw) == SliceLink(0, BY_REGISTRATION, True)
    # No offset: top to top, bottom to bottom, middle to middle.
    for i, expected in ((0, 0), (40, 20), (20, 10), (10, 5)):
        assert link_slice(i, cur, pri, **kw) == SliceLink(expected, BY_POSITION, False)
    # An offset is useless without real positions: relative position instead.
    assert link_slice(20, (), (), z_offset_mm=50.0, **kw).how == BY_POSITION
    with pytest.raises(ValueError):
        link_slice(0, (), (), current_slices=0, prior_slices=3)


def test_registration_offset_is_read_only_when_usable():
    assert registration_z_offset({"registration": {"z_offset_mm": "-12.5"}}) == -12.5
    assert registration_z_offset({"registration": {"z_offset_mm": 3, "ok": False}}) is None
    assert registration_z_offset({"registration": {"ncc_after": 0.8}}) is None
    assert registration_z_offset({"registration": {"z_offset_mm": float("nan")}}) is None
    assert registration_z_offset({}) is None


def test_scrolling_to_a_prior_only_nodule_finds_the_current_slice_that_shows_it():
    kw = {"current_slices": 41, "prior_slices": 21}
    cur = tuple(100.0 + 2.5 * k for k in range(41))
    pri = tuple(150.0 + 5.0 * k for k in range(21))
    assert current_slice_for(10, cur, pri, **kw) in (19, 20)  # both show prior slice 10
    assert current_slice_for(10, cur, pri, z_offset_mm=50.0, **kw) in (19, 20)
    assert current_slice_for(0, cur, pri, z_offset_mm=50.0, **kw) == 0
    # Every prior slice some current slice links to is found again (with +20 mm, prior slices
    # above 220 mm are beyond the current series: none links to them).
    for offset, reachable in ((None, 21), (50.0, 21), (20.0, 15)):
        links = {link_slice(i, cur, pri, z_offset_mm=offset, **kw).prior_index for i in range(41)}
        assert links == set(range(reachable))
        for p in links:
            i = current_slice_for(p, cur, pri, z_offset_mm=offset, **kw)
            assert link_slice(i, cur, pri, z_offset_mm=offset, **kw).prior_index == p


def _seg_with_nodule(label_number: int, tracking_uid: str | None) -> SegOverlay:
    layer = np.zeros((3, 12, 12), dtype=np.uint8)
    layer[1, 3:9, 3:9] = label_number
    segment = Segment(label_number, "Lesion 1", (255, 60, 60), 0, (1,), tracking_uid)
    return SegOverlay(segments=(segment,), layers=(layer,))


def test_the_nodule_segment_is_found_by_tracking_uid_then_by_label():
    seg = _seg_with_nodule(2, "2.25.A")
    assert nodule_segment(seg, _lesion(9, 1, "2.25.A")).number == 2  # UID wins over label
    assert nodule_segment(seg, _lesion(1, 1)).number == 2  # "Lesion 1"
    assert nodule_segment(seg, _lesion(5, 1, "2.25.Z")) is None
    assert nodule_segment(None, _lesion(1, 1)) is None


def test_outline_is_drawn_in_the_highlight_colour_only_where_the_nodule_is():
    hu = np.full((3, 12, 12), 40, dtype=np.int16)
    volume = CTVolume(hu=hu, sop_instance_uids=("1", "2", "3"))
    seg = _seg_with_nodule(2, None)
    [segment] = seg.segments
    img = outlined(volume, 1, 40, 400, seg, segment)
    is_highlight = np.all(img == HIGHLIGHT, axis=-1)
    assert is_highlight[3, 3] and is_highlight[8, 5] and not is_highlight[5, 5]  # ring, centre
    assert is_highlight.sum() == 6 * 6 - 2 * 2  # a 2-pixel ring of the 6x6 square
    grey = img[5, 5]
    assert grey[0] == grey[1] == grey[2]  # not filled: the tissue stays readable
    assert not np.all(outlined(volume, 0, 40, 400, seg, segment) == HIGHLIGHT, axis=-1).any()
    assert np.array_equal(
        outlined(volume, 1, 40, 400, seg, None), outlined(volume, 1, 40, 400, None, None)
    )
