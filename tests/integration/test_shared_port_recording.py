"""Two node processes on one port (RADAI_NODE_PROCESSES) recording the same SOP Instance UID at
the same moment, with different content: one is filed and indexed as the instance, the other
kept as a conflict, every time, on SQLite and on PostgreSQL. Two DicomNode objects in one test
process stand in for the two processes: each has its own locks, as separate processes would,
so only the database keeps them apart (SQLite's write lock; on PostgreSQL the advisory lock of
`recording.lock_uid_across_processes`)."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from db import Instance, InstanceConflict
from db.session import Database
from dicom_node import statuses
from dicom_node.archive import Archive
from dicom_node.server import DicomNode, NodeConfig
from tests.helpers import ct_dataset

ROUNDS = 15


def _part10(study: str, series: str, sop: str, fill: int) -> bytes:
    ds = ct_dataset(study, series, sop)
    ds.PixelData = bytes([fill, 0]) * 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_one_uid_from_two_processes_is_one_instance_and_one_conflict(
    database: Database, tmp_path: Path
) -> None:
    archive = Archive(tmp_path / "archive", tmp_path / "quarantine")
    nodes = [
        DicomNode(database, archive, NodeConfig(shared_port=True, journal_folder=f".journal-{i}"))
        for i in range(2)
    ]
    for node in nodes:
        node.journal.open()
        node.durability.start()
    study, series = generate_uid(), generate_uid()
    sops = []
    try:
        # The series' first instance, so that both paths (plain SQL and general) are exercised.
        first = generate_uid()
        assert (
            nodes[0].store(
                _part10(study, series, first, 1),
                sop_class=CTImageStorage,
                sop_instance=first,
                calling_ae="CT1",
                peer="test",
            )
            == statuses.SUCCESS
        )
        with ThreadPoolExecutor(2) as pool:
            for _ in range(ROUNDS):
                sop = generate_uid()
                sops.append(sop)
                datas = [_part10(study, series, sop, fill) for fill in (2, 3)]
                barrier = threading.Barrier(2)

                def send(
                    i: int, sop: str = sop, datas: list[bytes] = datas, barrier=barrier
                ) -> int:  # noqa: ANN001
                    barrier.wait()
                    return nodes[i].store(
                        datas[i], sop_class=CTImageStorage, sop_instance=sop,
                        calling_ae=f"CT{i}", peer="test",
                    )  # fmt: skip

                assert list(pool.map(send, [0, 1])) == [statuses.SUCCESS, statuses.SUCCESS]
    finally:
        for node in nodes:
            node.durability.stop()
            node.journal.close()

    with database.session() as s:
        for sop in sops:
            [instance] = s.execute(
                select(Instance).where(Instance.sop_instance_uid == sop)
            ).scalars()
            conflicts = s.scalar(
                select(func.count()).where(InstanceConflict.sop_instance_uid == sop)
            )
            assert conflicts == 1, sop
            # The file filed as the instance is the content recorded for it.
            held = Path(instance.archive_path).read_bytes()
            assert hashlib.sha256(held).hexdigest() == instance.sha256
