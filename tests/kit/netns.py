"""A network namespace standing in for another machine: its own loopback and one veth link to
this host, each end with its own address. Services that listen on this host's loopback
(PostgreSQL, Redis, Orthanc) are reached from inside only through TCP forwarders bound to the
host end of the link, so a process in the namespace talks to them over that link like a worker
on another machine would. Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import uuid
from pathlib import Path
from types import TracebackType

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class _Forwarder:
    """Accepts on (host, port) and pipes each connection to (target_host, target_port)."""

    def __init__(self, host: str, port: int, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.address = self.sock.getsockname()
        self.peers: set[str] = set()  # the addresses connections came from
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, peer = self.sock.accept()
            except OSError:
                return  # closed
            self.peers.add(peer[0])
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


class NetNamespace:
    """`with NetNamespace() as ns:` a fresh namespace at ``ns.address``, this host at ``ns.host``."""

    def __init__(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("network namespaces need root and iproute2 ('ip')")
        tag = uuid.uuid4().hex[:6]
        self.name = f"radai-{tag}"
        self._veth = (f"rh{tag}", f"rn{tag}")
        net = random.randint(1, 250)
        self.host, self.address = f"10.213.{net}.1", f"10.213.{net}.2"
        self._forwarders: list[_Forwarder] = []

    def __enter__(self) -> NetNamespace:
        host_end, ns_end = self._veth
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", self.name)
            _ip("addr", "add", f"{self.host}/30", "dev", host_end)
            _ip("link", "set", host_end, "up")
            for args in (
                ("addr", "add", f"{self.address}/30", "dev", ns_end),
                ("link", "set", ns_end, "up"),
                ("link", "set", "lo", "up"),
            ):
                _ip("netns", "exec", self.name, "ip", *args)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def forward(self, port: int) -> int:
        """Make this host's loopback ``port`` reachable from the namespace at (host, result)."""
        fwd = _Forwarder(self.host, 0, ("127.0.0.1", port))
        self._forwarders.append(fwd)
        return int(fwd.address[1])

    def peers(self) -> set[str]:
        """Every address that connected through the forwarders."""
        return set().union(*(f.peers for f in self._forwarders))

    def popen(self, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        """Start ``argv`` inside the namespace (`ip netns exec` execs it: the pid is its own)."""
        with open(log, "w") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def reaches(self, host: str, port: int) -> bool:
        """Whether a TCP connection from inside the namespace to (host, port) succeeds."""
        probe = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout=2).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        argv = ["ip", "netns", "exec", self.name, "python3", "-c", probe]
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0

    def close(self) -> None:
        for fwd in self._forwarders:
            fwd.close()
        self._forwarders.clear()
        subprocess.run(["ip", "link", "del", self._veth[0]], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
