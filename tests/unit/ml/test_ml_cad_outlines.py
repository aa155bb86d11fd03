"""The reporting rule chosen on the CAD's validation outlines: its FROC, false calls and choice,
on outlines made up so that the answer is known, and what the report says of it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ml.evaluation import report, unseen
from ml.runtime import cad
from ml.training import cad_outlines as co
from tests.unit.ml.test_ml_cad import _in_body, _model, _phantom


def _study(anatomy: str, i: int, *, faint_fp: float = -600.0, solid_fp: bool = False):
    """Two nodules (8 and 12 mm): a solid outline on each (scores 0.95, 0.90), a faint
    false call scoring above both, a small faint outline on the first nodule (scoring 0.2)
    and, optionally, a solid false call scoring 0.5."""
    outlines = [
        co.Outline(0.99, False, 7.0, faint_fp, None),
        co.Outline(0.95, False, 8.0, -100.0, 0),
        co.Outline(0.90, False, 11.0, -50.0, 1),
        co.Outline(0.20, False, 4.0, -500.0, 0),
    ]
    if solid_fp:
        outlines.append(co.Outline(0.50, False, 9.0, 20.0, None))
    nodules = [co.NoduleOutlines(8.0, 0.8, None), co.NoduleOutlines(12.0, 0.9, 0.7)]
    return co.OutlineStudy(f"{anatomy}-{i}", anatomy, nodules, 0.85, outlines)


def test_a_density_floor_ranks_faint_false_calls_last_and_stops_reporting_them():
    studies = [_study(a, i) for a in ("a", "b", "c") for i in range(2)]
    none = co.table(studies, -2000.0, 0.0)
    assert none["false_calls_per_study"] == 1.0  # the faint outline scores above threshold
    assert none["reported_share_6mm"] == 1.0
    floor = co.table(studies, -400.0, 0.0)
    assert floor["false_calls_per_study"] == 0.0 and floor["reported_share_6mm"] == 1.0
    assert floor["cpm"] == pytest.approx(1.0)  # both nodules before any false call
    # Without the floor the faint false call comes first in every study: one per study before
    # any nodule (the curve only interpolates up to it).
    assert none["sensitivity_at"]["0.125"] < floor["sensitivity_at"]["0.125"] == 1.0
    assert floor["cpm"] > none["cpm"]
    # With fewer outlines per study, only the first (in the order drawn) count.
    first = co.table(studies, -400.0, 0.0, limit=2)
    assert first["outlines_per_study"] == 2 and first["cpm"] == pytest.approx(0.5)
    assert co.table(studies, -400.0, 0.0, limit=1)["cpm"] == 0.0
    # A floor above the nodules' own density loses them.
    dense = co.table(studies, -80.0, 0.0)
    assert dense["reported_share_6mm"] == 0.5


def test_a_mass_is_ranked_first_and_reported_whatever_the_rule():
    mass = co.Outline(0.0, True, 40.0, -700.0, None)
    assert co.ranking(mass, -300.0, 6.0) == 1.0
    study = co.OutlineStudy("m", "a", [], 0.9, [mass])
    assert co.table([study], -300.0, 6.0)["false_calls_per_study"] == 1.0


def test_the_rule_is_chosen_on_other_anatomies_and_the_choice_recorded():
    # Anatomy "c" has a false call of -420 HU: only floors above it remove it; the others' only
    # false calls are at -600 HU, where every floor from -500 HU does.
    studies = [_study(a, i) for a in ("a", "b") for i in range(2)]
    studies += [_study("c", i, faint_fp=-420.0) for i in range(2)]
    assert co.choose(studies) == (-400.0, 0.0)  # the lowest floor that removes every one
    loao = co.leave_one_anatomy_out(studies)
    assert loao["chosen"]["c"] == {"density_floor_hu": -500.0, "size_floor_mm": 0.0}
    assert loao["chosen"]["a"] == {"density_floor_hu": -400.0, "size_floor_mm": 0.0}
    # "c" under the rule chosen without it keeps its false call first: a worse pooled CPM.
    assert loao["cpm"] < co.table(studies, -400.0, 0.0)["cpm"]


def test_outlines_of_both_pipelines_are_compared_on_the_nodules_both_outlined():
    studies = [_study("a", 0), _study("b", 0)]
    both = co.outline_comparison(studies)
    assert both["nodules"] == 2  # the 8 mm nodules have no baseline outline
    assert both["cad_mean_dice"] == pytest.approx(0.9)
    assert both["baseline_mean_dice"] == pytest.approx(0.7) and both["cad_better"] == 2
    assert co.outline_comparison(studies, 15.0)["nodules"] == 0


def test_a_study_is_outlined_by_the_cad_and_the_baseline_and_saved_and_loaded(tmp_path):
    spacing = (1.5, 0.8, 0.8)
    hu, _, nodule = _phantom(spacing, radius_mm=6.0)
    padded = _in_body(hu)
    labels = np.zeros(padded.shape, np.int16)
    labels[:, 20:-20, 20:-20][nodule] = 1
    centre = tuple(float(c) for c in np.argwhere(labels == 1).mean(axis=0))
    study = unseen.Study(
        "phantom", "a", "composite", padded, labels, spacing, [unseen.Truth(1, centre, 12.0)]
    )
    done = co.outline_study(study, _model(0.0))
    (nodule_outlines,) = done.nodules
    assert nodule_outlines.cad_dice is not None and nodule_outlines.cad_dice > 0.6
    assert nodule_outlines.baseline_dice is not None and nodule_outlines.baseline_dice > 0.6
    assert any(o.hit == 0 for o in done.outlines) and done.threshold == 0.0
    path = tmp_path / "phantom.json"
    path.write_text(json.dumps(dataclasses.asdict(done)))
    assert co.load([path]) == [done]
    # Scored once for several outliners, a study outlines as when it is scored itself.
    scored = cad.score_candidates(padded, spacing, _model(0.0))
    assert co.outline_study(study, _model(0.0), scored=scored) == done


def test_the_report_says_how_the_rule_was_chosen_from_the_tools_tables():
    studies = [_study(a, i) for a in ("a", "b", "c") for i in range(2)]
    density, size = co.choose(studies)
    tables = {
        "rules": [co.table(studies, *r) for r in co.rules()],
        "chosen_on_all": {"density_floor_hu": density, "size_floor_mm": size},
        "leave_one_anatomy_out": co.leave_one_anatomy_out(studies),
        "outlines_cad_vs_baseline": [co.outline_comparison(studies, d) for d in (0.0, 18.0)],
    }
    text = "\n".join(report.cad_rule_lines(tables))
    assert f"reaches {density:g} HU" in text and "on 6 validation composites" in text
    assert "| no floor | 0.696 | 1.00 | 1.000 |" in text  # a faint false call first in each
    assert "| chosen | 1.000 | 0.00 | 1.000 |" in text
    assert "both pipelines outlined (6): Dice CAD 0.90, baseline 0.70" in text
    assert "from 18 mm" not in text  # no nodule that large: no line


def test_outlines_by_an_outliner_are_compared_with_the_classical_ones_nodule_by_nodule():
    classical = [_study(a, i) for a in ("a", "b") for i in range(2)]
    drawn = [
        dataclasses.replace(
            s, nodules=[co.NoduleOutlines(8.0, 0.85, None), co.NoduleOutlines(12.0, None, 0.7)]
        )
        for s in classical
    ]
    both = co.outliner_comparison(drawn, classical)
    # Only the 8 mm nodule of each study was outlined by both (0.85 vs 0.8).
    assert both["nodules"] == 4 and both["outliner_better"] == 4 and both["classical_better"] == 0
    assert both["outliner_mean_dice"] == pytest.approx(0.85)
    assert both["classical_mean_dice"] == pytest.approx(0.8)
    assert both["outlined_by_outliner"] == 4 and both["outlined_classically"] == 8
    assert co.outliner_comparison(drawn, classical, 10.0)["nodules"] == 0


def test_the_report_sets_the_outliners_validation_beside_the_classical_outlines():
    classical = [_study(a, i) for a in ("a", "b") for i in range(2)]
    drawn = [
        dataclasses.replace(
            s, nodules=[co.NoduleOutlines(8.0, 0.85, None), co.NoduleOutlines(12.0, 0.95, 0.7)]
        )
        for s in classical
    ]
    classical_doc = {
        "rules": [co.table(classical, *r) for r in co.rules()],
        "chosen_on_all": {"density_floor_hu": -400.0, "size_floor_mm": 0.0},
    }
    drawn_doc = {
        "rules": [co.table(drawn, *r) for r in co.rules()],
        "outliner_vs_classical": [co.outliner_comparison(drawn, classical, d) for d in (0.0, 10.0)],
    }
    lines = report.outliner_validation_lines(drawn_doc, classical_doc)
    text = "\n".join(lines)
    assert "| all | 8 | 0.900 | 0.850 | 8 | 0 |" in text
    assert "| from 10 mm | 4 | 0.950 | 0.900 | 4 | 0 |" in text
    assert "reporting rule: U-Net outlines 1.000, classical 1.000" in text
    assert "U-Net drawing every nodule" in text
    drawn_doc["outliner_from_mm"] = 18.0
    text = "\n".join(report.outliner_validation_lines(drawn_doc, classical_doc))
    assert "only the nodules whose classical outline is at least 18 mm wide" in text
