"""A worker on another machine: it reads the study by WADO-RS from a DICOMweb archive (Orthanc
with its DICOMweb plugin) and stores its SEG and SR there by STOW-RS, with its own RADAI_HOME and
no access to the node's archive files (moved away before the worker starts)."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

import pydicom
import pytest

from db import Output, StudyState
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import radai_env, storescu, wait_for
from tests.helpers import study_row, study_state
from tests.kit.orthanc import OrthancServer

LUNG2 = sample_study_uid("lung2")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def upload(orthanc: OrthancServer, files: list[Path]) -> None:
    """The study as the hospital's archive holds it (Orthanc's REST upload)."""
    for path in files:
        request = urllib.request.Request(
            orthanc.http_url + "/instances", data=path.read_bytes(), method="POST"
        )
        with _HTTP.open(request, timeout=30) as rsp:
            assert rsp.status == 200


def modalities(orthanc: OrthancServer) -> list[str]:
    return sorted(str(orthanc.instance_tags(i).get("Modality")) for i in orthanc.instances())


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_remote_worker_reads_by_wado_and_stores_by_stow(
    database, node_factory, radai_workers, samples, tmp_path
):
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    broker_url = "redis://127.0.0.1:6379/0"
    node_home, worker_home = tmp_path / "node", tmp_path / "worker"
    with OrthancServer(dicomweb=True) as orthanc:
        upload(orthanc, samples["lung2"])
        node = node_factory(
            database, publish=celery_publisher(broker_url, queue), home=node_home, stable_seconds=1
        )
        assert storescu(node.port, samples["lung2"]).returncode == 0
        wait_for(lambda: study_state(database, LUNG2) == StudyState.QUEUED, timeout=60)
        # The worker may not read the node's files: they are not where the database says.
        (node_home / "archive").rename(node_home / "archive.hidden")
        env = radai_env(
            worker_home,
            database.url,
            broker_url,
            queue,
            RADAI_ARCHIVE_URL=orthanc.dicomweb_url,
            RADAI_ARCHIVE_CACHE_MB="64",
        )
        worker = radai_workers(env, "remote")
        wait_for(
            lambda: study_state(database, LUNG2) in (StudyState.DONE, StudyState.FAILED),
            timeout=300,
            interval=0.5,
        )
        study = study_row(database, LUNG2)
        assert study.state == StudyState.DONE, (study.error, worker.log_path.read_text()[-3000:])
        assert worker.poll() is None, "the worker died"

        # SEG and SR arrived in the archive by STOW-RS, beside the 61 CT slices.
        assert modalities(orthanc) == ["CT"] * 61 + ["SEG", "SR"]
        with database.session() as s:
            outputs = s.query(Output).all()
        assert sorted(o.modality for o in outputs) == ["SEG", "SR"]
        for out in outputs:
            assert out.path.startswith(orthanc.dicomweb_url + f"/studies/{LUNG2}/")
            local = next((worker_home / "outputs").rglob(f"{out.modality.lower()}.dcm"))
            assert pydicom.dcmread(local).SOPInstanceUID == out.sop_instance_uid
        # The series came through the worker's own cache, within its bound.
        cached = list((worker_home / "archive-cache" / LUNG2).rglob("*.dcm"))
        assert len(cached) == 61
        assert sum(p.stat().st_size for p in cached) <= 64 * 1024 * 1024
