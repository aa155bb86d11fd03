"""Load: 8 concurrent dcmtk senders, 2,000 instances in 5 studies, some studies interleaved
between all senders, with the node on SQLite and on PostgreSQL. Every instance must be on disk
once and recorded once, every study queued exactly once with its full instance count, and nothing
refused."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from db import StudyState
from tests.conftest import RecordingPublisher, storescu, wait_for
from tests.helpers import failures, instances, study_row, study_state

SENDERS = 8
STUDIES = 5
PER_STUDY = 400  # 5 x 400 = 2,000 instances
SIZE = 64


def _build_instances(template: Path, out: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """2,000 small (64x64) CT instances derived from a lung1 slice; returns files per study
    and all files in study order."""
    ds = pydicom.dcmread(template)
    step = ds.Rows // SIZE
    pixels = ds.pixel_array[::step, ::step][:SIZE, :SIZE]
    ds.Rows, ds.Columns = SIZE, SIZE
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.PixelSpacing = [float(v) * step for v in ds.PixelSpacing]
    per_study: dict[str, list[Path]] = {}
    ordered: list[Path] = []
    for s in range(STUDIES):
        study_uid, series_uid = generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesNumber = s + 1
        folder = out / f"study{s}"
        folder.mkdir(parents=True)
        files = []
        for i in range(PER_STUDY):
            sop = generate_uid()
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]
            ds.SliceLocation = float(i)
            path = folder / f"{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        per_study[study_uid] = files
        ordered += files
    return per_study, ordered


def _assign(ordered: list[Path]) -> list[list[Path]]:
    """Study 0 is dealt round-robin to all 8 senders; the others are contiguous chunks, so each
    of them comes from two senders at once."""
    parts: list[list[Path]] = [[] for _ in range(SENDERS)]
    for idx, path in enumerate(ordered):
        if idx < PER_STUDY:
            parts[idx % SENDERS].append(path)
        else:
            chunk = (len(ordered) - PER_STUDY) // SENDERS
            parts[(idx - PER_STUDY) // chunk].append(path)
    return parts


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eight_senders_two_thousand_instances(database, node_factory, samples, tmp_path):
    t0 = time.monotonic()
    per_study, ordered = _build_instances(samples["lung1"][0], tmp_path / "load")
    parts = _assign(ordered)
    assert sorted(len(p) for p in parts) == [250] * SENDERS
    built = time.monotonic() - t0

    publisher = RecordingPublisher()
    home = tmp_path / "home"
    node = node_factory(database, publish=publisher, home=home, stable_seconds=3.0)
    results: list = [None] * SENDERS

    def send(i: int) -> None:
        results[i] = storescu(node.port, parts[i], aet=f"LOAD{i}", timeout=180)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    sent = time.monotonic() - t0 - built
    assert not any(t.is_alive() for t in threads), "a sender did not finish"
    assert all(r.returncode == 0 for r in results), [r.stderr[-300:] for r in results]
    for r in results:
        assert (r.stdout + r.stderr).count("Received Store Response (Success)") == 250

    held = instances(database)
    assert len(held) == len(ordered) == 2000
    assert len({i.sop_instance_uid for i in held}) == 2000
    assert len({i.archive_path for i in held}) == 2000
    root = home / "archive"
    on_disk = [p for p in root.rglob("*.dcm") if ".staging" not in p.parts]
    assert len(on_disk) == 2000
    assert {str(p) for p in on_disk} == {i.archive_path for i in held}
    assert list(home.rglob("*.partial")) == []
    assert failures(database) == []

    for study_uid, files in per_study.items():
        assert study_row(database, study_uid).instance_count == len(files) == PER_STUDY
    wait_for(
        lambda: all(study_state(database, u) == StudyState.QUEUED for u in per_study),
        timeout=60,
    )
    time.sleep(1.0)  # nothing further may be published
    assert sorted(p["study_uid"] for _, p in publisher.sent) == sorted(per_study)
    assert all(task == "radai.process_study" for task, _ in publisher.sent)
    assert all(p["instances"] == PER_STUDY for _, p in publisher.sent)
    kind = "SQLite" if database.is_sqlite else "PostgreSQL"
    print(
        f"{kind}: built {built:.1f} s, sent 2000 instances with {SENDERS} senders in {sent:.1f} s "
        f"({2000 / sent:.0f} instances/s)"
    )
