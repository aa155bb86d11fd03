"""The users page (admins): accounts (add, disable, enable, reset password; each change
audited) and recent failed logins per account and per source address."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import session, store
from db import UserRole, login_throttle
from db.session import Database

log = logging.getLogger("radai.dashboard")


def _user_change(
    db: Database, user: store.SessionUser, what: str, change: Callable[[Any], Any]
) -> None:
    """Apply one account change in a transaction; the outcome is shown after the rerun."""
    try:
        with db.session() as s:
            change(s)
    except (ValueError, store.Forbidden) as exc:
        st.session_state["users_notice"] = ("error", str(exc))
        return
    log.info("%s by %s", what, user.name)
    st.session_state["users_notice"] = ("success", what[0].upper() + what[1:] + ".")


def render(db: Database, user: store.SessionUser) -> None:
    st.header("Users")
    kind, text = st.session_state.pop("users_notice", (None, None))
    if kind:
        getattr(st, kind)(text)
    with db.session() as s:
        accounts = store.list_accounts(s, user=user)
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
    failed_logins(db, user)
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
                    lambda s: store.add_account(s, name, str(role), pw, user=user),
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
                on_click=session.when_live,
                args=(
                    _user_change,
                    db,
                    user,
                    f"user {target} {'enabled' if disabled else 'disabled'}",
                    lambda s: store.set_account_disabled(s, target, not disabled, user=user),
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
                            lambda s: store.reset_account_password(s, target, new, user=user),
                        )
                    st.rerun()


def failed_logins(db: Database, user: store.SessionUser) -> None:
    """Recent refused logins per account and per source address, with the delay each is under."""
    with db.session() as s:
        accounts, sources = store.failed_logins(s, user=user)
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


if __name__ == "__main__":  # run by st.navigation (dashboard/app.py)
    render(*session.page_context("manage_users"))
