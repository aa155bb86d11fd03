"""The study page: the study's header, its flags (and, for a HELD study, why it is held and the
release for those who may), its results (newest first), the slice viewer with
window presets and SEG/saliency overlays (inline images only), the lesion table, review forms for
those who review, the review history and the DICOM downloads (audited when served)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import access, imaging, resources, session, store, viewer_link
from dashboard.views import compare
from db import StudyState
from db.audit_actions import AuditAction
from db.findings import Findings, Lesion
from db.session import Database

log = logging.getLogger("radai.dashboard")


def _set_slice(key: str, value: int) -> None:
    if session.live():
        st.session_state[key] = value


def _serve_output(
    db: Database,
    activity: session.Activity,
    cookie: str | None,
    user_name: str,
    study_uid: str,
    sop_uid: str,
    path: str,
) -> bytes:
    # Runs when the file is actually requested (Streamlit's deferred download, on its own
    # thread, outside the script): the audit entry records a download, not a page that merely
    # offered one, and a page left open past expiry or logout serves nothing. Streamlit then
    # serves the bytes from a /media/ URL, which dashboard.access lets only this browser fetch,
    # only while the session lives.
    if activity.expired():
        raise PermissionError("session expired")
    data = Path(path).read_bytes()
    if not access.grant_download(data, cookie, lambda: not activity.expired()):
        log.warning("download without a device token: the browser will be refused the file")
    store.log_event(
        db, user_name, AuditAction.STUDY_OUTPUT_DOWNLOADED, study_uid, {"sop_instance": sop_uid}
    )
    return data


def _dash(value: Any, fmt: str = "{}") -> str:
    """A value as shown, "-" where the result has none (e.g. the baseline's lesion scores)."""
    return "-" if value is None else fmt.format(value)


def _release(db: Database, user: store.SessionUser, study_uid: str, reason: str) -> bool:
    try:
        with db.session() as s:
            store.release_study(s, study_uid, reason, user=user)
    except (ValueError, store.Forbidden) as exc:
        st.error(str(exc))
        return False
    log.info("study %s released by %s", study_uid, user.name)
    st.session_state["release_notice"] = "Released: the study is queued for analysis."
    return True


def flags_section(db: Database, user: store.SessionUser, d: dict[str, Any]) -> None:
    """Why a study is held, every flag it ever got, and the release for those who may."""
    notice = st.session_state.pop("release_notice", None)
    if notice:
        st.success(notice)
    held = d["state"] == StudyState.HELD
    if held:
        st.error(
            "HELD: this study is not analysed until a person releases it. "
            f"Reason: {d['hold_reason'] or '(not recorded)'}"
        )
    if not d["flags"]:
        if d["flagged"] and d["flag_reason"]:
            st.warning(f"Flagged: {d['flag_reason']}")
        return
    if not held:
        st.warning(f"Flagged ({len(d['flags'])}): read the flags before trusting the result.")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Kind": flag.get("kind") or "-",
                    "Reason": flag.get("reason") or "",
                    # Stored as ISO 8601 in UTC; shown to the second.
                    "When (UTC)": (flag.get("at") or "")[:19].replace("T", " ")
                    or "before flags were kept one by one",
                }
                for flag in d["flags"]
            ],
            columns=["Kind", "Reason", "When (UTC)"],
        ),
        hide_index=True,
        key=f"flags_{d['study_uid']}",
    )
    if not held or not store.allowed(user, "release"):
        return
    gen_key = f"release_gen_{d['study_uid']}"
    gen = st.session_state.setdefault(gen_key, 0)
    with st.form(f"release_{d['study_uid']}_{gen}"):
        reason = st.text_input(
            "Reason for the release (required; audited)",
            key=f"release_reason_{d['study_uid']}_{gen}",
        )
        submitted = st.form_submit_button("Release for analysis")
    if submitted and session.live() and _release(db, user, d["study_uid"], reason):
        st.session_state[gen_key] = gen + 1
        st.rerun()


def ohif_link(db: Database, user: store.SessionUser, study_uid: str) -> None:
    """ "Open in OHIF": the study, its SEG and SR in the OHIF viewer beside DICOMweb."""
    if user.role not in viewer_link.VIEWER_ROLES:
        return
    base = viewer_link.viewer_base(st.context.headers.get("host"))
    if base is None:
        return
    key = f"ohif_token_{user.name}"
    if key not in st.session_state:  # one token per dashboard session, not per rerun
        st.session_state[key] = viewer_link.issue_token(db, user.name)
    st.link_button("Open in OHIF", viewer_link.ohif_url(base, study_uid, st.session_state[key]))


def render(db: Database, user: store.SessionUser) -> None:
    study_uid = st.session_state.get("study_uid")
    if not study_uid:
        st.info("Open a study from the worklist.")
        return
    with db.session() as s:
        d = store.study_detail(s, study_uid, user=user)
    if d is None:
        st.error("This study is no longer in the database.")
        return
    st.header(f"{d['patient_name'] or '(no name)'} · {d['patient_id']}")
    st.caption(
        f"Study date {d['study_date']} · {d['description']} · accession {d['accession_number']}"
        f" · {d['instances']} instances · state {d['state']} · priority {d['priority']}"
        f" · UID {d['study_uid']}"
    )
    if d["error"]:
        st.warning(f"{d['state']}: {d['error']}")
    ohif_link(db, user, study_uid)
    flags_section(db, user, d)
    for j in d["jobs"]:
        if j["findings_error"]:
            st.error(j["findings_error"])
    jobs = [j for j in d["jobs"] if j["findings"] is not None]
    if not jobs:
        st.info("No findings for this study yet.")
        return
    by_id = {j["id"]: j for j in jobs}
    default = d["current_job_id"] if d["current_job_id"] in by_id else jobs[0]["id"]
    job_id = default
    if len(jobs) > 1:
        job_id = st.selectbox(
            "Result",
            list(by_id),
            index=list(by_id).index(default),
            format_func=lambda i: (
                f"job {i} · {by_id[i]['model'][0]} {by_id[i]['model'][1]}"
                + (" (superseded)" if by_id[i]["superseded"] else " (current)")
            ),
            key=f"job_{study_uid}",
        )
    job = by_id[job_id]
    f: Findings = job["findings"]
    if job["superseded"]:
        st.warning("This result was superseded by a later processing of the study.")
    name, version = job["model"]
    finished = job["finished_at"].strftime("%Y-%m-%d %H:%M UTC") if job["finished_at"] else "-"
    st.caption(
        f"Model {name} {version} · pipeline {job['pipeline']} {job['pipeline_version']} · "
        f"job {job['id']} finished {finished}"
        + (f" · analysis {f.pipeline}" if f.pipeline else "")
        + f" · {session.NOT_FOR_CLINICAL_USE}"
    )
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Suspicion", f"{f.screening_probability:.0%}")
    m2.metric("Priority", f.priority)
    m3.metric("Lung volume", f"{f.lung_volume_ml / 1000:.1f} l")
    m4.metric("Lesions", len(f.lesions))

    slice_key = f"slice_{job['id']}"
    viewer(db, user, d, job, slice_key)
    compare.section(db, user, d, job)
    latest = store.latest_reviews(d["reviews"], job["id"])
    lesion_table(job, latest, slice_key)
    if store.allowed(user, "review"):
        review_forms(db, user, d, job, latest)
    review_history(d["reviews"])
    downloads(db, user, d, job)


def viewer(
    db: Database, user: store.SessionUser, d: dict[str, Any], job: dict[str, Any], slice_key: str
) -> None:
    f: Findings = job["findings"]
    with db.session() as s:
        paths = tuple(store.series_paths(s, d["id"], f.series_uid or "", user=user))
    try:
        volume = resources.cached_volume(paths)
    except imaging.ImagingError as exc:
        st.warning(f"The images cannot be shown: {exc}")
        return
    seg_path = next((o["path"] for o in job["outputs"] if o["modality"] == "SEG"), None)
    seg = None
    if seg_path and Path(seg_path).exists():
        try:
            seg = resources.cached_seg(seg_path, paths)
        except imaging.ImagingError as exc:
            st.warning(f"The segmentation cannot be shown: {exc}")
    # The map is read when first asked for, not with the study: decompressing it costs more
    # than reading the whole series, and most readers never turn it on.
    has_saliency = bool(f.saliency_path) and Path(f.saliency_path or "").exists()

    if slice_key not in st.session_state:
        first = f.lesions[0].slice_index if f.lesions else volume.slices // 2
        st.session_state[slice_key] = int(first) + 1
    image_col, controls = st.columns([3, 1])
    with controls:
        preset = st.radio(
            "Window", list(imaging.WINDOW_PRESETS), key="window", persist_state="session"
        )
        center, width = imaging.WINDOW_PRESETS[preset]
        number = st.slider("Slice", 1, volume.slices, key=slice_key)
        shown: list[int] = []
        opacity = 0.0
        if seg is not None:
            st.markdown("**Segments**")
            for segment in seg.segments:
                if st.checkbox(segment.label, value=True, key=f"seg_{job['id']}_{segment.number}"):
                    shown.append(segment.number)
            opacity = st.slider("Segment opacity", 0.0, 1.0, 0.4, 0.05, key="seg_opacity")
        sal_opacity = 0.0
        saliency = None
        if has_saliency and st.checkbox("Saliency map", value=False, key="saliency_on"):
            try:
                saliency = resources.cached_saliency(f.saliency_path or "", paths)
            except imaging.ImagingError as exc:
                st.warning(f"The saliency map cannot be shown: {exc}")
            else:
                sal_opacity = st.slider("Saliency opacity", 0.0, 1.0, 0.5, 0.05, key="sal_opacity")
    z = number - 1
    rgb = imaging.compose(
        volume,
        z,
        center,
        width,
        seg=seg,
        show_segments=tuple(shown),
        seg_opacity=opacity,
        saliency=saliency,
        saliency_opacity=sal_opacity,
    )
    here = [s.label for s in seg.segments if z in s.slices and s.label != "Lung"] if seg else []
    with image_col:
        # Inline (a data: URI inside the session's websocket), never a replayable /media/ URL.
        st.image(
            access.image_data_uri(rgb),
            caption=f"Slice {number} of {volume.slices} · {preset} (C {center:g} / W {width:g})"
            + (f" · {', '.join(here)}" if here else ""),
            width="stretch",
        )


def _review_text(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not reviewed"
    return f"{r['decision']} by {r['user']} ({r['created_at']:%Y-%m-%d %H:%M})"


def prior_caption(findings: Findings) -> str:
    """One line on the comparison: the prior study and interval, or why there was none."""
    if findings.prior_study_uid:
        fu = findings.follow_up
        when = f" of {fu['prior_study_date']}" if fu.get("prior_study_date") else ""
        days = f", {fu['interval_days']:.0f} days earlier" if fu.get("interval_days") else ""
        counts = (
            f": {fu.get('matched', 0)} matched, {fu.get('new', 0)} new, "
            f"{fu.get('resolved', 0)} resolved"
            if "matched" in fu
            else ""
        )
        return f"Compared with prior study {findings.prior_study_uid}{when}{days}{counts}."
    if findings.prior_reason:
        return f"No prior compared: {findings.prior_reason}"
    return "No prior compared (result from before follow-up)."


_NO_CHANGE = {"Volume change": "-", "Doubling time (days)": "-"}


def _change(les: Lesion) -> dict[str, str]:
    c = les.change
    if c is None:
        return {**_NO_CHANGE, "Volume change": "new"}
    return {
        "Volume change": f"{c.volume_change_pct:+.0f} %",
        # Negative: the nodule shrank; its magnitude is the halving time.
        "Doubling time (days)": _dash(c.doubling_time_days, "{:.0f}"),
    }


def lesion_rows(findings: Findings, latest: dict[int | None, dict]) -> list[dict[str, Any]]:
    """The lesion table's rows, one per lesion, with its tracking and change since the prior."""
    rows = []
    for les in findings.lesions:
        change = _change(les) if findings.prior_study_uid else _NO_CHANGE
        row = {"Lesion": les.label, "Nodule": _dash(les.tracking_id), **change, **_row(les, latest)}
        if findings.pipeline == "cad" and les.screening_probability is None:
            # The nodule CAD reports a lesion over 3 cm by its size, not by its classifier.
            row["Screener probability"] = "- (mass over 3 cm: reported by size)"
        rows.append(row)
    return rows


def lesion_table(job: dict[str, Any], latest: dict[int | None, dict], slice_key: str) -> None:
    findings: Findings = job["findings"]
    lesions: tuple[Lesion, ...] = findings.lesions
    st.subheader("Lesions")
    st.caption(prior_caption(findings))
    if not lesions:
        st.info("No lesion candidates in this result.")
        return
    st.dataframe(pd.DataFrame(lesion_rows(findings, latest)), hide_index=True)
    _after_table(job, lesions, slice_key)


def _row(les: Lesion, latest: dict[int | None, dict]) -> dict[str, Any]:
    return {
        "Slice": les.slice_index + 1,
        "Volume (ml)": round(les.volume_mm3 / 1000, 2),
        "Max 3D diameter (mm)": les.max_3d_diameter_mm,
        "Max axial diameter (mm)": les.max_2d_axial_diameter_mm,
        "Mean HU": _dash(les.mean_hu, "{:.0f}"),
        # The screening CNN's belief in this call: absent in results before 2.0.0
        # and in the classical baseline's, which has no screener.
        "Screener probability": _dash(les.screening_probability, "{:.0%}"),
        # LIDC readers' impression learned by a CNN, not pathology (see caption).
        "Malignancy rating 4-5": _dash(les.malignancy_score, "{:.0%}"),
        "Location": _dash(les.location),
        "Review": _review_text(latest.get(les.label)),
        "Corrected by reader": store.describe_corrections(
            (latest.get(les.label) or {}).get("corrections")
        ),
    }


def _after_table(job: dict[str, Any], lesions: tuple[Lesion, ...], slice_key: str) -> None:
    if any(les.malignancy_score is not None for les in lesions):
        st.caption(
            "Malignancy rating 4-5: the estimated probability that LIDC-IDRI radiologists would "
            "rate the nodule 4 or 5 of 5 for malignancy. Their impression, learned by a CNN; "
            "not pathology, not a diagnosis. Research software: NOT FOR CLINICAL USE."
        )
    cols = st.columns(min(len(lesions), 6))
    for i, les in enumerate(lesions):
        cols[i % len(cols)].button(
            f"Go to lesion {les.label}",
            key=f"goto_{job['id']}_{les.label}",
            on_click=_set_slice,
            args=(slice_key, les.slice_index + 1),
        )


def review_forms(
    db: Database,
    user: store.SessionUser,
    d: dict[str, Any],
    job: dict[str, Any],
    latest: dict[int | None, dict],
) -> None:
    st.subheader("Review")
    notice = st.session_state.pop("review_notice", None)
    if notice:
        st.success(notice)
    lesions = {les.label: les for les in job["findings"].lesions}
    targets: list[int | None] = [*lesions, None]
    for label in targets:
        title = "Whole study" if label is None else f"Lesion {label}"
        tag = "study" if label is None else str(label)
        # A saved review starts the next one on fresh widgets (new keys); a refused one keeps
        # what was typed so the reader only adds what was missing.
        gen_key = f"review_gen_{job['id']}_{tag}"
        gen = st.session_state.setdefault(gen_key, 0)
        with st.expander(f"{title}: {_review_text(latest.get(label))}"):
            with st.form(f"review_{job['id']}_{tag}_{gen}"):
                decision = st.radio(
                    "Decision",
                    ["accept", "reject", "amend"],
                    index=None,
                    horizontal=True,
                    key=f"decision_{job['id']}_{tag}_{gen}",
                )
                reason = st.text_input(
                    "Reason (required to reject or amend)",
                    key=f"reason_{job['id']}_{tag}_{gen}",
                )
                note = st.text_area("Note", key=f"note_{job['id']}_{tag}_{gen}")
                corrections = (
                    None
                    if label is None
                    else correction_inputs(lesions[label], f"{job['id']}_{tag}_{gen}")
                )
                submitted = st.form_submit_button("Save review")
            if submitted:
                try:
                    with db.session() as s:
                        review = store.add_review(
                            s,
                            study_uid=d["study_uid"],
                            job_id=job["id"],
                            lesion_label=label,
                            decision=decision,
                            reason=reason,
                            note=note,
                            user=user,
                            corrections=corrections,
                        )
                        review_id = review.id
                except (ValueError, store.Forbidden) as exc:
                    st.error(str(exc))
                    continue
                log.info("review %s of study %s by %s", review_id, d["study_uid"], user.name)
                st.session_state[gen_key] = gen + 1
                st.session_state["review_notice"] = f"{title}: {decision} saved."
                st.rerun()


def correction_inputs(lesion: Lesion, tag: str) -> dict[str, Any]:
    """The amend form's corrected values (None: unchanged), typed in mm, ml and words."""
    st.caption("Corrected values (amend only; leave empty to keep the model's)")
    cols = st.columns(4)
    values: dict[str, Any] = {}
    for col, c in zip(cols, store.CORRECTABLE.values(), strict=False):
        model = getattr(lesion, c.key)
        shown = "-" if model is None else f"{model / c.to_stored:g}"
        values[c.key] = col.number_input(
            f"{c.name.capitalize()} ({c.unit})",
            value=None,
            step=0.1 if c.unit == "mm" else 0.01,
            format="%.1f" if c.unit == "mm" else "%.3f",
            help=f"model: {shown} {c.unit}; allowed {c.low:g} to {c.high:g} {c.unit}",
            key=f"corr_{c.key}_{tag}",
        )
    options = ["", *store.LOCATIONS]
    values[store.LOCATION] = cols[3].selectbox(
        "Location",
        options,
        format_func=lambda o: o or f"unchanged ({lesion.location or '-'})",
        key=f"corr_location_{tag}",
    )
    return values


def review_history(reviews: list[dict[str, Any]]) -> None:
    if not reviews:
        return
    st.subheader("Review history")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "When (UTC)": r["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
                    "User": r["user"],
                    "Job": r["job_id"],
                    "Lesion": "study" if r["lesion_label"] is None else r["lesion_label"],
                    "Decision": r["decision"],
                    "Reason": r["reason"] or "",
                    "Note": r["note"] or "",
                    "Corrections": store.describe_corrections(r["corrections"]),
                    "Model": r["model"],
                }
                for r in reversed(reviews)
            ]
        ),
        hide_index=True,
    )


def downloads(
    db: Database, user: store.SessionUser, d: dict[str, Any], job: dict[str, Any]
) -> None:
    outputs = [o for o in job["outputs"] if Path(o["path"]).exists()]
    if not outputs:
        return
    st.subheader("Results as DICOM")
    cols = st.columns(len(outputs))
    for col, o in zip(cols, outputs, strict=True):
        col.download_button(
            f"Download {o['modality']}",
            data=functools.partial(
                _serve_output,
                db,
                st.session_state["activity"],
                session.xsrf_cookie(),
                user.name,
                d["study_uid"],
                o["sop_instance_uid"],
                o["path"],
            ),
            file_name=f"{o['modality'].lower()}-{o['sop_instance_uid']}.dcm",
            mime="application/dicom",
            key=f"dl_{o['sop_instance_uid']}",
            on_click="ignore",
        )


if __name__ == "__main__":  # run by st.navigation (dashboard/app.py)
    render(*session.page_context("read_studies"))
