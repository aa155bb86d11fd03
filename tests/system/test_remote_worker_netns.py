"""Workers on another machine, for real: each runs in its own network namespace (its own address,
its own loopback) and reaches the broker, the database and the DICOMweb archive only over a veth
link; the node's archive files are moved away before any worker starts. 10 studies end DONE with
one result each, and the study of a remote worker killed mid-study is completed by another
(Celery's late acknowledgement: the message returns after RADAI_VISIBILITY_TIMEOUT)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db import Job, Study, StudyState
from dicom_node.dispatcher import celery_publisher
from tests.conftest import radai_env, storescu, wait_for
from tests.helpers import jobs_and_outputs, small_chest_ct_studies
from tests.kit.netns import NetNamespace
from tests.kit.orthanc import OrthancServer
from tests.system.test_remote_worker import upload

STUDIES = 10
PG_PORT = 5432


def _states(db) -> dict[str, str]:  # noqa: ANN001
    with db.session() as s:
        return {uid: state for uid, state in s.execute(select(Study.study_uid, Study.state))}


def _worker(ns: NetNamespace, env: dict, name: str, log: Path, started: list):  # noqa: ANN202
    argv = [sys.executable, "-m", "radai", "worker", "--name", f"{name}@%h"]
    proc = ns.popen(argv, env, log)
    started.append(proc)
    return proc


def _stop(procs: list) -> None:
    """The workers end with the test (each in a session of its own), passed or failed: one
    left running outlived earlier runs of the suite."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_remote_workers_in_their_own_network_namespace(
    database, node_factory, redis_server, samples, tmp_path
):
    studies = small_chest_ct_studies(samples["lung2"], tmp_path / "studies", STUDIES)
    # One patient seen on ten days: each study's prior is the one before (read over the link).
    for day, files in enumerate(studies.values(), start=1):
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyDate = f"202401{day:02d}"
            ds.save_as(path, enforce_file_format=True)
    redis_port = redis_server()
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    node_home = tmp_path / "node"
    started: list = []
    with OrthancServer(dicomweb=True) as orthanc, NetNamespace() as ns:
        try:
            _run(
                database,
                node_factory,
                redis_port,
                queue,
                node_home,
                studies,
                orthanc,
                ns,
                tmp_path,
                started,
            )
        finally:
            _stop(started)


def _run(
    database, node_factory, redis_port, queue, node_home, studies, orthanc, ns, tmp_path, started
) -> None:  # noqa: ANN001
    upload(orthanc, [f for files in studies.values() for f in files])
    node = node_factory(
        database,
        publish=celery_publisher(f"redis://127.0.0.1:{redis_port}/0", queue),
        home=node_home,
        stable_seconds=1.0,
    )
    files = [f for uid in studies for f in studies[uid]]
    assert storescu(node.port, files, timeout=120).returncode == 0
    wait_for(
        lambda: Counter(_states(database).values())[StudyState.QUEUED] == STUDIES,
        timeout=60,
        interval=0.2,
    )
    (node_home / "archive").rename(node_home / "archive.hidden")

    # Inside, this host's loopback services are out of reach; only the link leads out.
    assert not ns.reaches("127.0.0.1", PG_PORT)
    pg, redis, http = ns.forward(PG_PORT), ns.forward(redis_port), ns.forward(orthanc.http_port)
    assert ns.reaches(ns.host, pg)
    db_url = database.url.replace(f"127.0.0.1:{PG_PORT}", f"{ns.host}:{pg}")
    assert ns.host in db_url

    def env(home: str) -> dict:
        return radai_env(
            tmp_path / home,
            db_url,
            f"redis://{ns.host}:{redis}/0",
            queue,
            RADAI_ARCHIVE_URL=f"http://{ns.host}:{http}/dicom-web",
            RADAI_VISIBILITY_TIMEOUT="10",
            RADAI_TORCH_THREADS="1",
        )

    # Worker A takes a study and is killed in the middle of it.
    a = _worker(ns, env("worker-a"), "remote-a", tmp_path / "a.log", started)
    busy = wait_for(
        lambda: [u for u, st in _states(database).items() if st == StudyState.PROCESSING],
        timeout=180,
        interval=0.02,
    )
    os.kill(a.pid, signal.SIGKILL)
    a.wait(timeout=10)
    time.sleep(0.5)
    killed = [u for u, st in _states(database).items() if st == StudyState.PROCESSING]
    assert killed == busy, (killed, busy, (tmp_path / "a.log").read_text()[-2000:])

    # Worker B, another "machine" home, drains the queue and takes over A's study.
    b = _worker(ns, env("worker-b"), "remote-b", tmp_path / "b.log", started)
    wait_for(
        lambda: (
            Counter(_states(database).values())[StudyState.DONE] == STUDIES or b.poll() is not None
        ),
        timeout=400,
        interval=0.5,
    )
    b_log = (tmp_path / "b.log").read_text()
    states = _states(database)
    assert Counter(states.values()) == {StudyState.DONE: STUDIES}, (states, b_log[-3000:])
    assert f"study {killed[0]} DONE" in b_log

    # One result per study: one job, one SEG and one SR, in the database and the archive.
    jobs, outputs = jobs_and_outputs(database)
    assert len(jobs) == STUDIES and all(j.state == StudyState.DONE for j in jobs)
    with database.session() as s:
        rows = s.execute(select(Study.study_uid, Job.attempts).join(Job, Job.study_id == Study.id))
        attempts = {uid: n for uid, n in rows}
    assert attempts[killed[0]] == 2 and sum(attempts.values()) == STUDIES + 1
    per_study = Counter((o.study_id, o.modality) for o in outputs)
    assert len(per_study) == 2 * STUDIES and set(per_study.values()) == {1}
    archived = Counter(
        (str(t.get("StudyInstanceUID")), str(t.get("Modality")))
        for t in (orthanc.instance_tags(i) for i in orthanc.instances())
    )
    for uid in studies:
        assert archived[(uid, "SEG")] == 1 and archived[(uid, "SR")] == 1

    # Earlier studies were compared as priors, their series and SEG read by WADO-RS too (not
    # every one: a study taken up before the one before it was DONE has none yet).
    compared = [j.findings.get("prior_study_uid") for j in jobs]
    reasons = {j.findings.get("prior_reason") for j in jobs}
    assert sum(1 for uid in compared if uid) >= STUDIES // 2, reasons

    # Everything the workers opened came over the link, from the namespace's own address.
    assert ns.peers() == {ns.address}
    assert not (tmp_path / "worker-b" / "archive").exists() or not any(
        (tmp_path / "worker-b" / "archive").iterdir()
    )
