"""A redis-server of the test's (or benchmark's) own on a free loopback port, for runs that stop
the broker: the machine's Redis on 6379 serves others and is never stopped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.kit.net import HOST, free_port, port_open, wait_until


class RedisServer:
    """Start, stop and start again on the same port.

    With ``folder``, persistence is as in docker-compose.yml (append-only file): what the broker
    held before a stop is there after the start. Without it, nothing is kept, as
    `scripts/setup.sh` runs the machine's Redis."""

    def __init__(self, folder: Path | None = None, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def up(self) -> bool:
        return port_open(self.port)

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [exe, "--port", str(self.port), "--bind", HOST, "--save", ""]
        if self.folder is not None:
            argv += ["--dir", str(self.folder), "--appendonly", "yes"]
        else:
            argv += ["--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.up, timeout=10, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        """SIGTERM, as `docker compose stop` does: redis flushes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        wait_until(lambda: not self.up(), timeout=10, what=f"port {self.port} closed")
