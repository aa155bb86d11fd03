"""A remote worker's end-to-end time against a local one: the same study processed by a worker
beside the node (it reads the node's archive files) and by a worker that reaches the archive only
through the node's DICOMweb (`RADAI_ARCHIVE_URL`: WADO-RS into its own cache, SEG and SR stored
back by STOW-RS), in the same run.

What it measures
----------------
One `radai node` (temp RADAI_HOME, SQLite database, Redis broker on an empty db number and a
unique queue, DICOMweb on a loopback port) and, one at a time, `radai worker` processes of two
kinds on the node's queue:

  local   RADAI_HOME = the node's: reads the archive's files (the default deployment)
  remote  its own RADAI_HOME, RADAI_ARCHIVE_URL = the node's DICOMweb with a worker token; only
          the database, the broker and the audit key are shared (as on another machine; here
          the "network" is loopback, so no latency or bandwidth limit is added)

`--pairs` pairs, each a local and a remote run in alternating order (local first in odd pairs,
remote first in even ones). A run starts a fresh worker, lets it process one untimed study (the
first job of a worker pays its imports), then times one study and stops the worker. Each study is
a copy of the 61-slice `lung2` sample with new UIDs (so no job is deduplicated and the remote
worker's cache is cold, as for any new study) and its own Patient ID (so no study has a prior:
follow-up would add work that differs from run to run), sent by dcmtk's `storescu`.

Per run, from the database (as bench/e2e.py): `total` = storescu's end to the SR recorded, `job`
= the job's start to its end (where the two kinds differ: the remote one fetches the series over
WADO-RS and stores SEG and SR by STOW-RS inside the job), `load + files` = the job's time not in
its own stage timings (reading the series, writing and storing the results), and the queue and
stable waits. The table gives each kind's median and the ratio remote / local of the medians.

Run: `python bench/remote_worker.py [--pairs 3]` with the project's venv active (PYTHONPATH=$PWD
from a worktree). Needs dcmtk's `/usr/bin/storescu` and Redis on 127.0.0.1:6379. Everything it
starts is stopped, its Redis keys deleted and its temp dir removed (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    HOST,
    BenchRun,
    Processes,
    bench_token,
    free_port,
    report_log_problems,
)
from e2e import (  # noqa: E402
    _RADAI_EXE,
    CpuMeter,
    RedisBroker,
    Service,
    StudyFactory,
    Worker,
    latency_row,
    storescu,
)

ROWS = (
    "total",
    "stable wait",
    "dispatch",
    "queue wait",
    "(job: started -> finished)",
    "load + files",
    "write_dicom",
    "DB write",
)


class OnePatientEach(StudyFactory):
    """Copies of lung2 as e2e makes them, each for its own patient: with one patient, every
    study would find the copies before it as priors, and follow-up (registration, the prior's
    SEG read from wherever its worker left it) would make runs unlike each other."""

    def make(self, tag: str) -> tuple[str, list[Path]]:
        uid, paths = super().make(tag)
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.PatientID = f"RW{self.count:05d}"
            ds.PatientName = f"REMOTE^WORKER{self.count:05d}"
            ds.save_as(path, enforce_file_format=True)
            path.read_bytes()
        return uid, paths


def wait_done(node: Service, worker: Worker, uid: str, timeout: float) -> str:
    """The study's final state; raises if the worker or the node dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = node.states([uid]).get(uid)
        if state in ("DONE", "NOT_APPLICABLE", "FAILED"):
            return state
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker {worker.name} exited {worker.proc.returncode}")
        if node.node is not None and node.node.poll() is not None:
            raise RuntimeError(f"node exited {node.node.returncode}")
        time.sleep(0.05)
    return "TIMEOUT"


def run_once(
    kind: str, svc: Service, node: Service, factory: StudyFactory, n: int, timeout: float
) -> tuple[dict[str, float | None], float]:
    """Start a `kind` worker, one untimed study, one timed; the timed study's row and the
    cores other processes kept busy meanwhile."""
    worker = svc.start_worker(f"{kind}{n}")
    try:
        for timed in (False, True):
            uid, files = factory.make(f"{kind}{n}{'t' if timed else 'w'}")
            pids = [node.node.pid if node.node else -1, worker.proc.pid]
            meter = CpuMeter(pids)
            send = storescu(files, node.port)
            if send.returncode != 0:
                raise RuntimeError(f"storescu exited {send.returncode}: {send.problems[:3]}")
            state = wait_done(node, worker, uid, timeout)
            other = meter.stop(pids).other_cores
            rec = node.record(uid)
            if state != "DONE":
                raise RuntimeError(f"{kind} study ended {state}: {rec.error}")
        row = latency_row(send, rec, node.stable)
        return row, other
    finally:
        svc.stop_workers()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="local/remote pairs (default 3)")
    parser.add_argument("--stable-seconds", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="s to wait for a study")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print it")
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="radai-bench-remote-"))
    procs = Processes()
    broker = RedisBroker()
    rows: dict[str, list[dict[str, float | None]]] = {"local": [], "remote": []}
    others: dict[str, list[float]] = {"local": [], "remote": []}

    def clean_broker() -> None:
        left = broker.cleanup()
        if left:
            print(f"note: other keys in redis db {broker.db}, left alone: {left[:5]}")

    with BenchRun(work, procs, keep=args.keep) as run:
        run.after.append(clean_broker)
        subprocess.run(
            [str(_RADAI_EXE), "sample", "--out", str(work / "samples")],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "RADAI_HOME": str(work / "sample-home")},
        )
        factory = OnePatientEach(work / "samples" / "lung2", work / "studies")
        node = Service(work / "node", procs, broker.url, broker.queue, args.stable_seconds)
        run.stops.append(node.stop)
        web_port = free_port()
        key = node.home / "audit.key"
        node.extra_env.update(
            RADAI_DICOMWEB_HOST=HOST,
            RADAI_DICOMWEB_PORT=str(web_port),
            RADAI_AUDIT_KEY_FILE=str(key),
        )
        node.start_node()
        token_file = work / "token"
        token_file.write_text(bench_token(node.home) + "\n")
        remote = Service(work / "remote", procs, broker.url, broker.queue, args.stable_seconds)
        remote.extra_env.update(
            RADAI_DATABASE_URL=f"sqlite:///{node.db_path}",
            RADAI_AUDIT_KEY_FILE=str(key),
            RADAI_ARCHIVE_URL=f"http://{HOST}:{web_port}/dicomweb",
            RADAI_ARCHIVE_TOKEN_FILE=str(token_file),
        )
        services = {"local": node, "remote": remote}
        for n in range(1, args.pairs + 1):
            order = ("local", "remote") if n % 2 else ("remote", "local")
            for kind in order:
                row, other = run_once(kind, services[kind], node, factory, n, args.timeout)
                rows[kind].append(row)
                others[kind].append(other)
                print(f"  pair {n} {kind:6s}: total {row['total']:.2f} s, job "
                      f"{row['(job: started -> finished)']:.2f} s, other processes "
                      f"{other:.2f} cores, load {os.getloadavg()[0]:.2f}",
                      flush=True)  # fmt: skip
        print(f"\nlung2 (61 slices), {args.pairs} pairs; median seconds (each run's values)")
        head = f"{'':28} {'local':>8} {'remote':>8} {'remote/local':>12}  runs local | remote"
        print(head)
        print("-" * len(head))
        for name in ROWS:
            lv = [r[name] for r in rows["local"]]
            rv = [r[name] for r in rows["remote"]]
            if any(v is None for v in lv + rv):
                continue
            lm, rm = statistics.median(lv), statistics.median(rv)  # type: ignore[type-var]
            ratio = f"{rm / lm:12.2f}" if lm else f"{'-':>12}"
            runs = " ".join(f"{v:.2f}" for v in lv) + " | " + " ".join(f"{v:.2f}" for v in rv)
            print(f"{name:28} {lm:8.2f} {rm:8.2f} {ratio}  {runs}")
        busy = {k: statistics.median(v) for k, v in others.items()}
        print(
            f"other processes, cores busy (median): local {busy['local']:.2f}, remote "
            f"{busy['remote']:.2f}; load {os.getloadavg()[0]:.2f}"
        )
        report_log_problems(
            node.log_problems() + remote.log_problems(),
            "log lines at WARNING or worse (with tracebacks)",
            records_only=True,
        )
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
