"""Follow-up through the whole pipeline: a prior and then a follow-up of the same patient sent to
the node and processed with `process_study`, a prior held by a real Orthanc and found through
RADAI_PRIOR_SOURCES, and the bad priors (another patient, an MR, missing slices), each of which
ends with a reason on the study and no comparison.

The prior is the bundled sample CT `lung1` under new UIDs and an earlier date: its nodule is the
same nodule, so the follow-up must inherit its tracking UID and report (nearly) no change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import delete, select

from db import Instance, Job, Output, Series, StudyState
from db.findings import Findings
from db.queries import study_summaries
from dicom_io.cstore import send_files
from dicom_node.samples import sample_study_uid
from tests.conftest import storescu, wait_for
from tests.helpers import study_row, study_state
from tests.kit.orthanc import OrthancServer
from workers import processing
from workers.pipeline.analysers import BaselineAnalyser
from workers.pipeline.followup import NO_PRIOR
from workers.pipeline.prior import PriorSources

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LUNG1 = sample_study_uid("lung1")
PRIOR = LUNG1 + ".77"
PRIOR_DATE = "20230615"  # lung1 is of 20240102: 201 days later


def _prior_copy(files: list[Path], folder: Path, study_uid: str = PRIOR, **tags: str) -> list[Path]:
    """lung1 as an earlier study of the same patient: new study, series and instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = study_uid + ".1"
        ds.SOPInstanceUID = f"{study_uid}.1.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = PRIOR_DATE
        for key, value in tags.items():
            setattr(ds, key, value)
        target = folder / f"{i:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def _findings(db, study_uid: str) -> Findings:
    with db.session() as s:
        stored = s.execute(
            select(Job.findings)
            .join(Job.study)
            .where(Job.study.has(study_uid=study_uid), Job.state == StudyState.DONE)
            .order_by(Job.id.desc())
        ).scalar()
    found = Findings.from_json(stored)
    assert found is not None
    return found


def _process(db, uid: str, out: Path, **kwargs) -> str:
    return processing.process_study(db, uid, out, analyser=BaselineAnalyser(), **kwargs)


@pytest.fixture
def node(database, node_factory):
    return node_factory(database, stable_seconds=0.3)


def _send(node, database, files: list[Path], uid: str) -> None:
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: study_state(database, uid) == StudyState.QUEUED)


def _errors(path: str) -> list[str]:
    check = subprocess.run(["/usr/bin/dciodvfy", path], capture_output=True, text=True)
    return [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]


def test_a_follow_up_inherits_the_prior_nodule_and_reports_its_change(
    database, node, samples, tmp_path
):
    out = tmp_path / "outputs"
    _send(node, database, _prior_copy(samples["lung1"], tmp_path / "prior"), PRIOR)
    assert _process(database, PRIOR, out) == "DONE"
    prior = _findings(database, PRIOR)
    assert prior.prior_reason == NO_PRIOR and prior.prior_study_uid is None
    assert prior.lesions and all(les.tracking_uid and les.change is None for les in prior.lesions)

    _send(node, database, samples["lung1"], LUNG1)
    assert _process(database, LUNG1, out) == "DONE"
    current = _findings(database, LUNG1)
    assert current.prior_study_uid == PRIOR and current.prior_reason is None
    assert current.follow_up["registration"]["ok"] is True
    assert current.follow_up["interval_days"] == 201.0
    assert current.follow_up["prior_source"] == "local"
    [before] = prior.lesions
    [now] = current.lesions
    assert now.tracking_uid == before.tracking_uid and now.tracking_id == before.tracking_id
    assert now.change is not None and now.change.prior_study_uid == PRIOR
    assert now.change.prior_label == before.label
    assert now.change.prior_volume_mm3 == pytest.approx(before.volume_mm3, rel=0.01)
    assert abs(now.change.volume_change_pct) < 5.0  # the same images: no real change

    # `radai studies --json` (db.queries.study_summaries) carries the new fields.
    with database.session() as s:
        rows = {r["study_uid"]: r for r in study_summaries(s)}
    listed = rows[LUNG1]["findings"]
    assert listed["prior_study_uid"] == PRIOR and listed["follow_up"]["matched"] == 1
    lesion = listed["lesions"][0]
    assert lesion["tracking_uid"] == before.tracking_uid
    for key in ("prior_study_uid", "prior_volume_mm3", "volume_change_pct", "doubling_time_days"):
        assert key in lesion["change"]
    assert rows[PRIOR]["findings"]["prior_reason"] == NO_PRIOR

    # The SR: valid, the nodule's tracking identifiers, the prior referenced.
    with database.session() as s:
        [sr_path] = s.execute(
            select(Output.path)
            .join(Job, Job.id == Output.job_id)
            .where(Job.study.has(study_uid=LUNG1), Output.modality == "SR")
        ).one()
    assert _errors(sr_path) == []
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_planar_roi_measurement_groups() + (
        sr.content.get_volumetric_roi_measurement_groups()
    )
    uids = {str(g.tracking_uid) for g in groups}
    assert now.tracking_uid in uids
    [evidence] = sr.PertinentOtherEvidenceSequence
    assert evidence.StudyInstanceUID == PRIOR
    dump = subprocess.run(["dsrdump", sr_path], capture_output=True, text=True, check=True).stdout
    assert now.tracking_uid in dump and "Comparison to previous studies" in dump
    assert "Volume change since prior study" in dump and PRIOR in dump


def test_a_prior_of_another_patient_with_the_same_id_is_not_compared(
    database, node, samples, tmp_path
):
    out = tmp_path / "outputs"
    files = _prior_copy(samples["lung1"], tmp_path / "prior", PatientBirthDate="19610101")
    _send(node, database, files, PRIOR)
    assert _process(database, PRIOR, out) == "DONE"
    _send(node, database, samples["lung1"], LUNG1)
    assert _process(database, LUNG1, out) == "DONE"
    current = _findings(database, LUNG1)
    assert current.prior_study_uid is None
    assert "different patient" in (current.prior_reason or "")
    assert all(les.change is None and les.tracking_uid for les in current.lesions)


def test_a_prior_with_a_missing_slice_is_not_compared(database, node, samples, tmp_path):
    out = tmp_path / "outputs"
    _send(node, database, _prior_copy(samples["lung1"], tmp_path / "prior"), PRIOR)
    assert _process(database, PRIOR, out) == "DONE"
    # A slice of the prior's series is lost from the archive after it was analysed.
    with database.session() as s:
        series_id = s.execute(select(Series.id).where(Series.series_uid == PRIOR + ".1")).scalar()
        s.execute(
            delete(Instance).where(
                Instance.series_id == series_id, Instance.sop_instance_uid == PRIOR + ".1.20"
            )
        )
    _send(node, database, samples["lung1"], LUNG1)
    assert _process(database, LUNG1, out) == "DONE"
    current = _findings(database, LUNG1)
    assert current.prior_study_uid is None
    assert "the prior series is not usable" in (current.prior_reason or "")
    assert "spacing" in (current.prior_reason or "")
    assert all(les.change is None for les in current.lesions)


def test_an_mr_of_the_patient_is_never_a_prior(database, node, samples, tmp_path):
    out = tmp_path / "outputs"
    patient = str(pydicom.dcmread(samples["lung1"][0], stop_before_pixels=True).PatientID)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.PatientID = patient
    mr.StudyDate = PRIOR_DATE
    mr_path = tmp_path / "mr.dcm"
    mr.save_as(mr_path)
    _send(node, database, [mr_path], str(mr.StudyInstanceUID))
    assert _process(database, str(mr.StudyInstanceUID), out).startswith("NOT_APPLICABLE")
    _send(node, database, samples["lung1"], LUNG1)
    assert _process(database, LUNG1, out) == "DONE"
    current = _findings(database, LUNG1)
    assert current.prior_study_uid is None and current.prior_reason == NO_PRIOR
    assert all(les.change is None for les in current.lesions)


def test_a_prior_on_a_pacs_is_found_retrieved_and_compared(
    sqlite_db, node_factory, samples, tmp_path
):
    """Orthanc holds the patient's CT prior and a later MR; the node holds only the follow-up."""
    database = sqlite_db
    node = node_factory(database, stable_seconds=0.3)
    patient = str(pydicom.dcmread(samples["lung1"][0], stop_before_pixels=True).PatientID)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr.PatientID = patient
    mr.StudyDate = "20231201"
    mr_path = tmp_path / "mr.dcm"
    mr.save_as(mr_path)
    cache = tmp_path / "home" / "prior-cache"
    with OrthancServer(DicomAlwaysAllowFind=True, DicomAlwaysAllowGet=True) as pacs:
        sent = send_files(
            [*_prior_copy(samples["lung1"], tmp_path / "prior"), mr_path],
            pacs.destination,
            calling_aet="RADAI",
            timeout=30,
        )
        assert all(r.ok for r in sent)
        _send(node, database, samples["lung1"], LUNG1)
        sources = PriorSources(destinations=(pacs.destination,), cache_dir=cache, timeout=15)
        assert _process(database, LUNG1, tmp_path / "out", prior_sources=sources) == "DONE"
    current = _findings(database, LUNG1)
    assert current.prior_study_uid == PRIOR
    assert current.follow_up["prior_source"] == "ORTHANC@{}:{}".format(*pacs.destination[1:])
    # the later MR was named and passed over, never compared
    [skipped] = current.follow_up["priors_not_used"]
    assert str(mr.StudyInstanceUID) in skipped and "MR, not CT" in skipped
    [now] = current.lesions
    assert now.change is not None and abs(now.change.volume_change_pct) < 5.0
    # Analysed here (no radai SEG on the PACS): the prior's nodule gets the UID its own study
    # would have given it, so processing the prior later agrees with this one.
    from ml.runtime.followup import tracking_uid

    assert now.tracking_uid == tracking_uid(PRIOR, now.change.prior_label)
    assert len(list((cache / PRIOR).rglob("*.dcm"))) == len(samples["lung1"])
    assert study_row(database, LUNG1).state == StudyState.DONE


def test_radai_studies_json_shows_the_follow_up(sqlite_db, node_factory, samples, tmp_path):
    node = node_factory(sqlite_db, stable_seconds=0.3)
    _send(node, sqlite_db, samples["lung1"], LUNG1)
    assert _process(sqlite_db, LUNG1, tmp_path / "out") == "DONE"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env.update(
        RADAI_HOME=str(tmp_path / "home"),
        RADAI_DATABASE_URL=sqlite_db.url,
        RADAI_AUDIT_KEY_FILE=os.environ["RADAI_AUDIT_KEY_FILE"],
    )
    listed = subprocess.run(
        [sys.executable, "-m", "radai", "studies", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["findings"]["prior_reason"] == NO_PRIOR
    assert row["findings"]["prior_study_uid"] is None
    [lesion] = row["findings"]["lesions"]
    assert lesion["tracking_uid"].startswith("2.25.") and lesion["tracking_id"] == "Nodule 1"
    assert lesion["change"] is None
    assert shutil.which("dsrdump")
