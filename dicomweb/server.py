"""DICOMweb served by uvicorn in a thread of the node's process, so STOW-RS shares the node's
store path (and its per-instance locks) in memory. TLS with the node's certificate and key when
they are set (client certificates required when a CA is given). uvicorn's access log is off: its
lines carry query strings, which can hold patients' names.

Beside it, a thread indexes new studies and series for QIDO-RS as they arrive (`index.refresh`
once a second: a count query when nothing is new), so that a search rarely has to read headers
itself; a search still indexes what is left before it matches."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from starlette.routing import BaseRoute

from dicomweb import index
from dicomweb.app import Service, build_app

log = logging.getLogger("radai.dicomweb")


class DicomWebServer:
    def __init__(
        self,
        service: Service,
        host: str,
        port: int,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
        extra_routes: Sequence[BaseRoute] = (),
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        self.host = host
        self.requested_port = port
        self.tls = tls_cert is not None
        self.config = uvicorn.Config(
            build_app(service, extra_routes),
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
            ssl_ca_certs=str(tls_ca) if tls_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_ca else ssl.CERT_NONE,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.db = service.db
        self.index_seconds = 1.0
        self._stop = threading.Event()
        self._indexer: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("DICOMweb is not running")
        return int(self._socket.getsockname()[1])

    def start(self, timeout: float = 30.0) -> None:
        """Bind (so a taken port fails here, at start) and serve in a thread."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without, each keep-alive request waited ~40 ms
        # (Nagle against the client's delayed ACK; measured with bench/dicomweb.py).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.requested_port))
        self._socket = sock
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[sock])),
            name="radai-dicomweb",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("DICOMweb did not start (see the log)")
            time.sleep(0.02)
        self._stop.clear()
        self._indexer = threading.Thread(
            target=self._index, name="radai-dicomweb-index", daemon=True
        )
        self._indexer.start()
        log.info(
            "DICOMweb on %s://%s:%d/dicomweb",
            "https" if self.tls else "http",
            self.host,
            self.port,
        )

    def _index(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                index.refresh(self.db, stop=self._stop)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a search indexes what this could not
                failures += 1
                log.warning("DICOMweb index: refresh failed (%s)", type(exc).__name__)
            self._stop.wait(self.index_seconds * min(2**failures, 60))

    def stop(self) -> None:
        self._stop.set()
        if self._indexer is not None:
            self._indexer.join(timeout=30)
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
