"""The clinicians' dashboard (Streamlit): `streamlit run dashboard/app.py` (or, with radai's
access rules in front, `dashboard/server.py`, which `radai dashboard` runs); research software,
NOT FOR CLINICAL USE.

This main script checks the session on every run and hands over to Streamlit's navigation: the
login form before login, afterwards the pages of the user's role (`PAGES`, filtered by
`store.PERMISSIONS`, the same table the store enforces), each its own module in
`dashboard/views/` (not `pages/`: Streamlit would serve a folder of that name as pages of their
own, run without this script's session check). The database comes from RADAI_DATABASE_URL
(default: SQLite in RADAI_HOME, `./var`), read here directly so the app depends on `db` alone.
Nothing with patient data is shown before login; a session ends after RADAI_SESSION_MINUTES
(default 30) without interaction, or at the next click after the account is disabled or its
password reset. Radiologists see the worklist, the study viewer and review (accept, reject, or
amend with corrected measurements); admins see the worklist and study (read-only), retry FAILED
studies, read the audit trail and manage users; auditors read the audit trail; everyone sees
the monitoring page (aggregates per model version, no patient data). Patient data stays in the
page (never in URLs, query parameters or logs: a page's address names the page only); logins,
logouts, expiries, opened studies, downloads, reviews, retries, account changes and chain checks
are written to the audit trail.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

try:
    from dashboard import session, store
except ImportError:  # `streamlit run dashboard/app.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dashboard import session, store

log = logging.getLogger("radai.dashboard")

# (page script relative to this file, title, permission it needs), in the sidebar's order; the
# first one a role may see is its home page.
PAGES = (
    ("views/worklist.py", "Worklist", "read_studies"),
    ("views/study.py", "Study", "read_studies"),
    ("views/audit.py", "Audit", "read_audit"),
    ("views/monitoring.py", "Monitoring", "read_monitoring"),
    ("views/users.py", "Users", "manage_users"),
)


def pages_for(role: str) -> list[tuple[str, str]]:
    """The (script, title) of each page a role may open, in the sidebar's order."""
    return [(path, title) for path, title, action in PAGES if role in store.PERMISSIONS[action]]


def main() -> None:
    st.set_page_config(page_title="radai", layout="wide")
    # Tracebacks can quote data values; the server log keeps them, the page does not.
    st.set_option("client.showErrorDetails", "type")
    # Patient lists leave through the reviewed DICOM outputs only, not as CSV from any table.
    st.set_option("client.disableDataExport", True)
    st.set_option("client.toolbarMode", "minimal")
    st.caption(session.NOT_FOR_CLINICAL_USE)
    db = session.get_database()
    try:
        user = session.current_user(db)
    except SQLAlchemyError as exc:
        log.error("database unavailable: %s", type(exc).__name__)
        st.error("The database is unavailable or not set up (run `radai db upgrade`).")
        st.stop()
    if user is None:
        # Before login every page's address shows the login form and nothing else (so that an
        # expired session, or a bookmark, lands on it without a "page not found"); after login
        # the same address opens the page itself, if the role has it.
        def login() -> None:
            session.login_page(db)

        addresses = [title.lower() for _, title, _ in PAGES]
        gates = [st.Page(login, title="Log in", url_path="login", default=True)] + [
            st.Page(login, title="Log in", url_path=address) for address in addresses
        ]
        st.navigation(gates, position="hidden").run()
        return
    session.watch()
    pages = [
        st.Page(path, title=title, url_path=title.lower(), default=i == 0)
        for i, (path, title) in enumerate(pages_for(user.role))
    ]
    navigation = st.navigation(pages)
    with st.sidebar:
        st.markdown(f"**{user.name}** ({user.role})")
        if st.button("Log out", key="logout"):
            session.logout(db, user)
            st.rerun()
        st.caption(session.NOT_FOR_CLINICAL_USE)
    navigation.run()


main()
