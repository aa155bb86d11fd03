"""An ASGI app served by uvicorn on a free loopback port in a thread, and a tiny urllib client
for it (Starlette's TestClient needs a package the tests do not install)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn


@dataclass
class Reply:
    status_code: int
    text: str
    headers: dict[str, str]


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def _call(self, method: str, path: str) -> Reply:
        request = urllib.request.Request(
            self.base + path, method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return Reply(
                    r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
                )
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()})

    def get(self, path: str) -> Reply:
        return self._call("GET", path)

    def post(self, path: str) -> Reply:
        return self._call("POST", path)


@contextmanager
def serve(app) -> Iterator[Client]:  # noqa: ANN001
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield Client(f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
