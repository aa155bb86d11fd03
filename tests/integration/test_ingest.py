"""The node against dcmtk's storescu/echoscu over real associations, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from db import InstanceConflict, Series, StudyState, audit
from dicom_node.samples import sample_study_uid
from tests.conftest import RecordingPublisher, echoscu, storescu, wait_for
from tests.helpers import count, instances, study_row, study_state

LUNG2 = sample_study_uid("lung2")
LUNG1 = sample_study_uid("lung1")


def test_echo_answers_and_wrong_called_ae_is_rejected(database, node_factory):
    node = node_factory(database)
    assert echoscu(node.port).returncode == 0
    wrong = echoscu(node.port, aec="NOT_RADAI")
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr


def test_study_goes_received_stable_queued(database, node_factory, samples):
    publisher = RecordingPublisher()
    node = node_factory(database, publish=publisher, stable_seconds=3.0)
    result = storescu(node.port, samples["lung2"])
    assert result.returncode == 0, result.stderr
    assert study_state(database, LUNG2) == StudyState.RECEIVING
    assert study_row(database, LUNG2).instance_count == 61

    wait_for(lambda: study_state(database, LUNG2) == StudyState.QUEUED, timeout=20)
    assert publisher.sent == [("radai.process_study", {"study_uid": LUNG2, "instances": 61})]

    held = instances(database)
    assert len(held) == 61
    for inst in held:
        data = Path(inst.archive_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == inst.sha256 and len(data) == inst.size
        assert inst.calling_ae == "STORESCU"
        assert inst.transfer_syntax == "1.2.840.10008.1.2.1"
    ds = pydicom.dcmread(held[0].archive_path)
    assert ds.StudyInstanceUID == LUNG2

    with database.session() as s:
        report = audit.verify(s)
        actions = [e.action for e in s.query(audit.AuditEntry).order_by(audit.AuditEntry.seq)]
    assert report.ok
    assert actions == ["study.received", "study.stable", "study.queued"]


def test_identical_resend_is_success_without_duplicate(database, node_factory, samples):
    node = node_factory(database, stable_seconds=30)
    files = samples["lung1"][:10]
    assert storescu(node.port, files).returncode == 0
    again = storescu(node.port, files)
    assert again.returncode == 0
    assert "Received Store Response (Success)" in again.stdout + again.stderr
    assert count(database, InstanceConflict) == 0
    assert len(instances(database)) == 10
    assert study_row(database, LUNG1).instance_count == 10


def test_same_uid_different_content_keeps_both_and_flags(database, node_factory, samples, tmp_path):
    node = node_factory(database, stable_seconds=30)
    original = samples["lung1"][0]
    assert storescu(node.port, [original]).returncode == 0
    changed = pydicom.dcmread(original)
    changed.ImageComments = "edited copy, same SOP Instance UID"
    other = tmp_path / "changed.dcm"
    changed.save_as(other, enforce_file_format=True)
    assert storescu(node.port, [other]).returncode == 0

    study = study_row(database, LUNG1)
    assert study.flagged and changed.SOPInstanceUID in study.flag_reason
    with database.session() as s:
        conflict = s.query(InstanceConflict).one()
    held = instances(database)
    assert len(held) == 1
    kept = pydicom.dcmread(held[0].archive_path)
    assert kept.get("ImageComments") == pydicom.dcmread(original).get("ImageComments")
    assert pydicom.dcmread(conflict.archive_path).ImageComments == changed.ImageComments


def test_calling_ae_allow_list(database, node_factory, samples):
    node = node_factory(database, allowed_calling_aets=["MODALITY1"], stable_seconds=30)
    refused = storescu(node.port, samples["lung1"][:1], aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert count(database, Series) == 0
    assert storescu(node.port, samples["lung1"][:1], aet="MODALITY1").returncode == 0
    assert study_row(database, LUNG1).instance_count == 1


def test_late_instances_reopen_a_queued_study(database, node_factory, samples):
    publisher = RecordingPublisher()
    node = node_factory(database, publish=publisher, stable_seconds=1.0)
    files = samples["lung2"]
    assert storescu(node.port, files[:30]).returncode == 0
    wait_for(lambda: study_state(database, LUNG2) == StudyState.QUEUED)
    assert storescu(node.port, files[30:]).returncode == 0
    assert study_state(database, LUNG2) in (StudyState.RECEIVING, StudyState.STABLE)
    wait_for(lambda: len(publisher.sent) == 2)
    assert [p["instances"] for _, p in publisher.sent] == [30, 61]
    # QUEUED is written just after the publish returns, in its own transaction.
    wait_for(lambda: study_state(database, LUNG2) == StudyState.QUEUED, timeout=10)
    with database.session() as s:
        actions = [e.action for e in s.query(audit.AuditEntry).order_by(audit.AuditEntry.seq)]
    assert "study.reopened" in actions


def test_several_senders_at_once(database, node_factory, samples):
    node = node_factory(database, stable_seconds=30, max_associations=16)
    parts = [samples["lung2"][i::3] for i in range(3)] + [samples["lung1"][i::3] for i in range(3)]
    results: list = [None] * len(parts)

    def send(i: int) -> None:
        results[i] = storescu(node.port, parts[i], aet=f"SENDER{i}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr[-300:] for r in results]
    assert study_row(database, LUNG2).instance_count == 61
    assert study_row(database, LUNG1).instance_count == 48
    assert len(instances(database)) == 109
    assert len({i.archive_path for i in instances(database)}) == 109


def test_node_restarted_between_two_halves(database, node_factory, samples, tmp_path):
    publisher = RecordingPublisher()
    home = tmp_path / "node-home"
    first = node_factory(database, publish=publisher, home=home, stable_seconds=2.0)
    assert storescu(first.port, samples["lung2"][:25]).returncode == 0
    first.stop()
    second = node_factory(database, publish=publisher, home=home, stable_seconds=2.0)
    assert storescu(second.port, samples["lung2"][25:]).returncode == 0
    wait_for(lambda: study_state(database, LUNG2) == StudyState.QUEUED)
    assert study_row(database, LUNG2).instance_count == 61
    assert publisher.sent[-1][1] == {"study_uid": LUNG2, "instances": 61}


# (file name, storescu flag that proposes its transfer syntax)
PYDICOM_FILES = [
    ("CT_small.dcm", ()),
    ("MR_small.dcm", ()),
    ("rtplan.dcm", ()),
    ("waveform_ecg.dcm", ()),
    ("MR_small_RLE.dcm", ("-xr",)),
    ("SC_rgb_rle.dcm", ("-xr",)),
    ("JPEG2000.dcm", ("-xw",)),
    ("MR_small_jpeg_ls_lossless.dcm", ("-xt",)),
    ("SC_rgb_jpeg_gdcm.dcm", ("-xs",)),
]


@pytest.mark.parametrize(("name", "flags"), PYDICOM_FILES, ids=[n for n, _ in PYDICOM_FILES])
def test_pydicom_test_files_are_stored_in_their_syntax(
    sqlite_db, node_factory, tmp_path, name, flags
):
    path = Path(get_testdata_file(name))
    local = tmp_path / name
    shutil.copy(path, local)
    node = node_factory(sqlite_db, stable_seconds=30)
    result = storescu(node.port, [local], extra=flags)
    assert result.returncode == 0, result.stdout + result.stderr
    held = instances(sqlite_db)
    assert len(held) == 1, result.stdout + result.stderr
    sent = pydicom.dcmread(path)
    stored = pydicom.dcmread(held[0].archive_path)
    assert stored.SOPInstanceUID == sent.SOPInstanceUID
    assert held[0].transfer_syntax == str(sent.file_meta.TransferSyntaxUID)
