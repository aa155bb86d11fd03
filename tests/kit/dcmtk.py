"""dcmtk's storescu and echoscu as the outside DICOM client.

They are called by absolute path: pynetdicom installs its own `storescu` into the venv's bin/,
which would shadow dcmtk's (and runs about 5x slower). dcmtk reads TCP_NODELAY from the
environment; without it Nagle's algorithm makes transfers 8-25x slower."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.kit.net import HOST

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def require(exe: str = STORESCU) -> None:
    if not Path(exe).exists():
        raise RuntimeError(f"dcmtk's {Path(exe).name} is missing: install dcmtk (setup.sh --test)")


def storescu(
    port: int,
    files: list[Path] | list[str],
    *,
    aec: str = "RADAI",
    aet: str = "STORESCU",
    extra: tuple[str, ...] = (),
    timeout: float | None = 120,
    verbose: bool = True,
    capture_stdout: bool = True,
) -> subprocess.CompletedProcess:
    """Send ``files`` in one association; the completed process, with stderr (and stdout) text."""
    require(STORESCU)
    argv = [STORESCU, *(["-v"] if verbose else []), "-aet", aet, "-aec", aec, *extra]
    return subprocess.run(
        [*argv, HOST, str(port), *map(str, files)],
        stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env=dcmtk_env(),
    )


def echoscu(port: int, aec: str = "RADAI", aet: str = "ECHOSCU") -> subprocess.CompletedProcess:
    require(ECHOSCU)
    return subprocess.run(
        [ECHOSCU, "-v", "-aet", aet, "-aec", aec, HOST, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dcmtk_env(),
    )


def problems(stderr: str) -> list[str]:
    """storescu's error, warning and fatal lines."""
    return [ln for ln in stderr.splitlines() if ln.startswith(("E:", "W:", "F:"))]
