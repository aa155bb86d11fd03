"""Prior and current study side by side, without Streamlit: which nodules the two results share
(by Tracking UID), which prior slice goes with a current one, and a slice with one nodule
outlined.

Linked scrolling maps a current slice to the prior's, in this order of trust:

1. around a nodule found in both studies: the same distance (mm, along the slice normal) from
   that nodule in both. Two scans of one patient differ by table position, breathing and
   coverage, so their slice positions share no origin; the matched nodule is the one point
   known to be the same anatomy in both, and near it (where the reader looks) the offset is
   right even when the registration's deformation is not a shift. Millimetres, not slice
   counts, so that a 1 mm series scrolls against a 5 mm prior at the same anatomical pace.
2. a z offset from the registration (``follow_up["registration"]["z_offset_mm"]``: prior z =
   current z + offset, as the registration maps current points to prior ones), where the worker
   recorded one: the whole-lung alignment, good away from any nodule.
3. the same relative position in each series: both cover the chest from top to bottom, so this
   is roughly right and never points outside the prior.

Imports `dashboard.imaging` and `db.findings` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dashboard import imaging
from db.findings import Findings, Lesion, LesionChange

HIGHLIGHT = (255, 220, 0)  # the selected nodule, the same colour in both studies

BY_NODULE = "nodule"
BY_REGISTRATION = "registration"
BY_POSITION = "relative position"


@dataclass(frozen=True)
class TrackedNodule:
    """One nodule as seen in either or both studies: ``current`` or ``prior`` is None where the
    nodule is new since the prior or no longer found."""

    key: str
    tracking_id: str
    current: Lesion | None
    prior: Lesion | None
    change: LesionChange | None


def tracked_nodules(current: Findings, prior: Findings | None) -> list[TrackedNodule]:
    """The current result's lesions (paired with the prior's by Tracking UID, else by the change's
    ``prior_label``), then the prior's lesions that no current one matched."""
    out: list[TrackedNodule] = []
    used: set[int] = set()
    for les in current.lesions:
        match = None
        if prior is not None:
            if les.tracking_uid:
                match = prior.tracked(les.tracking_uid)
            if match is None and les.change is not None and les.change.prior_label is not None:
                match = prior.lesion(les.change.prior_label)
        if match is not None:
            used.add(match.label)
        out.append(
            TrackedNodule(
                key=les.tracking_uid or f"current:{les.label}",
                tracking_id=les.tracking_id or f"Lesion {les.label}",
                current=les,
                prior=match,
                change=les.change,
            )
        )
    for les in prior.lesions if prior is not None else ():
        if les.label in used:
            continue
        out.append(
            TrackedNodule(
                key=les.tracking_uid or f"prior:{les.label}",
                tracking_id=les.tracking_id or f"prior lesion {les.label}",
                current=None,
                prior=les,
                change=None,
            )
        )
    return out


def describe(n: TrackedNodule) -> str:
    """The selector's line: tracking ID, volume change and doubling time, or new / not found."""
    if n.current is None:
        return f"{n.tracking_id} · not found in this study"
    if n.change is None:
        return f"{n.tracking_id} · new since the prior" if n.prior is None else n.tracking_id
    parts = [n.tracking_id, f"volume {n.change.volume_change_pct:+.0f}%"]
    dt = n.change.doubling_time_days
    parts.append("no growth" if dt is None else f"doubling time {dt:.0f} d")
    return " · ".join(parts)


def registration_z_offset(follow_up: dict[str, Any]) -> float | None:
    """The registration's z offset (prior z = current z + offset, mm), if recorded and usable."""
    registration = follow_up.get("registration")
    if not isinstance(registration, dict) or registration.get("ok") is False:
        return None
    value = registration.get("z_offset_mm")
    try:
        offset = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return offset if math.isfinite(offset) else None


@dataclass(frozen=True)
class SliceLink:
    """The prior slice shown with a current one, how it was chosen, and whether the wanted
    position lies beyond the prior series (then the nearest end slice is shown)."""

    prior_index: int
    how: str
    outside: bool = False


def _axis(positions: tuple[float, ...], n: int) -> np.ndarray:
    # A volume without positions (not read from DICOM) counts its slices as 1 mm apart: the
    # anchor then maps by slice counts, as the findings' slice indices do.
    if len(positions) == n:
        return np.asarray(positions, dtype=float)
    return np.arange(n, dtype=float)


def _nearest(axis: np.ndarray, target: float) -> tuple[int, bool]:
    index = int(np.argmin(np.abs(axis - target)))
    step = float(np.median(np.diff(axis))) if len(axis) > 1 else 1.0
    outside = target < axis[0] - step / 2 or target > axis[-1] + step / 2
    return index, bool(outside)


def link_slice(
    current_index: int,
    current_positions: tuple[float, ...],
    prior_positions: tuple[float, ...],
    *,
    current_slices: int,
    prior_slices: int,
    anchor: tuple[int, int] | None = None,
    z_offset_mm: float | None = None,
) -> SliceLink:
    """The prior slice for ``current_index`` (0-based): around ``anchor`` (the nodule's current
    and prior slice indices) if given, else by the registration's ``z_offset_mm``, else by
    relative position (see the module's docstring for why in this order)."""
    if current_slices < 1 or prior_slices < 1:
        raise ValueError("both series need at least one slice")
    i = min(max(int(current_index), 0), current_slices - 1)
    cur = _axis(current_positions, current_slices)
    pri = _axis(prior_positions, prior_slices)
    if anchor is not None:
        ca = min(max(anchor[0], 0), current_slices - 1)
        pa = min(max(anchor[1], 0), prior_slices - 1)
        index, outside = _nearest(pri, pri[pa] + (cur[i] - cur[ca]))
        return SliceLink(index, BY_NODULE, outside)
    real_positions = len(current_positions) == current_slices and len(prior_positions) == (
        prior_slices
    )
    if z_offset_mm is not None and real_positions:
        index, outside = _nearest(pri, cur[i] + z_offset_mm)
        return SliceLink(index, BY_REGISTRATION, outside)
    fraction = i / (current_slices - 1) if current_slices > 1 else 0.5
    return SliceLink(round(fraction * (prior_slices - 1)), BY_POSITION)


def current_slice_for(
    prior_index: int,
    current_positions: tuple[float, ...],
    prior_positions: tuple[float, ...],
    *,
    current_slices: int,
    prior_slices: int,
    z_offset_mm: float | None = None,
) -> int:
    """The current slice whose linked prior slice is nearest ``prior_index`` (where to scroll to
    show a nodule found only in the prior). A search over every current slice, not an inverse:
    the link is not one-to-one when the two series' slice spacings differ. Vectorised, as
    `link_slice` without an anchor would link each slice."""
    if current_slices < 1 or prior_slices < 1:
        raise ValueError("both series need at least one slice")
    real_positions = len(current_positions) == current_slices and len(prior_positions) == (
        prior_slices
    )
    if z_offset_mm is not None and real_positions:
        cur = np.asarray(current_positions, dtype=float)
        pri = np.asarray(prior_positions, dtype=float)
        linked = np.abs(pri[None, :] - (cur + z_offset_mm)[:, None]).argmin(axis=1)
    else:
        fraction = (
            np.arange(current_slices) / (current_slices - 1)
            if current_slices > 1
            else np.array([0.5])
        )
        # np.round, like the builtin round of link_slice, rounds halves to even.
        linked = np.round(fraction * (prior_slices - 1))
    return int(np.argmin(np.abs(linked - prior_index)))


def nodule_segment(seg: imaging.SegOverlay | None, lesion: Lesion | None) -> imaging.Segment | None:
    """A lesion's segment in its study's SEG: by Tracking UID, else by the "Lesion N" label the
    SEG writer gives lesion N."""
    if seg is None or lesion is None:
        return None
    if lesion.tracking_uid:
        for s in seg.segments:
            if s.tracking_uid == lesion.tracking_uid:
                return s
    return next((s for s in seg.segments if s.label == f"Lesion {lesion.label}"), None)


def outlined(
    volume: imaging.CTVolume,
    z: int,
    center: float,
    width: float,
    seg: imaging.SegOverlay | None,
    segment: imaging.Segment | None,
    color: tuple[int, int, int] = HIGHLIGHT,
) -> np.ndarray:
    """Slice ``z`` windowed, with ``segment`` (if any) outlined in ``color`` and not filled: the
    reader compares the tissue inside the outline between the two studies."""
    if seg is None or segment is None:
        return imaging.compose(volume, z, center, width)
    only = imaging.SegOverlay(segments=(replace(segment, color=color),), layers=seg.layers)
    return imaging.compose(
        volume, z, center, width, seg=only, show_segments=(segment.number,), seg_opacity=0.0
    )
