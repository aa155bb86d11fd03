"""A worker gives the heap's free pages back after each study (workers/malloc_tuning.py).

The case runs in a fresh interpreter: it frees one 8 MB array (which, by glibc's default, raises
the mmap threshold to 8 MB, so that 1 MB blocks come from the heap after it), allocates 200 arrays
of 1 MB, frees all but the last (which keeps the heap from shrinking from its top) and reports
how much of them the process still holds, before and after trimming."""

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
    import numpy as np
    from workers.malloc_tuning import trim_heap
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
    held = rss_mb() - before
    trimmed = trim_heap()
    print(held, rss_mb() - before, trimmed, int(last.sum()))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_heaps_free_pages_go_back_to_the_system_when_trimmed() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _CASE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(ROOT)},
    ).stdout.split()
    held, after, trimmed, kept = float(out[0]), float(out[1]), out[2], int(out[3])
    assert held > 150  # freed, yet still the process's: heap pages
    assert trimmed == "True"
    assert after < 20  # the last array and some slack
    assert kept == 1 << 20  # the array still in use is intact
