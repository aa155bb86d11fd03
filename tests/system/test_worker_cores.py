"""Two real `radai worker` processes on one host share its cores (workers/host_share.py): each
starts a study with torch threads = cores // 2, and once one is killed (SIGKILL) the other's
next study takes all the cores again. Each worker serves its own queue, so which worker runs
which study is known; the studies are unknown UIDs (the task finds nothing to do after setting
its threads). What is checked is the thread count each process reports in its log, not a time.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import pytest

from db.outbox_tasks import TaskName
from dicom_node.dispatcher import celery_publisher
from tests.conftest import radai_env, wait_for

BROKER = "redis://127.0.0.1:6379/3"
LINE = re.compile(
    r"study (\S+): torch threads (\d+) \((\d+) worker process\(es\) on this host, (\d+) core"
)


def _reported(log: Path) -> dict[str, tuple[int, int, int]]:
    """study UID -> (threads, worker processes, cores) as the worker logged them."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in LINE.finditer(text)}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_worker_processes_each_take_half_the_cores(sqlite_db, radai_workers, tmp_path):
    home, run_dir = tmp_path / "home", tmp_path / "run"
    queues = {n: f"radai.test.{uuid.uuid4().hex[:8]}.{n}" for n in ("a", "b")}
    workers = {
        n: radai_workers(
            radai_env(
                home,
                sqlite_db.url,
                BROKER,
                q,
                RADAI_WORKER_RUN_DIR=str(run_dir),
                RADAI_PIPELINE="baseline",
                RADAI_MALIGNANCY_MODEL="none",
            ),
            f"cores-{n}",
        )
        for n, q in queues.items()
    }
    for w in workers.values():
        wait_for(
            lambda w=w: w.poll() is not None or " ready." in w.log_path.read_text(errors="replace"),
            timeout=90,
            interval=0.2,
        )
        assert w.poll() is None, w.log_path.read_text()[-2000:]
    cores = len(os.sched_getaffinity(0))  # the workers inherit this process's CPUs

    def run(n: str) -> tuple[int, int, int]:
        uid = f"2.25.{uuid.uuid4().int}"
        celery_publisher(BROKER, queues[n])(str(TaskName.PROCESS_STUDY), {"study_uid": uid})
        log = workers[n].log_path
        wait_for(lambda: uid in _reported(log), timeout=60, interval=0.1)
        return _reported(log)[uid]

    shared = max(1, cores // 2)
    assert run("a") == (shared, 2, cores)
    assert run("b") == (shared, 2, cores)

    workers["b"].send_signal(signal.SIGKILL)
    workers["b"].wait(timeout=30)
    assert run("a") == (cores, 1, cores)  # the dead worker no longer takes a share
    assert sorted(p.name for p in run_dir.iterdir()) == [f"{workers['a'].pid}.worker"]
