"""De-identified export (PS3.15 Annex E basic profile): identifying values leave no trace in the
data set or its file, UIDs change but keep SEG and SR linked, the CT still validates, settings are
checked, and a real Orthanc receives de-identified results while the stored outputs stay as
they were."""

from __future__ import annotations

import hashlib
import io
import shutil
import stat
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from db import Export, Output, StudyState, audit
from dicom_io.destinations import format_destination
from dicom_node.samples import sample_study_uid
from radai.cli import _worker_config
from radai.settings import Settings
from tests.conftest import storescu, wait_for
from tests.helpers import study_state
from tests.kit.orthanc import OrthancServer
from workers import exporting, processing
from workers.deidentify import deidentify, load_salt, pseudonym_uid

SALT = "0" * 64
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))


def _walk(ds: Dataset):  # noqa: ANN202
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _texts(ds: Dataset) -> list[str]:
    return [str(e.value) for e in _walk(ds) if e.VR != "SQ" and e.value not in (None, b"")]


def _uids(ds: Dataset) -> set[str]:
    return {str(e.value) for e in _walk(ds) if e.VR == "UI" and e.value}


def _identifiers(ds: Dataset) -> list[str]:
    values = [str(ds.PatientName), str(ds.PatientID), ds.get("AccessionNumber", "")]
    values.append(ds.get("PatientBirthDate", ""))
    return [v for v in values if len(v) >= 4]


def _file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _common(ds: Dataset, sop_class: str, study: str) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane^Q"
    ds.PatientID = "MRN-7734521"
    ds.PatientBirthDate = "19561203"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-99812"
    ds.InstitutionName = "St. Example Hospital"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StudyDate = "20240317"
    ds.Manufacturer = "radai"
    ds.SeriesDescription = "radai result - NOT FOR CLINICAL USE"
    ds.StudyDescription = "CT chest for Jane Doe"
    ds.add_new(0x00091001, "LO", "private: Jane Doe")
    ds.add_new(0x00090010, "LO", "ACME")
    return ds


def _seg_and_sr() -> tuple[Dataset, Dataset]:
    study, frame = generate_uid(), generate_uid()
    seg = _common(Dataset(), SEG_STORAGE, study)
    seg.FrameOfReferenceUID = frame
    seg.ContentCreatorName = "Bot^Seg"
    seg.DeviceSerialNumber = "1"
    sr = _common(Dataset(), SR_STORAGE, study)
    sr.ContentDate, sr.ContentTime = "20240317", "101500"
    observer = _item(
        RelationshipType="HAS OBS CONTEXT",
        ValueType="PNAME",
        ConceptNameCodeSequence=Sequence(
            [
                _item(
                    CodeValue="121008",
                    CodingSchemeDesignator="DCM",
                    CodeMeaning="Person Observer Name",
                )
            ]
        ),
        PersonName="Doe^Jane^Q",
    )
    reference = _item(
        RelationshipType="CONTAINS",
        ValueType="IMAGE",
        ReferencedSOPSequence=Sequence(
            [_item(ReferencedSOPClassUID=SEG_STORAGE, ReferencedSOPInstanceUID=seg.SOPInstanceUID)]
        ),
    )
    nested = _item(
        RelationshipType="CONTAINS",
        ValueType="CONTAINER",
        ContinuityOfContent="SEPARATE",
        ContentSequence=Sequence([observer, reference]),
    )
    sr.ContentSequence = Sequence([nested])
    sr.CurrentRequestedProcedureEvidenceSequence = Sequence(
        [
            _item(
                StudyInstanceUID=study,
                ReferencedSeriesSequence=Sequence(
                    [
                        _item(
                            SeriesInstanceUID=seg.SeriesInstanceUID,
                            ReferencedSOPSequence=Sequence(
                                [
                                    _item(
                                        ReferencedSOPClassUID=SEG_STORAGE,
                                        ReferencedSOPInstanceUID=seg.SOPInstanceUID,
                                    )
                                ]
                            ),
                        )
                    ]
                ),
            )
        ]
    )
    return seg, sr


def _assert_deidentified(original: Dataset, result: Dataset) -> None:
    data = _file_bytes(result)
    for value in _identifiers(original):
        assert not any(value in text for text in _texts(result)), value
        assert value.encode() not in data, value
    assert str(result.PatientName) == ""
    assert result.PatientID and result.PatientID != original.PatientID
    assert result.PatientIdentityRemoved == "YES"
    assert result.DeidentificationMethod == "radai basic profile (PS3.15 E.1)"
    code = result.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert not any(e.tag.is_private for e in _walk(result))
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    instance_uids = {u for u in _uids(original) if not u.startswith("1.2.840.10008.")}
    assert instance_uids and not instance_uids & _uids(result)
    assert all(u.startswith("2.25.") for u in _uids(result) - _uids(original))


def test_ct_small_is_deidentified_and_still_valid(tmp_path: Path) -> None:
    original = pydicom.dcmread(CT_SMALL)
    assert any(e.tag.is_private for e in original)
    result = deidentify(original, salt=SALT)
    _assert_deidentified(original, result)
    assert pydicom.dcmread(CT_SMALL).PatientName == original.PatientName  # input untouched
    assert "InstitutionName" not in result and "StudyDate" in result
    assert result.StudyInstanceUID == pseudonym_uid(original.StudyInstanceUID, SALT)
    assert len(result.SOPInstanceUID) <= 64

    dciodvfy = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    if not Path(dciodvfy).exists():
        pytest.skip("dciodvfy is not installed")
    path = tmp_path / "ct.dcm"
    result.save_as(path, enforce_file_format=True)
    report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_seg_and_sr_stay_linked_without_names_anywhere() -> None:
    seg, sr = _seg_and_sr()
    new_seg, new_sr = deidentify(seg, salt=SALT), deidentify(sr, salt=SALT)
    _assert_deidentified(seg, new_seg)
    _assert_deidentified(sr, new_sr)
    observer = new_sr.ContentSequence[0].ContentSequence[0]
    assert observer.PersonName == "ANONYMIZED"
    referenced = new_sr.ContentSequence[0].ContentSequence[1].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == new_seg.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == SEG_STORAGE
    evidence = new_sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == new_seg.StudyInstanceUID == new_sr.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == new_seg.SeriesInstanceUID
    assert new_sr.PatientID == new_seg.PatientID  # one patient stays one pseudonym
    assert new_sr.ContentDate == "19000101" and new_sr.StudyDate == "19000101"
    assert new_seg.DeviceSerialNumber != "1"
    # radai's own disclaimer travels; the source's free text does not.
    assert new_seg.SeriesDescription == seg.SeriesDescription
    assert "StudyDescription" not in new_seg
    # Another salt, other UIDs: the link cannot be recomputed without the secret.
    assert deidentify(seg, salt="1" * 64).SOPInstanceUID != new_seg.SOPInstanceUID


def test_salt_is_created_once_and_private(tmp_path: Path) -> None:
    salt = load_salt(tmp_path)
    path = tmp_path / "deid-salt"
    assert len(salt) == 64 and load_salt(tmp_path) == salt
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_deidentified_destinations_must_be_export_destinations(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not in RADAI_EXPORT_TO"):
        Settings(export_to="PACS@pacs:104", export_deidentified="RESEARCH@lab:104")
    with pytest.raises(ValidationError, match="AET@HOST:PORT"):
        Settings(export_to="PACS@pacs:104", export_deidentified="nonsense")
    settings = Settings(
        home=tmp_path,
        export_to="PACS@pacs:104, RESEARCH@Lab.example:11112",
        export_deidentified="RESEARCH@lab.example:11112",
    )
    config = _worker_config(settings)
    assert config.deidentified == {"RESEARCH@Lab.example:11112"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _orthanc_file(orthanc: OrthancServer, instance_id: str) -> Dataset:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{orthanc.http_url}/instances/{instance_id}/file", timeout=10) as rsp:
        return pydicom.dcmread(io.BytesIO(rsp.read()))


def test_deidentified_export_reaches_orthanc(sqlite_db, node_factory, samples, tmp_path) -> None:
    study_uid = sample_study_uid("lung1")
    original = pydicom.dcmread(samples["lung1"][0], stop_before_pixels=True)
    node = node_factory(sqlite_db, stable_seconds=0.3)
    assert storescu(node.port, samples["lung1"]).returncode == 0
    wait_for(lambda: study_state(sqlite_db, study_uid) == StudyState.QUEUED)
    with OrthancServer() as orthanc:
        name = format_destination(orthanc.destination)
        assert processing.process_study(sqlite_db, study_uid, tmp_path / "out", [name]) == "DONE"
        with sqlite_db.session() as s:
            export_id = s.execute(select(Export.id)).scalar_one()
            outputs = {Path(p): None for (p,) in s.execute(select(Output.path))}
        before = {p: _sha256(p) for p in outputs}
        home = tmp_path / "home"
        delay = exporting.run_export(
            sqlite_db,
            export_id,
            {name: orthanc.destination},
            calling_aet="RADAI",
            deidentified={name},
            home=home,
        )
        assert delay is None
        received = [_orthanc_file(orthanc, i) for i in orthanc.instances()]

    assert {p: _sha256(p) for p in outputs} == before
    stored = [pydicom.dcmread(p) for p in outputs]
    assert all(ds.PatientName == original.PatientName for ds in stored)
    assert {str(ds.Modality) for ds in received} == {"SEG", "SR"} and len(received) == 2
    stored_uids = {ds.SOPInstanceUID for ds in stored}
    for ds in received:
        assert str(ds.PatientName) != str(original.PatientName)
        assert ds.PatientID != original.PatientID
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID not in stored_uids
        for value in _identifiers(original):
            assert not any(value in text for text in _texts(ds)), value
    seg = next(ds for ds in received if ds.Modality == "SEG")
    sr = next(ds for ds in received if ds.Modality == "SR")
    assert seg.SOPInstanceUID in _uids(sr)  # the SR still points at the SEG it describes
    assert seg.StudyInstanceUID == sr.StudyInstanceUID
    assert stat.S_IMODE((home / "deid-salt").stat().st_mode) == 0o600
    with sqlite_db.session() as s:
        sent = s.execute(
            select(audit.AuditEntry).where(audit.AuditEntry.action == "export.sent")
        ).scalar_one()
    assert sent.detail["deidentified"] is True
