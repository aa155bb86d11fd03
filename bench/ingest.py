"""Ingest benchmark: how fast does radai's DICOM node take in CT instances, next to two peers?

What it measures
----------------
Instances per second for dcmtk `storescu` senders over loopback, for two corpora and for 1 and
8 concurrent associations (files dealt out in turn):

* 512x512 CT: `--instances` (default 305) 16-bit slices of about 0.5 MB, 6 studies;
* 64x64 CT: `--small-instances` (default 5000) of about 10 KB, where the fixed cost per
  instance, not the bytes, sets the rate;

to three receivers:

* radai  - `radai node` (pynetdicom). Before it answers success the instance's bytes are in an
           append-only journal, fdatasynced (one sync shared by concurrent senders), the file is
           renamed into place and the SQLite index committed without waiting for the disk; files,
           folders and index are fsynced in the background before the journal drops the record,
           and the journal is replayed at start (dicom_node/journal.py, durability.py).
* storescp - dcmtk's `storescp`: writes each file into one folder, with no fsync and no index.
           This is the raw speed of the protocol and the page cache: an upper bound, not a peer
           with the same guarantees.
* orthanc - Orthanc (SQLite index, no compression, no plugins). Orthanc >= 1.7.4 fsyncs each
           stored file ("SyncStorageArea" defaults to true) and records the instance in its SQLite
           index before it answers; this is the closest like-for-like comparison.

The time is wall clock from the start of the first `storescu` to the exit of the last, so it
includes association set-up and storescu's own reading of the files (which are in the page
cache: they are read once before timing; and `sync` runs before each timed send, so that no run
pays for flushing another run's writes). Every receiver runs fresh (new process, empty storage
and database) for each of `--repeats` (default 3) repetitions, the receivers take turns within a
repetition, and the table shows the median. A run counts only if every storescu exits 0 and the
receiver holds all N instances afterwards (radai: `radai studies --json`; storescp: files in its
folder; Orthanc: its /statistics); a failed receiver is reported as FAILED, never timed.

Then a memory run: a fresh radai node receives `--memory-instances` (default 2000) 512x512
instances in one association, and its peak resident set (VmHWM from /proc/PID/status) is printed.

How to read it
--------------
`inst/s` is throughput; `x orthanc` and `x storescp` are each row's inst/s divided by Orthanc's
and storescp's in the same run, and the closing summary repeats radai's ratios per case. A ratio
near or above 1.0 to Orthanc means the node keeps up with an established archive that makes the
same durability promise; the gap to storescp is mostly the price of fsync and indexing. The
numbers depend on the disk's fsync latency, the CPU and the machine's load (printed before and
after each case): compare ratios from one run only.

Run: `python bench/ingest.py [--instances N] [--small-instances M] [--senders 1,8]` with the
project's venv active. Needs dcmtk (/usr/bin/storescu, storescp, echoscu) and Orthanc
(/usr/sbin/Orthanc). Only loopback (127.0.0.1) is used; everything it starts is stopped and its
temp dirs deleted.
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
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom
from common import (
    ECHOSCU,
    HOST,
    STORESCU,
    Processes,
    dcmtk_env,
    free_port,
    listening_sockets,
    problems,
    proc_status_kb,
)
from common import storescu as kit_storescu

STORESCP = "/usr/bin/storescp"

ORTHANC = "/usr/sbin/Orthanc"
CALLING_AET = "BENCHSCU"
REPEATS = 3
STUDIES = 6  # the corpus is split into this many studies (one series each), sent one by one
START_TIMEOUT = 60.0
SEND_TIMEOUT = 1800.0
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:radai:bench:ingest:v1")
_RADAI_EXE = Path(sys.executable).with_name("radai")


def _uid(*parts: str) -> str:
    """A deterministic UID (2.25.<uuid5>), so that the corpus is the same on every run."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(parts)).int}"


# --------------------------------------------------------------------------------------------
# Corpus


def build_samples(out: Path) -> Path:
    """Run `radai sample --out` and return the folder of lung2's slices."""
    subprocess.run(
        [str(_RADAI_EXE), "sample", "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "RADAI_HOME": str(out / "home")},
    )
    return out / "lung2"


def build_corpus(lung2: Path, out: Path, n: int, studies: int = STUDIES) -> list[Path]:
    """Write `n` copies of lung2's slices with new UIDs into `out`, split into `studies` studies.

    Study k gets instances [k*per, (k+1)*per) in file-name order, so storescu sends the studies
    one after another, as a modality or PACS would. Deterministic for a given (n, studies).
    """
    raw = [p.read_bytes() for p in sorted(lung2.glob("*.dcm"))]
    sources = [pydicom.dcmread(BytesIO(b)) for b in raw]
    if not sources:
        raise RuntimeError(f"no sample slices in {lung2}")
    # Step between slices, so that later copies continue the stack instead of overlapping it.
    first = [float(v) for v in sources[0].ImagePositionPatient]
    last = [float(v) for v in sources[-1].ImagePositionPatient]
    step = [(b - a) / max(1, len(sources) - 1) for a, b in zip(first, last, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    per = -(-n // studies)
    paths: list[Path] = []
    for i in range(n):
        study, index = divmod(i, per)
        src = sources[index % len(sources)]
        ds = pydicom.dcmread(BytesIO(raw[index % len(raw)]))  # a private copy to edit
        tag = f"n{n}/study{study}"
        sop_uid = _uid(tag, "instance", str(index))
        ds.StudyInstanceUID = _uid(tag)
        ds.SeriesInstanceUID = _uid(tag, "series")
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.StudyID = f"BENCH{study}"
        ds.AccessionNumber = f"BENCH{n}S{study}"
        ds.StudyDescription = f"radai ingest benchmark study {study} of {studies}"
        ds.InstanceNumber = index + 1
        shift = (index // len(sources)) * len(sources)
        position = [
            float(v) + shift * s for v, s in zip(src.ImagePositionPatient, step, strict=True)
        ]
        ds.ImagePositionPatient = [f"{v:.10g}" for v in position]
        if "SliceLocation" in ds:
            ds.SliceLocation = f"{float(src.SliceLocation) + shift * step[2]:.10g}"
        path = out / f"S{study:02d}_{index + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def build_small_corpus(
    lung2: Path, out: Path, n: int, studies: int = STUDIES, name: str = ""
) -> list[Path]:
    """`n` 64x64 CT instances (lung2's first slice, subsampled; about 9 KB each) in `studies`
    studies: a corpus where the fixed cost per instance, not the bytes, sets the rate. Corpora
    of another `name` have other UIDs."""
    source = pydicom.dcmread(sorted(lung2.glob("*.dcm"))[0])
    pixels = source.pixel_array[::8, ::8].copy()
    out.mkdir(parents=True, exist_ok=True)
    per = -(-n // studies)
    paths: list[Path] = []
    ds = source
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    spacing = [float(v) * 8 for v in source.PixelSpacing]
    ds.PixelSpacing = [f"{v:.10g}" for v in spacing]
    for i in range(n):
        study, index = divmod(i, per)
        tag = f"small{name}{n}/study{study}"
        sop_uid = _uid(tag, "instance", str(index))
        ds.StudyInstanceUID = _uid(tag)
        ds.SeriesInstanceUID = _uid(tag, "series")
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.AccessionNumber = f"SMALL{n}S{study}"
        ds.InstanceNumber = index + 1
        path = out / f"S{study:02d}_{index + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def warm_cache(paths: list[Path]) -> None:
    for p in paths:
        p.read_bytes()


def settle() -> None:
    """Flush dirty pages (the corpus just written, the last receiver's files) before a timed run,
    so that no run pays for the write-back of another's data in its fsyncs."""
    os.sync()


# --------------------------------------------------------------------------------------------
# Processes


def echo_ok(aet: str, port: int) -> bool:
    result = subprocess.run(
        [ECHOSCU, "-aet", CALLING_AET, "-aec", aet, HOST, str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    return result.returncode == 0


def wait_for_echo(proc: subprocess.Popen, aet: str, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before answering C-ECHO")
        if echo_ok(aet, port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"no C-ECHO answer on port {port} within {START_TIMEOUT:.0f} s")


@dataclass
class Send:
    seconds: float
    returncode: int
    problems: list[str]  # storescu's error and warning lines


def storescu(files: list[Path], aet: str, port: int, senders: int = 1) -> Send:
    """Send `files` over `senders` concurrent storescu associations (files dealt out in turn);
    the time until the last one exits."""
    shares = [files[i::senders] for i in range(senders)]
    results: list[subprocess.CompletedProcess] = []
    lock = threading.Lock()

    def send(share: list[Path], i: int) -> None:
        result = kit_storescu(
            port,
            share,
            aec=aet,
            aet=f"{CALLING_AET}{i}" if senders > 1 else CALLING_AET,
            timeout=SEND_TIMEOUT,
            verbose=False,
            capture_stdout=False,
        )
        with lock:
            results.append(result)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(sh, i)) for i, sh in enumerate(shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if len(results) < senders:
        return Send(seconds, -1, ["a storescu sender did not finish"])
    rc = next((r.returncode for r in results if r.returncode != 0), 0)
    return Send(seconds, rc, [p for r in results for p in problems(r.stderr)])


# --------------------------------------------------------------------------------------------
# Receivers


class Receiver:
    """One fresh receiver in its own folder: start(), then count() instances held, then stop()."""

    name = ""
    aet = ""
    durability = ""

    def __init__(self, procs: Processes, workdir: Path) -> None:
        self.procs = procs
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dcmtk_env()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = self.procs.start(self.argv(), env=self.env(), log=self.log)
        wait_for_echo(self.proc, self.aet, self.port)

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> int | None:
        return self.procs.stop(self.proc) if self.proc is not None else None

    def log_problems(self) -> list[str]:
        return []


class RadaiNode(Receiver):
    name = "radai"
    aet = "RADAI"
    processes = 1  # RADAI_NODE_PROCESSES (--node-processes)
    durability = (
        "the instance's bytes in an append-only journal, fdatasynced (shared by concurrent "
        "senders); file renamed into place and SQLite index committed (not yet synced); file, "
        "folder and index fsynced in the background before the journal drops it, replayed at start"
    )

    def __init__(self, procs: Processes, workdir: Path, stable_seconds: float) -> None:
        super().__init__(procs, workdir)
        self.home = workdir / "home"
        self.stable_seconds = stable_seconds

    def argv(self) -> list[str]:
        return [str(_RADAI_EXE), "node"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADAI_")}
        return {
            **env,
            "RADAI_HOME": str(self.home),
            "RADAI_DICOM_HOST": HOST,
            "RADAI_DICOM_PORT": str(self.port),
            "RADAI_AE_TITLE": self.aet,
            "RADAI_STABLE_SECONDS": str(self.stable_seconds),
            "RADAI_NODE_PROCESSES": str(self.processes),
        }

    def start(self) -> None:
        super().start()
        # The listener processes start after the node answers: wait for all of them, or the
        # first senders would all reach the node alone.
        deadline = time.monotonic() + 60
        while listening_sockets(self.port) < self.processes and time.monotonic() < deadline:
            time.sleep(0.2)

    def studies(self) -> list[dict]:
        result = subprocess.run(
            [str(_RADAI_EXE), "studies", "--json"],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return json.loads(result.stdout)

    def count(self) -> int:
        return sum(int(s["instances"]) for s in self.studies())

    def log_problems(self) -> list[str]:
        node_log = self.home / "logs" / "node.log"
        if not node_log.exists():
            return [f"no node log at {node_log}"]
        bad = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
        return [ln for ln in node_log.read_text(errors="replace").splitlines() if bad.search(ln)]

    def peak_memory_kb(self) -> dict[int, int]:
        """VmHWM of the node and of any child processes it started, by pid, in kB."""
        if self.proc is None:
            return {}
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (task / "children").read_text().split()]
        return {pid: proc_status_kb(pid, "VmHWM") or 0 for pid in pids}


class StoreScp(Receiver):
    name = "storescp"
    aet = "STORESCP"
    durability = "none: writes each file to the page cache (no fsync), no index"

    def argv(self) -> list[str]:
        self.out = self.workdir / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        return [STORESCP, "-aet", self.aet, "--output-directory", str(self.out), str(self.port)]

    def count(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())


class Orthanc(Receiver):
    name = "orthanc"
    aet = "ORTHANC"
    durability = (
        "file: fsync per file (SyncStorageArea, default true since 1.7.4); SQLite index "
        "transaction per instance; success after both"
    )

    def argv(self) -> list[str]:
        self.http_port = free_port()
        storage = self.workdir / "storage"
        config = {
            "Name": "radai-bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "SaveJobs": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [ORTHANC, str(path)]

    def statistics(self) -> dict:
        url = f"http://{HOST}:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:  # loopback only
            return json.load(response)

    def count(self) -> int:
        return int(self.statistics()["CountInstances"])

    def index_journal_mode(self) -> str:
        index = self.workdir / "storage" / "index"
        if not index.exists():
            return "?"
        with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
            return str(db.execute("PRAGMA journal_mode").fetchone()[0])

    def log_problems(self) -> list[str]:
        if not self.log.exists():
            return []
        # Orthanc logs its normal start-up lines at W level: only errors are worth showing.
        return [ln for ln in self.log.read_text(errors="replace").splitlines() if ln[:1] == "E"]


# --------------------------------------------------------------------------------------------
# Runs


@dataclass
class Outcome:
    receiver: str
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds and not self.failures else None


def measure_once(
    receiver: Receiver, files: list[Path], senders: int = 1
) -> tuple[float | None, list[str]]:
    """Start the receiver, send, verify, stop. Returns (seconds or None if it failed, notes)."""
    notes: list[str] = []
    try:
        receiver.start()
    except Exception as exc:  # noqa: BLE001 - a receiver that did not start is reported
        receiver.stop()
        tail = receiver.log.read_text(errors="replace").splitlines()[-5:]
        return None, [f"did not start: {exc}", *(f"log: {ln}" for ln in tail)]
    try:
        settle()
        sent = storescu(files, receiver.aet, receiver.port, senders)
        held = receiver.count()
        notes += [f"storescu: {p}" for p in sent.problems[:5]]
        if sent.returncode != 0:
            notes.insert(0, f"storescu exited {sent.returncode}")
        if held != len(files):
            notes.insert(0, f"holds {held} of {len(files)} instances after the send")
        ok = sent.returncode == 0 and held == len(files)
    except Exception as exc:  # noqa: BLE001 - e.g. storescu timed out, count failed
        return None, [*notes, f"{type(exc).__name__}: {exc}"]
    finally:
        rc = receiver.stop()
        notes += [f"log: {ln}" for ln in receiver.log_problems()[:10]]
        if rc not in (0, None) and receiver.name == "radai":
            notes.append(f"node exited {rc} on SIGTERM")
    return (sent.seconds if ok else None), notes


def run_comparison(
    files: list[Path],
    work: Path,
    procs: Processes,
    stable_seconds: float,
    on_done: Callable[[str, int, float | None], None],
    *,
    senders: int = 1,
    repeats: int = REPEATS,
) -> dict[str, Outcome]:
    makers: dict[str, Callable[[Path], Receiver]] = {
        "radai": lambda d: RadaiNode(procs, d, stable_seconds),
        "storescp": lambda d: StoreScp(procs, d),
        "orthanc": lambda d: Orthanc(procs, d),
    }
    outcomes = {name: Outcome(name) for name in makers}
    for rep in range(1, repeats + 1):
        for name, make in makers.items():
            workdir = work / f"{name}-{rep}"
            receiver = make(workdir)
            seconds, notes = measure_once(receiver, files, senders)
            if isinstance(receiver, Orthanc) and rep == 1:
                outcomes[name].notes.append(f"index journal_mode={receiver.index_journal_mode()}")
            outcomes[name].notes += [f"run {rep}: {n}" for n in notes]
            if seconds is None:
                outcomes[name].failures.append(f"run {rep} failed")
            else:
                outcomes[name].seconds.append(seconds)
            on_done(name, rep, seconds)
            shutil.rmtree(workdir, ignore_errors=True)
    return outcomes


def memory_run(files: list[Path], work: Path, procs: Processes, stable_seconds: float) -> None:
    node = RadaiNode(procs, work / "radai-memory", stable_seconds)
    node.start()
    try:
        settle()
        sent = storescu(files, node.aet, node.port)
        peaks = node.peak_memory_kb()  # read while the node still runs
        held = node.count()
    finally:
        rc = node.stop()
    problems = node.log_problems()
    print(f"\nPeak memory: fresh radai node, {len(files)} instances in one association")
    if sent.returncode != 0 or held != len(files):
        print(f"  FAILED: storescu exited {sent.returncode}, node holds {held} of {len(files)}")
        for p in sent.problems[:5]:
            print(f"  storescu: {p}")
    else:
        print(f"  {len(files) / sent.seconds:.1f} inst/s ({sent.seconds:.2f} s)")
    main_pid = node.proc.pid if node.proc else -1
    for pid, kb in peaks.items():
        role = "node process" if pid == main_pid else "child process"
        print(f"  VmHWM {role} (pid {pid}): {kb / 1024:.1f} MB")
    if len(peaks) == 1:
        print("  (the node ran as a single process; no children)")
    if rc not in (0, None):
        print(f"  node exited {rc} on SIGTERM")
    for ln in problems[:10]:
        print(f"  node.log: {ln}")


# --------------------------------------------------------------------------------------------
# Report


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unavailable ({exc})"
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0].strip() if lines else "?"


def print_machine(corpus: Path) -> None:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(corpus)],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print("Machine")
    print(f"  nproc: {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})")
    print(f"  CPU: {model}")
    print(f"  kernel: {platform.release()}; temp filesystem: {fs or '?'} ({corpus.parent})")
    print(
        f"  python {platform.python_version()}, pydicom {pydicom.__version__}, "
        f"pynetdicom {pynetdicom.__version__}"
    )
    print(f"  {_first_line([STORESCU, '--version'])}; {_first_line([ORTHANC, '--version'])}")
    print_load("at start")


def print_load(when: str) -> None:
    # Other work on the machine skews every number: show it, so a noisy run can be recognised.
    one, five, _ = os.getloadavg()
    print(f"  load average {when}: {one:.2f} (1 min), {five:.2f} (5 min)")


def print_table(
    outcomes: dict[str, Outcome], n: int, title: str = "", repeats: int = REPEATS
) -> None:
    medians = {k: o.median for k, o in outcomes.items()}
    ref_orthanc, ref_scp = medians.get("orthanc"), medians.get("storescp")

    def ratio(seconds: float | None, ref: float | None) -> str:
        # Ratio of throughputs = inverse ratio of times.
        return f"{ref / seconds:.2f}" if seconds and ref else "-"

    title = title or f"One storescu association, {n} instances"
    print(f"\n{title}, median of {repeats} fresh runs")
    header = f"{'receiver':<10} {'instances':>9} {'seconds':>8} {'inst/s':>8} "
    header += f"{'x orthanc':>9} {'x storescp':>10}  runs (s)"
    print(header)
    print("-" * len(header))
    for name, o in outcomes.items():
        runs = " ".join(f"{s:.2f}" for s in o.seconds)
        if o.median is None:
            print(f"{name:<10} {n:>9} {'FAILED':>8} {'-':>8} {'-':>9} {'-':>10}  {runs}")
            continue
        print(
            f"{name:<10} {n:>9} {o.median:>8.2f} {n / o.median:>8.1f} "
            f"{ratio(o.median, ref_orthanc):>9} {ratio(o.median, ref_scp):>10}  {runs}"
        )
    for name, o in outcomes.items():
        if o.failures or o.notes:
            print(f"\nNotes for {name}:")
            for line in [*o.failures, *o.notes][:30]:
                print(f"  {line}")


# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="radai-bench-ingest-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--instances", type=int, default=305, help="512x512 CT slices (default 305)"
    )
    parser.add_argument(
        "--small-instances", type=int, default=5000, help="64x64 CT instances (default 5000)"
    )
    parser.add_argument(
        "--senders",
        default="1,8",
        help="concurrent storescu associations, comma-separated (default 1,8)",
    )
    parser.add_argument("--repeats", type=int, default=REPEATS, help="fresh runs per receiver")
    parser.add_argument(
        "--memory-instances", type=int, default=2000, help="instances for the memory run"
    )
    parser.add_argument(
        "--stable-seconds",
        type=float,
        default=5.0,
        help="RADAI_STABLE_SECONDS for the node (default 5, the node's default)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="no memory run")
    parser.add_argument(
        "--node-processes",
        type=int,
        default=1,
        help="RADAI_NODE_PROCESSES: processes receiving on the node's port (default 1)",
    )
    args = parser.parse_args(argv)
    RadaiNode.processes = args.node_processes
    senders = [int(v) for v in args.senders.split(",") if v.strip()]
    for tool in (STORESCU, STORESCP, ECHOSCU, ORTHANC, str(_RADAI_EXE)):
        if not os.access(tool, os.X_OK):
            print(f"missing {tool}", file=sys.stderr)
            return 2

    procs = Processes()
    failed = False
    summary: list[str] = []
    with _workspace() as work:
        try:
            lung2 = build_samples(work / "samples")
            corpora = []
            if args.instances > 0:
                ct = build_corpus(lung2, work / f"corpus-{args.instances}", args.instances)
                corpora.append(("512x512 CT", ct))
            if args.small_instances > 0:
                small = build_small_corpus(
                    lung2, work / f"small-{args.small_instances}", args.small_instances
                )
                corpora.append(("64x64 CT", small))
            print_machine(work)
            for label, corpus in corpora:
                size = sum(p.stat().st_size for p in corpus) / 1e6
                print(f"Corpus {label}: {len(corpus)} instances, {size:.1f} MB, {STUDIES} studies")
            print("\nDurable before success:")
            for name, cls in (("radai", RadaiNode), ("storescp", StoreScp), ("orthanc", Orthanc)):
                print(f"  {name:<9} {cls.durability}")

            def progress(name: str, rep: int, seconds: float | None) -> None:
                shown = "FAILED" if seconds is None else f"{seconds:.2f} s"
                print(f"  run {rep} {name}: {shown}", flush=True)

            for label, corpus in corpora:
                for k in senders:
                    title = f"{label}, {len(corpus)} instances, {k} storescu association(s)"
                    print(f"\n{title}", flush=True)
                    warm_cache(corpus)
                    print_load("before")
                    outcomes = run_comparison(
                        corpus,
                        work / "runs",
                        procs,
                        args.stable_seconds,
                        progress,
                        senders=k,
                        repeats=args.repeats,
                    )
                    print_load("after")
                    print_table(outcomes, len(corpus), title, args.repeats)
                    failed |= any(o.median is None for o in outcomes.values())
                    summary.append(_summary_line(title, outcomes, len(corpus)))
            print("\nSummary (inst/s; radai's ratios to Orthanc and storescp in the same run)")
            for line in summary:
                print(f"  {line}")

            if not args.skip_memory:
                memory_corpus = build_corpus(
                    lung2, work / f"corpus-{args.memory_instances}", args.memory_instances
                )
                warm_cache(memory_corpus)
                memory_run(memory_corpus, work / "runs", procs, args.stable_seconds)
        finally:
            procs.stop_all()
    return 1 if failed else 0


def _summary_line(title: str, outcomes: dict[str, Outcome], n: int) -> str:
    rate = {k: (n / o.median if o.median else None) for k, o in outcomes.items()}

    def shown(k: str) -> str:
        return f"{rate[k]:.0f}" if rate.get(k) else "FAILED"

    def ratio(k: str) -> str:
        return f"{rate['radai'] / rate[k]:.2f}x" if rate.get("radai") and rate.get(k) else "-"

    return (
        f"{title}: radai {shown('radai')}, orthanc {shown('orthanc')}, "
        f"storescp {shown('storescp')}; radai/orthanc {ratio('orthanc')}, "
        f"radai/storescp {ratio('storescp')}"
    )


if __name__ == "__main__":
    sys.exit(main())
