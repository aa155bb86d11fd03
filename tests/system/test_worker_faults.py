"""A worker killed with SIGKILL in the middle of a study: the message comes back (acks_late,
Redis visibility timeout) or the job's lease lapses and the node queues the study again
(db/leases.py), whichever comes first; a new worker completes the study with exactly one set of
outputs. (With a lease as long as the visibility timeout both happen; test_worker_leases.py has
the broker lose the message.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import select

from db import Job, Output, StudyState
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import radai_env, storescu, wait_for
from tests.helpers import study_state

LUNG2 = sample_study_uid("lung2")


@pytest.mark.slow
def test_killed_worker_loses_no_study(sqlite_db, node_factory, samples, tmp_path):
    home = tmp_path / "home"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    broker = "redis://127.0.0.1:6379/3"
    node = node_factory(
        sqlite_db, publish=celery_publisher(broker, queue), home=home, stable_seconds=0.5
    )
    env = radai_env(
        home, sqlite_db.url, broker, queue, RADAI_VISIBILITY_TIMEOUT="8", RADAI_LEASE_SECONDS="8"
    )

    def start(n: int) -> subprocess.Popen:
        log = open(tmp_path / f"worker{n}.log", "w")  # noqa: SIM115
        return subprocess.Popen(
            [sys.executable, "-m", "radai", "worker", "--name", f"w{n}@%h"],
            env=env,
            stdout=log,
            stderr=log,
        )

    first = start(1)
    second = None
    try:
        assert storescu(node.port, samples["lung2"]).returncode == 0
        wait_for(
            lambda: study_state(sqlite_db, LUNG2) == StudyState.PROCESSING,
            timeout=60,
            interval=0.05,
        )
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert study_state(sqlite_db, LUNG2) == StudyState.PROCESSING
        second = start(2)
        wait_for(
            lambda: study_state(sqlite_db, LUNG2) == StudyState.DONE, timeout=120, interval=0.5
        )
        with sqlite_db.session() as s:
            jobs = list(s.execute(select(Job)).scalars())
            outputs = list(s.execute(select(Output)).scalars())
        assert len(jobs) == 1 and jobs[0].attempts == 2
        assert sorted(o.modality for o in outputs) == ["SEG", "SR"]
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
