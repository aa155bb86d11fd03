"""The small encodings the node makes and reads for every C-STORE, with `struct`.

pynetdicom builds and reads them through pydicom datasets: the File Meta Information put in front
of a received dataset (`Event.encoded_dataset`), the C-STORE-RSP command set, and the C-STORE-RQ
command set it decodes. Together they cost more CPU than recording the instance. All are fixed
layouts of a few elements, so they are written and read here directly;
`tests/unit/dicom_node/test_store_codec.py` checks them against pynetdicom's own encodings and
decodings. The reader answers only for a plain request and leaves anything else to pynetdicom.

Imports only the standard library.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

_PREAMBLE = b"\x00" * 128 + b"DICM"
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def part10_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str,
    implementation_version: str,
) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received dataset."""
    elements = b"".join(
        (
            _explicit(2, 0x0001, b"OB", b"\x00\x01"),
            _explicit(2, 0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _explicit(2, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _explicit(2, 0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _explicit(2, 0x0012, b"UI", _padded(implementation_uid, b"\x00")),
            _explicit(2, 0x0013, b"SH", _padded(implementation_version, b" ")),
        )
    )
    group_length = _explicit(2, 0x0000, b"UL", struct.pack("<I", len(elements)))
    return _PREAMBLE + group_length + elements


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def c_store_rsp(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The command set of a C-STORE-RSP without a data set or error details (PS3.7 9.3.1.2),
    Implicit VR Little Endian as every command set."""
    elements = b"".join(
        (
            _implicit(0x0002, _padded(sop_class_uid, b"\x00")),
            _implicit(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _implicit(0x0120, struct.pack("<H", message_id)),
            _implicit(0x0800, struct.pack("<H", _NO_DATASET)),
            _implicit(0x0900, struct.pack("<H", status)),
            _implicit(0x1000, _padded(sop_instance_uid, b"\x00")),
        )
    )
    return _implicit(0x0000, struct.pack("<I", len(elements))) + elements


class StoreRequest(NamedTuple):
    message_id: int
    priority: int
    sop_class_uid: str
    sop_instance_uid: str


# The command elements of a C-STORE-RQ not sent on behalf of a C-MOVE (PS3.7 9.3.1.1): Affected
# SOP Class UID, Command Field, Message ID, Priority, Command Data Set Type, Affected SOP
# Instance UID; the Command Group Length may come too.
_PLAIN_RQ = frozenset({0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_UID = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def c_store_rq(command: bytes) -> StoreRequest | None:
    """The fields of a plain C-STORE-RQ command set (Implicit VR Little Endian), or None for
    anything else: another command, more or fewer elements than the plain six, a value of an
    unexpected length, a UID that is not plainly valid, a priority outside 0-2. pynetdicom reads
    those and decides (its conversions and its refusals stay its own)."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", command, pos)
        pos += 8
        if group != 0 or length > end - pos or element in values:
            return None
        values[element] = command[pos : pos + length]
        pos += length
    group_length = values.pop(0x0000, None)
    if group_length is not None and len(group_length) != 4:
        return None
    if values.keys() != _PLAIN_RQ or any(
        len(values[e]) != 2 for e in (0x0100, 0x0110, 0x0700, 0x0800)
    ):
        return None
    (command_field,) = struct.unpack("<H", values[0x0100])
    (message_id,) = struct.unpack("<H", values[0x0110])
    (priority,) = struct.unpack("<H", values[0x0700])
    (dataset_type,) = struct.unpack("<H", values[0x0800])
    if command_field != _C_STORE_RQ or dataset_type == _NO_DATASET or priority > 2:
        return None
    uids = [values[e].rstrip(b"\x00 ") for e in (0x0002, 0x1000)]
    if not all(0 < len(uid) <= 64 and _UID.fullmatch(uid) for uid in uids):
        return None
    return StoreRequest(message_id, priority, uids[0].decode(), uids[1].decode())
