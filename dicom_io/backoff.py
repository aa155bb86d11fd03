"""The one retry schedule: capped exponential backoff, counted in consecutive failures.

Convention: ``failures`` is how many attempts in a row have failed so far, so it is 1 after the
first failure. The wait before the next attempt is ``base * 2 ** (failures - 1)`` seconds, never
more than ``cap``: base, 2 base, 4 base, ... cap, cap. Callers keep their own base and cap (the
broker is retried within seconds, a PACS within minutes) but never their own formula.
"""

from __future__ import annotations

import math


def backoff_delay(failures: int, *, base: float, cap: float) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (1 = the first)."""
    if failures < 1:
        raise ValueError(f"failures counts failed attempts and starts at 1, not {failures}")
    if not (base > 0 and cap > 0):
        raise ValueError(f"backoff needs a positive base and cap, not base={base}, cap={cap}")
    try:
        return min(cap, math.ldexp(base, failures - 1))
    except OverflowError:  # 2 ** (failures - 1) beyond a float: the cap was reached long before
        return cap
