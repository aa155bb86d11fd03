"""The study page's lesion table and prior caption show follow-up: each nodule's tracking
identifier, its volume change and doubling time, and the prior compared with or why none was."""

from __future__ import annotations

from dataclasses import replace

from dashboard.views.study import lesion_rows, prior_caption
from db.findings import Findings, Lesion, LesionChange

PRIOR = "1.2.3.4"


def _lesion(label: int, change: LesionChange | None = None) -> Lesion:
    return Lesion(
        label=label,
        volume_mm3=500.0,
        max_3d_diameter_mm=9.0,
        max_2d_axial_diameter_mm=8.0,
        slice_index=3,
        centroid_zyx=(3.0, 10.0, 10.0),
        tracking_uid=f"2.25.{label}",
        tracking_id=f"Nodule {label + 4}",
        change=change,
    )


def test_matched_and_new_nodules_with_their_change():
    grown = LesionChange(PRIOR, 250.0, 100.0, doubling_time_days=180.0, interval_days=180.0)
    findings = Findings(
        screening_probability=0.5,
        priority=2,
        lung_volume_ml=3000.0,
        lesions=(_lesion(1, grown), _lesion(2)),
        prior_study_uid=PRIOR,
        follow_up={
            "prior_study_date": "20240101",
            "interval_days": 180.0,
            "matched": 1,
            "new": 1,
            "resolved": 0,
        },
    )
    first, second = lesion_rows(findings, {})
    assert (first["Nodule"], first["Volume change"], first["Doubling time (days)"]) == (
        "Nodule 5",
        "+100 %",
        "180",
    )
    assert (second["Nodule"], second["Volume change"], second["Doubling time (days)"]) == (
        "Nodule 6",
        "new",
        "-",
    )
    caption = prior_caption(findings)
    assert PRIOR in caption and "20240101" in caption and "180 days" in caption
    assert "1 matched, 1 new, 0 resolved" in caption


def test_without_a_prior_the_reason_is_shown_and_no_nodule_is_called_new():
    findings = Findings(
        screening_probability=0.5,
        priority=2,
        lung_volume_ml=3000.0,
        lesions=(_lesion(1),),
        prior_reason="prior 1.2.9: the prior is of a different patient (Patient ID differs)",
    )
    [row] = lesion_rows(findings, {})
    assert row["Volume change"] == "-" and row["Nodule"] == "Nodule 5"
    assert prior_caption(findings).startswith("No prior compared: prior 1.2.9: the prior is of")
    old = Findings(screening_probability=0.5, priority=2, lung_volume_ml=3000.0)
    assert "before follow-up" in prior_caption(old)


def test_a_cad_mass_says_it_was_reported_by_size_not_by_the_classifier():
    nodule = replace(_lesion(1), screening_probability=0.97)
    mass = replace(_lesion(2), volume_mm3=48000.0, screening_probability=None)
    cad = Findings(
        screening_probability=0.9,
        priority=1,
        lung_volume_ml=3000.0,
        lesions=(mass, nodule),
        pipeline="cad",
    )
    rows = lesion_rows(cad, {})
    assert rows[0]["Screener probability"] == "- (mass over 3 cm: reported by size)"
    assert rows[1]["Screener probability"] == "97%"
    # The baseline has no classifier at all: its lesions keep the plain dash.
    [plain] = lesion_rows(replace(cad, lesions=(mass,), pipeline="baseline"), {})
    assert plain["Screener probability"] == "-"
