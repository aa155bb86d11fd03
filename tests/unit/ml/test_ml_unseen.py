"""The unseen-patient evaluation (ml.evaluation.unseen) on phantoms: the hit rule, size bands,
an oracle and a detector that calls everywhere, mirrored studies, the verdict, the report section
and the gate on the LIDC test split. Never reads the shared data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ml.data import splits
from ml.data.compose import PlacementIndex
from ml.data.nodules import NoduleRow
from ml.evaluation import report, unseen
from ml.evaluation.unseen import Detections, Study, Truth
from tests.kit.phantoms import _ellipsoid, phantom_background, phantom_crop

SPACING = (2.0, 1.0, 1.0)


def _sphere_study(centres_mm, radii_mm, shape=(20, 60, 60), study_id="s") -> Study:
    labels = np.zeros(shape, dtype=np.int16)
    truths = []
    for i, (c, r) in enumerate(zip(centres_mm, radii_mm, strict=True), start=1):
        labels[_ellipsoid(shape, SPACING, c, (r, r, r))] = i
        cv = ndimage.center_of_mass(labels == i)
        truths.append(Truth(i, tuple(float(v) for v in cv), 2.0 * r, f"n{i}", "P", "free"))
    hu = np.full(shape, -850.0, dtype=np.float32)
    return Study(study_id, "phantom", "composite", hu, labels, SPACING, truths)


def _blob(shape, centre_vox, half=(0, 1, 1)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    z, y, x = centre_vox
    m[
        z - half[0] : z + half[0] + 1, y - half[1] : y + half[1] + 1, x - half[2] : x + half[2] + 1
    ] = 1
    return m


def test_hit_within_radius_of_centre_and_miss_beyond_it():
    study = _sphere_study([(20.0, 30.0, 20.0)], [5.0])
    cz, cy, cx = (int(round(v)) for v in study.truths[0].centre_voxel)
    det = np.zeros(study.labels.shape, dtype=np.int32)
    det[_blob(det.shape, (cz, cy, cx + 3))] = 1  # 3 mm from the centre: inside the 5 mm radius
    det[_blob(det.shape, (cz, cy, cx + 12))] = 2  # 12 mm away, outside the nodule
    assert unseen.match(det, 2, study.labels, study.truths, SPACING) == [0, None]


def test_hit_inside_the_label_counts_even_beyond_the_radius():
    # An elongated lesion: its centroid is far from a candidate that still lies inside it.
    shape = (20, 60, 60)
    labels = np.zeros(shape, dtype=np.int16)
    labels[10, 30, 10:50] = 1
    truth = Truth(1, (10.0, 30.0, 29.5), 4.0)  # radius 2 mm
    det = np.zeros(shape, dtype=np.int32)
    det[10, 30, 12] = 1
    assert unseen.match(det, 1, labels, [truth], SPACING) == [0]


def test_candidate_between_two_nodules_takes_the_nearest():
    study = _sphere_study([(20.0, 30.0, 15.0), (20.0, 30.0, 27.0)], [9.0, 9.0])
    cz, cy, _ = (int(round(v)) for v in study.truths[0].centre_voxel)
    det = np.zeros(study.labels.shape, dtype=np.int32)
    det[_blob(det.shape, (cz, cy, 22), half=(0, 0, 0))] = 1  # 7.5 / 4.5 mm: within both radii
    assert unseen.match(det, 1, study.labels, study.truths, SPACING) == [1]


def test_size_bands_drop_other_bands_hits_but_keep_false_positives():
    truths = [Truth(1, (0, 0, 0), 4.0), Truth(2, (0, 0, 0), 12.0)]
    s = unseen.Scored(
        "s",
        "a",
        "composite",
        "m",
        truths,
        [(0.9, 0, True), (0.8, 1, True), (0.7, None, True)],
        [],
        0.0,
    )
    large = unseen.scan_detections([s], (6.0, math.inf))[0]
    assert large.nodules == 1
    assert list(large.candidates) == [(0.8, 0), (0.7, None)]
    small = unseen.scan_detections([s], (0.0, 6.0))[0]
    assert small.nodules == 1 and list(small.candidates) == [(0.9, 0), (0.7, None)]


def _oracle(study: Study):
    def detect(hu, spacing):
        return Detections(study.labels.astype(np.int32), [1.0] * len(study.truths), 0.5)

    return detect


def _calls_everywhere(n_per_axis: int = 3):
    """Candidates on a regular grid of small cubes: every scan gets n^3 calls, score 0.9."""

    def detect(hu, spacing):
        labels = np.zeros(hu.shape, dtype=np.int32)
        k = 0
        for z in np.linspace(1, hu.shape[0] - 2, n_per_axis).astype(int):
            for y in np.linspace(1, hu.shape[1] - 2, n_per_axis).astype(int):
                for x in np.linspace(1, hu.shape[2] - 2, n_per_axis).astype(int):
                    k += 1
                    labels[z, y, x] = k
        return Detections(labels, [0.9] * k, 0.5)

    return detect


def _studies(n=4):
    return [
        _sphere_study(
            [(20.0, 20.0, 15.0), (20.0, 40.0, 45.0)], [2.0 + i, 6.0 + 2 * i], study_id=f"s{i}"
        )
        for i in range(n)
    ]


def test_a_detector_that_finds_everything_has_cpm_one_and_dice_one():
    scored = [unseen.score_study(s, "oracle", _oracle(s)) for s in _studies()]
    out = unseen.summarise(scored, "oracle", resamples=20)
    assert out["froc"]["all"]["cpm"][0] == pytest.approx(1.0)
    assert out["froc"]["all"]["nodules"] == 8
    assert out["operating_point"]["false_calls_per_scan"] == 0
    assert out["dice"]["found_nodules"][0] == pytest.approx(1.0)


def test_a_detector_that_calls_everywhere_has_its_false_positives_counted_per_scan():
    studies = _studies()
    scored = [unseen.score_study(s, "grid", _calls_everywhere(3)) for s in studies]
    hits = sum(1 for s in scored for _, h, _ in s.candidates if h is not None)
    out = unseen.summarise(scored, "grid", resamples=20)
    fp_per_scan = (27 * len(studies) - hits) / len(studies)
    assert out["operating_point"]["false_calls_per_scan"] == pytest.approx(fp_per_scan)
    assert out["froc"]["all"]["curve"]["fps_per_scan"][-1] == pytest.approx(fp_per_scan)
    assert out["froc"]["all"]["cpm"][0] < 0.5


def test_mirrored_study_flips_labels_and_truth_consistently():
    study = _sphere_study([(20.0, 20.0, 12.0), (20.0, 40.0, 45.0)], [4.0, 6.0])
    m = unseen.mirrored(study)
    np.testing.assert_array_equal(m.labels, study.labels[:, :, ::-1])
    np.testing.assert_array_equal(m.hu, study.hu[:, :, ::-1])
    for t in m.truths:
        c = ndimage.center_of_mass(m.labels == t.label)
        np.testing.assert_allclose(c, t.centre_voxel, atol=1e-6)
    # an oracle on the mirrored copy finds both nodules, nothing else, with the same outlines
    s0 = unseen.score_study(study, "oracle", _oracle(study))
    s1 = unseen.score_study(m, "oracle", _oracle(m))
    assert [h for _, h, _ in s1.candidates] == [0, 1]
    assert [o["dice"] for o in s1.overlap] == [o["dice"] for o in s0.overlap]


def test_composite_of_phantoms_is_deterministic_and_its_truth_matches_its_labels():
    bg = phantom_background()
    index = PlacementIndex(bg)
    crops = [
        phantom_crop(radii_mm=(5.0, 4.0, 4.0), wall=False, shape=(10, 30, 30)),
        phantom_crop(wall=False),
    ]
    a = unseen.compose_study(bg, index, crops, seed=3)
    b = unseen.compose_study(bg, index, crops, seed=3)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert len(a.truths) == 2
    for t in a.truths:
        assert a.labels[tuple(int(round(v)) for v in t.centre_voxel)] == t.label
        vol = 4 / 3 * math.pi * (t.diameter_mm / 2) ** 3
        assert vol == pytest.approx((a.labels == t.label).sum() * np.prod(bg.spacing), rel=0.3)


def test_run_scores_every_method_and_the_baseline_stays_default_unless_models_win_every_row():
    studies = _studies(3)
    lookup = {id(s.hu): s for s in studies}

    def oracle(hu, spacing):
        return _oracle(lookup[id(hu)])(hu, spacing)

    methods = {
        "models": lambda a: (_calls_everywhere(2), "grid", False),
        "baseline": lambda a: (oracle, "oracle", False),
    }
    results, _ = unseen.run(Path("."), methods, k=3, robust_k=0, resamples=20, studies=studies)
    assert results["verdict"]["default"] == "baseline"
    assert "CPM (all nodules)" in results["verdict"]["rows_not_won_by_models"]
    swapped = {"models": methods["baseline"], "baseline": methods["models"]}
    results2, _ = unseen.run(Path("."), swapped, k=3, robust_k=0, resamples=20, studies=studies)
    # No real CTs here: the false-call rows have no figure, and a missing figure is not a win.
    assert results2["verdict"]["default"] == "baseline"
    assert all(
        "(no figure)" in r or "real" in r or "CT" in r
        for r in results2["verdict"]["rows_not_won_by_models"]
    )
    text = report.unseen_markdown(report._clean(results))
    assert text.startswith(report.UNSEEN_BEGIN) and text.rstrip().endswith(report.UNSEEN_END)
    assert "| all | models |" in text and results["verdict"]["sentence"] in text


def test_report_section_is_replaced_and_other_tables_stay(tmp_path):
    (tmp_path / "report.md").write_text(
        "# Model evaluation\n\nintro\n\n## Real tumours\n\nold table\n"
    )
    text = report._with_section(
        (tmp_path / "report.md").read_text(),
        "<!-- unseen-patients:begin -->\nA\n<!-- unseen-patients:end -->\n",
    )
    assert text.index("A") < text.index("## Real tumours") and "old table" in text
    again = report._with_section(
        text, "<!-- unseen-patients:begin -->\nB\n<!-- unseen-patients:end -->\n"
    )
    assert "B" in again and "\nA\n" not in again and again.count("unseen-patients:begin") == 1


def test_test_split_is_read_only_with_the_final_evaluation_purpose(tmp_path, monkeypatch):
    ids = [f"LIDC-IDRI-{i:04d}" for i in range(1, 41)]
    split_file = tmp_path / "split.json"
    splits.write_split(ids, split_file)
    crop_dir = tmp_path / "lidc-nodules"
    (crop_dir / "image").mkdir(parents=True)
    (crop_dir / "mask").mkdir()
    lines = ["patient_id,nodule_id,diameter_mm"]
    for pid in ids:
        row = NoduleRow(pid, 1, 8.0, {})
        (crop_dir / "image" / row.crop_name).touch()
        (crop_dir / "mask" / row.crop_name).touch()
        lines.append(f"{pid},1,8.0")
    (crop_dir / "nodules.csv").write_text("\n".join(lines) + "\n")
    purposes = []
    real = splits.lidc_split

    def spy(part, *, purpose=None, path=splits.SPLIT_FILE):
        purposes.append((part, purpose))
        return real(part, purpose=purpose, path=split_file)

    monkeypatch.setattr(splits, "lidc_split", spy)
    rows = unseen.test_rows(tmp_path)
    assert purposes == [("test", "final-evaluation")]
    assert rows and {r.patient_id for r in rows} == set(
        real("test", purpose="final-evaluation", path=split_file)
    )
    with pytest.raises(PermissionError):
        splits.rows_in(rows, "test")


def test_studies_are_dealt_deterministically_each_nodule_once_before_any_twice():
    rows = [NoduleRow(f"LIDC-IDRI-90{i:02d}", 1, 8.0, {}) for i in range(5)]
    used: list[str] = []

    def crop_loader(row):
        used.append(row.patient_id)
        return phantom_crop(radii_mm=(4.0, 3.5, 3.5), wall=False, shape=(8, 24, 24))

    def studies():
        return unseen.iter_studies(
            Path("."),
            ("phantomA", "phantomB"),
            2,
            rows=rows,
            nodules_per_study=2,
            load=lambda d, name: phantom_background(name=name),
            crop_loader=crop_loader,
        )

    first = [(s.study_id, s.kind, len(s.truths)) for s in studies()]
    assert [k for _, k, _ in first] == [
        "composite",
        "mirrored",
        "composite",
        "as-is",
        "composite",
        "mirrored",
        "composite",
        "as-is",
    ]
    assert sorted(used[:5]) == sorted(r.patient_id for r in rows)  # all once before a repeat
    assert len(used) == 8
    used.clear()
    assert [(s.study_id, s.kind, len(s.truths)) for s in studies()] == first


def test_with_two_challengers_each_is_judged_against_the_baseline_and_figures_carry_over():
    studies = _studies(3)
    lookup = {id(s.hu): s for s in studies}

    def oracle(hu, spacing):
        return _oracle(lookup[id(hu)])(hu, spacing)

    grid = lambda a: (_calls_everywhere(2), "grid", False)  # noqa: E731
    methods = {
        "models": grid,
        "cad": lambda a: (oracle, "oracle", False),
        "baseline": grid,
    }
    results, _ = unseen.run(Path("."), methods, k=3, robust_k=0, resamples=20, studies=studies)
    by = results["verdict"]["by_challenger"]
    assert set(by) == {"models", "cad"}
    # The oracle beats the grid on the composite rows; the grid ties itself on every row.
    assert "CPM (all nodules)" in by["cad"]["rows_won_by_models"]
    assert "CPM (all nodules)" in by["models"]["rows_not_won_by_models"]
    assert "CPM (all nodules)" in by["models"]["rows_tied"]  # a tie is said apart from a loss
    assert "ties on: " in by["models"]["sentence"] and "CPM" not in by["cad"].get("rows_tied", [])
    assert results["verdict"]["default"] == "baseline"  # no real CTs: rows without figures
    # Running only the CAD again carries the other methods' figures over, same studies only.
    again, _ = unseen.run(
        Path("."), {"cad": methods["cad"]}, k=3, robust_k=0, resamples=20, studies=studies
    )
    merged = unseen.carry_over(again, results)
    assert list(merged["methods"]) == ["models", "baseline", "cad"]
    assert merged["methods"]["models"] == results["methods"]["models"]
    assert set(merged["carried_over"]) == {"models", "baseline"}
    assert merged["verdict"]["by_challenger"]["cad"] == by["cad"]
    other = dict(results, settings={**results["settings"], "seed": 1})
    with pytest.raises(ValueError, match="other studies"):
        unseen.carry_over(again, other)


def test_the_comparison_names_every_pipeline_that_shares_the_best_figure():
    assert report.better_of({"models": 18.0, "cad": 1.0, "baseline": 1.0}, False) == (
        "tie: cad, baseline"
    )
    assert report.better_of({"models": 0.06, "cad": 0.17, "baseline": 0.07}, True) == "cad"
    assert report.better_of({"models": 0.5, "cad": 0.2, "baseline": 0.9}, False) == "cad"
    assert report.better_of({"cad": 1.0, "baseline": 1.0}, False) == "tie"
