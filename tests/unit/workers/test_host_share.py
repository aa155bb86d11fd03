"""Worker processes on one host count each other (workers/host_share.py): live processes count,
dead ones do not, however they died, and a forked child counts as itself, not as its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from tests.conftest import wait_for
from workers import app as worker_app
from workers.app import WorkerConfig, configure, share_cores
from workers.host_share import SUFFIX, HostRegistry
from workers.models import torch_threads

ROOT = Path(__file__).resolve().parents[3]

# A worker process stand-in: registers in the folder, says so, then waits to be killed.
# With "fork", it forks first and the child registers too (as a prefork pool's child would).
# Each line is one write: print's pieces are separate writes when Python runs unbuffered
# (PYTHONUNBUFFERED), and the parent's and the child's lines would interleave.
_MEMBER = textwrap.dedent(
    """
    import os, sys, time
    from workers.host_share import HostRegistry
    def say(role):
        os.write(1, f"{role} {os.getpid()}\\n".encode())
    reg = HostRegistry(sys.argv[1])
    reg.ensure()
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:
            reg.ensure()
            say("child")
            time.sleep(120)
            os._exit(0)
        say("parent")
    elif sys.argv[2] == "exit":
        say("member")
        sys.exit(0)  # ends without leaving: its file stays behind, unlocked
    else:
        say("member")
    time.sleep(120)
    """
)


class Members:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self.roles: dict[str, int] = {}  # the last started member's pid by role

    def start(self, mode: str = "stay") -> subprocess.Popen:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        stderr = self.folder.parent / f"member-{len(self.procs)}.stderr"
        with stderr.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", _MEMBER, str(self.folder), mode],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        self.procs.append(proc)
        lines = 2 if mode == "fork" else 1
        for _ in range(lines):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            words = line.split()
            if len(words) != 2:
                proc.kill()
                proc.wait(timeout=30)
                raise AssertionError(
                    f"member ({mode}) said {line!r}, exit {proc.returncode}; "
                    f"stderr: {stderr.read_text()[-2000:]!r}"
                )
            self.pids.append(int(words[1]))
            self.roles[words[0]] = int(words[1])
        return proc

    def stop(self) -> None:
        # Our own children through their Popen (never a pid that was reaped and may be reused);
        # a forked grandchild by pid while it still runs.
        ours = {proc.pid for proc in self.procs}
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for pid in self.pids:
            if pid not in ours and not _gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)


@pytest.fixture
def members(tmp_path):  # noqa: ANN001, ANN201
    m = Members(tmp_path / "run")
    yield m
    m.stop()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still has its pid but holds no file locks any more.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_live_processes_count_and_killed_ones_do_not(members) -> None:
    reg = HostRegistry(members.folder)
    assert reg.live() == 0  # no folder yet
    reg.ensure()
    reg.ensure()  # idempotent
    assert reg.live() == 1
    first = members.start()
    members.start()
    assert reg.live() == 3
    first.send_signal(signal.SIGKILL)  # no chance to clean up
    first.wait(timeout=30)
    assert reg.live() == 2
    assert sorted(p.name for p in members.folder.glob(f"*{SUFFIX}")) == sorted(
        f"{pid}{SUFFIX}" for pid in (os.getpid(), members.pids[1])
    )  # the dead one's file was removed
    reg.leave()
    assert reg.live() == 1 and not (members.folder / f"{os.getpid()}{SUFFIX}").exists()


def test_a_file_left_behind_by_a_process_that_exited_does_not_count(members) -> None:
    proc = members.start("exit")
    proc.wait(timeout=30)
    assert (members.folder / f"{members.pids[0]}{SUFFIX}").exists()
    assert HostRegistry(members.folder).live() == 0
    assert not list(members.folder.glob(f"*{SUFFIX}"))


def test_a_forked_child_counts_as_itself_not_as_its_parent(members) -> None:
    parent = members.start("fork")
    child_pid = members.roles["child"]  # the two lines may come in either order
    assert members.roles["parent"] == parent.pid
    reg = HostRegistry(members.folder)
    assert reg.live() == 2  # parent and child, each with its own file
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    # The child inherited the parent's descriptor and closed it: the parent's lock went with it.
    assert reg.live() == 1
    assert [p.name for p in members.folder.glob(f"*{SUFFIX}")] == [f"{child_pid}{SUFFIX}"]
    os.kill(child_pid, signal.SIGKILL)
    wait_for(lambda: _gone(child_pid), timeout=30)
    assert reg.live() == 0


@pytest.fixture
def restore_threads():  # noqa: ANN201
    before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    yield
    torch.set_num_threads(before[0])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before[1])
    if worker_app._host is not None:
        worker_app._host.leave()
        worker_app._host = None


def _config(tmp_path: Path, run_dir: Path | None, **kw) -> WorkerConfig:  # noqa: ANN003
    return WorkerConfig(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        broker_url="memory://",
        home=tmp_path,
        run_dir=run_dir,
        **kw,
    )


def test_each_study_starts_with_the_cores_shared_among_the_live_workers(
    tmp_path, members, restore_threads
) -> None:
    configure(_config(tmp_path, members.folder))
    alone = share_cores()
    assert (alone.processes, alone.threads) == (1, alone.cores)
    assert torch.get_num_threads() == alone.cores
    other = members.start()
    both = share_cores()
    assert both.processes == 2
    assert both.threads == torch_threads(0, 2, both.cores) == torch.get_num_threads()
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == both.threads
    other.send_signal(signal.SIGKILL)
    other.wait(timeout=30)
    assert share_cores().processes == 1  # the dead one no longer takes a share


def test_an_explicit_setting_wins_over_the_count(tmp_path, members, restore_threads) -> None:
    members.start()
    members.start()
    configure(_config(tmp_path, members.folder, torch_threads=3))
    share = share_cores()
    assert share.processes == 3 and share.threads == 3 == torch.get_num_threads()


def test_without_a_folder_only_the_own_pool_counts(tmp_path, members, restore_threads) -> None:
    members.start()
    configure(_config(tmp_path, None, processes=2))
    share = share_cores()
    assert share.processes == 2 and share.threads == torch_threads(0, 2, share.cores)
    assert not (members.folder / f"{os.getpid()}{SUFFIX}").exists()  # nor did it register
