"""The two small encodings the node makes for every C-STORE, built with `struct`.

pynetdicom builds both through pydicom datasets: the File Meta Information put in front of a
received dataset (`Event.encoded_dataset`) and the C-STORE-RSP command set. Together they cost
more CPU than recording the instance. Both are fixed layouts of a few elements, so they are
written here directly; `tests/unit/dicom_node/test_store_codec.py` checks them byte for byte
against pynetdicom's own encodings.

Imports only the standard library.
"""

from __future__ import annotations

import struct

_PREAMBLE = b"\x00" * 128 + b"DICM"
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
