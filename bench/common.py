"""What the benchmark scripts share: loopback ports, dcmtk's environment, and a registry of the
processes a benchmark starts so that every one of them is stopped whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

HOST = "127.0.0.1"  # benchmarks only ever talk to loopback


def dcmtk_env() -> dict[str, str]:
    # dcmtk tools read TCP_NODELAY from the environment; without it Nagle slows them 8-25x.
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


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
