"""The worklist page: studies by AI priority, filtered and paged, refreshed every
REFRESH_SECONDS, with every flag's reason (HELD studies, waiting for a person's release, among
them); opening a study (audited) goes to the study page; admins retry FAILED studies."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import session, store
from db import StudyState
from db.audit_actions import AuditAction
from db.session import Database

log = logging.getLogger("radai.dashboard")

PAGE_SIZE = 50
REFRESH_SECONDS = 10
ANY = "any"
STUDY_PAGE = "views/study.py"  # relative to dashboard/app.py, the main script


def _flag(choice: str) -> bool | None:
    return None if choice == ANY else choice == "yes"


def _study_label(row: dict[str, Any]) -> str:
    prio = "-" if row["priority"] is None else row["priority"]
    return f"P{prio} · {row['patient_name'] or '(no name)'} · {row['study_date']} · {row['state']}"


def _open_study(db: Database, user: store.SessionUser) -> None:
    # Read the pick now, not when the button was drawn: the list may have refreshed since.
    study_uid = st.session_state.get("wl_pick")
    if not study_uid or not session.live():
        return
    st.session_state["study_uid"] = study_uid
    store.log_event(db, user.name, AuditAction.STUDY_OPENED, study_uid, {})


def _retry(db: Database, user: store.SessionUser, study_uid: str) -> None:
    if not session.live():
        return
    try:
        with db.session() as s:
            store.retry_study(s, study_uid, user=user)
    except (ValueError, store.Forbidden) as exc:
        st.session_state["retry_notice"] = ("error", str(exc))
        return
    log.info("retry of study %s requested by %s", study_uid, user.name)
    st.session_state["retry_notice"] = ("success", "Retry queued; the study will be reprocessed.")


def render(db: Database, user: store.SessionUser) -> None:
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
    if session.expired():
        st.rerun(scope="app")
    with db.session() as s:
        wl = store.worklist(
            s,
            user=user,
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
        if session.live():
            st.switch_page(STUDY_PAGE)
        st.rerun(scope="app")
    if store.allowed(user, "retry"):
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
                # All of them, oldest first: a later flag never hides an earlier one.
                "Flags": "; ".join(r["flags"]),
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
            "Flags",
            "Reviewed",
            "Error",
            "Study UID",
        ],
    )


if __name__ == "__main__":  # run by st.navigation (dashboard/app.py)
    render(*session.page_context("read_studies"))
