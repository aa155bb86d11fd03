"""The clinicians' dashboard (Streamlit): `streamlit run dashboard/app.py`, research software, NOT
FOR CLINICAL USE.

The database comes from RADAI_DATABASE_URL (default: SQLite in RADAI_HOME, `./var`), read here
directly so the app depends on `db` alone. Nothing with patient data is shown before login; a
session ends after RADAI_SESSION_MINUTES (default 30) without interaction, or at the next click
after the account is disabled or its password reset. Radiologists see the worklist, the study
viewer and review (accept, reject, or amend with corrected measurements); admins see the
worklist and study (read-only), retry FAILED studies, read the audit trail and manage users;
auditors read the audit trail; everyone sees the monitoring page (aggregates per model version,
no patient data). Patient data stays in the page (never in URLs, query parameters or logs);
logins, logouts, expiries, opened studies, downloads, reviews, retries, account changes and
chain checks are written to the audit trail.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

try:
    from dashboard import access, imaging, store
except ImportError:  # `streamlit run dashboard/app.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dashboard import access, imaging, store
from db import StudyState, User, UserRole, audit, login_throttle, monitoring, users
from db.requeue import request_retry
from db.session import Database

log = logging.getLogger("radai.dashboard")

PAGE_SIZE = 50
REFRESH_SECONDS = 10
NOT_FOR_CLINICAL_USE = "Research software: NOT FOR CLINICAL USE."
ROLE_PAGES = {
    "radiologist": ["Worklist", "Study", "Monitoring"],
    "admin": ["Worklist", "Study", "Audit", "Monitoring", "Users"],
    "auditor": ["Audit", "Monitoring"],
}
CAN_REVIEW = {"radiologist"}
CAN_RETRY = {"admin"}
CAN_MANAGE_USERS = {"admin"}
MONITORING_PERIODS = {"Last 7 days": 7, "Last 30 days": 30, "Last 90 days": 90, "All time": None}
MONITORING_TTL = 30  # seconds a computed monitoring page is reused across reruns and sessions
ANY = "any"


def database_url() -> str:
    """RADAI_DATABASE_URL, else SQLite in RADAI_HOME (as radai.settings computes it)."""
    url = os.environ.get("RADAI_DATABASE_URL", "").strip()
    if url:
        return url
    home = Path(os.environ.get("RADAI_HOME", "./var")).expanduser().resolve()
    return f"sqlite:///{home / 'radai.sqlite'}"


def session_seconds() -> float:
    try:
        minutes = float(os.environ.get("RADAI_SESSION_MINUTES", "30"))
    except ValueError:
        minutes = 30.0
    return max(minutes, 0.1) * 60


@st.cache_resource(show_spinner=False)
def get_database(url: str) -> Database:
    return Database(url, pool_size=5)


@st.cache_resource(show_spinner="Loading the series...", max_entries=4)
def cached_volume(paths: tuple[str, ...]) -> imaging.CTVolume:
    return imaging.load_ct(paths)


@st.cache_resource(show_spinner="Loading the segmentation...", max_entries=4)
def cached_seg(seg_path: str, paths: tuple[str, ...]) -> imaging.SegOverlay:
    return imaging.load_seg(seg_path, cached_volume(paths))


@st.cache_resource(show_spinner=False, max_entries=4)
def cached_saliency(saliency_path: str, paths: tuple[str, ...]) -> np.ndarray:
    return imaging.load_saliency(saliency_path, cached_volume(paths))


# --- session -------------------------------------------------------------------------------


@dataclass
class Activity:
    """When the session's user last interacted. A mutable object rather than a float so that
    code running outside the script (deferred downloads) sees expiry and logout too."""

    last: float = field(default_factory=time.time)
    ended: bool = False

    def expired(self) -> bool:
        return self.ended or time.time() - self.last > session_seconds()


def _expired() -> bool:
    activity = st.session_state.get("activity")
    return activity is None or activity.expired()


def _live() -> bool:
    """For widget callbacks, which run before the script checks the session: act only if live."""
    return st.session_state.get("user") is not None and not _expired()


def _touch() -> None:
    st.session_state["activity"].last = time.time()


def _end_session(notice: str | None = None) -> None:
    activity = st.session_state.get("activity")
    if activity is not None:
        activity.ended = True
    st.session_state.clear()
    if notice:
        st.session_state["notice"] = notice


@st.fragment(run_every=30)
def _session_watch() -> None:
    # Pages without their own timer would keep patient data on screen after expiry until the
    # next click; this brings the login back within half a minute. It is not activity.
    if _expired():
        st.rerun(scope="app")


def current_user(db: Database) -> store.SessionUser | None:
    """The logged-in user, or None; ends (and audits) a session idle for too long."""
    user = st.session_state.get("user")
    if user is None:
        return None
    if _expired():
        store.log_event(db, user.name, "user.session_expired", None, {})
        log.info("session of %s expired", user.name)
        _end_session("Your session expired after inactivity; please log in again.")
        return None
    # A user disabled, or whose password was reset, meanwhile loses access at the next
    # interaction.
    with db.session() as s:
        row = s.execute(
            select(User.disabled, User.password_hash).where(User.id == user.id)
        ).one_or_none()
    if row is None or row.disabled:
        store.log_event(db, user.name, "user.session_ended", None, {"reason": "account disabled"})
        _end_session("Your account is disabled.")
        return None
    if user.credential and store.credential_stamp(row.password_hash) != user.credential:
        store.log_event(db, user.name, "user.session_ended", None, {"reason": "password reset"})
        _end_session("Your password was reset; please log in again.")
        return None
    _touch()
    return user


def login_page(db: Database) -> None:
    st.title("radai")
    notice = st.session_state.pop("notice", None)
    if notice:
        st.info(notice)
    with st.form("login"):
        name = st.text_input("User name", key="login_name")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Log in")
    if not submitted:
        return
    user, outcome, retry_after = store.login(
        db, name, password, source=_client_address(), device=access.device_id(_xsrf_cookie())
    )
    if user is None:
        log.info("login refused (%s)", outcome)
        # The same words for every refusal of the same kind, whether the name exists or not.
        if outcome == login_throttle.THROTTLED:
            st.error(
                "Too many failed attempts: please wait "
                f"{max(1, round(retry_after))} s before trying again."
            )
        else:
            st.error("Wrong user name or password.")
        return
    log.info("login of %s (%s)", user.name, user.role)
    st.session_state.clear()
    st.session_state["user"] = user
    st.session_state["activity"] = Activity()
    st.rerun()


def _client_address() -> str | None:
    try:
        address = st.context.ip_address
    except Exception:  # noqa: BLE001 - no client (a bare script run): the throttle says "unknown"
        return None
    return address if isinstance(address, str) else None  # (AppTest gives a mock)


def _xsrf_cookie() -> str | None:
    """The browser's Streamlit XSRF cookie: its device token (see dashboard.access)."""
    try:
        value = st.context.cookies.get(access.XSRF_COOKIE)
    except Exception:  # noqa: BLE001 - no client
        return None
    return value if isinstance(value, str) else None


def logout(db: Database, user: store.SessionUser) -> None:
    store.log_event(db, user.name, "user.logout", None, {})
    log.info("logout of %s", user.name)
    _end_session("You are logged out.")


# --- worklist ------------------------------------------------------------------------------


def _flag(choice: str) -> bool | None:
    return None if choice == ANY else choice == "yes"


def _study_label(row: dict[str, Any]) -> str:
    prio = "-" if row["priority"] is None else row["priority"]
    return f"P{prio} · {row['patient_name'] or '(no name)'} · {row['study_date']} · {row['state']}"


def _open_study(db: Database, user: store.SessionUser) -> None:
    # Read the pick now, not when the button was drawn: the list may have refreshed since.
    study_uid = st.session_state.get("wl_pick")
    if not study_uid or not _live():
        return
    st.session_state["study_uid"] = study_uid
    st.session_state["page"] = "Study"
    store.log_event(db, user.name, "study.opened", study_uid, {})


def _retry(db: Database, user: store.SessionUser, study_uid: str) -> None:
    if not _live() or user.role not in CAN_RETRY:
        return
    try:
        with db.session() as s:
            request_retry(s, study_uid, actor=user.name)
    except ValueError as exc:
        st.session_state["retry_notice"] = ("error", str(exc))
        return
    log.info("retry of study %s requested by %s", study_uid, user.name)
    st.session_state["retry_notice"] = ("success", "Retry queued; the study will be reprocessed.")


def worklist_page(db: Database, user: store.SessionUser) -> None:
    st.header("Worklist")
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
    states = c1.multiselect(
        "State", [str(s) for s in StudyState], key="f_states", persist_state="session"
    )
    flagged = c2.selectbox("Flagged", [ANY, "yes", "no"], key="f_flagged", persist_state="session")
    reviewed = c3.selectbox(
        "Reviewed", [ANY, "yes", "no"], key="f_reviewed", persist_state="session"
    )
    page = c4.number_input("Page", min_value=1, step=1, key="f_page", persist_state="session")
    worklist_table(db, user, tuple(states), _flag(flagged), _flag(reviewed), int(page))


@st.fragment(run_every=REFRESH_SECONDS)
def worklist_table(
    db: Database,
    user: store.SessionUser,
    states: tuple[str, ...],
    flagged: bool | None,
    reviewed: bool | None,
    page: int,
) -> None:
    # The timer reruns only this fragment: it must notice an expired session itself, and it
    # does not count as activity.
    if _expired():
        st.rerun(scope="app")
    with db.session() as s:
        wl = store.worklist(
            s,
            states=list(states) or None,
            flagged=flagged,
            reviewed=reviewed,
            page=page,
            page_size=PAGE_SIZE,
        )
    now = datetime.now(UTC).strftime("%H:%M:%S")
    st.caption(
        f"{wl.total} studies · page {wl.page} of {wl.pages} · refreshed {now} UTC "
        f"(every {REFRESH_SECONDS} s)"
    )
    st.dataframe(
        worklist_frame(wl.rows),
        hide_index=True,
        column_config={
            "Priority": st.column_config.NumberColumn(help="1 is the most urgent"),
            "Suspicion": st.column_config.ProgressColumn(
                format="percent", min_value=0.0, max_value=1.0
            ),
        },
        key="worklist_table",
    )
    if not wl.rows:
        st.info("No studies match.")
        return
    by_uid = {r["study_uid"]: r for r in wl.rows}
    st.selectbox(
        "Study", list(by_uid), format_func=lambda uid: _study_label(by_uid[uid]), key="wl_pick"
    )
    if st.button("Open study", key="wl_open", on_click=_open_study, args=(db, user)):
        st.rerun(scope="app")
    if user.role in CAN_RETRY:
        kind, text = st.session_state.pop("retry_notice", (None, None))
        if kind:
            getattr(st, kind)(text)
        failed = [r for r in wl.rows if r["state"] == StudyState.FAILED]
        for r in failed:
            st.button(
                f"Retry: {_study_label(r)}",
                key=f"retry_{r['study_uid']}",
                on_click=_retry,
                args=(db, user, r["study_uid"]),
                help=r["error"] or None,
            )


def worklist_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The worklist table as shown (one page of `store.worklist` rows)."""
    return pd.DataFrame(
        [
            {
                "Priority": r["priority"],
                "State": r["state"],
                "Patient": r["patient_name"],
                "Patient ID": r["patient_id"],
                "Study date": r["study_date"],
                "Description": r["description"],
                "Instances": r["instances"],
                "Suspicion": r["probability"],
                "Lesions": r["lesions"],
                "Flagged": r["flagged"],
                "Reviewed": "yes" if r["reviewed"] else "no",
                "Error": r["error"] or "",
                "Study UID": r["study_uid"],
            }
            for r in rows
        ],
        columns=[
            "Priority",
            "State",
            "Patient",
            "Patient ID",
            "Study date",
            "Description",
            "Instances",
            "Suspicion",
            "Lesions",
            "Flagged",
            "Reviewed",
            "Error",
            "Study UID",
        ],
    )


# --- study ---------------------------------------------------------------------------------


def _set_slice(key: str, value: int) -> None:
    if _live():
        st.session_state[key] = value


def _serve_output(
    db: Database,
    activity: Activity,
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
    store.log_event(db, user_name, "study.output_downloaded", study_uid, {"sop_instance": sop_uid})
    return data


def study_page(db: Database, user: store.SessionUser) -> None:
    study_uid = st.session_state.get("study_uid")
    if not study_uid:
        st.info("Open a study from the worklist.")
        return
    with db.session() as s:
        d = store.study_detail(s, study_uid)
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
    if d["flagged"]:
        st.warning(f"Flagged: {d['flag_reason']}")
    jobs = [j for j in d["jobs"] if j["findings"]]
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
    f = job["findings"]
    if job["superseded"]:
        st.warning("This result was superseded by a later processing of the study.")
    name, version = job["model"]
    finished = job["finished_at"].strftime("%Y-%m-%d %H:%M UTC") if job["finished_at"] else "-"
    st.caption(
        f"Model {name} {version} · pipeline {job['pipeline']} {job['pipeline_version']} · "
        f"job {job['id']} finished {finished} · {NOT_FOR_CLINICAL_USE}"
    )
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Suspicion", f"{f.get('screening_probability', 0):.0%}")
    m2.metric("Priority", f.get("priority", "-"))
    m3.metric("Lung volume", f"{f.get('lung_volume_ml', 0) / 1000:.1f} l")
    m4.metric("Lesions", len(f.get("lesions", [])))

    slice_key = f"slice_{job['id']}"
    viewer(db, d, job, slice_key)
    latest = store.latest_reviews(d["reviews"], job["id"])
    lesion_table(job, latest, slice_key)
    if user.role in CAN_REVIEW:
        review_forms(db, user, d, job, latest)
    review_history(d["reviews"])
    downloads(db, user, d, job)


def viewer(db: Database, d: dict[str, Any], job: dict[str, Any], slice_key: str) -> None:
    f = job["findings"]
    with db.session() as s:
        paths = tuple(store.series_paths(s, d["id"], f.get("series_uid", "")))
    try:
        volume = cached_volume(paths)
    except imaging.ImagingError as exc:
        st.warning(f"The images cannot be shown: {exc}")
        return
    seg_path = next((o["path"] for o in job["outputs"] if o["modality"] == "SEG"), None)
    seg = None
    if seg_path and Path(seg_path).exists():
        try:
            seg = cached_seg(seg_path, paths)
        except imaging.ImagingError as exc:
            st.warning(f"The segmentation cannot be shown: {exc}")
    # The map is read when first asked for, not with the study: decompressing it costs more
    # than reading the whole series, and most readers never turn it on.
    has_saliency = bool(f.get("saliency_path")) and Path(f["saliency_path"]).exists()

    if slice_key not in st.session_state:
        lesions = f.get("lesions") or []
        first = lesions[0]["slice_index"] if lesions else volume.slices // 2
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
                saliency = cached_saliency(f["saliency_path"], paths)
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


def lesion_table(job: dict[str, Any], latest: dict[int | None, dict], slice_key: str) -> None:
    lesions = job["findings"].get("lesions") or []
    st.subheader("Lesions")
    if not lesions:
        st.info("No lesion candidates in this result.")
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Lesion": les["label"],
                    "Slice": les["slice_index"] + 1,
                    "Volume (ml)": round(les["volume_mm3"] / 1000, 2),
                    "Max 3D diameter (mm)": les["max_3d_diameter_mm"],
                    "Max axial diameter (mm)": les["max_2d_axial_diameter_mm"],
                    "Mean HU": les["mean_hu"],
                    # the screening CNN's belief in this call; absent in results before 2.0.0
                    "Screener probability": les.get("screening_probability"),
                    "Location": les["location"],
                    "Review": _review_text(latest.get(int(les["label"]))),
                    "Corrected by reader": store.describe_corrections(
                        (latest.get(int(les["label"])) or {}).get("corrections")
                    ),
                }
                for les in lesions
            ]
        ),
        hide_index=True,
    )
    cols = st.columns(min(len(lesions), 6))
    for i, les in enumerate(lesions):
        cols[i % len(cols)].button(
            f"Go to lesion {les['label']}",
            key=f"goto_{job['id']}_{les['label']}",
            on_click=_set_slice,
            args=(slice_key, int(les["slice_index"]) + 1),
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
    lesions = {int(les["label"]): les for les in job["findings"].get("lesions", [])}
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
                except ValueError as exc:
                    st.error(str(exc))
                    continue
                log.info("review %s of study %s by %s", review_id, d["study_uid"], user.name)
                st.session_state[gen_key] = gen + 1
                st.session_state["review_notice"] = f"{title}: {decision} saved."
                st.rerun()


def correction_inputs(lesion: dict[str, Any], tag: str) -> dict[str, Any]:
    """The amend form's corrected values (None: unchanged), typed in mm, ml and words."""
    st.caption("Corrected values (amend only; leave empty to keep the model's)")
    cols = st.columns(4)
    values: dict[str, Any] = {}
    for col, c in zip(cols, store.CORRECTABLE.values(), strict=False):
        model = lesion.get(c.key)
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
        format_func=lambda o: o or f"unchanged ({lesion.get('location') or '-'})",
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
                _xsrf_cookie(),
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


# --- audit ---------------------------------------------------------------------------------


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def audit_page(db: Database, user: store.SessionUser) -> None:
    st.header("Audit trail")
    with db.session() as s:
        actors = store.audit_actors(s)
    c1, c2, c3, c4 = st.columns(4)
    study_uid = c1.text_input("Study UID", key="a_study", persist_state="session").strip()
    actor = c2.selectbox("User (actor)", [ANY, *actors], key="a_actor", persist_state="session")
    since = c3.datetime_input("From (UTC)", value=None, key="a_since", persist_state="session")
    until = c4.datetime_input("Until (UTC)", value=None, key="a_until", persist_state="session")
    with db.session() as s:
        rows = store.audit_entries(
            s,
            study_uid=study_uid or None,
            actor=None if actor == ANY else actor,
            since=_aware(since),
            until=_aware(until),
        )
    st.caption(f"{len(rows)} entries shown (newest first, at most 500)")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Seq": r["seq"],
                    "At (UTC)": r["at"].strftime("%Y-%m-%d %H:%M:%S"),
                    "Actor": r["actor"],
                    "Action": r["action"],
                    "Study UID": r["study_uid"],
                    "Detail": json.dumps(r["detail"], sort_keys=True),
                    "Hash": r["entry_hash"],
                }
                for r in rows
            ],
            columns=["Seq", "At (UTC)", "Actor", "Action", "Study UID", "Detail", "Hash"],
        ),
        hide_index=True,
    )
    if st.button("Verify chain", key="verify_chain"):
        with db.session() as s:
            report = audit.verify(s)
        store.log_event(
            db,
            user.name,
            "audit.verified",
            None,
            {"ok": report.ok, "entries": report.entries, "broken_at_seq": report.broken_at_seq},
        )
        if report.ok:
            st.success(f"Chain OK: {report.entries} entries verified.")
        else:
            st.error(
                f"Chain BROKEN at seq {report.broken_at_seq}: {report.problem} "
                f"(checked {report.entries} entries)."
            )


# --- monitoring ----------------------------------------------------------------------------


@st.cache_data(ttl=MONITORING_TTL, show_spinner="Computing...", max_entries=16)
def cached_monitoring(url: str, days: int | None, today: str) -> monitoring.Monitoring:
    # `today` is in the key so that a period never straddles midnight in a stale entry.
    since = None
    if days is not None:
        since = datetime.fromisoformat(today).replace(tzinfo=UTC) - timedelta(days=days - 1)
    with get_database(url).session() as s:
        return monitoring.monitoring(s, since=since)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# Finished states in the colours people expect; waiting ones in greys and blues.
STATE_COLORS = {
    StudyState.DONE: "#2e7d32",
    StudyState.NOT_APPLICABLE: "#9e9e9e",
    StudyState.FAILED: "#c62828",
    StudyState.PROCESSING: "#1565c0",
    StudyState.QUEUED: "#64b5f6",
    StudyState.STABLE: "#bbdefb",
    StudyState.RECEIVING: "#cfd8dc",
}


def _chart_labels(models: list[monitoring.ModelStats]) -> list[str]:
    """Short names for charts: the models and their versions, unless two would look alike."""
    short = [
        ", ".join(f"{n} {v}" for n, v in sorted(x.model_versions.items())) or x.label
        for x in models
    ]
    return short if len(set(short)) == len(short) else [x.label for x in models]


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def monitoring_page(db: Database, user: store.SessionUser) -> None:
    st.header("Monitoring")
    period = st.selectbox(
        "Period (by study arrival)",
        list(MONITORING_PERIODS),
        key="m_period",
        persist_state="session",
    )
    today = datetime.now(UTC).date().isoformat()
    m = cached_monitoring(db.url, MONITORING_PERIODS[period], today)
    st.caption(
        f"Computed at most {MONITORING_TTL} s ago. A reviewed finding is a lesion with a review "
        "(its latest decision counts); acceptance = accepted / reviewed, amended findings are "
        "counted apart. Turnaround of finished jobs: received = first instance, result = job "
        "finished, reviewed = first review of that result. p90: 90th percentile."
    )
    reviewed = sum(x.reviewed for x in m.models)
    accepted = sum(x.accepted for x in m.models)
    c1, c2, c3, c4, c5, c6 = st.columns(6)
    c1.metric("Studies", m.studies)
    c2.metric("Done", m.study_states.get(StudyState.DONE, 0))
    c3.metric("Failed", m.study_states.get(StudyState.FAILED, 0))
    c4.metric("Not applicable", m.study_states.get(StudyState.NOT_APPLICABLE, 0))
    c5.metric("Reviewed findings", reviewed)
    c6.metric("Accepted", _rate(accepted / reviewed if reviewed else None))
    if not m.models and not m.per_day:
        st.info("No studies in this period.")
        return

    st.subheader("Per model version")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "Model version": x.label,
                    "Jobs": x.jobs,
                    "Done": x.states.get(StudyState.DONE, 0),
                    "Failed": x.failed,
                    "Not applicable": x.not_applicable,
                    "Findings": x.findings,
                    "Reviewed": x.reviewed,
                    "Accepted": x.accepted,
                    "Rejected": x.rejected,
                    "Amended": x.amended,
                    "Acceptance": _rate(x.acceptance_rate),
                    "Received→result median": _duration(x.received_to_result.median_s),
                    "Received→result p90": _duration(x.received_to_result.p90_s),
                    "Result→review median": _duration(x.result_to_review.median_s),
                    "Result→review p90": _duration(x.result_to_review.p90_s),
                    "Received→review median": _duration(x.received_to_review.median_s),
                    "Received→review p90": _duration(x.received_to_review.p90_s),
                    "Whole-study reviews": ", ".join(
                        f"{k} {v}" for k, v in sorted(x.study_reviews.items())
                    ),
                }
                for x in m.models
            ]
        ),
        hide_index=True,
        key="m_models",
    )
    labels = _chart_labels(m.models)
    left, right = st.columns(2)
    with left:
        st.markdown("**Reviewed findings by decision**")
        decisions = pd.DataFrame(
            [
                {"Model": labels[i], "Decision": d, "Findings": n}
                for i, x in enumerate(m.models)
                for d, n in (
                    ("accepted", x.accepted),
                    ("amended", x.amended),
                    ("rejected", x.rejected),
                )
                if n
            ],
            columns=["Model", "Decision", "Findings"],
        )
        if decisions.empty:
            st.caption("No reviewed findings yet.")
        else:
            st.altair_chart(
                alt.Chart(decisions)
                .mark_bar()
                .encode(
                    x=alt.X(
                        "sum(Findings):Q",
                        title="share of reviewed findings",
                        stack="normalize",
                        axis=alt.Axis(format="%"),
                    ),
                    y=alt.Y("Model:N", title=None, axis=alt.Axis(labelLimit=260)),
                    color=alt.Color(
                        "Decision:N",
                        scale=alt.Scale(
                            domain=["accepted", "amended", "rejected"],
                            range=["#2e7d32", "#f9a825", "#c62828"],
                        ),
                        legend=alt.Legend(orient="bottom", title=None),
                    ),
                    tooltip=["Model", "Decision", "Findings"],
                ),
                width="stretch",
            )
    with right:
        spans = [
            (labels[i], span, stat, v)
            for i, x in enumerate(m.models)
            for span, spread in (
                ("received → result", x.received_to_result),
                ("result → review", x.result_to_review),
            )
            for stat, v in (("median", spread.median_s), ("p90", spread.p90_s))
            if v is not None
        ]
        top = max((v for *_, v in spans), default=0.0)
        unit, per = ("s", 1) if top < 120 else ("min", 60) if top < 7200 else ("h", 3600)
        st.markdown(f"**Turnaround ({unit}): median and p90**")
        one = len({label for label, *_ in spans}) == 1
        frame = pd.DataFrame(
            [
                {
                    "Model": label,
                    "Span": span if one else f"{label} · {span}",
                    "Statistic": stat,
                    unit: v / per,
                }
                for label, span, stat, v in spans
            ],
            columns=["Model", "Span", "Statistic", unit],
        )
        if frame.empty:
            st.caption("No finished jobs yet.")
        else:
            st.altair_chart(
                alt.Chart(frame)
                .mark_bar()
                .encode(
                    x=alt.X(f"{unit}:Q", title=unit),
                    y=alt.Y("Span:N", title=None, axis=alt.Axis(labelLimit=300)),
                    yOffset=alt.YOffset("Statistic:N", sort=["median", "p90"]),
                    color=alt.Color(
                        "Statistic:N",
                        scale=alt.Scale(domain=["median", "p90"], range=["#1565c0", "#90caf9"]),
                        legend=alt.Legend(orient="bottom", title=None),
                    ),
                    tooltip=["Model", "Span", "Statistic", alt.Tooltip(f"{unit}:Q", format=".1f")],
                ),
                width="stretch",
            )

    st.subheader("Studies per day")
    if m.per_day:
        per_day = pd.DataFrame(
            [
                {"Day": d.day.isoformat(), "State": state, "Studies": n}
                for d in m.per_day
                for state, n in d.states.items()
            ]
        )
        st.altair_chart(
            alt.Chart(per_day)
            .mark_bar(size=max(4, min(36, 700 // len(m.per_day))))
            .encode(
                x=alt.X("Day:O", title="day of arrival (UTC)", axis=alt.Axis(labelAngle=-45)),
                y=alt.Y("sum(Studies):Q", title="studies"),
                color=alt.Color(
                    "State:N",
                    scale=alt.Scale(
                        domain=[str(s) for s in STATE_COLORS],
                        range=list(STATE_COLORS.values()),
                    ),
                    legend=alt.Legend(orient="bottom", title=None),
                ),
                tooltip=["Day", "State", "Studies"],
            )
            .properties(height=260),
            width="stretch",
        )

    st.subheader("Failures and not applicable, by reason")
    if m.study_failures:
        st.markdown("**Studies in these states now**")
        st.dataframe(
            pd.DataFrame(m.study_failures, columns=["State", "Reason", "Studies"]),
            hide_index=True,
            key="m_study_failures",
        )
    st.markdown("**Jobs, per model version**")
    reasons = [
        {"Model version": x.label, "State": state, "Reason": reason, "Jobs": n}
        for x in m.models
        for state, reason, n in x.failure_reasons
    ]
    if reasons:
        st.dataframe(pd.DataFrame(reasons), hide_index=True, key="m_failures")
    else:
        st.caption("None in this period.")


# --- users ---------------------------------------------------------------------------------


def _user_change(
    db: Database, user: store.SessionUser, what: str, change: Callable[[Any], Any]
) -> None:
    """Apply one account change in a transaction; the outcome is shown after the rerun."""
    try:
        with db.session() as s:
            change(s)
    except ValueError as exc:
        st.session_state["users_notice"] = ("error", str(exc))
        return
    log.info("%s by %s", what, user.name)
    st.session_state["users_notice"] = ("success", what[0].upper() + what[1:] + ".")


def users_page(db: Database, user: store.SessionUser) -> None:
    if user.role not in CAN_MANAGE_USERS:  # the page list already hides it; never trust that
        st.error("Only admins manage users.")
        return
    st.header("Users")
    kind, text = st.session_state.pop("users_notice", (None, None))
    if kind:
        getattr(st, kind)(text)
    with db.session() as s:
        accounts = users.list_users(s)
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "User": a["name"],
                    "Role": a["role"],
                    "Created (UTC)": a["created_at"].strftime("%Y-%m-%d %H:%M"),
                    "Status": "disabled" if a["disabled"] else "enabled",
                }
                for a in accounts
            ],
            columns=["User", "Role", "Created (UTC)", "Status"],
        ),
        hide_index=True,
        key="users_table",
    )
    failed_logins(db)
    add_col, change_col = st.columns(2)
    with add_col, st.form("add_user", clear_on_submit=True):
        st.markdown("**Add a user**")
        name = st.text_input("User name", key="u_new_name")
        role = st.selectbox("Role", list(UserRole), key="u_new_role")
        pw = st.text_input("Password", type="password", key="u_new_pw")
        pw2 = st.text_input("Password again", type="password", key="u_new_pw2")
        if st.form_submit_button("Add user"):
            if pw != pw2:
                st.session_state["users_notice"] = ("error", "the two passwords differ")
            else:
                _user_change(
                    db,
                    user,
                    f"user {name.strip()} added as {role}",
                    lambda s: users.add_user(s, name, role, pw, actor=user.name),
                )
            st.rerun()
    with change_col:
        st.markdown("**Change a user**")
        by_name = {a["name"]: a for a in accounts}
        target = st.selectbox("User", list(by_name), key="u_target")
        if target:
            disabled = by_name[target]["disabled"]
            st.button(
                f"{'Enable' if disabled else 'Disable'} {target}",
                key="u_toggle",
                on_click=_when_live,
                args=(
                    _user_change,
                    db,
                    user,
                    f"user {target} {'enabled' if disabled else 'disabled'}",
                    lambda s: users.set_disabled(s, target, not disabled, actor=user.name),
                ),
            )
            with st.form("reset_password", clear_on_submit=True):
                new = st.text_input("New password", type="password", key="u_reset_pw")
                new2 = st.text_input("New password again", type="password", key="u_reset_pw2")
                if st.form_submit_button(f"Reset password of {target}"):
                    if new != new2:
                        st.session_state["users_notice"] = ("error", "the two passwords differ")
                    else:
                        _user_change(
                            db,
                            user,
                            f"password of {target} reset",
                            lambda s: users.reset_password(s, target, new, actor=user.name),
                        )
                    st.rerun()


def failed_logins(db: Database) -> None:
    """Recent refused logins per account and per source address, with the delay each is under."""
    with db.session() as s:
        accounts, sources = login_throttle.recent_failures(s)
    minutes = int(login_throttle.WINDOW.total_seconds() // 60)
    st.markdown(f"**Failed logins, last {minutes} min**")
    if not accounts and not sources:
        st.caption("None.")
        return
    st.caption(
        "Throttled: attempts refused during a delay (the password was not checked). Names "
        "that are no account are counted together and stored only as digests."
    )

    def frame(rows: list[login_throttle.FailureSummary], who: str) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    who: r.who if r.who is not None else "(names that are no account)",
                    "Failed": r.failures,
                    "Throttled": r.throttled,
                    "Last (UTC)": r.last_at.strftime("%Y-%m-%d %H:%M:%S"),
                    "Delay now (s)": round(r.delay_s),
                }
                for r in rows
            ],
            columns=[who, "Failed", "Throttled", "Last (UTC)", "Delay now (s)"],
        )

    left, right = st.columns(2)
    left.dataframe(frame(accounts, "Account"), hide_index=True, key="failed_accounts")
    right.dataframe(frame(sources, "Source address"), hide_index=True, key="failed_sources")


def _when_live(fn: Callable[..., None], *args: Any) -> None:
    if _live():
        fn(*args)


# --- main ----------------------------------------------------------------------------------

PAGES = {
    "Worklist": worklist_page,
    "Study": study_page,
    "Audit": audit_page,
    "Monitoring": monitoring_page,
    "Users": users_page,
}


def main() -> None:
    st.set_page_config(page_title="radai", layout="wide")
    # Tracebacks can quote data values; the server log keeps them, the page does not.
    st.set_option("client.showErrorDetails", "type")
    # Patient lists leave through the reviewed DICOM outputs only, not as CSV from any table.
    st.set_option("client.disableDataExport", True)
    st.set_option("client.toolbarMode", "minimal")
    st.caption(NOT_FOR_CLINICAL_USE)
    db = get_database(database_url())
    try:
        user = current_user(db)
    except SQLAlchemyError as exc:
        log.error("database unavailable: %s", type(exc).__name__)
        st.error("The database is unavailable or not set up (run `radai db upgrade`).")
        st.stop()
    if user is None:
        login_page(db)
        return
    _session_watch()
    pages = ROLE_PAGES.get(user.role, [])
    with st.sidebar:
        st.markdown(f"**{user.name}** ({user.role})")
        if st.session_state.get("page") not in pages and pages:
            st.session_state["page"] = pages[0]
        page = st.radio("Page", pages, key="page")
        if st.button("Log out", key="logout"):
            logout(db, user)
            st.rerun()
        st.caption(NOT_FOR_CLINICAL_USE)
    if page:
        PAGES[page](db, user)


main()
