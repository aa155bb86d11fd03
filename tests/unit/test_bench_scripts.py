"""Every benchmark script starts: its imports resolve and it answers --help (a benchmark is run
by hand, rarely, so a broken import would otherwise wait for the next person who needs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "bench"
_SCRIPTS = sorted(p for p in _BENCH.glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", _SCRIPTS, ids=[p.stem for p in _SCRIPTS])
def test_benchmark_answers_help(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=_BENCH.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
