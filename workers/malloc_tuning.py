"""glibc's malloc held to return a worker's large arrays to the system when they are freed.

A study's stages allocate and free many arrays of a few hundred kilobytes to a few megabytes
(a slice's masks and distance maps, per-slab copies). glibc serves an allocation of at least
its mmap threshold with mmap and gives it back when freed, but by default it raises that threshold
to the size of each such block freed (up to 32 MB), after which blocks of that size come from
the heap, where freed memory stays with the process and fragments. Over a few 534-slice studies
that let a worker's peak climb by about 50 MB a study. Holding the threshold at 128 KiB (glibc's
starting value) keeps the peak flat. Imports nothing of ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("radai.worker")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def hold_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process (and the processes it forks
    after); True when done. Not on another C library, and not when the operator chose a
    threshold already (glibc's `MALLOC_MMAP_THRESHOLD_` environment variable)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    if not done:
        log.warning("malloc: could not hold the mmap threshold at %d bytes", nbytes)
    return done
