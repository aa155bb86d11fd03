"""Faults of the service's dependencies, with real processes: Redis stopped for 20 s while studies
become stable (node + dispatcher + a real worker), PostgreSQL restarted while senders store, and
a real small filesystem that fills up.

Each dependency is a private instance of the test's own (its own redis-server, its own PostgreSQL
cluster, its own tmpfs), so that stopping it disturbs nothing else on the machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select

from db import OutboxMessage, StudyState
from db.session import Database
from dicom_node import statuses
from dicom_node.dispatcher import celery_publisher
from dicom_node.samples import sample_study_uid
from tests.conftest import RecordingPublisher, free_port, radai_env, storescu, wait_for
from tests.helpers import (
    failures,
    instances,
    jobs_and_outputs,
    outbox,
    small_chest_ct_studies,
    storescu_statuses,
    study_row,
    study_state,
)

OUTAGE_S = 20.0
RECEIVED = re.compile(r"Task radai\.process_study\[([0-9a-f-]+)\] received")
LUNG1 = sample_study_uid("lung1")
LUNG2 = sample_study_uid("lung2")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_redis_stopped_for_20_s_loses_nothing(
    sqlite_db, node_factory, radai_workers, private_redis, samples, tmp_path
):
    db = sqlite_db
    studies = small_chest_ct_studies(samples["lung2"], tmp_path / "studies", 5)
    first, *during = list(studies)
    home = tmp_path / "home"
    queue = f"radai.test.{uuid.uuid4().hex[:8]}"
    node = node_factory(
        db, publish=celery_publisher(private_redis.url, queue), home=home, stable_seconds=1.0
    )
    # A short visibility timeout, so that the unacknowledged task comes back within the test.
    env = radai_env(home, db.url, private_redis.url, queue, RADAI_VISIBILITY_TIMEOUT="8")
    worker = radai_workers(env, "w1")

    # The whole chain works before the outage; a full-size study is in the worker's hands when
    # Redis stops: its result lands while the broker is away and its acknowledgement is lost.
    assert storescu(node.port, studies[first]).returncode == 0
    wait_for(
        lambda: study_state(db, first) == StudyState.DONE or worker.poll() is not None,
        timeout=90,
        interval=0.2,
    )
    assert worker.poll() is None, f"the worker exited: {worker.log_path.read_text()[-1500:]}"
    assert study_state(db, first) == StudyState.DONE
    assert storescu(node.port, samples["lung2"]).returncode == 0
    wait_for(lambda: study_state(db, LUNG2) == StudyState.PROCESSING, timeout=30, interval=0.05)

    private_redis.stop()
    down_at = time.monotonic()
    # Studies arrive and become stable while the broker is away: two at once, then one each
    # 5 s later. The node goes on receiving; the outbox keeps their messages.
    assert storescu(node.port, studies[during[0]] + studies[during[1]]).returncode == 0
    for uid in during[2:]:
        time.sleep(5)
        assert storescu(node.port, studies[uid]).returncode == 0
    wait_for(lambda: all(study_state(db, u) == StudyState.STABLE for u in during), timeout=15)
    wait_for(lambda: study_state(db, LUNG2) == StudyState.DONE, timeout=60, interval=0.2)
    wait_for(lambda: all(m.attempts >= 2 for m in outbox(db) if m.study_uid in during), timeout=15)
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    pending = [m for m in outbox(db) if m.study_uid in during]
    assert len(pending) == len(during)
    assert all(m.published_at is None and m.last_error for m in pending)
    assert all(study_state(db, u) == StudyState.STABLE for u in during)
    assert worker.poll() is None, "the worker exited while the broker was away"

    private_redis.start()
    up_at = time.monotonic()
    wait_for(
        lambda: all(study_state(db, u) in (StudyState.DONE, StudyState.FAILED) for u in during),
        timeout=120,
        interval=0.2,
    )
    recovered = time.monotonic() - up_at
    assert all(study_state(db, u) == StudyState.DONE for u in studies)

    # The task whose acknowledgement was lost is delivered again (and finds its result there:
    # the job counts below show it did not run again).
    def redelivered() -> list[str]:
        received = Counter(RECEIVED.findall(worker.log_path.read_text()))
        return [task for task, n in received.items() if n > 1]

    assert len(wait_for(redelivered, timeout=60, interval=0.5)) == 1
    assert worker.poll() is None

    # Processed exactly once: one job per study, one attempt, one SEG and one SR.
    jobs, outputs = jobs_and_outputs(db)
    everything = [*studies, LUNG2]
    assert len(jobs) == len(everything) and all(j.attempts == 1 for j in jobs)
    assert Counter(o.modality for o in outputs) == {"SEG": len(everything), "SR": len(everything)}
    with db.session() as s:
        published = Counter(
            s.execute(
                select(OutboxMessage.study_uid).where(OutboxMessage.published_at.is_not(None))
            ).scalars()
        )
    assert published == Counter({uid: 1 for uid in everything})
    assert failures(db) == []
    print(
        f"broker down {up_at - down_at:.1f} s; {len(during)} studies stable meanwhile, all DONE "
        f"{recovered:.1f} s after Redis returned"
    )


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl), on a free port.

    initdb refuses to run as root: as root, the cluster belongs to the `postgres` OS user and
    its folder lies outside pytest's root-only tmp_path."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="radai-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def _run(self, exe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / exe), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{exe} failed: {result.stdout[-500:]} {result.stderr[-500:]}")
        return result

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/radai"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self) -> None:
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE radai")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
        pg.create_database()
        yield pg
    finally:
        pg.remove()


SENDERS = 4


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_postgres_restarted_under_load(private_postgres, node_factory, samples, tmp_path):
    """Four storescu senders store 1,200 instances while the database is restarted twice (a fast
    stop, then an immediate one, as a crash would). While the node cannot record it answers
    0xA703 and nothing else; it recovers by itself; every acknowledged instance is on disk and in
    the database; each refused one is sent again and then stored."""
    db = Database(private_postgres.url)
    db.upgrade()
    # No worker here: 128x128 slices (33 KB) keep the senders quick.
    studies = small_chest_ct_studies(samples["lung2"], tmp_path / "studies", 60, step=4)
    publisher = RecordingPublisher()
    home = tmp_path / "home"
    node = node_factory(db, publish=publisher, home=home, stable_seconds=8.0)

    uids = list(studies)
    share = [uids[i::SENDERS] for i in range(SENDERS)]
    seen: dict[str, list[int | None]] = {}  # file -> every status it received, in order
    acknowledged = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + 150

    def sender(i: int) -> None:
        pending = [f for uid in share[i] for f in studies[uid]]
        while pending and time.monotonic() < stop_at:
            refused = []
            for n in range(0, len(pending), 20):
                chunk = pending[n : n + 20]
                result = storescu(node.port, chunk, aet=f"PGLOAD{i}", extra=("-d", "-nh"))
                got = storescu_statuses(result.stdout + result.stderr)
                with lock:
                    for path in chunk:
                        status = got.get(str(path))
                        seen.setdefault(str(path), []).append(status)
                        if status == statuses.SUCCESS:
                            acknowledged[0] += 1
                        else:
                            refused.append(path)
            pending = refused  # a sender retries what was refused, as a PACS would
            if pending:
                time.sleep(0.5)

    threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(SENDERS)]
    for t in threads:
        t.start()
    outages = []
    for at, mode in ((200, "fast"), (600, "immediate")):
        wait_for(lambda at=at: acknowledged[0] >= at, timeout=60, interval=0.05)
        t0 = time.monotonic()
        private_postgres.stop(mode)
        time.sleep(3)
        private_postgres.start()
        outages.append((mode, acknowledged[0], time.monotonic() - t0))
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a sender did not finish"

    total = sum(len(files) for files in studies.values())
    assert len(seen) == total
    answers = Counter(s for history in seen.values() for s in history)
    refusals = {s: n for s, n in answers.items() if s != statuses.SUCCESS}
    # The outages happened under load, and every refusal said: cannot record.
    assert refusals, "no instance was refused: the database was never down under load"
    assert set(refusals) == {statuses.CANNOT_RECORD}, answers
    assert all(history[-1] == statuses.SUCCESS for history in seen.values())

    held = instances(db)
    assert len(held) == total
    assert len({i.sop_instance_uid for i in held}) == total
    on_disk = {str(p) for p in (home / "archive").rglob("*.dcm") if ".staging" not in p.parts}
    assert on_disk == {i.archive_path for i in held}
    assert list(home.rglob("*.partial")) == []
    for uid, files in studies.items():
        assert study_row(db, uid).instance_count == len(files)

    # Every study is queued with all its instances. One whose refused instances came back after
    # its stable window was queued early and then reopened by them (queued again, by design).
    def last_sent() -> dict[str, int]:
        return {p["study_uid"]: p["instances"] for _, p in publisher.sent}

    wait_for(
        lambda: (
            last_sent() == {uid: 20 for uid in uids}
            and all(study_state(db, uid) == StudyState.QUEUED for uid in uids)
        ),
        timeout=60,
        interval=0.2,
    )
    reopened = len(publisher.sent) - len(uids)
    recorded = [f for f in failures(db) if f.status == statuses.CANNOT_RECORD]
    print(
        f"{total} instances, 4 senders, outages {outages}; answers {dict(answers)}; "
        f"{len(recorded)} refusals recorded once the database was back; "
        f"{reopened} studies queued early and reopened"
    )


def _mount_small_filesystem(target: Path, size_mb: int) -> str:
    """Mount a real filesystem of `size_mb` at `target`: tmpfs, else a loop-mounted ext4 image;
    return what was mounted, or skip the test when this machine allows neither."""
    target.mkdir(parents=True, exist_ok=True)
    tried = []
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return "tmpfs"
    tried.append(f"tmpfs: {result.stderr.strip()}")
    image = target.parent / f"{target.name}.ext4"
    with open(image, "wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode == 0:
        result = subprocess.run(
            ["mount", "-o", "loop", str(image), str(target)], capture_output=True, text=True
        )
        if result.returncode == 0:
            return "ext4 (loop)"
        tried.append(f"loop ext4: {result.stderr.strip()}")
    else:
        tried.append(f"mkfs.ext4: {made.stderr.strip()}")
    pytest.skip("cannot mount a small filesystem here: " + "; ".join(tried))


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB filesystem of its own, mounted for the test and unmounted after it."""
    target = tmp_path / "small"
    _mount_small_filesystem(target, 40)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _statuses_of(node, files, aet):  # noqa: ANN001, ANN202
    result = storescu(node.port, files, aet=aet, extra=("-d", "-nh"))
    got = storescu_statuses(result.stdout + result.stderr)
    return [got.get(str(f)) for f in files]


def _acknowledged_are_stored(db: Database, home: Path, acknowledged: int) -> None:
    held = instances(db)
    assert len(held) == acknowledged
    on_disk = [p for p in (home / "archive").rglob("*.dcm") if ".staging" not in p.parts]
    assert sorted(map(str, on_disk)) == sorted(i.archive_path for i in held)
    for row in held:  # whole files, exactly the bytes that were recorded
        assert hashlib.sha256(Path(row.archive_path).read_bytes()).hexdigest() == row.sha256
    assert list(home.rglob("*.partial")) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_disk_filling_up_is_refused_before_it_is_full(
    small_filesystem, sqlite_db, node_factory, samples
):
    """The node's home on a real 40 MB filesystem, 15 MB of it taken by other data, and
    RADAI_MIN_FREE_DISK_MB=10: the 512x512 slices of lung1 (0.5 MB each) are stored until less
    than 10 MB would remain, then refused with 0xA702 while the filesystem still has room. Once
    the other data is deleted, the refused slices are sent again and stored."""
    home = small_filesystem
    filler = home / "other-data.bin"
    filler.write_bytes(b"\0" * 15_000_000)
    node = node_factory(sqlite_db, home=home, min_free_disk_mb=10, stable_seconds=1.0)
    files = samples["lung1"]

    got = _statuses_of(node, files, "FILLER")
    accepted = [f for f, s in zip(files, got, strict=True) if s == statuses.SUCCESS]
    refused = [f for f, s in zip(files, got, strict=True) if s != statuses.SUCCESS]
    assert accepted and refused, got
    assert set(got[len(accepted) :]) == {statuses.DISK_LOW}, got  # success, then refusals
    free_mb = shutil.disk_usage(home).free / 1e6
    assert 9.0 < free_mb < 10.6, free_mb  # refused at the threshold, far from full
    _acknowledged_are_stored(sqlite_db, home, len(accepted))
    disk_low = [f for f in failures(sqlite_db) if f.status == statuses.DISK_LOW]
    assert len(disk_low) == len(refused)
    assert all(f.quarantine_path is None for f in disk_low)  # nothing written for them

    filler.unlink()
    assert _statuses_of(node, refused, "FILLER") == [statuses.SUCCESS] * len(refused)
    _acknowledged_are_stored(sqlite_db, home, len(files))
    wait_for(lambda: study_state(sqlite_db, LUNG1) == StudyState.QUEUED, timeout=30)
    assert study_row(sqlite_db, LUNG1).instance_count == len(files)
    print(
        f"accepted {len(accepted)}, refused {len(refused)} with {free_mb:.1f} MB still free; "
        "all stored after freeing space"
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_disk_really_full_is_refused_out_of_resources(
    small_filesystem, sqlite_db, node_factory, samples
):
    """With the free-space guard switched off (a negative minimum), the filesystem really fills
    up: the write that fails with ENOSPC is answered 0xA702 (out of resources), leaves no
    partial file, and nothing is acknowledged that is not whole on disk and recorded."""
    home = small_filesystem
    node = node_factory(sqlite_db, home=home, min_free_disk_mb=-1e9, stable_seconds=30)
    files = samples["lung1"] + samples["lung2"]  # 57 MB for a 40 MB filesystem
    got = _statuses_of(node, files, "FULL")
    accepted = [s for s in got if s == statuses.SUCCESS]
    assert statuses.DISK_LOW in got, got
    assert set(got) == {statuses.SUCCESS, statuses.DISK_LOW}, got
    _acknowledged_are_stored(sqlite_db, home, len(accepted))
    assert {f.status for f in failures(sqlite_db)} == {statuses.DISK_LOW}
    # It was really full: every refusal is a write that failed with ENOSPC (the guard is off).
    # The free space left afterwards says less: each file is written twice at once (journal and
    # staging), the failed writes are removed and the journal is compacted in the background.
    assert all("filesystem is full" in f.reason for f in failures(sqlite_db))
    assert all("No space left on device" in f.reason for f in failures(sqlite_db))
