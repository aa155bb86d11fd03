"""Listener-only node processes beside the full node, on the same port (RADAI_NODE_PROCESSES).

One Python process takes one core at a time (the GIL), so concurrent senders share it; more
processes listening on the same port (SO_REUSEPORT, `NodeConfig.shared_port`) let the kernel
spread the associations over cores. Only the full node runs the assembly loop, the outbox and
DICOMweb; a listener receives, journals, files and records instances like it, with a journal
folder of its own, which it replays when it starts (so a listener that died is restarted here:
what it acknowledged and had not yet indexed is indexed then). A listener stops when told to or
when its parent, the full node, is gone.

Imports the standard library and `dicom_node.server`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable

from dicom_node.server import DicomNode

log = logging.getLogger("radai.node")

# A listener that dies at once is started again no more often than this.
_RESTART_SECONDS = 2.0


class Listeners:
    """The full node's listener processes: started after it, restarted when one exits while the
    node runs, stopped (SIGTERM, then SIGKILL after `grace` seconds) when it stops."""

    def __init__(
        self, argv_for: Callable[[int], list[str]], count: int, *, grace: float = 10.0
    ) -> None:
        self.argv_for = argv_for
        self.count = count
        self.grace = grace
        self.procs: dict[int, subprocess.Popen] = {}
        self._started_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)
        self._thread = threading.Thread(target=self._watch, name="radai-listeners", daemon=True)
        self._thread.start()

    def _spawn(self, index: int) -> None:
        self.procs[index] = subprocess.Popen(self.argv_for(index))
        self._started_at[index] = time.monotonic()
        log.info("node listener %d started (pid %d)", index, self.procs[index].pid)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for index, proc in list(self.procs.items()):
                if proc.poll() is None or self._stop.is_set():
                    continue
                if time.monotonic() - self._started_at[index] < _RESTART_SECONDS:
                    continue
                log.warning(
                    "node listener %d exited (%s); starting it again", index, proc.returncode
                )
                self._spawn(index)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + self.grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_listener(node: DicomNode, stop: threading.Event, parent_pid: int) -> None:
    """Run `node` (configured with a shared port and its own journal folder) until `stop` is
    set or the process that started this one is gone."""
    node.start()
    try:
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                log.warning("the full node (pid %d) is gone: this listener stops", parent_pid)
                break
    finally:
        node.stop()
