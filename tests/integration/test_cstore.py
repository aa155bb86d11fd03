"""The C-STORE client (`dicom_io.cstore`) against a real Orthanc, dcmtk's storescp, scripted
pynetdicom SCPs (statuses, refused SOP classes, slow or stalled peers), a closed port and a
listener that never answers: every failure is a `StoreError` marked permanent or transient, or
(with `check=False`) one result per file.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import BasicTextSRStorage, CTImageStorage, SegmentationStorage

from dicom_io.cstore import StoreError, send_files
from tests.conftest import free_port, wait_for
from tests.kit.orthanc import OrthancServer

TESTDATA = Path(pydicom.data.__file__).parent / "test_files"
# Bounds on how long failures may take. They are generous so that a loaded machine does not flake:
# they catch waiting for a default timeout (30-60 s) or forever, they measure nothing.
QUICK = 5.0
SHORT_TIMEOUT = 3.0
SHORT_BOUND = 15.0
STORESCP = "/usr/bin/storescp"  # dcmtk's, not pynetdicom's of the same name in the venv

Destination = tuple[str, str, int]


def _copy_with_new_uid(name: str, dest: Path, transfer_syntax: str | None = None) -> Path:
    # Only files bundled with pydicom: get_testdata_file() would download the others.
    source = TESTDATA / name
    if not source.exists():
        pytest.skip(f"pydicom test file {name} is not installed")
    ds = pydicom.dcmread(source)
    # A fresh UID per copy, so that what the destination holds is provably what this test sent.
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path = dest / f"{Path(name).stem}-{ds.SOPInstanceUID[-8:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _store_error(
    paths: list[Path], destination: Destination, **kw: float
) -> tuple[StoreError, float]:
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        send_files(paths, destination, **kw)
    return info.value, time.monotonic() - start


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    return _copy_with_new_uid("liver_1frame.dcm", tmp_path)


@pytest.fixture
def sr(tmp_path: Path) -> Path:
    """A Basic Text SR, stored as implicit VR so that it differs from the SEG's transfer syntax."""
    return _copy_with_new_uid("reportsi.dcm", tmp_path, ImplicitVRLittleEndian)


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    return _copy_with_new_uid("CT_small.dcm", tmp_path)


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    with OrthancServer() as server:
        yield server


class ScriptedSCP:
    """A pynetdicom storage SCP that answers every C-STORE with `status` and records the UIDs."""

    def __init__(self, sop_classes: list[str], max_associations: int = 10) -> None:
        self.status = 0x0000
        self.delay = 0.0
        self.received: list[str] = []
        ae = AE(ae_title="SCRIPTED")
        ae.maximum_associations = max_associations
        for sop in sop_classes:
            ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.destination: Destination = ("SCRIPTED", "127.0.0.1", self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        time.sleep(self.delay)
        return self.status


@pytest.fixture
def scripted_scp() -> Iterator[Callable[..., ScriptedSCP]]:
    started: list[ScriptedSCP] = []

    def make(sop_classes: list[str], **kw: int) -> ScriptedSCP:
        started.append(ScriptedSCP(sop_classes, **kw))
        return started[-1]

    yield make
    for scp in started:
        scp.server.shutdown()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[Destination, Path]]:
    """dcmtk's storescp on a free port, writing what it receives into a folder."""
    if not Path(STORESCP).exists():
        pytest.skip("dcmtk's storescp is not installed")
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [STORESCP, "-aet", "DCMTK", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, timeout=10, interval=0.05)
        yield ("DCMTK", "127.0.0.1", port), out
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def silent_listener() -> Iterator[Destination]:
    """Accepts TCP connections and never sends a byte: a hung PACS, or a black hole past accept."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield ("SILENT", "127.0.0.1", server.getsockname()[1])
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_seg_sr_and_ct_arrive_in_orthanc(
    orthanc: OrthancServer, seg: Path, sr: Path, ct: Path
) -> None:
    before = set(orthanc.instances())
    results = send_files([seg, sr, ct], orthanc.destination)
    assert [(r.path, r.ok) for r in results] == [(seg, True), (sr, True), (ct, True)]

    new = set(orthanc.instances()) - before
    stored = {orthanc.instance_tags(i)["SOPInstanceUID"]: i for i in new}
    assert set(stored) == {_uid(seg), _uid(sr), _uid(ct)}
    # Each file travelled in its own transfer syntax rather than one common to all.
    for path, syntax in ((seg, ExplicitVRLittleEndian), (sr, ImplicitVRLittleEndian)):
        metadata = orthanc.get(f"/instances/{stored[_uid(path)]}/metadata?expand")
        assert metadata["TransferSyntax"] == syntax, path.name


def test_wrong_called_aet_is_a_permanent_rejection(orthanc: OrthancServer, sr: Path) -> None:
    _, host, port = orthanc.destination
    before = set(orthanc.instances())
    error, elapsed = _store_error([sr], ("NOT_ORTHANC", host, port))
    assert error.permanent, f"{error} after {elapsed:.1f} s; Orthanc:\n{orthanc.log_tail()}"
    assert "rejected" in error.reason
    assert error.destination == ("NOT_ORTHANC", host, port)
    assert str(error).startswith(f"NOT_ORTHANC@{host}:{port}: ")
    assert elapsed < QUICK
    assert set(orthanc.instances()) == before


def test_empty_list_never_connects() -> None:
    assert send_files([], ("ANY", "127.0.0.1", free_port()), timeout=SHORT_TIMEOUT) == []


def test_closed_port_is_transient(sr: Path) -> None:
    error, elapsed = _store_error([sr], ("ANY", "127.0.0.1", free_port()), timeout=SHORT_TIMEOUT)
    assert not error.permanent
    assert "connect" in error.reason
    assert elapsed < SHORT_BOUND


def test_listener_that_never_answers_times_out_as_transient(
    silent_listener: Destination, sr: Path
) -> None:
    error, elapsed = _store_error([sr], silent_listener, timeout=SHORT_TIMEOUT)
    assert not error.permanent
    assert "not answered" in error.reason
    assert elapsed < SHORT_BOUND


def test_listener_that_closes_on_the_request_is_transient_and_says_so(sr: Path) -> None:
    """A peer that reads the A-ASSOCIATE-RQ and hangs up (a proxy whose backend is gone)."""
    server = socket.create_server(("127.0.0.1", 0))

    def hang_up() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        destination = ("ANY", "127.0.0.1", server.getsockname()[1])
        error, elapsed = _store_error([sr], destination, timeout=SHORT_TIMEOUT)
    finally:
        thread.join(timeout=5)
        server.close()
    assert not error.permanent
    assert "closed the connection without answering" in error.reason
    assert elapsed < SHORT_BOUND


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        (0x0001, None),
        (0xB000, None),
        (0xB007, None),
        (0xA700, False),
        (0xA7FF, False),
        (0xA900, True),
        (0xC000, True),
        (0x0122, True),
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) and not isinstance(v, bool) else str(v),
)
def test_store_status_classification(
    scripted_scp: Callable[..., ScriptedSCP],
    seg: Path,
    sr: Path,
    status: int,
    permanent: bool | None,
) -> None:
    scp = scripted_scp([SegmentationStorage, BasicTextSRStorage])
    scp.status = status
    if permanent is None:
        send_files([seg, sr], scp.destination, timeout=SHORT_TIMEOUT)
        assert scp.received == [_uid(seg), _uid(sr)]
        return
    error, _ = _store_error([seg, sr], scp.destination, timeout=SHORT_TIMEOUT)
    assert error.permanent is permanent
    assert f"0x{status:04X}" in error.reason
    assert seg.name in error.reason
    assert scp.received == [_uid(seg)]  # stops at the first failure


def test_unaccepted_sop_class_is_permanent_and_sends_nothing(
    scripted_scp: Callable[..., ScriptedSCP], ct: Path, sr: Path
) -> None:
    scp = scripted_scp([CTImageStorage])
    error, _ = _store_error([ct, sr], scp.destination, timeout=SHORT_TIMEOUT)
    assert error.permanent
    assert "Basic Text SR" in error.reason
    error, _ = _store_error([sr], scp.destination, timeout=SHORT_TIMEOUT)
    assert error.permanent
    assert "no presentation context accepted" in error.reason
    assert scp.received == []


def test_missing_store_response_is_transient(
    scripted_scp: Callable[..., ScriptedSCP], sr: Path
) -> None:
    scp = scripted_scp([BasicTextSRStorage])
    scp.delay = 3.0
    error, elapsed = _store_error([sr], scp.destination, timeout=1.0)
    assert not error.permanent
    assert "no C-STORE response" in error.reason
    assert elapsed < SHORT_BOUND


def test_peer_that_stops_reading_times_out_as_transient(tmp_path: Path) -> None:
    """Sends a file larger than the loopback socket buffers to a peer whose reader blocks after
    the association is set up: pynetdicom alone would wait in send() forever."""
    ds = pydicom.dcmread(_copy_with_new_uid("CT_small.dcm", tmp_path))
    ds.Rows = ds.Columns = 2048
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(2048 * 2048 * 2 * 3)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)

    release = threading.Event()

    def stall_on_first_data(event: evt.Event) -> None:
        if event.data[:1] == b"\x04":  # P-DATA-TF: the association is up, the store has begun
            release.wait(60)

    ae = AE(ae_title="STALLED")
    ae.add_supported_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_DATA_RECV, stall_on_first_data)]
    )
    try:
        destination = ("STALLED", "127.0.0.1", server.server_address[1])
        error, elapsed = _store_error([path], destination, timeout=SHORT_TIMEOUT)
    finally:
        release.set()
        server.shutdown()
    assert not error.permanent
    assert elapsed < SHORT_BOUND


def test_transient_rejection_is_transient(
    scripted_scp: Callable[..., ScriptedSCP], sr: Path
) -> None:
    scp = scripted_scp([BasicTextSRStorage], max_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(BasicTextSRStorage, ImplicitVRLittleEndian)
    held = holder.associate(*scp.destination[1:], ae_title=scp.destination[0])
    assert held.is_established
    try:
        # pynetdicom answers "local limit exceeded", a rejection of result 2 (transient).
        error, _ = _store_error([sr], scp.destination, timeout=SHORT_TIMEOUT)
    finally:
        held.release()
    assert not error.permanent
    assert "Rejected Transient" in error.reason


def test_files_arrive_in_dcmtk_storescp(
    storescp: tuple[Destination, Path], seg: Path, sr: Path, ct: Path
) -> None:
    destination, out = storescp
    results = send_files([seg, sr, ct], destination, calling_aet="RADAI_TEST", check=False)
    assert [r.status for r in results] == [0x0000, 0x0000, 0x0000]
    received = {_uid(p) for p in out.iterdir()}
    assert received == {_uid(seg), _uid(sr), _uid(ct)}


def test_without_check_every_file_is_tried_and_reported(
    scripted_scp: Callable[..., ScriptedSCP], seg: Path, sr: Path
) -> None:
    scp = scripted_scp([SegmentationStorage, BasicTextSRStorage])
    scp.status = 0xA700
    results = send_files([seg, sr], scp.destination, timeout=SHORT_TIMEOUT, check=False)
    assert scp.received == [_uid(seg), _uid(sr)]
    assert [(r.path, r.status) for r in results] == [(seg, 0xA700), (sr, 0xA700)]
    assert not any(r.ok or r.permanent for r in results)
    assert all(r.reason.startswith(r.path.name) and "0xA700" in r.reason for r in results)


def test_without_check_a_timed_out_store_leaves_the_rest_unanswered(
    scripted_scp: Callable[..., ScriptedSCP], seg: Path, sr: Path
) -> None:
    scp = scripted_scp([SegmentationStorage, BasicTextSRStorage])
    scp.delay = 3.0
    start = time.monotonic()
    results = send_files([seg, sr], scp.destination, timeout=1.0, check=False)
    assert time.monotonic() - start < SHORT_BOUND
    assert [r.status for r in results] == [None, None]
    assert all("no C-STORE response" in r.reason and not r.permanent for r in results)
    assert scp.received == [_uid(seg)]
