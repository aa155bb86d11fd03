"""The monitoring page: aggregates per model version (acceptance, turnaround, failures by
reason) and studies per day, with charts; no patient data."""

from __future__ import annotations

from datetime import UTC, datetime

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import resources, session, store
from db import StudyState, monitoring
from db.session import Database

MONITORING_PERIODS = {"Last 7 days": 7, "Last 30 days": 30, "Last 90 days": 90, "All time": None}


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


# Finished states in the colours people expect; waiting ones in greys and blues; HELD, which
# waits for a person rather than for the pipeline, in amber.
STATE_COLORS = {
    StudyState.DONE: "#2e7d32",
    StudyState.NOT_APPLICABLE: "#9e9e9e",
    StudyState.FAILED: "#c62828",
    StudyState.HELD: "#ef6c00",
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


def render(db: Database, user: store.SessionUser) -> None:
    st.header("Monitoring")
    period = st.selectbox(
        "Period (by study arrival)",
        list(MONITORING_PERIODS),
        key="m_period",
        persist_state="session",
    )
    today = datetime.now(UTC).date().isoformat()
    m = resources.cached_monitoring(db.url, MONITORING_PERIODS[period], today)
    st.caption(
        f"Computed at most {resources.MONITORING_TTL} s ago. A reviewed finding is a lesion "
        "with a review (its latest decision counts); acceptance = accepted / reviewed, "
        "amended findings are counted apart. Turnaround of finished jobs: received = first "
        "instance, result = job finished, reviewed = first review of that result. p90: 90th "
        "percentile."
    )
    reviewed = sum(x.reviewed for x in m.models)
    accepted = sum(x.accepted for x in m.models)
    c1, c2, c3, c4, c5, c6, c7 = st.columns(7)
    c1.metric("Studies", m.studies)
    c2.metric("Done", m.study_states.get(StudyState.DONE, 0))
    c3.metric("Failed", m.study_states.get(StudyState.FAILED, 0))
    c4.metric("Not applicable", m.study_states.get(StudyState.NOT_APPLICABLE, 0))
    c5.metric("Held", m.study_states.get(StudyState.HELD, 0), help="waiting for a release")
    c6.metric("Reviewed findings", reviewed)
    c7.metric("Accepted", _rate(accepted / reviewed if reviewed else None))
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


if __name__ == "__main__":  # run by st.navigation (dashboard/app.py)
    render(*session.page_context("read_monitoring"))
