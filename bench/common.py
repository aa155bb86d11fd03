"""What the benchmark scripts share: the test kit (`tests/kit`: loopback ports, dcmtk's storescu
and echoscu), a registry of the processes a benchmark starts so that every one of them is
stopped whatever happens, and a DICOMweb token in a node's database."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db import audit  # noqa: E402
from db.api_tokens import create_token  # noqa: E402
from db.audit_keys import AuditKeys  # noqa: E402
from db.session import Database  # noqa: E402
from db.users import add_user  # noqa: E402
from tests.kit.dcmtk import ECHOSCU, STORESCU, dcmtk_env, problems, storescu  # noqa: E402
from tests.kit.net import HOST, free_port  # noqa: E402

__all__ = [
    "ECHOSCU",
    "HOST",
    "STORESCU",
    "Processes",
    "bench_token",
    "dcmtk_env",
    "free_port",
    "problems",
    "storescu",
]


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
