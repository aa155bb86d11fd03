"""The study page's "Compare with prior" section (not a page of its own): the prior study the
result was compared with and the current one side by side, one slider scrolling both
(`dashboard.comparison.link_slice`), a selector of the tracked nodules with their volume change
and doubling time, and the selected nodule outlined in both images (inline images only). For a
result without a prior it says why there is none.

Showing the prior loads another study's images: the same permission as viewing a study
(`store.prior_for_comparison` refuses otherwise, and a prior of another patient), and turning
the comparison on is audited as opening the prior study, as the worklist audits opening one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import access, comparison, imaging, resources, session, store
from db.audit_actions import AuditAction
from db.findings import Findings
from db.session import Database

log = logging.getLogger("radai.dashboard")


def _opened(
    db: Database, user: store.SessionUser, key: str, study_uid: str, prior_uid: str
) -> None:
    # A callback: runs when the reader turns the comparison on, once per turning on, like the
    # worklist's "Open" (and not on every rerun while it stays on).
    if session.live() and st.session_state.get(key):
        store.log_event(
            db, user.name, AuditAction.STUDY_OPENED, prior_uid, {"as_prior_of": study_uid}
        )


def _jump(slider_key: str, index: int) -> None:
    if session.live():
        st.session_state[slider_key] = index + 1


def _load(
    paths: tuple[str, ...], seg_path: str | None, what: str
) -> tuple[imaging.CTVolume | None, imaging.SegOverlay | None]:
    try:
        volume = resources.cached_volume(paths)
    except imaging.ImagingError as exc:
        st.warning(f"The {what} images cannot be shown: {exc}")
        return None, None
    seg = None
    if seg_path and Path(seg_path).exists():
        try:
            seg = resources.cached_seg(seg_path, paths)
        except imaging.ImagingError as exc:
            st.warning(f"The {what} segmentation cannot be shown: {exc}")
    return volume, seg


def _registration_note(follow_up: dict[str, Any]) -> str:
    reg = follow_up.get("registration")
    if not isinstance(reg, dict):
        return ""
    parts = []
    if isinstance(reg.get("lung_dice_after"), int | float):
        parts.append(f"lung Dice {reg['lung_dice_after']:.2f}")
    if isinstance(reg.get("ncc_after"), int | float):
        parts.append(f"NCC {reg['ncc_after']:.2f}")
    return f" · registration: {', '.join(parts)}" if parts else ""


def section(db: Database, user: store.SessionUser, d: dict[str, Any], job: dict[str, Any]) -> None:
    """The comparison for one result (`job`) of the study `d` (as `store.study_detail` gives)."""
    f: Findings = job["findings"]
    if not f.prior_study_uid:
        if f.prior_reason:
            st.subheader("Compare with prior")
            st.info(f"No comparison with a prior study: {f.prior_reason}")
        return
    st.subheader("Compare with prior")
    try:
        with db.session() as s:
            prior = store.prior_for_comparison(
                s, f.prior_study_uid, patient_id=d["patient_id"], user=user
            )
    except (ValueError, store.Forbidden) as exc:
        st.error(str(exc))
        return
    if prior is None:
        source = f.follow_up.get("prior_source")
        if source and source != "local":
            st.info(
                f"The prior study came from {source} for the comparison and is not stored in "
                "radai: its images cannot be shown here (the change figures are in the findings)."
            )
        else:
            st.warning("The prior study this result was compared with is no longer in radai.")
        return
    prior_f: Findings | None = prior["findings"]
    if prior_f is None:
        st.warning(prior["findings_error"] or "The prior study has no findings to compare with.")
        return
    st.caption(
        f"Prior study of {prior['study_date'] or 'unknown date'} · UID {prior['study_uid']}"
        + _registration_note(f.follow_up)
    )
    on_key = f"cmp_on_{job['id']}"
    if not st.toggle(
        "Show the prior beside this study",
        key=on_key,
        on_change=_opened,
        args=(db, user, on_key, d["study_uid"], prior["study_uid"]),
    ):
        return
    with db.session() as s:
        paths = tuple(store.series_paths(s, d["id"], f.series_uid or "", user=user))
    current_seg = next((o["path"] for o in job["outputs"] if o["modality"] == "SEG"), None)
    cur_vol, cur_seg = _load(paths, current_seg, "current")
    pri_vol, pri_seg = _load(tuple(prior["series_paths"]), prior["seg_path"], "prior")
    if cur_vol is None or pri_vol is None:
        return
    viewer(f, prior_f, job["id"], (cur_vol, cur_seg), (pri_vol, pri_seg))


def viewer(
    f: Findings,
    prior_f: Findings,
    job_id: int,
    current: tuple[imaging.CTVolume, imaging.SegOverlay | None],
    prior: tuple[imaging.CTVolume, imaging.SegOverlay | None],
) -> None:
    cur_vol, cur_seg = current
    pri_vol, pri_seg = prior
    nodules = comparison.tracked_nodules(f, prior_f)
    offset = comparison.registration_z_offset(f.follow_up)
    geometry = {
        "current_slices": cur_vol.slices,
        "prior_slices": pri_vol.slices,
    }
    slider_key = f"cmp_slice_{job_id}"

    def start_of(n: comparison.TrackedNodule | None) -> int:
        if n is not None and n.current is not None:
            return n.current.slice_index
        if n is not None and n.prior is not None:
            return comparison.current_slice_for(
                n.prior.slice_index,
                cur_vol.positions_mm,
                pri_vol.positions_mm,
                z_offset_mm=offset,
                **geometry,
            )
        return cur_vol.slices // 2

    chosen: comparison.TrackedNodule | None = None
    if nodules:
        # Open on a nodule seen in both studies: that is what a follow-up reader compares.
        first = next((i for i, n in enumerate(nodules) if n.current and n.prior), 0)
        pick_key = f"cmp_nodule_{job_id}"

        def on_pick() -> None:
            _jump(slider_key, start_of(nodules[st.session_state[pick_key]]))

        pick = st.selectbox(
            "Tracked nodule",
            list(range(len(nodules))),
            index=first,
            format_func=lambda i: comparison.describe(nodules[i]),
            key=pick_key,
            on_change=on_pick,
        )
        chosen = nodules[pick]
    else:
        st.info("Neither study has a lesion call: the two are linked by position only.")
    if slider_key not in st.session_state:
        st.session_state[slider_key] = start_of(chosen) + 1
    number = st.slider("Slice (current; the prior follows)", 1, cur_vol.slices, key=slider_key)
    z = number - 1
    anchor = None
    if chosen is not None and chosen.current is not None and chosen.prior is not None:
        anchor = (chosen.current.slice_index, chosen.prior.slice_index)
    link = comparison.link_slice(
        z, cur_vol.positions_mm, pri_vol.positions_mm, anchor=anchor, z_offset_mm=offset, **geometry
    )
    if chosen is not None and chosen.change is not None:
        c = chosen.change
        m1, m2, m3 = st.columns(3)
        m1.metric(
            "Volume",
            f"{chosen.current.volume_mm3 / 1000:.2f} ml" if chosen.current else "-",
            f"{c.volume_change_pct:+.0f}% (prior {c.prior_volume_mm3 / 1000:.2f} ml)",
            delta_color="inverse",
        )
        m2.metric(
            "Doubling time",
            "no growth" if c.doubling_time_days is None else f"{c.doubling_time_days:.0f} days",
        )
        m3.metric("Interval", "-" if c.interval_days is None else f"{c.interval_days:.0f} days")

    preset = st.session_state.get("window") or next(iter(imaging.WINDOW_PRESETS))
    center, width = imaging.WINDOW_PRESETS.get(preset, next(iter(imaging.WINDOW_PRESETS.values())))
    pri_segment = comparison.nodule_segment(pri_seg, chosen.prior if chosen else None)
    cur_segment = comparison.nodule_segment(cur_seg, chosen.current if chosen else None)
    left, right = st.columns(2)
    for col, title, vol, seg, segment, index, extra in (
        (
            left,
            "Prior",
            pri_vol,
            pri_seg,
            pri_segment,
            link.prior_index,
            f" · linked by {link.how}"
            + (" · beyond the prior's coverage: nearest slice" if link.outside else ""),
        ),
        (right, "Current", cur_vol, cur_seg, cur_segment, z, ""),
    ):
        rgb = comparison.outlined(vol, index, center, width, seg, segment)
        here = ""
        if chosen is not None:
            if segment is None:
                here = " · nodule not outlined (not in this study's SEG)"
            elif index in segment.slices:
                here = f" · {chosen.tracking_id} outlined"
            else:
                here = f" · {chosen.tracking_id} not on this slice"
        with col:
            # Inline (a data: URI inside the session's websocket), never a /media/ URL.
            st.image(
                access.image_data_uri(rgb),
                caption=f"{title} · slice {index + 1} of {vol.slices}{here}{extra}",
                width="stretch",
            )
