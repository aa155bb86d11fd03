"""A node killed (SIGKILL) after acknowledging instances whose index rows and files were not yet
synced loses none of them: the ingest journal is replayed at the next start.

The node under test runs in its own process with background syncing held off (`sync_seconds`
of an hour), so that every instance it acknowledges stays in the journal only. After the kill,
the test does to the database and the archive what a power cut may do to writes that were never
synced: the database goes back to a copy taken after the first study (the commits of the other
two are gone), some archive files vanish and one is cut short. A new node must then hold every
acknowledged instance exactly once, each file whole.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from db import AuditEntry, Instance
from db.session import Database
from dicom_node import statuses
from tests.conftest import storescu
from tests.helpers import small_chest_ct_studies, storescu_statuses, study_row

ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import sys
from pathlib import Path
from db.session import Database
from dicom_node.archive import Archive
from dicom_node.server import NodeConfig
from dicom_node.service import NodeService

home = Path(sys.argv[2])
service = NodeService(
    Database(sys.argv[1]),
    Archive(home / "archive", home / "quarantine"),
    NodeConfig(host="127.0.0.1", port=0, sync_seconds=3600.0),
    stable_seconds=3600.0,
    publish=lambda task, payload: None,
)
service.start()
print(service.port, flush=True)
service.wait()
"""


def _send(port: int, files: list[Path]) -> None:
    result = storescu(port, files, aet="CRASHSCU", extra=("-d", "-nh"))
    got = storescu_statuses(result.stdout + result.stderr)
    answers = [got.get(str(f)) for f in files]
    assert answers == [statuses.SUCCESS] * len(files), result.stderr[-2000:]


def _snapshot(db_path: Path, to: Path) -> None:
    # SQLite's online backup: a consistent copy while the node writes.
    with sqlite3.connect(db_path) as src, sqlite3.connect(to) as dst:
        src.backup(dst)


def _restore(snapshot: Path, db_path: Path) -> None:
    for suffix in ("-wal", "-shm", ""):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    db_path.write_bytes(snapshot.read_bytes())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_after_acknowledgement_loses_nothing(node_factory, samples, tmp_path):
    db_path = tmp_path / "radai.sqlite"
    url = f"sqlite:///{db_path}"
    Database(url).upgrade()
    home = tmp_path / "home"
    studies = small_chest_ct_studies(samples["lung2"], tmp_path / "studies", 3, step=4)
    uids = list(studies)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        port = int(child.stdout.readline())
        _send(port, studies[uids[0]])
        _snapshot(db_path, tmp_path / "after-first-study.sqlite")
        _send(port, studies[uids[1]] + studies[uids[2]])
        journal = home / "archive" / ".journal"
        assert any(p.stat().st_size > 0 for p in journal.glob("*.journal"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)

    # What a power cut may leave of writes that were not synced.
    _restore(tmp_path / "after-first-study.sqlite", db_path)
    db = Database(url)
    assert study_row(db, uids[1]) is None
    lost = sorted((home / "archive" / uids[1]).rglob("*.dcm"))
    for path in lost[::2]:
        path.unlink()
    cut = next((home / "archive" / uids[2]).rglob("*.dcm"))
    cut.write_bytes(cut.read_bytes()[:1000])

    node_factory(db, home=home, stable_seconds=3600.0)

    with db.session() as s:
        held = list(s.execute(select(Instance)).scalars())
        received = s.execute(
            select(func.count())
            .select_from(AuditEntry)
            .where(AuditEntry.action == "study.received")
        ).scalar_one()
    sent = {pydicom.dcmread(f).SOPInstanceUID: f for uid in uids for f in studies[uid]}
    assert sorted(i.sop_instance_uid for i in held) == sorted(sent)  # each once, none missing
    for uid in uids:
        assert study_row(db, uid).instance_count == len(studies[uid])
    assert received == len(uids)  # no study recorded twice
    for instance in held:
        kept = pydicom.dcmread(instance.archive_path)
        original = pydicom.dcmread(sent[instance.sop_instance_uid])
        assert kept.SOPInstanceUID == instance.sop_instance_uid
        assert kept.PixelData == original.PixelData
