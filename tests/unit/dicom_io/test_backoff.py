"""The one retry schedule (`dicom_io.backoff`): the n-th failure in a row waits base * 2**(n-1)
seconds, never more than the cap, never less than the wait before it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicom_io.backoff import backoff_delay


def test_first_failure_waits_base_then_doubles_to_the_cap() -> None:
    delays = [backoff_delay(n, base=1.0, cap=30.0) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert [backoff_delay(n, base=5.0, cap=300.0) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]


def test_huge_failure_counts_give_the_cap() -> None:
    assert backoff_delay(10_000, base=5.0, cap=300.0) == 300.0
    assert backoff_delay(10**30, base=0.001, cap=2.0) == 2.0


def test_a_cap_below_the_base_wins() -> None:
    assert backoff_delay(1, base=5.0, cap=1.0) == 1.0


@pytest.mark.parametrize("failures", [0, -1])
def test_failures_start_at_one(failures: int) -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        backoff_delay(failures, base=1.0, cap=10.0)


@pytest.mark.parametrize(("base", "cap"), [(0.0, 10.0), (-1.0, 10.0), (1.0, 0.0)])
def test_base_and_cap_must_be_positive(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        backoff_delay(1, base=base, cap=cap)


@given(
    n=st.integers(min_value=1, max_value=5000),
    base=st.floats(min_value=1e-3, max_value=1e3),
    cap=st.floats(min_value=1e-3, max_value=1e5),
)
def test_capped_and_monotone(n: int, base: float, cap: float) -> None:
    here, after = backoff_delay(n, base=base, cap=cap), backoff_delay(n + 1, base=base, cap=cap)
    assert 0 < here <= after <= cap
    # Past 60 doublings even the smallest base here is beyond the largest cap.
    assert here == (cap if n > 60 else min(cap, base * 2 ** (n - 1)))
