"""What the benchmark scripts share: the test kit (`tests/kit`: loopback ports, dcmtk's storescu
and echoscu), a registry of the processes a benchmark starts so that every one of them is
stopped whatever happens, the report-and-clean-up tail of a run (`BenchRun`, the log lines at
WARNING or worse), a process's CPU time and memory from /proc, and a DICOMweb token in a node's
database."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import audit  # noqa: E402
from db.api_tokens import create_token  # noqa: E402
from db.audit_keys import AuditKeys  # noqa: E402
from db.session import Database  # noqa: E402
from db.users import add_user  # noqa: E402
from tests.kit.dcmtk import ECHOSCU, STORESCU, dcmtk_env, problems, storescu  # noqa: E402
from tests.kit.net import HOST, free_port, listening_sockets  # noqa: E402

__all__ = [
    "ECHOSCU",
    "HOST",
    "STORESCU",
    "BenchRun",
    "Processes",
    "bench_token",
    "dcmtk_env",
    "free_port",
    "listening_sockets",
    "proc_cpu_seconds",
    "proc_status_kb",
    "problems",
    "report_log_problems",
    "storescu",
]


def proc_status_kb(pid: int, key: str) -> int | None:
    """A kB value (VmHWM, VmRSS) from /proc/PID/status, or None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Every process the benchmark starts, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if it was killed)."""
        killed = False
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed = True
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)
        return None if killed else proc.returncode

    def stop_all(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, timeout=15.0)


class BenchRun:
    """The tail of a benchmark's run, as a ``with`` block: an exception inside is reported as
    FAILED rather than raised (so that the cleanup's own notes still print, and `exit_code` says
    1), then the ``stops`` run (services stopped in order, while their processes are known),
    every process of ``procs`` is stopped, the ``after`` callables run (broker keys) and the temp
    folder ``work`` is removed, or kept and named with ``keep``. An interrupt (Ctrl-C) is cleaned
    up after the same way and then raised."""

    def __init__(self, work: Path, procs: Processes, *, keep: bool) -> None:
        self.work = work
        self.procs = procs
        self.keep = keep
        self.failed = False
        self.stops: list[Callable[[], object]] = []
        self.after: list[Callable[[], object]] = []

    def __enter__(self) -> BenchRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        report = isinstance(exc, Exception)
        if report:
            self.failed = True
            print(f"FAILED: {type(exc).__name__}: {exc}")
        try:
            for stop in self.stops:
                stop()
        finally:
            try:
                self.procs.stop_all()
                for fn in self.after:
                    fn()
            finally:
                if self.keep:
                    print(f"kept {self.work}")
                else:
                    shutil.rmtree(self.work, ignore_errors=True)
        return report

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def report_log_problems(
    lines: Sequence[str], heading: str, *, records_only: bool = False, shown: int = 10
) -> None:
    """Print how many log ``lines`` (those at WARNING or worse and tracebacks, as
    `e2e.Service.log_problems` gives them) there are and the first ``shown``; with
    ``records_only``, only log records at WARNING or ERROR are shown, not a traceback's lines."""
    print(f"{heading}: {len(lines)}")
    if records_only:
        lines = [ln for ln in lines if any(f" {w} " in ln for w in ("WARNING", "ERROR"))]
    for ln in lines[:shown]:
        print(f"  {ln[:300]}")


def bench_token(home: Path) -> str:
    """A new `worker` token (read and store) of a new admin "bench", in the SQLite database of
    the node whose RADAI_HOME is `home` (audit key `home/audit.key`), once it has started."""
    audit.configure(AuditKeys.load(home / "audit.key"))
    db = Database(f"sqlite:///{home / 'radai.sqlite'}")
    try:
        with db.session() as s:
            add_user(s, "bench", "admin", "bench-password", actor="bench")
            return create_token(s, "bench", role="worker", actor="bench")[1]
    finally:
        db.dispose()
