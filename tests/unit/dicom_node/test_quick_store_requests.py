"""The node's reader of C-STORE requests (`reactor._quick_store_requests`, `store_codec.c_store_rq`)
against pynetdicom's own: the same P-DATA primitives, fragmented as pynetdicom's encoder fragments
them, queue the same requests in the same order; whatever is not a plain C-STORE-RQ is decided by
pynetdicom, with the same outcome."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_dimse_recv_handler
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from dicom_node import store_codec
from dicom_node.reactor import _quick_store_requests

_UIDS = st.from_regex(r"\A[1-9][0-9]{0,3}(\.(0|[1-9][0-9]{0,5})){1,9}\Z")
_FIELDS = (
    "MessageID",
    "Priority",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
)


def _store(message_id: int, priority: int, sop_class: str, sop_instance: str, data: bytes) -> Any:
    req = C_STORE()
    req.MessageID = message_id
    req.Priority = priority
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.DataSet = BytesIO(data)
    return req


def _pdata(primitive: Any, context_id: int, max_pdu: int) -> list[Any]:
    message = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return list(message.encode_msg(context_id, max_pdu))


def _receivers() -> tuple[Association, Any, Association]:
    ours = Association(AE(), "acceptor")
    ours.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)  # as the node does
    theirs = Association(AE(), "acceptor")
    theirs.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
    return ours, _quick_store_requests(ours, ours.dimse.receive_primitive), theirs


def _queued(assoc: Association) -> list[tuple]:
    out = []
    while not assoc.dimse.msg_queue.empty():
        context_id, primitive = assoc.dimse.msg_queue.get()
        fields = tuple(getattr(primitive, f, None) for f in _FIELDS)
        data = primitive.DataSet.getvalue() if getattr(primitive, "DataSet", None) else None
        out.append((context_id, type(primitive).__name__, fields, data, primitive._context_id))
    return out


def _events(assoc: Association) -> list[str]:
    return [assoc.dul.event_queue.get() for _ in range(assoc.dul.event_queue.qsize())]


def _feed_both(pdata: list[Any]) -> tuple[list, list]:
    ours, receive, theirs = _receivers()
    for primitive in pdata:
        receive(primitive)
        theirs.dimse.receive_primitive(primitive)
    assert _events(ours) == _events(theirs)
    return _queued(ours), _queued(theirs)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 2),
    _UIDS,
    _UIDS,
    st.binary(min_size=1, max_size=3000),
    st.sampled_from([0, 40, 200, 16382]),
    st.sampled_from([1, 3, 255]),
)
def test_plain_requests_are_queued_as_pynetdicom_queues_them(
    message_id, priority, sop_class, sop_instance, data, max_pdu, context_id
):
    pdata = _pdata(_store(message_id, priority, sop_class, sop_instance, data), context_id, max_pdu)
    ours, theirs = _feed_both(pdata)
    assert len(theirs) == 1
    assert ours == theirs


def test_anything_else_is_pynetdicom_s_in_order():
    echo = C_ECHO()
    echo.MessageID = 7
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    moved = _store(3, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", b"\x08\x00" * 50)
    moved.MoveOriginatorApplicationEntityTitle = "MOVER"
    moved.MoveOriginatorMessageID = 11
    messages = [
        _store(1, 2, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", b"a" * 500),
        echo,
        moved,
        _store(2, 1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.2", b"b" * 500),
        # Not plainly valid: pynetdicom takes a leading zero and a trailing dot (its conformance
        # check is off by default); ours steps aside.
        _store(4, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.03.4", b"c" * 10),
        _store(5, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.5", b"d" * 10),
    ]
    pdata = [p for m in messages for p in _pdata(m, 1, 100)]
    ours, theirs = _feed_both(pdata)
    assert [q[1] for q in theirs] == [
        "C_STORE",
        "C_ECHO",
        "C_STORE",
        "C_STORE",
        "C_STORE",
        "C_STORE",
    ]
    assert ours == theirs
    assert theirs[2][2][4:] == ("MOVER", 11)


def _raw_command(*elements: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack("<HHI", 0, tag, len(v)) + v for tag, v in elements)


def test_c_store_rq_reads_only_plain_requests():
    us = lambda n: struct.pack("<H", n)  # noqa: E731
    plain = [
        (0x0002, b"1.2.840.10008.5.1.4.1.1.2\x00"),
        (0x0100, us(1)),
        (0x0110, us(9)),
        (0x0700, us(0)),
        (0x0800, us(0x0000)),
        (0x1000, b"1.2.3.4 "),
    ]
    assert store_codec.c_store_rq(_raw_command(*plain)) == store_codec.StoreRequest(
        9, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    )
    # The same command as pynetdicom encodes it, Command Group Length included.
    encoded = encode(_pdata_command(), True, True)
    assert store_codec.c_store_rq(encoded) == store_codec.StoreRequest(
        9, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    )
    changed = {
        "an echo": [(0x0100, us(0x0030)) if t == 0x0100 else (t, v) for t, v in plain],
        "no data set": [(0x0800, us(0x0101)) if t == 0x0800 else (t, v) for t, v in plain],
        "priority 3": [(0x0700, us(3)) if t == 0x0700 else (t, v) for t, v in plain],
        "move originator": [*plain, (0x1031, us(5))],
        "element missing": plain[:-1],
        "element twice": [*plain, plain[1]],
        "long message ID": [
            (0x0110, b"\x09\x00\x00\x00") if t == 0x0110 else (t, v) for t, v in plain
        ],
        "two UIDs in one": [(0x1000, b"1.2.3\\1.2.4") if t == 0x1000 else (t, v) for t, v in plain],
        "empty UID": [(0x1000, b"") if t == 0x1000 else (t, v) for t, v in plain],
        "65-character UID": [
            (0x1000, b"1." + b"2" * 63) if t == 0x1000 else (t, v) for t, v in plain
        ],
        "non-ASCII UID": [(0x1000, "1.2.３".encode()) if t == 0x1000 else (t, v) for t, v in plain],
    }
    for name, elements in changed.items():
        assert store_codec.c_store_rq(_raw_command(*elements)) is None, name
    whole = _raw_command(*plain)
    assert store_codec.c_store_rq(whole[:-3]) is None, "cut short"
    assert store_codec.c_store_rq(whole + b"\x00\x00\x00") is None, "trailing bytes"
    assert store_codec.c_store_rq(b"\x08\x00" + whole[2:]) is None, "not group 0000"


def _pdata_command() -> Any:
    message = C_STORE_RQ()
    message.primitive_to_message(_store(9, 0, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", b"\x00" * 4))
    return message.command_set
