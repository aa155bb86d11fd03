"""The audit page: the trail filtered by study, actor and time, and the hash chain's
verification (itself audited)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from dashboard import session, store
from db import audit
from db.audit_actions import AuditAction
from db.session import Database

ANY = "any"


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def render(db: Database, user: store.SessionUser) -> None:
    st.header("Audit trail")
    with db.session() as s:
        actors = store.audit_actors(s, user=user)
    c1, c2, c3, c4 = st.columns(4)
    study_uid = c1.text_input("Study UID", key="a_study", persist_state="session").strip()
    actor = c2.selectbox("User (actor)", [ANY, *actors], key="a_actor", persist_state="session")
    since = c3.datetime_input("From (UTC)", value=None, key="a_since", persist_state="session")
    until = c4.datetime_input("Until (UTC)", value=None, key="a_until", persist_state="session")
    with db.session() as s:
        rows = store.audit_entries(
            s,
            user=user,
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
            AuditAction.AUDIT_VERIFIED,
            None,
            {"ok": report.ok, "entries": report.entries, "broken_at_seq": report.broken_at_seq},
        )
        if report.ok:
            st.success(f"Chain OK: {report.entries} entries verified.")
        else:
            # A bad checkpoint names no entry: say so rather than "at seq None".
            where = "" if report.broken_at_seq is None else f" at seq {report.broken_at_seq}"
            st.error(f"Chain BROKEN{where}: {report.problem} (checked {report.entries} entries).")


if __name__ == "__main__":  # run by st.navigation (dashboard/app.py)
    render(*session.page_context("read_audit"))
