"""A worker's malloc gives freed blocks of a few megabytes back (workers/malloc_tuning.py).

Each case runs in a fresh interpreter: it frees one 8 MB array (which, by glibc's default, raises
the mmap threshold to 8 MB), then allocates 200 arrays of 1 MB, frees all but the last (which
keeps the heap from being trimmed from its top) and reports how much of them it still holds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

_CASE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from workers.malloc_tuning import hold_mmap_threshold
    held = hold_mmap_threshold() if sys.argv[1] == "held" else False
    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    big = np.ones(8 << 20, dtype=np.uint8)
    del big
    before = rss_mb()
    arrays = [np.ones(1 << 20, dtype=np.uint8) for _ in range(200)]
    last = arrays[-1]
    del arrays
    print(held, rss_mb() - before, last.sum() > 0)
    """
)


def _retained_mb(mode: str) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", _CASE, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(ROOT)},
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_megabyte_arrays_go_back_to_the_system_once_the_threshold_is_held() -> None:
    held, retained = _retained_mb("held")
    assert held
    assert retained < 20  # the last array and some slack
    # By glibc's default the same arrays come from the heap and stay with the process.
    default_held, default_retained = _retained_mb("default")
    assert not default_held
    assert default_retained > 150


def test_an_operators_own_threshold_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.malloc_tuning import hold_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert hold_mmap_threshold() is False
