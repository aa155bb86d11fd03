"""Tests for db.findings: the one shape of a job's findings, read from any stored version."""

from __future__ import annotations

import json

import pytest

from db.findings import SCHEMA_VERSION, Findings, FindingsError, Lesion

# A row as the worker wrote it before the schema had a version (schema 1).
SCHEMA_1 = {
    "screening_probability": 0.9123,
    "triage_score": 0.88,
    "priority": 1,
    "lung_volume_ml": 4321.5,
    "lesions": [
        {
            "label": 1,
            "volume_mm3": 48000.2,
            "max_3d_diameter_mm": 69.0,
            "max_2d_axial_diameter_mm": 55.8,
            "mean_hu": 21.4,
            "location": "right lower zone",
            "centroid_zyx": [30.2, 250.0, 140.5],
            "slice_index": 30,
            "screening_probability": 0.97,
        },
        {
            "label": 2,
            "volume_mm3": 900.0,
            "max_3d_diameter_mm": 14.0,
            "max_2d_axial_diameter_mm": 12.0,
            "mean_hu": None,
            "location": None,
            "centroid_zyx": [10, 100, 300],
            "slice_index": 10,
        },
    ],
    "series_uid": "1.2.3",
    "slices": 61,
    "saliency_path": "/x/saliency.npz",
    "saliency_method": "Grad-CAM of radai-lesion-screen-cnn@2.0.0",
    "input_qa": {"analysable": True, "reasons": []},
    "not_for_clinical_use": True,
}


def test_schema_1_rows_read_with_every_value():
    f = Findings.from_json(SCHEMA_1)
    assert f is not None
    assert f.priority == 1 and f.screening_probability == pytest.approx(0.9123)
    assert [les.label for les in f.lesions] == [1, 2]
    assert f.lesion(1).location == "right lower zone"
    assert f.lesion(1).centroid_zyx == (30.2, 250.0, 140.5)
    # what older screeners did not write stays absent, not invented
    assert f.lesion(2).screening_probability is None
    assert f.lesion(2).mean_hu is None
    assert f.lesion(3) is None
    assert f.schema == SCHEMA_VERSION


def test_round_trip_through_json_is_lossless_and_versioned():
    f = Findings.from_json(SCHEMA_1)
    stored = json.loads(json.dumps(f.to_json()))
    assert stored["schema"] == SCHEMA_VERSION
    assert Findings.from_json(stored) == f
    # the dict keys every existing reader uses are still there
    assert set(SCHEMA_1) <= set(stored)
    assert set(SCHEMA_1["lesions"][0]) <= set(stored["lesions"][0])


def test_no_findings_is_none():
    assert Findings.from_json(None) is None
    assert Findings.from_json({}) is None


def test_a_newer_schema_is_refused_with_a_reason():
    with pytest.raises(FindingsError, match="newer"):
        Findings.from_json({**SCHEMA_1, "schema": SCHEMA_VERSION + 1})


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in SCHEMA_1.items() if k != "priority"},
        {**SCHEMA_1, "lung_volume_ml": "lots"},
        {**SCHEMA_1, "lesions": [{"label": 1}]},
        {**SCHEMA_1, "lesions": [{**SCHEMA_1["lesions"][0], "centroid_zyx": [1, 2]}]},
    ],
)
def test_unreadable_findings_raise_findings_error(broken):
    with pytest.raises(FindingsError):
        Findings.from_json(broken)


def test_lesion_to_json_gives_plain_lists():
    les = Lesion.from_json(SCHEMA_1["lesions"][0])
    assert les.to_json()["centroid_zyx"] == [30.2, 250.0, 140.5]


def test_schema_3_follow_up_round_trips_and_older_rows_have_none():
    change = {
        "prior_study_uid": "1.2.9",
        "prior_volume_mm3": 500.0,
        "volume_change_pct": 40.0,
        "doubling_time_days": 247.3,
        "prior_label": 2,
    }
    data = {
        **SCHEMA_1,
        "schema": 3,
        "prior_study_uid": "1.2.9",
        "follow_up": {"new": 0, "resolved": 1},
        "lesions": [
            {**SCHEMA_1["lesions"][0], "tracking_uid": "2.25.7", "tracking_id": "Nodule 1"},
            {**SCHEMA_1["lesions"][1], "tracking_uid": "2.25.8", "change": change},
        ],
    }
    f = Findings.from_json(json.loads(json.dumps(data)))
    assert f.prior_study_uid == "1.2.9" and f.prior_reason is None
    assert f.tracked("2.25.8").change.doubling_time_days == pytest.approx(247.3)
    assert f.tracked("2.25.8").change.prior_label == 2
    assert f.tracked("2.25.7").change is None and f.tracked("2.25.9") is None
    again = Findings.from_json(json.loads(json.dumps(f.to_json())))
    assert again == f
    assert again.to_json()["lesions"][1]["change"]["volume_change_pct"] == 40.0

    old = Findings.from_json(SCHEMA_1)
    assert old.prior_study_uid is None and old.follow_up == {}
    assert all(les.tracking_uid is None and les.change is None for les in old.lesions)


def test_an_unreadable_change_is_refused():
    bad = {**SCHEMA_1, "lesions": [{**SCHEMA_1["lesions"][0], "change": {"prior_study_uid": "1"}}]}
    with pytest.raises(FindingsError, match="lesion change"):
        Findings.from_json(bad)
