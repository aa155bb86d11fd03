"""What the dashboard keeps across reruns and sessions: the database engine, loaded series,
segmentations and saliency maps (`st.cache_resource`: one object shared, never copied), and the
monitoring figures (`st.cache_data` for MONITORING_TTL seconds).

Imports Streamlit, `dashboard.imaging` and `db`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import streamlit as st

from dashboard import imaging
from db import audit, monitoring
from db.audit_keys import AuditKeys
from db.session import Database

MONITORING_TTL = 30  # seconds a computed monitoring page is reused across reruns and sessions


def audit_keys() -> AuditKeys | None:
    """The audit keys `radai dashboard` names in RADAI_AUDIT_KEY_FILE (never created here)."""
    key_file = os.environ.get("RADAI_AUDIT_KEY_FILE", "").strip()
    if not key_file:
        return None
    folder = os.environ.get("RADAI_AUDIT_CHECKPOINT_DIR", "").strip()
    return AuditKeys.load(Path(key_file), Path(folder) if folder else None, create=False)


@st.cache_resource(show_spinner=False)
def database(url: str) -> Database:
    """One engine (and connection pool) per database URL, shared by every session. The audit key
    is configured with it: logins append keyed entries, and "Verify chain" checks keys and
    checkpoints."""
    keys = audit_keys()
    if keys is not None:
        audit.configure(keys)
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


@st.cache_data(ttl=MONITORING_TTL, show_spinner="Computing...", max_entries=16)
def cached_monitoring(url: str, days: int | None, today: str) -> monitoring.Monitoring:
    # `today` is in the key so that a period never straddles midnight in a stale entry.
    since = None
    if days is not None:
        since = datetime.fromisoformat(today).replace(tzinfo=UTC) - timedelta(days=days - 1)
    with database(url).session() as s:
        return monitoring.monitoring(s, since=since)
