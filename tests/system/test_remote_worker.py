"""A worker on another machine: it reads the study by WADO-RS from a DICOMweb archive and stores
its SEG and SR there by STOW-RS, with its own RADAI_HOME. The archive is Orthanc with its DICOMweb
plugin (the node's files moved away before the worker starts), then radai's own DICOMweb server,
where the results stored back must not reopen the study."""

from __future__ import annotations

import time
import urllib.request
import uuid
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db import AuditEntry, Instance, Job, Output, Study, StudyState
from db.api_tokens import create_token
from db.audit_actions import AuditAction
from db.own_results import RESULT_SOP_CLASSES, result_file
from db.users import add_user
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import radai_env, storescu, wait_for
from tests.helpers import small_chest_ct_studies, study_row, study_state
from tests.kit.dicomweb import dicomweb_server
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
        stored = {}
        for instance_id in orthanc.instances():
            with _HTTP.open(f"{orthanc.http_url}/instances/{instance_id}/file", timeout=30) as r:
                ds = pydicom.dcmread(BytesIO(r.read()))  # a Part 10 file, as any reader wants
            stored[str(ds.SOPInstanceUID)] = ds
        for out in outputs:
            assert stored[out.sop_instance_uid].SeriesInstanceUID == out.series_uid
            assert out.path.startswith(orthanc.dicomweb_url + f"/studies/{LUNG2}/")
            local = next((worker_home / "outputs").rglob(f"{out.modality.lower()}.dcm"))
            assert pydicom.dcmread(local).SOPInstanceUID == out.sop_instance_uid
        # The series came through the worker's own cache, within its bound.
        cached = list((worker_home / "archive-cache" / LUNG2).rglob("*.dcm"))
        assert len(cached) == 61
        assert sum(p.stat().st_size for p in cached) <= 64 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_remote_worker_against_radais_own_dicomweb(
    database, node_factory, radai_workers, samples, tmp_path
):
    """The archive is the node itself: the SEG and SR the worker STOWs back become instances of
    the study, and the study is neither reopened nor analysed again because of them."""
    [(study_uid, files)] = small_chest_ct_studies(samples["lung2"], tmp_path / "s", 1).items()
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    broker_url = "redis://127.0.0.1:6379/0"
    node_home = tmp_path / "node"
    node = node_factory(
        database, publish=celery_publisher(broker_url, queue), home=node_home, stable_seconds=1
    )
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: study_state(database, study_uid) == StudyState.QUEUED, timeout=60)
    with database.session() as s:
        add_user(s, "remote-worker", "admin", "password-123", actor="test")
        token = create_token(s, "remote-worker", role="worker", actor="test")[1]
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")

    # The node serves the study from its files; the worker has its own home and reads over HTTP.
    with dicomweb_server(database, node.node.store) as web:
        url = f"http://127.0.0.1:{web.port}/dicomweb"
        env = radai_env(
            tmp_path / "worker",
            database.url,
            broker_url,
            queue,
            RADAI_ARCHIVE_URL=url,
            RADAI_ARCHIVE_TOKEN_FILE=str(token_file),
        )
        worker = radai_workers(env, "remote-own")
        wait_for(
            lambda: study_state(database, study_uid) in (StudyState.DONE, StudyState.FAILED),
            timeout=240,
            interval=0.5,
        )
        study = study_row(database, study_uid)
        assert study.state == StudyState.DONE, (study.error, worker.log_path.read_text()[-3000:])
        with database.session() as s:
            classes = list(
                s.execute(
                    select(Instance.sop_class_uid)
                    .join(Study, Study.id == Instance.study_id)
                    .where(Study.study_uid == study_uid)
                ).scalars()
            )
        results = [c for c in classes if c in RESULT_SOP_CLASSES]
        assert len(results) == 2 and len(classes) == len(files) + 2
        # The dashboard finds the results in the node's copies of them.
        with database.session() as s:
            for out in s.query(Output).all():
                assert Path(result_file(s, out.path, out.sop_instance_uid)).is_file()
        # Several stable periods later: still DONE, one job, never reopened.
        time.sleep(3)
        assert study_state(database, study_uid) == StudyState.DONE
        with database.session() as s:
            assert len(s.execute(select(Job)).scalars().all()) == 1
            actions = s.execute(
                select(AuditEntry.action).where(AuditEntry.study_uid == study_uid)
            ).scalars()
            assert AuditAction.STUDY_REOPENED not in set(actions)
