"""End-to-end benchmark: from the last C-STORE of a CT study to its AI results in the database.

What it measures
----------------
A fresh `radai node` and `radai worker` processes run in a temp RADAI_HOME (SQLite database),
with a Celery broker on Redis (127.0.0.1:6379, an empty db number and a unique queue name) or,
with `--broker sqlite`, the default SQLite broker in RADAI_HOME. Studies are copies of the
61-slice `lung2` sample (`radai sample`), each rewritten with new Study/Series/SOP Instance UIDs
so that no job is deduplicated, and with a patient of its own so that none is another's prior,
and sent with dcmtk's `storescu` over loopback.

1. Latency (one worker, `--repeats` studies sent one after the other, median shown): seconds
   from the end of the storescu process (its last C-STORE response) to the SR row in `outputs`
   (`created_at`), split into the stages the database records:

   stable wait     storescu end -> audit `study.stable`: RADAI_STABLE_SECONDS plus the node's
                   0.5 s assembly poll
   dispatch        `study.stable` -> `study.queued` (outbox message published to the broker)
   queue wait      `study.queued` -> `jobs.started_at` (broker delivery to an idle worker)
   load + files    job time not covered by `jobs.timings`: reading the series' headers and
                   pixels, claiming the job, recording its result
   qa, malignancy, follow_up, segment, screen_and_gradcam, measure, lungs, ..., write_dicom
                   `jobs.timings` (input QA, the malignancy model, the prior lookup, the
                   analyser's own perf_counter laps, the SEG/SR/saliency files)
   DB write        `jobs.finished_at` -> SR `outputs.created_at` (the result transaction, up to
                   the flush of the output rows; its commit is not included)

   `total` is the sum; `total - stable window` is what the service adds on top of the
   deliberate wait for a study to be complete. The first job of a fresh worker pays one-off
   costs (lazy imports, the node's first broker connection): `--warmup` (default 1) studies are
   processed before the timed ones, and the first is shown in the `cold` column.

2. Peak memory: VmHWM (/proc/PID/status) of each worker process, and of any child it forked
   (with `--concurrency 1` the pool is `solo`: the task runs in the worker process itself), read
   at the end of each phase, next to its VmRSS once ready (`idle`) and at that moment (`after`).

3. Throughput: N (`--studies`, default 8) fresh lung2 copies sent by one storescu with their
   slices interleaved, so that all N studies complete (and turn STABLE) at about the same time
   (`queued spread`: first to last QUEUED); studies per minute from the first study QUEUED to
   the last SR recorded, with ONE worker process and with TWO separate worker processes on the
   same queue (freshly started for each phase; `jobs`: studies each one processed). `two / one`
   is the speed-up; it cannot exceed the number of CPU cores, which the node and this script
   share (the machine's nproc and CPU are printed first). `--rounds R` repeats both phases,
   alternating (odd rounds one worker first, even rounds two first), and the ratio is then
   taken from the medians. `--pipelines baseline,models` runs the pair for each pipeline in the
   same run (a round runs every pipeline's pair before the next round), so the two pipelines'
   ratios come from the same stretch of machine load. `--oversubscribed` adds, for each
   pipeline, two workers that each take every core (RADAI_TORCH_THREADS = nproc: the default
   before the workers on a host counted each other) as a peer of the shared default.
   `threads` is what each worker process reported at the start of its studies: torch threads
   / worker processes it counted on the host (`radai.worker: study ...: torch threads N (M
   worker process(es) ...)`). The workers register in a folder of this run's own
   (RADAI_WORKER_RUN_DIR), so other radai workers on the machine are not counted.

Other work on the machine skews everything, the two-worker run most: for each phase the script
prints the CPU its own processes used (node, workers, storescu, itself) and what everything
else used (`CPU other`, in cores busy on average, from /proc/stat), and flags a phase where
other processes kept more than a quarter of a core busy. `--quiet-wait S` waits (up to S
seconds) before each phase until the rest of the machine is idle.

How to read it
--------------
The latency table is per stage, median of the repeats, with each run's values; the stable
window itself is a setting, so `total - stable window` is the number to watch. Pipeline stages
are CPU bound and scale with slice count; the dispatch and queue wait stages are the service's
own overhead (polling intervals), and should be a small fraction of a second on Redis (the
SQLite broker is polled, about once a second). Throughput `two / one` near 2.0 means the
pipeline scales with worker processes; much less on a 2-core machine means the cores, not the
queue, are the limit. Compare numbers from the same machine only.

`--slices N` sends lung2 resampled to N slices (bench/ct_series.py) instead of the 61-slice
sample; `--pipeline` and `--torch-threads` set the workers' RADAI_PIPELINE and
RADAI_TORCH_THREADS (unset by default: the service's defaults); `--pipelines` the pipelines of
the throughput phases (default: `--pipeline`'s). `--skip-latency` runs the throughput only.

Run: `python bench/e2e.py [--studies N] [--broker redis|sqlite]` with the project's venv active
(`--help` lists the other options). Needs dcmtk (/usr/bin/storescu, /usr/bin/echoscu) and, for
the default broker, Redis at 127.0.0.1:6379. Everything it starts is stopped, its Redis keys
deleted and its temp dir removed (`--keep` keeps the dir, with RADAI_HOME/logs, to inspect).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from common import (
    ECHOSCU,
    HOST,
    STORESCU,
    Processes,
    dcmtk_env,
    free_port,
    problems,
    proc_cpu_seconds,
    proc_status_kb,
)
from common import storescu as kit_storescu
from pydicom.uid import generate_uid

AET = "RADAI"
CALLING_AET = "BENCHE2E"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
START_TIMEOUT = 120.0
POLL = 0.05
OTHER_CPU_LIMIT = 0.25  # cores busy with other people's work above which a phase is flagged
_RADAI_EXE = Path(sys.executable).with_name("radai")
# The workers' jobs.timings keys: input QA, the malignancy model, the follow-up (prior lookup, and
# comparison when one is found), then the analyser's laps (ml.runtime.inference's for the models,
# ml.runtime.baseline's for the baseline); a pipeline's rows show "-" for the other's.
PIPELINE_STAGES = (
    "qa",
    "malignancy",
    "follow_up",
    "segment",
    "screen_and_gradcam",
    "measure",
    "lungs",
    "lesions",
    "score",
    "saliency",
)


def _parse_time(value: str | None) -> datetime | None:
    """A time as SQLAlchemy stores it in SQLite (UTC, zone dropped) -> aware UTC datetime."""
    if value is None:
        return None
    at = datetime.fromisoformat(value)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


THREADS_LINE = re.compile(r"torch threads (\d+) \((\d+) worker process")


def _secs(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


# --------------------------------------------------------------------------------------------
# Studies


class StudyFactory:
    """Copies of a sample study, each with new Study/Series/SOP Instance UIDs and a patient of
    its own: copies of one patient would be each other's priors, and every study after the first
    would pay a follow-up comparison (a second volume loaded and registered) that the latency of
    one new study should not include (`bench/followup.py` measures that)."""

    def __init__(self, sample: Path, out: Path) -> None:
        self.sources = sorted(sample.glob("*.dcm"))
        if not self.sources:
            raise RuntimeError(f"no sample slices in {sample}")
        self.out = out
        self.count = 0
        self.token = uuid.uuid4().hex[:8]  # patients unique to this run, too

    def make(self, tag: str) -> tuple[str, list[Path]]:
        self.count += 1
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = self.out / tag
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, src in enumerate(self.sources):
            ds = pydicom.dcmread(src)
            sop_uid = generate_uid()
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.PatientID = f"E2E-{self.token}-{self.count:06d}"
            ds.PatientName = f"E2E^{self.count:06d}"
            ds.AccessionNumber = f"E2E{self.count:06d}"
            ds.StudyID = f"E2E{self.count}"
            path = folder / f"{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        for p in paths:  # into the page cache, so the send times only the network and node
            p.read_bytes()
        return study_uid, paths


def interleave(groups: list[list[Path]]) -> list[Path]:
    """Slice 1 of every study, then slice 2 of every study...: all studies end together."""
    out: list[Path] = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out


@dataclass
class Send:
    seconds: float
    ended: datetime  # wall clock (UTC) when storescu exited: after the last C-STORE response
    returncode: int
    problems: list[str]


def storescu(files: list[Path], port: int) -> Send:
    t0 = time.perf_counter()
    result = kit_storescu(
        port, files, aec=AET, aet=CALLING_AET, timeout=None, verbose=False, capture_stdout=False
    )
    ended = datetime.now(UTC)
    return Send(time.perf_counter() - t0, ended, result.returncode, problems(result.stderr))


# --------------------------------------------------------------------------------------------
# Processes


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; idle, iowait and steal excluded)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Where the CPU went during a phase: the benchmark's own processes (node, workers, this
    script and the storescu it ran) against everything else on the machine."""

    def __init__(self, pids: list[int]) -> None:
        self.t0 = time.monotonic()
        self.busy0 = _machine_busy_seconds()
        self.ours0 = self._ours(pids)

    @staticmethod
    def _ours(pids: list[int]) -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return own + sum(proc_cpu_seconds(p) for p in pids)

    def stop(self, pids: list[int]) -> CpuShare:
        wall = time.monotonic() - self.t0
        busy = (_machine_busy_seconds() - self.busy0) / wall
        ours = (self._ours(pids) - self.ours0) / wall
        return CpuShare(wall, busy, ours, max(0.0, busy - ours))


def wait_quiet(pids: list[int], limit_s: float, window: float = 2.0, needed: int = 3) -> str:
    """Wait (up to `limit_s`) until other processes use under OTHER_CPU_LIMIT cores for
    `needed` windows in a row; say how it went. A shared machine is rarely idle for long."""
    if limit_s <= 0:
        return ""
    t0, calm = time.monotonic(), 0
    while time.monotonic() - t0 < limit_s:
        meter = CpuMeter(pids)
        time.sleep(window)
        calm = calm + 1 if meter.stop(pids).other_cores < OTHER_CPU_LIMIT else 0
        if calm >= needed:
            return f"machine quiet after {time.monotonic() - t0:.0f} s"
    return f"machine still busy after {limit_s:.0f} s: went on"


@dataclass
class CpuShare:
    wall: float
    busy_cores: float  # the machine, in cores busy on average
    ours_cores: float  # this benchmark's processes
    other_cores: float  # everything else: other people's work skews the numbers

    def text(self) -> str:
        return (
            f"CPU over {self.wall:.1f} s: machine {self.busy_cores:.2f} cores busy, this "
            f"benchmark {self.ours_cores:.2f}, other processes {self.other_cores:.2f}"
        )


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path
    idle_rss_kb: int | None = None

    def memory(self, phase: str) -> Memory:
        """VmHWM and VmRSS of the worker and of every process below it, read now."""
        reading = Memory(phase, self.name, self.idle_rss_kb, self.jobs_done())
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            hwm, rss = proc_status_kb(pid, "VmHWM"), proc_status_kb(pid, "VmRSS")
            if hwm is not None and rss is not None:
                role = "worker process" if pid == self.proc.pid else "child of the worker"
                reading.procs.append((pid, role, hwm, rss))
            todo += _children(pid)
        return reading

    def jobs_done(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return len(re.findall(r"radai\.worker: study \S+ DONE", text))

    def threads(self) -> str:
        """The torch threads / worker processes it reported at the start of its studies."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        seen = sorted({f"{t}/{p}" for t, p in THREADS_LINE.findall(text)})
        return ",".join(seen) or "?"


@dataclass
class Memory:
    phase: str
    worker: str
    idle_rss_kb: int | None
    jobs: int
    procs: list[tuple[int, str, int, int]] = field(default_factory=list)  # pid, role, HWM, RSS


class Service:
    """One RADAI_HOME with its node and workers, and the broker settings they share."""

    def __init__(self, home: Path, procs: Processes, broker_url: str, queue: str, stable: float):
        self.home = home
        self.procs = procs
        self.port = free_port()
        self.broker_url = broker_url
        self.queue = queue
        self.stable = stable
        self.node: subprocess.Popen | None = None
        self.workers: list[Worker] = []
        self.db_path = home / "radai.sqlite"
        self.extra_env: dict[str, str] = {}
        (home / "bench").mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
        env.update(
            RADAI_HOME=str(self.home),
            RADAI_DICOM_HOST=HOST,
            RADAI_DICOM_PORT=str(self.port),
            RADAI_AE_TITLE=AET,
            RADAI_STABLE_SECONDS=str(self.stable),
            RADAI_QUEUE=self.queue,
            RADAI_IO_QUEUE=f"{self.queue}.io",
            RADAI_BROKER_URL=self.broker_url,
            # This run's workers count each other only: not other radai workers on the machine.
            RADAI_WORKER_RUN_DIR=str(self.home / "run"),
        )
        env.update(self.extra_env)
        return env

    def start_node(self) -> None:
        log = self.home / "bench" / "node.out"
        self.node = self.procs.start([str(_RADAI_EXE), "node"], env=self.env(), log=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.node.poll() is not None:
                raise RuntimeError(f"node exited {self.node.returncode}; see {log}")
            echo = subprocess.run(
                [ECHOSCU, "-aet", CALLING_AET, "-aec", AET, HOST, str(self.port)],
                env=dcmtk_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
            )
            if echo.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("node did not answer C-ECHO")

    def start_worker(self, name: str, env: dict[str, str] | None = None) -> Worker:
        log = self.home / "bench" / f"{name}.out"
        argv = [str(_RADAI_EXE), "worker", "--concurrency", "1", "--name", f"{name}@%h"]
        proc = self.procs.start(argv, env={**self.env(), **(env or {})}, log=log)
        worker = Worker(name, proc, log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited {proc.returncode}; see {log}")
            if log.exists() and " ready." in log.read_text(errors="replace"):
                time.sleep(0.5)  # let it settle (first poll of the queue) before the idle RSS
                worker.idle_rss_kb = proc_status_kb(proc.pid, "VmRSS")
                self.workers.append(worker)
                return worker
            time.sleep(0.2)
        raise RuntimeError(f"worker {name} not ready within {START_TIMEOUT:.0f} s")

    def stop_workers(self) -> list[str]:
        notes = []
        for w in self.workers:
            rc = self.procs.stop(w.proc)
            if rc not in (0, None):
                notes.append(f"worker {w.name} exited {rc} on SIGTERM")
            elif rc is None:
                notes.append(f"worker {w.name} did not stop on SIGTERM within 30 s: killed")
        self.workers = []
        return notes

    def stop(self) -> list[str]:
        notes = self.stop_workers()
        if self.node is not None:
            rc = self.procs.stop(self.node)
            if rc is None:
                notes.append("node did not stop on SIGTERM within 30 s: killed")
            elif rc != 0:
                notes.append(f"node exited {rc} (on SIGTERM, or before it)")
        return notes

    # Reading the service's database. Read-only sqlite3, not the project's engine: that one
    # opens every transaction with BEGIN IMMEDIATE and would take the write lock while polling.
    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            yield conn
        finally:
            conn.close()

    def states(self, study_uids: list[str]) -> dict[str, str]:
        marks = ",".join("?" * len(study_uids))
        with self._db() as db:
            rows = db.execute(
                f"SELECT study_uid, state FROM studies WHERE study_uid IN ({marks})", study_uids
            ).fetchall()
        return dict(rows)

    def wait_finished(self, study_uids: list[str], timeout: float) -> dict[str, str]:
        finished = {"DONE", "NOT_APPLICABLE", "FAILED"}
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(study_uids)
            if all(states.get(u) in finished for u in study_uids):
                return states
            if time.monotonic() > deadline:
                return states
            dead = [f"worker {w.name} rc={w.proc.poll()}" for w in self.workers]
            dead = [d for d in dead if not d.endswith("rc=None")]
            if self.node is not None and self.node.poll() is not None:
                dead.append(f"node rc={self.node.returncode}")
            if dead:
                raise RuntimeError(f"died while studies were processed: {', '.join(dead)}")
            time.sleep(POLL)

    def record(self, study_uid: str) -> StudyRecord:
        with self._db() as db:
            study_id, state, error = db.execute(
                "SELECT id, state, error FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            audit = {}
            for action, at in db.execute(
                "SELECT action, at FROM audit_log WHERE study_uid = ? ORDER BY seq", (study_uid,)
            ):
                audit.setdefault(action, _parse_time(at))  # first of each action
            job = db.execute(
                "SELECT id, started_at, finished_at, timings FROM jobs WHERE study_id = ? "
                "ORDER BY id DESC LIMIT 1",
                (study_id,),
            ).fetchone()
            sr = None
            if job is not None:
                row = db.execute(
                    "SELECT created_at FROM outputs WHERE job_id = ? AND modality = 'SR'",
                    (job[0],),
                ).fetchone()
                sr = _parse_time(row[0]) if row else None
        timings = json.loads(job[3]) if job and job[3] else {}
        return StudyRecord(
            study_uid=study_uid,
            state=state,
            error=error,
            stable=audit.get("study.stable"),
            queued=audit.get("study.queued"),
            started=_parse_time(job[1]) if job else None,
            finished=_parse_time(job[2]) if job else None,
            sr=sr,
            timings=timings,
        )

    def log_problems(self) -> list[str]:
        bad = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback|Error:")
        lines = []
        for path in sorted((self.home / "logs").glob("*.log")) + sorted(
            (self.home / "bench").glob("*.out")
        ):
            for ln in path.read_text(errors="replace").splitlines():
                if bad.search(ln):
                    lines.append(f"{path.name}: {ln}")
        return lines


@dataclass
class StudyRecord:
    study_uid: str
    state: str
    error: str | None
    stable: datetime | None
    queued: datetime | None
    started: datetime | None
    finished: datetime | None
    sr: datetime | None
    timings: dict[str, float]


# --------------------------------------------------------------------------------------------
# Broker


class RedisBroker:
    """An empty Redis db number claimed with a marker key, and a unique queue name."""

    def __init__(self) -> None:
        import redis

        self.token = uuid.uuid4().hex[:10]
        self.queue = f"radai.e2e.{self.token}"
        self.marker = f"radai-e2e-bench-claim:{self.token}"
        self.db = -1
        for db in range(15, 0, -1):  # db 0 is where everybody else goes
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=5)
            if client.dbsize() == 0 and client.set(self.marker, "1", nx=True, ex=4 * 3600):
                self.db, self.client = db, client
                break
        if self.db < 0:
            raise RuntimeError("no empty Redis db number (1-15) at 127.0.0.1:6379")
        self.url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.db}"

    def cleanup(self) -> list[str]:
        """Delete this run's keys (queues, bindings, kombu's bookkeeping); report any others."""
        ours = [k for k in self.client.scan_iter() if self.token.encode() in k]
        kombu = {
            b"unacked",
            b"unacked_index",
            b"unacked_mutex",
            b"_kombu.binding_deadlines",
            b"_kombu.binding.celery.pidbox",
            b"_kombu.binding.celeryev",
        }
        rest = [k for k in self.client.scan_iter() if k not in ours]
        shared = [k for k in rest if k in kombu or k.endswith(b".reply.celery.pidbox")]
        others = [k for k in rest if k not in shared]
        if ours:
            self.client.delete(*ours)
        if shared and not others:  # kombu's keys are shared per db: only if nobody else is here
            self.client.delete(*shared)
        return [k.decode(errors="replace") for k in others]


# --------------------------------------------------------------------------------------------
# Phases


def latency_row(send: Send, rec: StudyRecord, stable: float) -> dict[str, float | None]:
    t = rec.timings
    job = _secs(rec.started, rec.finished)
    timed = sum(t.get(k, 0.0) for k in PIPELINE_STAGES) + t.get("write_dicom", 0.0)
    row: dict[str, float | None] = {
        "stable wait": _secs(send.ended, rec.stable),
        "dispatch": _secs(rec.stable, rec.queued),
        "queue wait": _secs(rec.queued, rec.started),
        "load + files": None if job is None else job - timed,
    }
    for k in PIPELINE_STAGES:
        row[k] = t.get(k)
    row["write_dicom"] = t.get("write_dicom")
    row["DB write"] = _secs(rec.finished, rec.sr)
    total = _secs(send.ended, rec.sr)
    row["total"] = total
    row["total - stable window"] = None if total is None else total - stable
    row["(job: started -> finished)"] = job
    row["(storescu send)"] = send.seconds
    return row


SHARED, ALL_CORES = "shared", "all cores"


@dataclass
class Phase:
    pipeline: str | None  # None: RADAI_PIPELINE unset (the service's default)
    workers: int
    mode: str = SHARED

    def env(self, nproc: int) -> dict[str, str]:
        env = {"RADAI_PIPELINE": self.pipeline} if self.pipeline else {}
        if self.mode == ALL_CORES:
            env["RADAI_TORCH_THREADS"] = str(nproc)
        return env


def phases(pipelines: list[str | None], rnd: int, oversubscribed: bool) -> list[Phase]:
    """One round: for each pipeline one worker and two (and two taking every core), one worker
    first in odd rounds and last in even rounds, so that a drift in machine load does not
    favour one side."""
    out = []
    for p in pipelines:
        pair = [Phase(p, 1), Phase(p, 2)] + ([Phase(p, 2, ALL_CORES)] if oversubscribed else [])
        out += pair if rnd % 2 else pair[::-1]
    return out


@dataclass
class Throughput:
    workers: int
    studies: int
    states: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None
    per_job: list[float] = field(default_factory=list)
    jobs_by_worker: dict[str, int] = field(default_factory=dict)
    send_seconds: float = 0.0
    first_queued_spread: float | None = None  # first QUEUED -> last QUEUED
    round: int = 1
    cpu: CpuShare | None = None
    pipeline: str = "(default)"
    mode: str = SHARED  # SHARED: the default thread count; ALL_CORES: each worker every core
    threads: list[str] = field(default_factory=list)  # per worker: "threads/processes" seen
    worker_cpu_s: float = 0.0  # CPU seconds the workers used (user + system), all threads

    @property
    def cpu_per_study(self) -> float:
        return self.worker_cpu_s / self.studies

    @property
    def per_minute(self) -> float | None:
        return self.studies / self.seconds * 60 if self.seconds else None


def run_throughput(
    svc: Service,
    factory: StudyFactory,
    n: int,
    phase: Phase,
    timeout: float,
    rnd: int,
    quiet_wait: float = 0.0,
) -> tuple[Throughput, list[Memory], list[str]]:
    workers = phase.workers
    tag = f"r{rnd}{(phase.pipeline or 'default')[0]}{'o' if phase.mode == ALL_CORES else ''}"
    env = phase.env(len(os.sched_getaffinity(0)))
    ws = [svc.start_worker(f"{tag}t{workers}w{i + 1}", env) for i in range(workers)]
    studies = [factory.make(f"thr-{tag}-{workers}-{i}") for i in range(n)]
    uids = [u for u, _ in studies]
    pids = [svc.node.pid if svc.node else -1] + [w.proc.pid for w in ws]
    if said := wait_quiet(pids, quiet_wait):
        print(f"  {said}", flush=True)
    meter = CpuMeter(pids)
    workers_cpu0 = sum(proc_cpu_seconds(w.proc.pid) for w in ws)
    send = storescu(interleave([p for _, p in studies]), svc.port)
    notes = [f"storescu: {p}" for p in send.problems[:5]]
    if send.returncode != 0:
        notes.insert(0, f"storescu exited {send.returncode}")
    states = svc.wait_finished(uids, timeout)
    cpu = meter.stop(pids)
    workers_cpu = sum(proc_cpu_seconds(w.proc.pid) for w in ws) - workers_cpu0
    memory = [w.memory(f"throughput {workers} w, round {rnd}") for w in ws]
    result = Throughput(
        workers,
        n,
        send_seconds=send.seconds,
        round=rnd,
        cpu=cpu,
        pipeline=phase.pipeline or "(default)",
        mode=phase.mode,
        threads=[w.threads() for w in ws],
        worker_cpu_s=workers_cpu,
    )
    for s in states.values():
        result.states[s] = result.states.get(s, 0) + 1
    recs = [svc.record(u) for u in uids]
    queued = [r.queued for r in recs if r.queued]
    ends = [r.sr or r.finished for r in recs if (r.sr or r.finished)]
    if len(queued) == n and len(ends) == n and all(r.state == "DONE" for r in recs):
        result.seconds = (max(ends) - min(queued)).total_seconds()
        result.first_queued_spread = (max(queued) - min(queued)).total_seconds()
    result.per_job = [j for r in recs if (j := _secs(r.started, r.finished)) is not None]
    result.jobs_by_worker = {w.name: w.jobs_done() for w in ws}
    notes += svc.stop_workers()
    for r in recs:
        if r.state != "DONE":
            notes.append(f"study {r.study_uid} ended {r.state}: {r.error}")
    return result, memory, notes


def run_latency(
    svc: Service, factory: StudyFactory, args: argparse.Namespace, memory: list[Memory]
) -> tuple[list[dict[str, float | None]], dict[str, float | None] | None, CpuShare, list[str]]:
    """One worker, studies one after the other: the timed rows, the cold (first) row, where
    the CPU went, and notes."""
    notes: list[str] = []
    worker = svc.start_worker("lat1")
    lat_pids = [svc.node.pid if svc.node else -1, worker.proc.pid]
    if said := wait_quiet(lat_pids, args.quiet_wait):
        print(f"  {said}", flush=True)
    lat_cpu = CpuMeter(lat_pids)
    rows: list[dict[str, float | None]] = []
    cold: dict[str, float | None] | None = None
    for i in range(args.warmup + args.repeats):
        uid, files = factory.make(f"lat{i}")
        run_cpu = CpuMeter(lat_pids)
        send = storescu(files, svc.port)
        if send.returncode != 0:
            notes.append(f"latency run {i}: storescu exited {send.returncode}")
        svc.wait_finished([uid], args.timeout)
        other = run_cpu.stop(lat_pids).other_cores
        rec = svc.record(uid)
        if rec.state != "DONE":
            notes.append(f"latency run {i}: study ended {rec.state}: {rec.error}")
            continue
        row = latency_row(send, rec, args.stable_seconds)
        row["(CPU other, cores)"] = other
        label = "warm-up" if i < args.warmup else f"run {i - args.warmup + 1}"
        print(f"  latency {label}: total {row['total']:.2f} s", flush=True)
        if i >= args.warmup:
            rows.append(row)
        elif i == 0:
            cold = row
        if i + 1 == args.warmup:  # memory after the first job(s), before the timed runs
            memory.append(worker.memory("latency, after warm-up"))
    memory.append(worker.memory("latency, after the runs"))
    lat_share = lat_cpu.stop(lat_pids)
    notes += svc.stop_workers()
    return rows, cold, lat_share, notes


# --------------------------------------------------------------------------------------------
# Report


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def print_machine(broker: str, stable: float, n: int) -> None:
    nproc = len(os.sched_getaffinity(0))
    one, five, _ = os.getloadavg()
    print("Machine")
    print(f"  nproc: {nproc} CPU core(s) (os.cpu_count {os.cpu_count()}); CPU: {_cpu_model()}")
    print(f"  kernel {platform.release()}, python {platform.python_version()}")
    print(f"  load average at start: {one:.2f} (1 min), {five:.2f} (5 min)")
    print(
        f"Setup: broker {broker}, database SQLite in a temp RADAI_HOME, "
        f"RADAI_STABLE_SECONDS={stable:g}, study = lung2 sample (61 CT slices, new UIDs each), "
        f"throughput N={n}"
    )
    if nproc <= 2:
        print(
            f"  NOTE: this machine has {nproc} core(s); node, workers, storescu and this script "
            "share them, so two workers can at best approach 2x one."
        )


def _fmt(v: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.3f}"


def print_latency(
    rows: list[dict[str, float | None]], cold: dict[str, float | None] | None, stable: float
) -> None:
    print(
        f"\nLatency: storescu end -> SR recorded, one worker, median of {len(rows)} "
        f"(RADAI_STABLE_SECONDS={stable:g})"
    )
    runs_head = " ".join(f"{f'run {i + 1}':>7}" for i in range(len(rows)))
    header = f"{'stage':<28} {'median s':>8}  {runs_head}"
    if cold is not None:
        header += f"  {'cold':>7}"
    print(header)
    print("-" * len(header))
    for key in rows[0]:
        values = [r[key] for r in rows]
        known = [v for v in values if v is not None]
        med = statistics.median(known) if len(known) == len(values) else None
        line = f"{key:<28} {_fmt(med, 8)}  {' '.join(_fmt(v) for v in values)}"
        if cold is not None:
            line += f"  {_fmt(cold.get(key))}"
        print(line)
        if key == "DB write":
            print("-" * len(header))
    if cold is not None:
        print("cold = the first study of a freshly started worker (warm-up, not in the median)")
    print(
        "CPU other = cores kept busy by other processes on the machine during the run "
        f"(above {OTHER_CPU_LIMIT} the run is skewed)"
    )


def print_memory(readings: list[Memory]) -> None:
    print("\nWorker memory (/proc/PID/status, MB): idle = VmRSS once ready, peak = VmHWM,")
    print("after = VmRSS at the end of the phase; jobs = studies the worker had processed")
    header = (
        f"{'phase':<26} {'worker':<6} {'jobs':>4} {'idle':>7} {'peak':>7} {'after':>7}  process"
    )
    print(header)
    print("-" * len(header))
    solo = True
    for m in readings:
        idle = "-" if m.idle_rss_kb is None else f"{m.idle_rss_kb / 1024:.1f}"
        if not m.procs:
            print(f"{m.phase:<26} {m.worker:<6} {m.jobs:>4} {idle:>7} {'gone':>7}")
        for pid, role, hwm, rss in m.procs:
            print(
                f"{m.phase:<26} {m.worker:<6} {m.jobs:>4} {idle:>7} {hwm / 1024:>7.1f} "
                f"{rss / 1024:>7.1f}  {role} {pid}"
            )
        solo = solo and len(m.procs) <= 1
    if solo:
        print("(no worker forked a child: solo pool, the tasks ran in the worker processes)")


def print_throughput(results: list[Throughput]) -> None:
    print("\nThroughput: N lung2 studies sent at once, first QUEUED -> last SR recorded")
    header = (
        f"{'round':>5} {'pipeline':<9} {'workers':>7} {'threads':<9} {'studies':>7} "
        f"{'seconds':>8} {'studies/min':>11} {'job s (mean)':>12} {'queued spread':>13} "
        f"{'CPU ours':>8} {'CPU other':>9} {'CPU s/study':>11}  jobs"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        secs = "FAILED" if r.seconds is None else f"{r.seconds:.2f}"
        rate = "-" if r.per_minute is None else f"{r.per_minute:.2f}"
        job = f"{statistics.mean(r.per_job):.2f}" if r.per_job else "-"
        spread = "-" if r.first_queued_spread is None else f"{r.first_queued_spread:.2f}"
        ours = "-" if r.cpu is None else f"{r.cpu.ours_cores:.2f}"
        other = "-" if r.cpu is None else f"{r.cpu.other_cores:.2f}"
        by = ", ".join(f"{v}" for v in r.jobs_by_worker.values())
        workers = f"{r.workers}{'*' if r.mode == ALL_CORES else ''}"
        print(
            f"{r.round:>5} {r.pipeline:<9} {workers:>7} {' '.join(r.threads):<9} "
            f"{r.studies:>7} {secs:>8} {rate:>11} {job:>12} {spread:>13} {ours:>8} {other:>9}"
            f" {r.cpu_per_study:>11.2f}  {by}"
        )
    print(
        "(CPU ours/other: cores busy on average with this benchmark's processes / with "
        "anything else on the machine; CPU s/study: the workers' CPU time per study, which "
        "threads waiting for a core they share inflate and other people's work barely moves; "
        "threads: torch threads / worker processes each worker counted; 2*: two workers each "
        "taking every core, RADAI_TORCH_THREADS = nproc)"
    )
    busy = [r for r in results if r.cpu is not None and r.cpu.other_cores > OTHER_CPU_LIMIT]
    for r in busy:
        print(
            f"WARNING: other processes kept {r.cpu.other_cores:.2f} cores busy during round "
            f"{r.round} with {r.workers} worker(s) ({r.pipeline}): that row is skewed; rerun "
            "on a quiet machine"
        )
    for pipeline in dict.fromkeys(r.pipeline for r in results):
        mine = [r for r in results if r.pipeline == pipeline]
        _print_ratio(f"{pipeline}: ratio two / one workers", mine)
        _print_ratio(f"{pipeline}: ratio two workers each on all cores / one", mine, ALL_CORES)
        _print_ratio(f"{pipeline}: two workers, shared / each on all cores", mine, SHARED, 2)
        _print_pair_ratios(pipeline, mine)
        _print_cpu(pipeline, mine)
    clean_rounds = {r.round for r in results} - {r.round for r in busy}
    if busy and clean_rounds:
        clean = [r for r in results if r.round in clean_rounds]
        names = ", ".join(map(str, sorted(clean_rounds)))
        for pipeline in dict.fromkeys(r.pipeline for r in clean):
            mine = [r for r in clean if r.pipeline == pipeline]
            _print_ratio(f"{pipeline}: ratio from the quiet round(s) only ({names})", mine)
    elif busy:
        print("no round ran with the rest of the machine quiet: the ratios are skewed")


def _rate(results: list[Throughput], workers: int, mode: str = SHARED) -> list[float]:
    return [
        r.per_minute
        for r in results
        if r.workers == workers and r.mode == mode and r.per_minute is not None
    ]


def _print_ratio(
    label: str, results: list[Throughput], mode: str = SHARED, against: int = 1
) -> None:
    """Median rate of two workers (in `mode`) over the median rate of `against` workers
    (one worker; or two sharing, to compare two all-cores workers with them)."""
    base = _rate(results, 1) if against == 1 else _rate(results, 2, ALL_CORES)
    two = _rate(results, 2, mode)
    if base and two:
        b, t = statistics.median(base), statistics.median(two)
        how = f"medians of {len(two)} rounds: " if len(two) > 1 else ""
        print(f"{label}: {t / b:.2f}x ({how}{t:.2f} vs {b:.2f} studies/min)")


def _print_cpu(pipeline: str, results: list[Throughput]) -> None:
    """The workers' median CPU seconds per study of each setup: the cost of a study, which
    a wall-clock rate on a busy machine does not show."""
    setups = {(1, SHARED): "one worker", (2, SHARED): "two", (2, ALL_CORES): "two on all cores"}
    parts = []
    for (workers, mode), name in setups.items():
        cpu = [r.cpu_per_study for r in results if (r.workers, r.mode) == (workers, mode)]
        if cpu:
            parts.append(f"{name} {statistics.median(cpu):.1f}")
    if parts:
        print(f"{pipeline}: workers' CPU s per study (median): {', '.join(parts)}")


def _print_pair_ratios(pipeline: str, results: list[Throughput]) -> None:
    """Two / one workers of each round on its own: the spread says how much load drift moved
    the ratio between rounds."""
    by_round: dict[int, list[Throughput]] = {}
    for r in results:
        by_round.setdefault(r.round, []).append(r)
    pairs = []
    for rnd, rs in sorted(by_round.items()):
        one, two = _rate(rs, 1), _rate(rs, 2)
        if one and two:
            pairs.append(f"round {rnd} {two[0] / one[0]:.2f}x")
    if len(pairs) > 1:
        print(f"{pipeline}: two / one per round: {', '.join(pairs)}")


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8, help="N for throughput (default 8)")
    parser.add_argument("--broker", choices=["redis", "sqlite"], default="redis")
    parser.add_argument("--stable-seconds", type=float, default=1.0, help="default 1")
    parser.add_argument("--repeats", type=int, default=3, help="latency runs (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed studies for a fresh worker (default 1)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="throughput rounds, 1 then 2 workers (default 1)"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--pipelines",
        help="comma list of the throughput phases' pipelines, e.g. baseline,models "
        "(default: --pipeline's)",
    )
    parser.add_argument(
        "--oversubscribed",
        action="store_true",
        help="also two workers that each take every core (RADAI_TORCH_THREADS = nproc)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each phase, wait up to this many s for other processes to go idle",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="s to wait for results")
    parser.add_argument(
        "--slices",
        type=int,
        default=61,
        help="slices of the study: 61 is the sample; more resamples lung2 (bench/ct_series.py)",
    )
    parser.add_argument(
        "--pipeline", choices=["baseline", "models"], help="the workers' RADAI_PIPELINE"
    )
    parser.add_argument(
        "--torch-threads", type=int, help="the workers' RADAI_TORCH_THREADS (default: unset)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (RADAI_HOME, logs) and print it"
    )
    args = parser.parse_args(argv)
    for tool in (STORESCU, ECHOSCU, str(_RADAI_EXE)):
        if not os.access(tool, os.X_OK):
            print(f"missing {tool}", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="radai-bench-e2e-"))
    procs = Processes()
    broker: RedisBroker | None = None
    svc: Service | None = None
    failed = False
    notes: list[str] = []
    try:
        if args.broker == "redis":
            broker = RedisBroker()
            broker_url, queue = broker.url, broker.queue
            broker_text = f"redis {broker_url}, queue {queue}"
        else:
            broker_url, queue = "", f"radai.e2e.{uuid.uuid4().hex[:10]}"
            broker_text = "SQLite (kombu sqlalchemy transport) in RADAI_HOME"
        print_machine(broker_text, args.stable_seconds, args.studies)

        subprocess.run(
            [str(_RADAI_EXE), "sample", "--out", str(work / "samples")],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "RADAI_HOME": str(work / "sample-home")},
        )
        sample = work / "samples" / "lung2"
        if args.slices != 61:
            from ct_series import write_resampled

            sample = work / "samples" / f"lung2-{args.slices}"
            write_resampled(sample, slices=args.slices)
        print(
            f"  study: {args.slices} slices; RADAI_PIPELINE {args.pipeline or '(default)'}, "
            f"RADAI_TORCH_THREADS {args.torch_threads or '(default)'}",
            flush=True,
        )
        factory = StudyFactory(sample, work / "studies")
        svc = Service(work / "home", procs, broker_url, queue, args.stable_seconds)
        if args.pipeline:
            svc.extra_env["RADAI_PIPELINE"] = args.pipeline
        if args.torch_threads:
            svc.extra_env["RADAI_TORCH_THREADS"] = str(args.torch_threads)
        svc.start_node()

        # 1. Latency, 2. memory while processing.
        memory: list[Memory] = []
        rows: list[dict[str, float | None]] = []
        cold: dict[str, float | None] | None = None
        lat_share: CpuShare | None = None
        if not args.skip_latency:
            rows, cold, lat_share, more = run_latency(svc, factory, args, memory)
            notes += more
            failed |= not rows or any(n.startswith("latency run") for n in more)

        # 3. Throughput with one and with two worker processes.
        results: list[Throughput] = []
        pipelines: list[str | None] = (
            [p.strip() for p in args.pipelines.split(",")] if args.pipelines else [args.pipeline]
        )
        if not args.skip_throughput:
            for rnd in range(1, args.rounds + 1):
                for phase in phases(pipelines, rnd, args.oversubscribed):
                    res, mem, more = run_throughput(
                        svc, factory, args.studies, phase, args.timeout, rnd, args.quiet_wait
                    )
                    shown = "FAILED" if res.seconds is None else f"{res.seconds:.2f} s"
                    print(
                        f"  throughput round {rnd}, {res.pipeline}, {phase.workers} worker(s)"
                        f"{' each on all cores' if phase.mode == ALL_CORES else ''}: {shown}; "
                        f"threads {' '.join(res.threads)}",
                        flush=True,
                    )
                    results.append(res)
                    memory += mem
                    notes += more
                    failed |= res.seconds is None
        load1, load5, _ = os.getloadavg()

        print("\n" + "=" * 72)
        if rows and lat_share is not None:
            print_latency(rows, cold, args.stable_seconds)
            print(f"{lat_share.text()} (latency phase, study copies written in it too)")
            if lat_share.other_cores > OTHER_CPU_LIMIT:
                print("WARNING: other processes were busy during the latency runs: skewed")
        elif not args.skip_latency:
            print("\nLatency: FAILED (no run finished DONE)")
        print_memory(memory)
        if results:
            print_throughput(results)
        print(f"\nload average at end: {load1:.2f} (1 min), {load5:.2f} (5 min)")
    except Exception as exc:  # noqa: BLE001 - report, then clean up below
        failed = True
        print(f"\nFAILED: {type(exc).__name__}: {exc}")
    finally:
        if svc is not None:
            if failed:  # what each process said last, for the post-mortem
                for path in sorted((svc.home / "bench").glob("*.out")):
                    tail = path.read_text(errors="replace").splitlines()[-4:]
                    print(f"\nlast lines of {path.name}:")
                    for ln in tail:
                        print(f"  {ln[:300]}")
            notes += svc.stop()
            problems = svc.log_problems()
            print(f"\nLog lines at WARNING or worse under RADAI_HOME/logs: {len(problems)}")
            for ln in problems[:20]:
                print(f"  {ln[:300]}")
        procs.stop_all()
        if broker is not None:
            others = broker.cleanup()
            if others:
                notes.append(f"other keys in redis db {broker.db}, left alone: {others[:5]}")
        if args.keep:
            notes.append(f"kept {work} (RADAI_HOME: {work / 'home'}); delete it when done")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for n in notes:
        print(f"note: {n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
