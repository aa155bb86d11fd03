"""Progress bar, running loss and JSON-lines log of one training run (both networks' loops)."""

from __future__ import annotations

import json
import time
from pathlib import Path

LOG_EVERY = 25  # steps between log entries; the last step is always logged


class TrainingLog:
    """Use as a context manager; call :meth:`step` once per optimiser step."""

    def __init__(self, task: str, steps: int, log_path: Path | None, progress: bool) -> None:
        self.task, self.steps = task, steps
        self.history: list[dict] = []
        self.running: float | None = None
        self._log = log_path.open("a") if log_path else None
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=steps, desc=f"train {task}", unit="step")
        self._start = time.perf_counter()

    def step(self, step: int, loss: float, lr: float, **extra: int) -> None:
        r = self.running
        self.running = loss if r is None else 0.95 * r + 0.05 * loss
        if self._bar:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{self.running:.4f}")
        if step % LOG_EVERY == 0 or step == self.steps:
            entry = {
                "task": self.task,
                "step": step,
                "loss": round(loss, 5),
                "running_loss": round(self.running, 5),
                "lr": round(lr, 6),
                "elapsed_s": round(time.perf_counter() - self._start, 1),
                **extra,
            }
            self.history.append(entry)
            if self._log:
                self._log.write(json.dumps(entry) + "\n")
                self._log.flush()

    def note(self, entry: dict) -> None:
        """An extra log entry (validation metrics): kept in the history and the JSON-lines log."""
        entry = {
            "task": self.task,
            **entry,
            "elapsed_s": round(time.perf_counter() - self._start, 1),
        }
        self.history.append(entry)
        if self._log:
            self._log.write(json.dumps(entry) + "\n")
            self._log.flush()
        if self._bar:
            self._bar.write(json.dumps(entry))

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._bar.close()
        if self._log:
            self._log.close()
