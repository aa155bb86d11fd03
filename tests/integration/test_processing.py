"""The pipeline run directly (no broker): results, idempotency, reprocessing, bad series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from db import Job, Output, StudyState, audit
from dicom_node.samples import sample_study_uid
from tests.conftest import storescu, wait_for
from tests.helpers import study_row, study_state
from workers import processing

LUNG1 = sample_study_uid("lung1")


@pytest.fixture
def queued_lung1(database, node_factory, samples):
    node = node_factory(database, stable_seconds=0.3)
    assert storescu(node.port, samples["lung1"]).returncode == 0
    wait_for(lambda: study_state(database, LUNG1) == StudyState.QUEUED)
    return node


def _jobs(db):
    with db.session() as s:
        return list(s.execute(select(Job).order_by(Job.id)).scalars())


def _outputs(db):
    with db.session() as s:
        return list(s.execute(select(Output).order_by(Output.id)).scalars())


def test_lung1_is_processed_once_with_findings_seg_and_sr(database, queued_lung1, tmp_path):
    out = tmp_path / "outputs"
    assert processing.process_study(database, LUNG1, out) == "DONE"
    study = study_row(database, LUNG1)
    assert study.state == StudyState.DONE and study.priority in (1, 2, 3, 4)
    [job] = _jobs(database)
    assert job.findings["lesions"], "the real lung1 nodule was not found"
    # kept calls outrank every dropped one, so the study's probability is the best kept lesion's
    kept = [les["screening_probability"] for les in job.findings["lesions"]]
    assert max(kept) == job.findings["screening_probability"]
    assert job.model_versions == {
        "radai-lung-lesion-unet": "1.0.0",
        "radai-lesion-screen-cnn": "2.0.0",
    }
    assert job.pipeline_version == f"{processing.PIPELINE_RELEASE}/1.0.0+2.0.0"
    assert job.findings["input_qa"]["analysable"] is True
    assert job.findings["saliency_method"].startswith("Grad-CAM of radai-lesion-screen-cnn@2.0.0")
    outputs = _outputs(database)
    assert sorted(o.modality for o in outputs) == ["SEG", "SR"]
    for o in outputs:
        ds = pydicom.dcmread(o.path)
        assert ds.StudyInstanceUID == LUNG1 and ds.SOPInstanceUID == o.sop_instance_uid
        check = subprocess.run(["/usr/bin/dciodvfy", o.path], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors

    # The same message again (at-least-once delivery): nothing new.
    again = processing.process_study(database, LUNG1, out)
    assert again.startswith("already DONE")
    assert len(_jobs(database)) == 1 and len(_outputs(database)) == 2
    with database.session() as s:
        assert audit.verify(s).ok


def test_late_instance_supersedes_the_old_result(database, queued_lung1, samples, tmp_path):
    out = tmp_path / "outputs"
    assert processing.process_study(database, LUNG1, out) == "DONE"
    extra = pydicom.dcmread(samples["lung1"][0])
    extra.SOPInstanceUID = extra.SOPInstanceUID + ".1"
    extra.InstanceNumber = 999
    extra.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    extra.SeriesInstanceUID = extra.SeriesInstanceUID + ".9"
    path = tmp_path / "extra.dcm"
    extra.save_as(path, enforce_file_format=True)
    assert storescu(queued_lung1.port, [path]).returncode == 0
    wait_for(lambda: study_state(database, LUNG1) == StudyState.QUEUED)
    assert processing.process_study(database, LUNG1, out) == "DONE"
    first, second = _jobs(database)
    assert first.superseded and not second.superseded
    assert first.input_hash != second.input_hash
    assert len(_outputs(database)) == 4  # the old outputs are kept, never deleted


def test_mr_study_is_not_applicable(database, node_factory, tmp_path):
    node = node_factory(database, stable_seconds=0.3)
    mr = tmp_path / "mr.dcm"
    shutil.copy(get_testdata_file("MR_small.dcm"), mr)
    assert storescu(node.port, [mr]).returncode == 0
    uid = pydicom.dcmread(mr).StudyInstanceUID
    wait_for(lambda: study_state(database, uid) == StudyState.QUEUED)
    result = processing.process_study(database, uid, tmp_path / "out")
    assert result.startswith("NOT_APPLICABLE")
    study = study_row(database, uid)
    assert study.state == StudyState.NOT_APPLICABLE and "modality MR is not CT" in study.error
    assert _outputs(database) == []


def test_series_with_a_missing_slice_is_not_applicable(sqlite_db, node_factory, samples, tmp_path):
    node = node_factory(sqlite_db, stable_seconds=0.3)
    files = samples["lung1"][:20] + samples["lung1"][21:]
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.QUEUED)
    processing.process_study(sqlite_db, LUNG1, tmp_path / "out")
    study = study_row(sqlite_db, LUNG1)
    assert study.state == StudyState.NOT_APPLICABLE
    assert "missing slices" in study.error
    assert not any(Path(tmp_path / "out").rglob("*.dcm"))


def test_unexpected_error_leaves_study_retryable(database, queued_lung1, tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise OSError("disk on fire")

    monkeypatch.setattr(processing.inference, "analyse", boom)
    with pytest.raises(OSError):
        processing.process_study(database, LUNG1, tmp_path / "out")
    assert study_state(database, LUNG1) == StudyState.PROCESSING
    processing.fail(database, LUNG1, "gave up: disk on fire")
    study = study_row(database, LUNG1)
    assert study.state == StudyState.FAILED and "disk on fire" in study.error
    monkeypatch.undo()
    from db.requeue import request_retry

    with database.session() as s:
        request_retry(s, LUNG1, actor="test")
    wait_for(lambda: study_state(database, LUNG1) == StudyState.QUEUED)
    assert processing.process_study(database, LUNG1, tmp_path / "out") == "DONE"
    [job] = _jobs(database)
    assert job.attempts == 2 and job.state == StudyState.DONE


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_the_baseline_pipeline_gives_the_same_shape_of_result(database, queued_lung1, tmp_path):
    from db.findings import Findings
    from ml.runtime.baseline import BASELINE_NAME, BASELINE_VERSION
    from workers.pipeline.analysers import BaselineAnalyser

    out = tmp_path / "outputs"
    result = processing.process_study(database, LUNG1, out, analyser=BaselineAnalyser())
    assert result == "DONE"
    [job] = _jobs(database)
    assert job.model_versions == {BASELINE_NAME: BASELINE_VERSION}
    assert job.pipeline_version == f"{processing.PIPELINE_RELEASE}/baseline-{BASELINE_VERSION}"
    findings = Findings.from_json(job.findings)
    assert findings.pipeline == "baseline"
    assert findings.lesions, "the baseline finds the real lung1 nodule"
    assert all(les.screening_probability is None for les in findings.lesions)
    outputs = _outputs(database)
    assert sorted(o.modality for o in outputs) == ["SEG", "SR"]
    seg = pydicom.dcmread(next(o.path for o in outputs if o.modality == "SEG"))
    algorithms = {str(s.SegmentAlgorithmName) for s in seg.SegmentSequence}
    assert algorithms == {BASELINE_NAME}


@pytest.mark.timeout(900)  # scores ~3,000 candidates: minutes on two busy cores
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_the_cad_pipeline_scores_each_reported_nodule_into_findings_seg_and_sr(
    database, queued_lung1, tmp_path
):
    from db.findings import Findings
    from ml.runtime import cad
    from workers.pipeline.analysers import CadAnalyser, make_analyser

    analyser = make_analyser("cad")
    assert isinstance(analyser, CadAnalyser)
    out = tmp_path / "outputs"
    assert processing.process_study(database, LUNG1, out, analyser=analyser) == "DONE"
    [job] = _jobs(database)
    # The classifier and, by default, the outline U-Net that redraws nodules from 18 mm and the
    # second stage that scores every outline again.
    assert analyser.outliner is not None and analyser.reranker is not None
    assert job.model_versions == {
        analyser.model.name: analyser.model.version,
        analyser.outliner.name: analyser.outliner.version,
        analyser.reranker.name: analyser.reranker.version,
    }
    findings = Findings.from_json(job.findings)
    assert findings.pipeline == "cad"
    threshold = cad.threshold_of(analyser.reranker)
    # Every reported nodule carries the second stage's probability, at or above its threshold; a
    # mass (over 3 cm, reported by size) carries none.
    for les in findings.lesions:
        if les.screening_probability is None:
            assert les.volume_mm3 >= round(cad.MIN_MASS_VOLUME_MM3, 1)
        else:
            assert les.screening_probability >= threshold
            # ground glass and partial-volume specks are outlined but never reported
            assert les.mean_hu is not None and les.mean_hu >= cad.MIN_REPORTED_MEAN_HU
    outputs = _outputs(database)
    assert sorted(o.modality for o in outputs) == ["SEG", "SR"]
    seg_path = next(o.path for o in outputs if o.modality == "SEG")
    seg = pydicom.dcmread(seg_path)
    names = {str(s.SegmentAlgorithmName) for s in seg.SegmentSequence}
    assert cad.CAD_NAME in names or not findings.lesions
    # What drew and scored the outlines is named in the SEG: the classifier's, the outline U-Net's
    # and the second stage's versions.
    assert str(seg.SoftwareVersions) == (
        f"{analyser.model.version} outline {analyser.outliner.version} "
        f"rerank {analyser.reranker.version}"
    )
    for path in (seg_path, next(o.path for o in outputs if o.modality == "SR")):
        check = subprocess.run(["/usr/bin/dciodvfy", path], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_the_malignancy_model_scores_each_lesion_into_findings_and_sr(
    database, queued_lung1, tmp_path
):
    from db.findings import Findings
    from ml.runtime import registry
    from workers.dicom_out.sr import MALIGNANCY_RATING_PROBABILITY

    grader = registry.load(registry.DEFAULT_REFS["malignancy"])
    out = tmp_path / "outputs"
    assert processing.process_study(database, LUNG1, out, grader=grader) == "DONE"
    [job] = _jobs(database)
    assert job.model_versions[grader.name] == grader.version
    assert job.pipeline_version.endswith(f"+m{grader.version}")
    findings = Findings.from_json(job.findings)
    scores = [les.malignancy_score for les in findings.lesions]
    assert scores and all(s is not None and 0.0 <= s <= 1.0 for s in scores)
    sr_path = next(o.path for o in _outputs(database) if o.modality == "SR")
    check = subprocess.run(["/usr/bin/dciodvfy", sr_path], capture_output=True, text=True)
    errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], errors
    dump = subprocess.run(["/usr/bin/dsrdump", sr_path], capture_output=True, text=True)
    assert dump.returncode == 0
    assert MALIGNANCY_RATING_PROBABILITY[0].meaning in dump.stdout
    texts: list[str] = []

    def walk(items) -> None:  # noqa: ANN001
        for item in items:
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(pydicom.dcmread(sr_path).ContentSequence)
    assert any("not pathology" in text for text in texts)
