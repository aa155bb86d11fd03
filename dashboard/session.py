"""The dashboard session: who is logged in, since when, and how it ends.

Login (throttled and audited by `store.login`), logout, expiry after RADAI_SESSION_MINUTES
without interaction, and the end of a session whose account was disabled or whose password was
reset meanwhile. Pages get the database and the checked user from `page_context`. Imports
Streamlit, `dashboard.store`, `dashboard.access` and `dashboard.resources`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st
from sqlalchemy import select

from dashboard import access, resources, store
from db import User, login_throttle
from db.audit_actions import AuditAction
from db.session import Database

log = logging.getLogger("radai.dashboard")

NOT_FOR_CLINICAL_USE = "Research software: NOT FOR CLINICAL USE."


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


def get_database() -> Database:
    """The dashboard's database (one engine per process, `resources.database`)."""
    return resources.database(database_url())


@dataclass
class Activity:
    """When the session's user last interacted. A mutable object rather than a float so that
    code running outside the script (deferred downloads) sees expiry and logout too."""

    last: float = field(default_factory=time.time)
    ended: bool = False

    def expired(self) -> bool:
        return self.ended or time.time() - self.last > session_seconds()


def expired() -> bool:
    activity = st.session_state.get("activity")
    return activity is None or activity.expired()


def live() -> bool:
    """For widget callbacks, which run before the script checks the session: act only if live."""
    return st.session_state.get("user") is not None and not expired()


def touch() -> None:
    st.session_state["activity"].last = time.time()


def end_session(notice: str | None = None) -> None:
    activity = st.session_state.get("activity")
    if activity is not None:
        activity.ended = True
    st.session_state.clear()
    if notice:
        st.session_state["notice"] = notice


@st.fragment(run_every=30)
def watch() -> None:
    # Pages without their own timer would keep patient data on screen after expiry until the
    # next click; this brings the login back within half a minute. It is not activity.
    if expired():
        st.rerun(scope="app")


def current_user(db: Database) -> store.SessionUser | None:
    """The logged-in user, or None; ends (and audits) a session idle for too long."""
    user = st.session_state.get("user")
    if user is None:
        return None
    if expired():
        store.log_event(db, user.name, AuditAction.USER_SESSION_EXPIRED, None, {})
        log.info("session of %s expired", user.name)
        end_session("Your session expired after inactivity; please log in again.")
        return None
    # A user disabled, or whose password was reset, meanwhile loses access at the next
    # interaction.
    with db.session() as s:
        row = s.execute(
            select(User.disabled, User.password_hash).where(User.id == user.id)
        ).one_or_none()
    if row is None or row.disabled:
        store.log_event(
            db, user.name, AuditAction.USER_SESSION_ENDED, None, {"reason": "account disabled"}
        )
        end_session("Your account is disabled.")
        return None
    if user.credential and store.credential_stamp(row.password_hash) != user.credential:
        store.log_event(
            db, user.name, AuditAction.USER_SESSION_ENDED, None, {"reason": "password reset"}
        )
        end_session("Your password was reset; please log in again.")
        return None
    touch()
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
        db, name, password, source=client_address(), device=access.device_id(xsrf_cookie())
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


def client_address() -> str | None:
    try:
        address = st.context.ip_address
    except Exception:  # noqa: BLE001 - no client (a bare script run): the throttle says "unknown"
        return None
    return address if isinstance(address, str) else None  # (AppTest gives a mock)


def xsrf_cookie() -> str | None:
    """The browser's Streamlit XSRF cookie: its device token (see dashboard.access)."""
    try:
        value = st.context.cookies.get(access.XSRF_COOKIE)
    except Exception:  # noqa: BLE001 - no client
        return None
    return value if isinstance(value, str) else None


def logout(db: Database, user: store.SessionUser) -> None:
    store.log_event(db, user.name, AuditAction.USER_LOGOUT, None, {})
    log.info("logout of %s", user.name)
    end_session("You are logged out.")


def when_live(fn: Callable[..., None], *args: Any) -> None:
    """A widget callback that acts only while the session is live."""
    if live():
        fn(*args)


def page_context(action: str) -> tuple[Database, store.SessionUser]:
    """For a page script: the database and the logged-in user, whom `app.py` has checked this
    run; stops the page with a message when the user's role may not do `action` (the page list
    already leaves such pages out, and the store refuses anyway)."""
    user = st.session_state.get("user")
    if user is None or expired():
        st.stop()
    if not store.allowed(user, action):
        st.error("Your role does not give access to this page.")
        st.stop()
    return get_database(), user
