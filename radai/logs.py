"""Logging for radai processes: one line format, to stderr and to a file under RADAI_HOME/logs."""

from __future__ import annotations

import logging
from pathlib import Path


def configure(level: str, log_dir: Path, name: str) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in (logging.StreamHandler(), logging.FileHandler(log_dir / f"{name}.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    # pynetdicom logs each PDU at INFO and dumps datasets at DEBUG (patient data): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
