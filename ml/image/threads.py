"""Running one step per slice or per batch on several threads: scipy's filters and
interpolation and ITK's transforms release the GIL, so independent steps on one volume run in
parallel in one process, each writing its own part of the result. Imports nothing of ours."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def for_each(step: Callable[[T], object], items: Iterable[T], threads: int) -> None:
    """``step(item)`` for every item, on ``threads`` threads (in order on one); the first
    exception a step raises is raised here."""
    if threads <= 1:
        for item in items:
            step(item)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(step, items):  # consumed, so that a step's exception surfaces
            pass
