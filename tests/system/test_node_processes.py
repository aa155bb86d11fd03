"""RADAI_NODE_PROCESSES=2: `radai node` and a listener process share the DICOM port (SO_REUSEPORT).
Eight concurrent storescu associations, some sending the same instances twice: every instance is
recorded once, on SQLite and on PostgreSQL; a listener killed with SIGKILL is started again; the
node's SIGTERM stops its listener too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from db.session import Database
from tests.conftest import free_port, wait_for
from tests.kit.dcmtk import storescu
from tests.kit.dicomweb import ct_instance, save
from tests.kit.net import listening_sockets

RADAI = [sys.executable, "-m", "radai"]
STUDIES, PER_SERIES = 4, 40


def _listener_pids(node_pid: int) -> list[int]:
    pids = []
    children = []  # a child belongs to the thread that started it
    for task in Path(f"/proc/{node_pid}/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except FileNotFoundError:
            continue  # the thread ended
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--listener" in cmdline and _alive(int(child)):
            pids.append(int(child))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def corpus(tmp_path: Path) -> list[list[Path]]:
    """Eight senders' files: four studies of 40 instances, each study sent by two senders."""
    shares: list[list[Path]] = []
    for s in range(STUDIES):
        study, series = generate_uid(), generate_uid()
        files = [
            save(ct_instance(study, series, number=n + 1, accession=f"MP{s}"), tmp_path / f"s{s}")
            for n in range(PER_SERIES)
        ]
        shares += [files, files[::-1]]  # the same instances from two senders at once
    return shares


def test_two_processes_share_the_port_and_record_each_instance_once(
    tmp_path: Path, database: Database, corpus: list[list[Path]]
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
    env.update(
        RADAI_HOME=str(tmp_path / "home"),
        RADAI_DATABASE_URL=database.url,
        RADAI_DICOM_PORT=str(port),
        RADAI_DICOMWEB_PORT="0",
        RADAI_STABLE_SECONDS="600",
        RADAI_NODE_PROCESSES="2",
    )
    node = subprocess.Popen([*RADAI, "node"], env=env)
    try:
        wait_for(lambda: listening_sockets(port) == 2, timeout=90, interval=0.3)
        [listener] = _listener_pids(node.pid)

        with ThreadPoolExecutor(len(corpus)) as pool:
            sent = list(pool.map(lambda files: storescu(port, files, verbose=False), corpus))
        assert all(r.returncode == 0 for r in sent), [r.stderr[-500:] for r in sent]

        listed = subprocess.run(
            [*RADAI, "studies", "--json"], env=env, capture_output=True, text=True, timeout=120
        )
        assert listed.returncode == 0, listed.stderr
        studies = json.loads(listed.stdout)
        assert sorted(s["instances"] for s in studies) == [PER_SERIES] * STUDIES
        home = tmp_path / "home"
        archived = [p for p in (home / "archive").rglob("*.dcm") if ".journal" not in str(p)]
        assert len(archived) == STUDIES * PER_SERIES
        # Both processes kept a journal of their own.
        assert (home / "archive" / ".journal").is_dir()
        assert (home / "archive" / ".journal-1").is_dir()

        os.kill(listener, signal.SIGKILL)
        wait_for(lambda: _listener_pids(node.pid) not in ([], [listener]), timeout=30)
        wait_for(lambda: listening_sockets(port) == 2, timeout=60, interval=0.3)
        [restarted] = _listener_pids(node.pid)
    finally:
        node.terminate()
        node.wait(timeout=60)
    assert node.returncode == 0
    wait_for(lambda: not _alive(restarted), timeout=30)
    assert listening_sockets(port) == 0
