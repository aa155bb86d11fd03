"""The nodule CAD's second stage: its features, its network, how it reorders a CAD result, and
how it is fitted, thresholded and registered leave one anatomy out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.image.blobs import Blob
from ml.image.measure import RegionMeasurement
from ml.runtime import cad, cad_rerank, networks, registry
from ml.runtime.registry import LoadedModel
from ml.training import cad_rerank as training

N_FEATURES = len(cad_rerank.FEATURES)


def _measurement(label: int, volume: float, mean_hu: float = 20.0, elongation: float = 1.0):
    d = (6 * volume / np.pi) ** (1 / 3)
    return RegionMeasurement(
        label=label, voxel_count=int(volume), voxel_volume_mm3=volume, mesh_volume_mm3=volume,
        surface_area_mm2=np.pi * d**2, sphericity=1.0 / elongation,
        max_3d_diameter_mm=d * elongation, max_2d_axial_diameter_mm=d,
        major_axis_mm=d * elongation, minor_axis_mm=d,
        least_axis_mm=d, mean_hu=mean_hu, min_hu=mean_hu - 50, max_hu=mean_hu + 50,
        centroid_zyx=(1.0, 1.0, 1.0), bbox=(0, 0, 0, 2, 2, 2),
    )  # fmt: skip


def _blob(radius_mm: float = 3.0) -> Blob:
    return Blob((1.0, 1.0, 1.0), radius_mm, 300.0, 0.8, 0.9, 3, 10.0, 1.0)


def test_features_follow_their_names_and_the_study_context_is_relative():
    m = _measurement(1, 500.0, mean_hu=-100.0, elongation=3.0)
    row = cad_rerank.outline_features(m, _blob(), 0.9)
    assert len(row) == N_FEATURES - cad_rerank.STUDY_FEATURES
    assert row[0] == pytest.approx(np.log(9.0))  # the classifier's logit
    assert row[1] == pytest.approx(np.log(500.0))
    assert row[cad_rerank.FEATURES.index("mean HU / 1000")] == pytest.approx(-0.1)
    assert row[3] == pytest.approx(np.log(3.0))  # major / minor axis
    # A score of exactly 0 or 1 stays finite.
    assert np.isfinite(cad_rerank.outline_features(m, _blob(), 1.0)).all()
    rows = np.array([[2.0] + row[1:], [0.0] + row[1:], [-1.0] + row[1:]], dtype=np.float32)
    x = cad_rerank.in_study(rows)
    assert x.shape == (3, N_FEATURES)
    assert x[:, -2].tolist() == pytest.approx([2.0, 0.0, -1.0])  # less the median logit 0
    assert x[:, -1].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])  # rank over outlines
    # The same outlines in a study whose scores are all 5 lower look the same against it.
    shifted = rows.copy()
    shifted[:, 0] -= 5.0
    assert np.allclose(cad_rerank.in_study(shifted)[:, -2:], x[:, -2:])
    assert cad_rerank.in_study(np.zeros((0, N_FEATURES - 2))).shape == (0, N_FEATURES)


def test_the_network_standardises_and_needs_its_shape():
    net = networks.build("cad-rerank", {"features": 3, "hidden": 0})
    assert isinstance(net, networks.RerankNet)
    with torch.no_grad():
        net.mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        net.scale.copy_(torch.tensor([2.0, 2.0, 2.0]))
        net.head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        net.head.bias.zero_()
    out = net(torch.tensor([[5.0, 0.0, 0.0]]))
    assert out.item() == pytest.approx(2.0)  # (5 - 1) / 2
    assert isinstance(
        networks.build("cad-rerank", {"features": 3, "hidden": 4}).head, torch.nn.Sequential
    )
    with pytest.raises(ValueError):
        networks.build("cad-rerank")


def _reranker(threshold: float, weight_on: str = "log volume (mm3)") -> LoadedModel:
    net = networks.build("cad-rerank", {"features": N_FEATURES, "hidden": 0})
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.weight[0, cad_rerank.FEATURES.index(weight_on)] = 1.0
    card = {"operating_point": {"threshold": threshold}}
    return LoadedModel(registry.RERANKER, "test", "cad-rerank", net, card)


def _result(volumes: list[float], scores: list[float], masses: int = 0) -> cad.CadResult:
    labels = np.zeros((4, 4, len(volumes) + 1), dtype=np.uint8)
    for i in range(len(volumes)):
        labels[:, :, i] = i + 1
    lesions = [_measurement(i + 1, v) for i, v in enumerate(volumes)]
    seeds = [None] * masses + [_blob() for _ in volumes[masses:]]
    return cad.CadResult(
        labels.astype(bool), labels, lesions, scores, 0.5, 100, masses=masses, seeds=seeds
    )


def test_rerank_orders_nodules_by_the_second_stage_and_keeps_masses_first():
    # A mass, then three nodules in the classifier's order; the second stage prefers volume.
    r = _result([40000.0, 10.0, 300.0, 50.0], [0.2, 0.9, 0.8, 0.7], masses=1)
    out = cad.rerank(r, _reranker(threshold=0.99))
    assert [m.voxel_volume_mm3 for m in out.lesions] == [40000.0, 300.0, 50.0, 10.0]
    assert [m.label for m in out.lesions] == [1, 2, 3, 4]
    # The labels move with their lesions: the 300 mm3 outline (old label 3) is now label 2.
    assert (out.lesion_labels[:, :, 2] == 2).all() and (out.lesion_labels[:, :, 1] == 4).all()
    assert out.scores[0] == 0.2  # the mass keeps its score: it is reported by size
    assert out.scores[1:] == sorted(out.scores[1:], reverse=True)
    assert out.classifier_scores == [0.2, 0.8, 0.7, 0.9]
    assert out.threshold == 0.99 and out.reported == [0, 1]  # sigmoid(log 300) > 0.99
    only = cad.reported_only(out)
    assert only.classifier_scores == [0.2, 0.8] and len(only.seeds) == 2
    # A nodule without the candidate it was drawn from cannot be scored again.
    unseeded = cad.CadResult(
        r.lung_mask, r.lesion_labels, r.lesions, r.scores, 0.5, 1, masses=0, seeds=[None] * 4
    )
    with pytest.raises(ValueError):
        cad.rerank(unseeded, _reranker(0.5))


def _study(anatomy: str, i: int, rng: np.random.Generator, nodules: int = 3) -> training.Study:
    """Ten outlines: the nodules' have a larger 'volume' feature than the others'."""
    hits = list(range(nodules)) + [None] * (10 - nodules)
    x = rng.normal(0, 1, (10, N_FEATURES)).astype(np.float32)
    x[:nodules, 1] += 3.0
    return training.Study(
        f"{anatomy}-{i}", anatomy, [8.0] * nodules, [], x, rng.uniform(0, 1, 10), hits,
        np.zeros(10, bool), 0.5,
    )  # fmt: skip


def _studies(seed: int = 0) -> list[training.Study]:
    rng = np.random.default_rng(seed)
    return [_study(a, i, rng) for a in ("a", "b", "c") for i in range(4)]


def test_fitting_learns_what_separates_nodules_and_the_threshold_keeps_the_target():
    studies = _studies()
    net = training.fit(studies, {"hidden": 0, "l2": 1e-3})
    p = [cad_rerank.probabilities(net, s.features) for s in studies]
    assert all(q[:3].mean() > q[3:].mean() + 0.3 for q in p)
    t = training.threshold_at(studies, p, target=1.0)
    op = training.operating_point(studies, p, [t] * len(studies))
    assert op["false_calls_per_study"] <= 1.0
    # Just below it, one more false call would be reported (it is the lowest such threshold).
    loose = training.operating_point(studies, p, [np.nextafter(t, -np.inf)] * len(studies))
    assert loose["false_calls_per_study"] > 1.0 or t == 0.0
    assert (
        training.threshold_at(studies, p, target=0.0)
        > max(float(q[s.hits.index(None)]) for s, q in zip(studies, p, strict=True)) - 1.0
    )


def test_leave_one_out_never_sees_the_anatomy_it_scores():
    studies = _studies()
    recipe = {"hidden": 0, "l2": 1e-3}
    before = training.leave_one_out(studies, recipe)
    # Relabel anatomy 'a' upside down: its own scores cannot change, the others' must.
    flipped = [
        training.Study(s.study_id, s.anatomy, s.diameters_mm, s.masses, s.features, s.scores,
                       s.hits[::-1] if s.anatomy == "a" else s.hits, s.faint,
                       s.classifier_threshold)
        for s in studies
    ]  # fmt: skip
    after = training.leave_one_out(flipped, recipe)
    for s, b, a in zip(studies, before, after, strict=True):
        if s.anatomy == "a":
            assert np.allclose(a, b)
        else:
            assert not np.allclose(a, b)


def test_a_recipe_is_chosen_only_where_it_beats_the_classifier():
    def ev(classifier: float, *cpms: float) -> dict:
        rows = [{"recipe": {"hidden": 0, "l2": x}, "froc": {"cpm": c}} for x, c in enumerate(cpms)]
        return {"classifier": {"froc": {"cpm": classifier}}, "recipes": rows}

    assert training.choose(ev(0.5, 0.4, 0.6, 0.6)) == {"hidden": 0, "l2": 1}
    assert training.choose(ev(0.5, 0.4, 0.5)) is None


def test_registered_models_load_by_name_and_fold(tmp_path):
    studies = _studies()
    recipe = {"hidden": 0, "l2": 1e-3}
    evaluation = training.evaluate(studies)
    written = training.register(studies, recipe, evaluation, "x", tmp_path)
    assert len(written) == 4  # three folds and the shipped model
    shipped = registry.load(f"{training.NAME}@{training.VERSION}", tmp_path)
    assert shipped.task == "cad-rerank" and cad.threshold_of(shipped) > 0.0
    fold = registry.load(f"{training.NAME}@{training.VERSION}#holdout-a", tmp_path)
    assert fold.card["anatomies"] == ["b", "c"]
    # Its threshold is the one the evaluation chose without anatomy a, nested.
    row = next(r for r in evaluation["recipes"] if r["recipe"] == recipe)
    assert cad.threshold_of(fold) == row["fold_thresholds"]["a"]
    # Each anatomy's own figures at its fold threshold; four studies each, so they pool back.
    per = row["by_anatomy"]
    assert set(per) == {"a", "b", "c"}
    pooled = sum(op["false_calls_per_study"] for op in per.values()) / 3
    assert pooled == pytest.approx(row["operating_point"]["false_calls_per_study"])
    assert row["fold_thresholds"]["a"] == training.fold_threshold(
        [s for s in studies if s.anatomy != "a"], recipe
    )
    x = studies[0].features
    assert not np.allclose(
        cad_rerank.probabilities(fold.net, x), cad_rerank.probabilities(shipped.net, x)
    )


def test_the_report_shows_each_recipe_beside_the_classifier_and_marks_the_chosen_one():
    from ml.evaluation import report

    def row(cpm: float) -> dict:
        at = {"0.125": cpm / 2, "1": cpm, "8": cpm * 1.5}
        op = {"false_calls_per_study": 1.0, "reported_share_6mm": cpm}
        return {"froc": {"cpm": cpm, "sensitivity_at": at}, "operating_point": op}

    chosen = {"hidden": 0, "l2": 0.001}
    doc = {
        "studies": 36,
        "outlines_per_study": 40,
        "classifier": row(0.38),
        "recipes": [
            {"recipe": chosen, **row(0.47)},
            {"recipe": {"hidden": 16, "l2": 0.1}, **row(0.3)},
        ],
        "chosen": chosen,
    }
    lines = report.rerank_validation_lines(doc)
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[1].startswith("| classifier alone") and "| 0.380 |" in table[1]
    assert "(chosen)" in table[2] and "| 0.470 |" in table[2]
    assert "(chosen)" not in table[3] and "16 hidden" in table[3]
    assert "per held-out anatomy" not in " ".join(lines)
    doc["recipes"][0]["by_anatomy"] = {
        "cap001": {"false_calls_per_study": 2.0, "reported_share_6mm": 0.5},
        "lung1": {"false_calls_per_study": 0.0, "reported_share_6mm": 0.6},
    }
    text = " ".join(report.rerank_validation_lines(doc))
    assert "cap001 2.00, 0.50; lung1 0.00, 0.60." in text
    doc["chosen"] = None
    assert "none did" in " ".join(report.rerank_validation_lines(doc))


def test_validation_outlines_become_the_second_stages_rows_masses_apart():
    from ml.training import cad_outlines

    m, seed = _measurement(2, 300.0), _blob()
    outlines = [
        cad_outlines.Outline(0.0, True, 40.0, 30.0, 1, _measurement(1, 40000.0).to_dict(), None),
        cad_outlines.Outline(0.9, False, 8.3, 20.0, 0, m.to_dict(), seed.to_dict()),
        cad_outlines.Outline(0.2, False, 5.0, -600.0, None, m.to_dict(), seed.to_dict()),
    ]
    study = cad_outlines.OutlineStudy("s", "lung1", [], 0.7, outlines)
    s = training.from_outlines(study)
    assert s.masses == [1] and s.hits == [0, None] and s.classifier_threshold == 0.7
    assert s.faint.tolist() == [False, True]  # by the outline's mean density, -600 HU
    rows = [cad_rerank.outline_features(m, seed, p) for p in (0.9, 0.2)]
    assert np.allclose(s.features, cad_rerank.in_study(np.array(rows)))
    old = cad_outlines.OutlineStudy(
        "s", "lung1", [], 0.7, [cad_outlines.Outline(0.9, False, 8.3, 20.0, 0)]
    )
    with pytest.raises(ValueError, match="without their features"):
        training.from_outlines(old)


def test_fit_and_register_reads_outline_files_and_ships_only_a_better_ranking(tmp_path):
    import json
    from dataclasses import asdict

    from ml.training import cad_outlines

    rng = np.random.default_rng(3)
    folder = tmp_path / "outlines"
    folder.mkdir()
    for anatomy in ("lung1", "normal001", "cap001"):
        for i in range(3):
            outlines = []
            for k in range(12):
                nodule = k < 3
                volume = float(rng.uniform(400, 900) if nodule else rng.uniform(5, 300))
                m = _measurement(k + 1, volume, mean_hu=float(rng.uniform(-300, 50)))
                # The classifier's scores say nothing here; the outlines' size does.
                outlines.append(
                    cad_outlines.Outline(
                        float(rng.uniform(0.1, 0.9)), False, 8.0, m.mean_hu,
                        k if nodule else None, m.to_dict(), _blob().to_dict(),
                    )
                )  # fmt: skip
            study = cad_outlines.OutlineStudy(f"{anatomy}-{i}", anatomy, [], 0.5, outlines)
            name = f"{anatomy}-{i}.cnn@1.{registry.CAD_OUTLINER}.from18mm.limit40.json"
            (folder / name).write_text(json.dumps(asdict(study)))
    # A study with nodules: the FROC needs their count (three 8 mm nodules per study).
    for p in folder.iterdir():
        d = json.loads(p.read_text())
        d["nodules"] = [{"diameter_mm": 8.0, "cad_dice": None, "baseline_dice": None}] * 3
        p.write_text(json.dumps(d))
    paths = training.outline_files(folder, registry.CAD_OUTLINER, 40)
    assert len(paths) == 9 and training.outline_files(folder, "classical", 40) == []
    out = tmp_path / "validation.json"
    doc = training.fit_and_register(paths, out, root=tmp_path / "registry", log=lambda _: None)
    assert json.loads(out.read_text())["chosen"] == doc["chosen"] is not None
    best = max(r["froc"]["cpm"] for r in doc["recipes"])
    assert best > doc["classifier"]["froc"]["cpm"]
    shipped = registry.load(f"{training.NAME}@{training.VERSION}", tmp_path / "registry")
    assert ("coefficients" in shipped.card) == (shipped.card["architecture"]["hidden"] == 0)
    assert "NOT FOR CLINICAL USE" in next((tmp_path / "registry").rglob("card.md")).read_text()
    with pytest.raises(ValueError, match="three anatomies"):
        training.fit_and_register(paths[:3], out, root=tmp_path / "r2", log=lambda _: None)
