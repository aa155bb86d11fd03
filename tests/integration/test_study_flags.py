"""Study safety flags accumulate, and a study naming more than one patient is HELD until a person
releases it: over dcmtk's storescu, through the `radai` command, into the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from alembic import command
from sqlalchemy import select, text

from db import AuditEntry, Study, StudyState, audit
from db.audit_actions import AuditAction
from db.queries import study_summaries
from db.requeue import release
from dicom_node.samples import sample_study_uid
from tests.conftest import RecordingPublisher, storescu, wait_for
from tests.helpers import CT_IMAGE, ct_dataset, jobs_and_outputs, study_row, study_state
from workers import processing

LUNG1 = sample_study_uid("lung1")
ROOT = "1.2.826.0.1.3680043.8.498.77"


def _radai(args: list[str], db_url: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    # The session's audit key (tests/conftest.py): one deployment, one key for every process.
    env.update(
        RADAI_HOME=str(home),
        RADAI_DATABASE_URL=db_url,
        RADAI_AUDIT_KEY_FILE=os.environ["RADAI_AUDIT_KEY_FILE"],
    )
    return subprocess.run(
        [sys.executable, "-m", "radai", *args], env=env, capture_output=True, text=True, timeout=120
    )


def _save(ds, path: Path) -> Path:  # noqa: ANN001
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _actions(db, study_uid: str) -> list[AuditEntry]:  # noqa: ANN001
    with db.session() as s:
        return list(
            s.execute(
                select(AuditEntry).where(AuditEntry.study_uid == study_uid).order_by(AuditEntry.seq)
            ).scalars()
        )


def test_mixed_patients_then_a_conflict_keeps_both_flags_in_radai_studies(
    sqlite_db, node_factory, tmp_path
):
    node = node_factory(sqlite_db, stable_seconds=30)
    study, series = f"{ROOT}.1", f"{ROOT}.2"
    first = _save(ct_dataset(study, series, f"{ROOT}.3"), tmp_path / "a.dcm")
    mixed = ct_dataset(study, series, f"{ROOT}.4")
    mixed.PatientID = "OTHER-PATIENT-0815"
    changed = ct_dataset(study, series, f"{ROOT}.3")
    changed.PixelData = b"\x02\x00" * 16
    files = [first, _save(mixed, tmp_path / "b.dcm"), _save(changed, tmp_path / "c.dcm")]
    for path in files:  # one association each, in this order
        assert storescu(node.port, [path]).returncode == 0

    listed = _radai(["studies", "--json"], sqlite_db.url, tmp_path / "home")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert [f["kind"] for f in row["flags"]] == ["patients_mixed", "instance_conflict"]
    assert all(f["at"] for f in row["flags"])
    assert "Patient ID" in row["flags"][0]["reason"] and f"{ROOT}.3" in row["flags"][1]["reason"]
    assert "Patient ID" in row["flag_reason"] and f"{ROOT}.3" in row["flag_reason"]
    assert row["hold_reason"] and row["flagged"]
    table = _radai(["studies"], sqlite_db.url, tmp_path / "home").stdout
    assert "Patient ID" in table and f"SOP Instance UID {ROOT}.3" in table
    # Flags name instances and attributes, never the patients.
    assert "OTHER-PATIENT" not in listed.stdout + table and "SECRET" not in listed.stdout


@pytest.mark.timeout(600)
def test_mixed_patient_study_is_held_then_released_and_processed(
    sqlite_db, node_factory, samples, tmp_path
):
    publisher = RecordingPublisher()
    node = node_factory(sqlite_db, publish=publisher, stable_seconds=0.5)
    files = []
    for n, path in enumerate(samples["lung1"]):
        ds = pydicom.dcmread(path)
        if n >= 40:  # the last slices claim another patient
            ds.PatientID = "OTHER-PATIENT-0815"
        files.append(tmp_path / path.name)
        ds.save_as(files[-1], enforce_file_format=True)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.HELD)

    # Held: nothing queued, and a message delivered anyway (stale, redelivered) starts nothing.
    node.dispatcher.run_once()
    assert publisher.sent == []
    assert processing.process_study(sqlite_db, LUNG1, tmp_path / "out").startswith("study is held")
    assert jobs_and_outputs(sqlite_db) == ([], [])
    study = study_row(sqlite_db, LUNG1)
    assert study.state == StudyState.HELD and "Patient ID" in study.hold_reason

    home = tmp_path / "home"
    refused = _radai(["release", LUNG1, "--user", "alice", "--reason", " "], sqlite_db.url, home)
    assert refused.returncode == 1 and "needs a reason" in refused.stderr
    released = _radai(
        ["release", LUNG1, "--user", "alice", "--reason", "one patient, ID corrected in RIS"],
        sqlite_db.url,
        home,
    )
    assert released.returncode == 0, released.stderr
    wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.QUEUED)
    assert publisher.sent == [("radai.process_study", {"study_uid": LUNG1, "instances": 48})]
    assert processing.process_study(sqlite_db, LUNG1, tmp_path / "out") == "DONE"
    jobs, outputs = jobs_and_outputs(sqlite_db)
    assert len(jobs) == 1 and sorted(o.modality for o in outputs) == ["SEG", "SR"]

    entries = _actions(sqlite_db, LUNG1)
    [held] = [e for e in entries if e.action == "study.held"]
    [rel] = [e for e in entries if e.action == "study.released"]
    assert held.detail["instances"] == 48 and "Patient ID" in held.detail["reason"]
    assert rel.actor == "cli:alice" and rel.detail["reason"] == "one patient, ID corrected in RIS"
    assert rel.detail["from_state"] == "HELD" and rel.detail["to_state"] == "STABLE"

    # A late instance of yet another patient holds it again, with a second flag.
    late = pydicom.dcmread(samples["lung1"][0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID + ".9"
    late.PatientID = "THIRD-PATIENT"
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    assert storescu(node.port, [tmp_path / "late.dcm"]).returncode == 0
    wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.HELD)
    study = study_row(sqlite_db, LUNG1)
    assert [f["kind"] for f in study.flags] == ["patients_mixed", "patients_mixed"]
    assert len(publisher.sent) == 1


def test_release_refuses_studies_that_are_not_held(database):
    from db.models import utcnow

    now = utcnow()
    with database.session() as s:
        s.add(
            Study(
                study_uid="1.2.5",
                state=StudyState.DONE,
                last_instance_at=now,
                state_changed_at=now,
            )
        )
    for uid, match in (("1.2.5", "not HELD"), ("9.9.9", "no study")):
        with pytest.raises(ValueError, match=match):
            with database.session() as s:
                release(s, uid, actor="test", reason="looked at it")


def test_migration_0005_keeps_old_flag_reasons_as_flags(sqlite_db):
    command.downgrade(sqlite_db.alembic_config(), "0004")
    with sqlite_db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (study_uid, state, modalities, flagged, flag_reason, "
                "instance_count, first_received_at, last_instance_at, state_changed_at, attempts) "
                "VALUES ('1.2.6', 'DONE', '', 1, 'an old reason; another', 1, "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:00', 0)"
            )
        )
    sqlite_db.upgrade()
    with sqlite_db.session() as s:
        [row] = study_summaries(s)
        assert row["flags"] == [{"kind": "legacy", "reason": "an old reason; another", "at": None}]
    # The append-only triggers of the audit log survived the migration.
    with sqlite_db.session() as s:
        audit.append(s, "test", AuditAction.AUDIT_VERIFIED)
    with pytest.raises(Exception, match="append-only"):
        with sqlite_db.session() as s:
            s.execute(text("UPDATE audit_log SET actor = 'x'"))
