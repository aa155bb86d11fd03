"""The report-and-clean-up tail the benchmarks share (bench/common.py): a failure is reported,
not raised, and whatever happens every process is stopped and the temp folder removed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
assert _spec is not None and _spec.loader is not None
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _started(tmp_path: Path):  # noqa: ANN202
    work = tmp_path / "work"
    work.mkdir()
    procs = common.Processes()
    proc = procs.start([sys.executable, "-c", "import time; time.sleep(60)"], env={},
                       log=tmp_path / "sleep.log")  # fmt: skip
    return work, procs, proc


def test_a_failure_is_reported_then_everything_is_stopped_in_order(tmp_path, capsys) -> None:
    work, procs, proc = _started(tmp_path)
    order: list[str] = []
    with common.BenchRun(work, procs, keep=False) as run:
        run.stops.append(lambda: order.append("stop" if proc.poll() is None else "too late"))
        run.after.append(lambda: order.append("after" if proc.poll() is not None else "early"))
        raise RuntimeError("the node did not start")
    assert run.exit_code == 1
    assert "FAILED: RuntimeError: the node did not start" in capsys.readouterr().out
    assert order == ["stop", "after"]
    assert proc.poll() is not None and not work.exists()


def test_a_run_that_ends_well_keeps_the_folder_when_asked(tmp_path, capsys) -> None:
    work, procs, proc = _started(tmp_path)
    with common.BenchRun(work, procs, keep=True) as run:
        pass
    assert run.exit_code == 0 and proc.poll() is not None
    assert work.is_dir() and f"kept {work}" in capsys.readouterr().out


def test_an_interrupt_is_cleaned_up_after_and_raised(tmp_path) -> None:
    work, procs, proc = _started(tmp_path)
    with pytest.raises(KeyboardInterrupt), common.BenchRun(work, procs, keep=False):
        raise KeyboardInterrupt
    assert proc.poll() is not None and not work.exists()


def test_log_problems_are_counted_and_only_records_shown_when_asked(capsys) -> None:
    lines = [
        "node.log: 2024-01-01 WARNING radai.node slow disk",
        "node.log: Traceback (most recent call last):",
        "worker.log: 2024-01-01 ERROR radai.worker boom",
    ]
    common.report_log_problems(lines, "log lines at WARNING or worse", records_only=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "log lines at WARNING or worse: 3"
    assert out[1:] == ["  " + lines[0], "  " + lines[2]]
    common.report_log_problems(lines, "radai log lines")
    assert len(capsys.readouterr().out.splitlines()) == 4
