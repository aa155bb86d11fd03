"""Results leave for PACS destinations: a real Orthanc receives SEG and SR; a dead destination
is retried with backoff, then given up, without holding anything else back."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from sqlalchemy import select

from db import Export, OutboxMessage, Output, StudyState, audit
from dicom_io.destinations import format_destination
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import free_port, radai_env, storescu, wait_for
from tests.helpers import study_state
from tests.kit.orthanc import OrthancServer
from workers import exporting, processing

LUNG1 = sample_study_uid("lung1")


@pytest.fixture(scope="module")
def orthanc():
    with OrthancServer() as server:
        yield server


def _exports(db) -> dict[str, Export]:
    with db.session() as s:
        return {e.destination: e for e in s.execute(select(Export)).scalars()}


def _orthanc_sop_uids(orthanc: OrthancServer) -> set[str]:
    return {orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances()}


def test_results_reach_orthanc_and_a_dead_destination_gives_up(
    database, node_factory, samples, orthanc, tmp_path
):
    node = node_factory(database, stable_seconds=0.3)
    assert storescu(node.port, samples["lung1"]).returncode == 0
    wait_for(lambda: study_state(database, LUNG1) == StudyState.QUEUED)
    dead = ("NOBODY", "127.0.0.1", free_port())
    names = {format_destination(d): d for d in (orthanc.destination, dead)}
    assert processing.process_study(database, LUNG1, tmp_path / "out", list(names)) == "DONE"

    exports = _exports(database)
    assert set(exports) == set(names) and all(e.state == "PENDING" for e in exports.values())
    with database.session() as s:
        queued = [
            m.payload["export_id"]
            for m in s.execute(select(OutboxMessage)).scalars()
            if m.task == "radai.export_output"
        ]
        outputs = {o.sop_instance_uid for o in s.execute(select(Output)).scalars()}
    assert sorted(queued) == sorted(e.id for e in exports.values())

    ok = exports[format_destination(orthanc.destination)]
    assert exporting.run_export(database, ok.id, names, calling_aet="RADAI") is None
    assert outputs <= _orthanc_sop_uids(orthanc)

    bad = exports[format_destination(dead)]
    delays = [
        exporting.run_export(
            database, bad.id, names, calling_aet="RADAI", timeout=2, max_attempts=3, backoff_cap=7
        )
        for _ in range(3)
    ]
    assert delays == [5.0, 7.0, None]
    final = _exports(database)
    assert final[format_destination(orthanc.destination)].state == "SENT"
    assert final[format_destination(dead)].state == "FAILED"
    assert final[format_destination(dead)].attempts == 3
    with database.session() as s:
        actions = [e.action for e in s.query(audit.AuditEntry).order_by(audit.AuditEntry.seq)]
    assert "export.sent" in actions and "export.failed" in actions


def test_worker_exports_through_the_outbox(sqlite_db, node_factory, samples, tmp_path):
    """Node, broker, a real worker process and Orthanc: the SR and SEG arrive by themselves."""
    with OrthancServer() as orthanc:
        _worker_exports(sqlite_db, node_factory, samples, tmp_path, orthanc)


def _worker_exports(sqlite_db, node_factory, samples, tmp_path, orthanc) -> None:
    home = tmp_path / "home"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    broker = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    dead = f"NOBODY@127.0.0.1:{free_port()}"
    destinations = f"{format_destination(orthanc.destination)},{dead}"
    publish = celery_publisher(broker, queue, {"radai.export_output": queue + ".io"})
    node = node_factory(sqlite_db, publish=publish, home=home, stable_seconds=0.5)
    env = radai_env(home, sqlite_db.url, broker, queue, RADAI_EXPORT_TO=destinations)
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "radai", "worker"], env=env, stdout=log, stderr=log
    )
    try:
        assert _orthanc_sop_uids(orthanc) == set()
        assert storescu(node.port, samples["lung1"]).returncode == 0
        wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.DONE, timeout=180)
        with sqlite_db.session() as s:
            outputs = {o.sop_instance_uid for o in s.execute(select(Output)).scalars()}
        wait_for(lambda: outputs <= _orthanc_sop_uids(orthanc), timeout=60)
        exports = _exports(sqlite_db)
        wait_for(
            lambda: _exports(sqlite_db)[format_destination(orthanc.destination)].state == "SENT",
            timeout=30,
        )
        assert exports[dead].state == "PENDING" or _exports(sqlite_db)[dead].attempts >= 1
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(timeout=30)
