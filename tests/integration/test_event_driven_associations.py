"""The node's associations run on the waiting loops of `dicom_node.reactor` (pynetdicom 3.0.4) and
behave as pynetdicom's own: many requests in one association, release, a peer's abort, an idle
peer cut off at the network timeout, and stored files with the same Part 10 header."""

from __future__ import annotations

import threading

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node import reactor
from tests.conftest import wait_for
from tests.helpers import CT_IMAGE, ct_dataset, encode, instances, part10, raw_association, send_raw

pytestmark = pytest.mark.skipif(not reactor.supported(), reason="pynetdicom is not 3.0.4")

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.410", "1.2.826.0.1.3680043.8.498.411"


def _server_side(node) -> list:  # noqa: ANN001
    return list(node.node.ae.active_associations)


def test_requests_release_and_abort_on_the_waiting_loops(sqlite_db, node_factory, tmp_path):
    node = node_factory(sqlite_db, stable_seconds=30)
    with raw_association(node.port, [(CT_IMAGE, ExplicitVRLittleEndian)]) as assoc:
        server = _server_side(node)
        assert len(server) == 1
        # The acceptor runs the node's waiting loop, not pynetdicom's polling one.
        assert server[0]._run_reactor.__name__ == "<lambda>"
        for n in range(30):
            uid = f"1.2.826.0.1.3680043.8.498.412.{n}"
            data = part10(encode(ct_dataset(STUDY, SERIES, uid)), CT_IMAGE, uid)
            assert send_raw(assoc, tmp_path / "x.dcm", data) == 0
    wait_for(lambda: not server[0].is_alive(), timeout=5)
    assert server[0].is_released
    stored = instances(sqlite_db)
    assert len(stored) == 30
    # The header the node wrote is the one pynetdicom's encoder writes.
    ds = pydicom.dcmread(stored[0].archive_path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADAI")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    server = _server_side(node)
    assoc.abort()
    wait_for(lambda: not server[0].is_alive(), timeout=5)
    assert server[0].is_aborted


def test_an_idle_peer_is_cut_off_at_the_network_timeout(sqlite_db, node_factory):
    node = node_factory(sqlite_db, stable_seconds=30, network_timeout=1.0)
    ended = threading.Event()
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title="RADAI",
        evt_handlers=[
            (evt.EVT_ABORTED, lambda e: ended.set()),
            (evt.EVT_CONN_CLOSE, lambda e: ended.set()),
        ],
    )
    assert assoc.is_established
    server = _server_side(node)
    assert ended.wait(10), "the node never ended an idle association"
    wait_for(lambda: not server[0].is_alive(), timeout=5)
