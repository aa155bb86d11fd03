"""A private Orthanc for tests: started on free loopback ports with its own configuration, storage
and log in a temporary directory, queried through its REST API, stopped on exit. Skipped when
Orthanc is not installed, except under CI (CI=true), where that fails the test.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import pytest

from tests.kit.net import free_port

ORTHANC = os.environ.get("RADAI_TEST_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get(
    "RADAI_TEST_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
)
DICOMWEB_ROOT = "/dicom-web/"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Bypass any http_proxy from the environment: the API is on loopback only.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def orthanc_executable() -> str:
    """The Orthanc binary, or skip (fail under CI) the calling test when there is none."""
    found = shutil.which(ORTHANC)
    if found is None:
        message = f"Orthanc not found at {ORTHANC} (Debian package 'orthanc')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def dicomweb_plugin() -> str:
    """Orthanc's DICOMweb plugin, or skip (fail under CI) when it is not installed."""
    if not Path(DICOMWEB_PLUGIN).exists():
        message = f"Orthanc DICOMweb plugin not found at {DICOMWEB_PLUGIN} ('orthanc-dicomweb')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return DICOMWEB_PLUGIN


class OrthancServer:
    """`with OrthancServer() as orthanc:` runs a fresh, empty Orthanc for the block.

    With ``dicomweb=True`` it loads the DICOMweb plugin (QIDO/WADO/STOW-RS at `dicomweb_url`);
    ``host`` is the address it listens on (remote access is allowed when it is not loopback).
    """

    def __init__(
        self, aet: str = "ORTHANC", dicomweb: bool = False, host: str = "127.0.0.1", **config: object
    ) -> None:
        self.aet = aet
        self.dicomweb = dicomweb
        self.host = host
        self.dicom_port = 0
        self.http_port = 0
        self.extra_config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.http_url + DICOMWEB_ROOT.rstrip("/")

    @property
    def destination(self) -> tuple[str, str, int]:
        return (self.aet, self.host, self.dicom_port)

    @property
    def log_path(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "orthanc.log"

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        executable = orthanc_executable()
        self._tmp = tempfile.TemporaryDirectory(prefix="radai-orthanc-")
        # Free ports are only free until someone else takes them: retry on a lost race.
        for _ in range(3):
            self.dicom_port, self.http_port = free_port(), free_port()
            if self.dicom_port == self.http_port:
                continue
            self._launch(executable)
            if self._wait_ready():
                return
            self._terminate()
        log = self.log_tail()
        self.stop()
        pytest.fail(f"Orthanc did not become ready within {START_TIMEOUT} s; log tail:\n{log}")

    def _launch(self, executable: str) -> None:
        assert self._tmp is not None
        home = Path(self._tmp.name)
        plugins: dict[str, object] = {}
        if self.dicomweb:
            plugins = {
                "Plugins": [dicomweb_plugin()],
                "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "StowMaxInstances": 0},
            }
        config = {
            "Name": "radai-test",
            "StorageDirectory": str(home / "storage"),
            "IndexDirectory": str(home / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": self.host != "127.0.0.1",
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "LuaScripts": [],
            "StorageCompression": False,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "HttpsVerifyPeers": False,
            "DicomScpTimeout": 10,
            **plugins,
            **self.extra_config,
        }
        (home / "orthanc.json").write_text(json.dumps(config, indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(home / "orthanc.out", "ab") as out:
            self._proc = subprocess.Popen(
                [executable, f"--logfile={self.log_path}", str(home / "orthanc.json")],
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # e.g. a port taken in the meantime
            if self._dicom_port_open() and self._http_ok():
                return True
            time.sleep(0.1)
        return False

    def _dicom_port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def _http_ok(self) -> bool:
        try:
            system = self.get("/system", timeout=1)
        except (OSError, ValueError, http.client.HTTPException):
            return False
        return system.get("DicomPort") == self.dicom_port

    def get(self, path: str, timeout: float = 10) -> object:
        """GET `path` from the REST API and decode its JSON."""
        with _HTTP.open(self.http_url + path, timeout=timeout) as rsp:
            return json.load(rsp)

    def instances(self) -> list[str]:
        """Orthanc's IDs of all stored instances."""
        return list(self.get("/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, object]:
        """The main tags of one instance, by keyword (`simplified-tags`)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def log_tail(self, lines: int = 40) -> str:
        if self._tmp is None:
            return ""
        home = Path(self._tmp.name)
        text = ""
        for name in ("orthanc.out", "orthanc.log"):
            path = home / name
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
