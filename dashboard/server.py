"""The dashboard as an ASGI app: Streamlit's `st.App` running `dashboard/app.py`, with
`dashboard.access.AccessGuard` in front of Streamlit's own routes (no metrics or agent API, no
`/media/` file outside the session that granted it). `radai dashboard` runs
`streamlit run dashboard/server.py`, which finds `app` below and serves it with uvicorn.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

try:
    from dashboard.access import AccessGuard
except ImportError:  # `streamlit run dashboard/server.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dashboard.access import AccessGuard

app = st.App(Path(__file__).with_name("app.py"), middleware=[Middleware(AccessGuard)])
