"""Steps run on several threads (ml.image.threads): each item once, a step's error surfaces."""

from __future__ import annotations

import threading

import pytest

from ml.image.threads import for_each


@pytest.mark.parametrize("threads", [1, 3])
def test_every_item_is_stepped_once(threads: int) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def step(i: int) -> None:
        with lock:
            seen.append(i)

    for_each(step, range(50), threads)
    assert sorted(seen) == list(range(50))


@pytest.mark.parametrize("threads", [1, 3])
def test_a_failing_step_raises_its_error(threads: int) -> None:
    def step(i: int) -> None:
        if i == 7:
            raise ValueError("slice 7 is broken")

    with pytest.raises(ValueError, match="slice 7"):
        for_each(step, range(20), threads)
