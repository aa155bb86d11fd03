"""The whole service over real sockets: storescu -> node -> broker -> a real Celery worker process
-> SEG + SR, on the embedded SQLite broker with SQLite and on Redis with PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from db import StudyState
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import radai_env, storescu, wait_for
from tests.helpers import study_row, study_state

LUNG2 = sample_study_uid("lung2")


@pytest.mark.parametrize(
    ("database", "broker"),
    [("sqlite", "sqla"), ("postgresql", "redis")],
    indirect=["database"],
)
def test_sample_study_end_to_end(database, broker, node_factory, radai_workers, samples, tmp_path):
    home = tmp_path / "home"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    broker_url = (
        f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
        if broker == "sqla"
        else "redis://127.0.0.1:6379/0"
    )
    node = node_factory(
        database, publish=celery_publisher(broker_url, queue), home=home, stable_seconds=1.0
    )
    worker = radai_workers(radai_env(home, database.url, broker_url, queue), "e2e")
    assert storescu(node.port, samples["lung2"]).returncode == 0
    wait_for(
        lambda: study_state(database, LUNG2) in (StudyState.DONE, StudyState.FAILED),
        timeout=240,
        interval=0.5,
    )
    study = study_row(database, LUNG2)
    assert study.state == StudyState.DONE, study.error
    assert worker.poll() is None, "the worker died"

    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env.update(RADAI_HOME=str(home), RADAI_DATABASE_URL=database.url)
    listing = subprocess.run(
        [sys.executable, "-m", "radai", "studies", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    [row] = json.loads(listing.stdout)
    assert row["state"] == "DONE" and row["instances"] == 61
    assert row["findings"]["lesions"] and row["findings"]["screening_probability"] > 0.5
    assert sorted(o["modality"] for o in row["outputs"]) == ["SEG", "SR"]
    assert row["model_versions"]
    dump = subprocess.run(
        ["/usr/bin/dsrdump", next(o["path"] for o in row["outputs"] if o["modality"] == "SR")],
        capture_output=True,
        text=True,
    )
    assert dump.returncode == 0 and "NOT FOR CLINICAL USE" in dump.stdout
