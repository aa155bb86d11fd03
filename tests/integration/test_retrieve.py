"""dicom_io.retrieve against a real Orthanc: C-FIND a patient's studies and a study's series, C-GET
a series, and clear errors for an unreachable peer or a series the peer does not have."""

from __future__ import annotations

import pydicom
import pytest

from dicom_io.cstore import send_files
from dicom_io.retrieve import RetrieveError, find_series, find_studies, get_series
from tests.kit.net import free_port
from tests.kit.orthanc import OrthancServer


@pytest.fixture(scope="module")
def pacs(samples):
    with OrthancServer(DicomAlwaysAllowFind=True, DicomAlwaysAllowGet=True) as orthanc:
        files = samples["lung1"]
        results = send_files(files, orthanc.destination, calling_aet="RADAI", timeout=30)
        assert all(r.ok for r in results)
        yield orthanc, files


def test_find_then_get_a_series_returns_every_instance(pacs, tmp_path):
    orthanc, files = pacs
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    studies = find_studies(orthanc.destination, str(first.PatientID), timeout=15)
    assert [s.study_uid for s in studies] == [str(first.StudyInstanceUID)]
    assert studies[0].modalities == ("CT",)
    assert studies[0].instances == len(files)
    series = find_series(orthanc.destination, studies[0].study_uid, timeout=15)
    assert [s.series_uid for s in series] == [str(first.SeriesInstanceUID)]
    got = get_series(
        orthanc.destination, studies[0].study_uid, series[0].series_uid, tmp_path, timeout=30
    )
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in got}
    assert received == sent
    assert not list(tmp_path.glob("*.part"))


def test_an_unknown_patient_has_no_studies(pacs):
    orthanc, _ = pacs
    assert find_studies(orthanc.destination, "NO-SUCH-PATIENT", timeout=15) == []


def test_a_rejected_association_says_so(pacs):
    orthanc, _ = pacs
    _, host, port = orthanc.destination
    with pytest.raises(RetrieveError, match=r"association rejected \(Rejected Permanent"):
        find_studies(("NOT_ORTHANC", host, port), "X", timeout=15)


def test_unreachable_peer_is_a_retrieve_error():
    with pytest.raises(RetrieveError, match="not established"):
        find_studies(("NOBODY", "127.0.0.1", free_port()), "X", timeout=3)


def test_getting_a_series_the_peer_lacks_fails_and_writes_nothing(pacs, tmp_path):
    orthanc, files = pacs
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    with pytest.raises(RetrieveError, match="C-GET ended with status"):
        get_series(
            orthanc.destination, str(first.StudyInstanceUID), "1.2.3.4.5", tmp_path, timeout=15
        )
    assert not list(tmp_path.iterdir())
