"""A quick reader for well-formed instances: one pass over the bytes with `struct`, no pydicom.

On a small instance pydicom's reader and its value conversions cost more than everything else
the node does before it answers. `scan` walks the file meta and the top-level elements of the
little-endian transfer syntaxes (explicit and implicit VR; encapsulated pixel data; sequences of
defined or undefined length, walked item by item but not decoded), and returns the raw values of
the elements it is asked for. It answers only for input it understands completely: anything
unusual (a VR it does not know, a length that runs past the end, stray bytes, a deflated or
big-endian syntax, tags out of order, nesting deeper than `_MAX_DEPTH`) gives None, and the caller
then reads the bytes with pydicom, whose verdict stands. A scan that returns never accepts what
the careful reader would refuse: `tests/unit/test_header_scan.py` checks both on corrupted input.

Imports only the standard library.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_PREAMBLE = 128
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_TRANSFER_SYNTAX = 0x00020010
_PIXEL_DATA = 0x7FE00010
_MAX_DEPTH = 16
# VRs with a 4-byte length after two reserved bytes in explicit VR (PS3.5 table 7.1-1).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_HEADER_LE = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


@dataclass(frozen=True)
class Element:
    vr: str | None  # None in implicit VR
    value: bytes | None  # None for undefined length, and for pixel data (only its length)
    length: int  # 0xFFFFFFFF: undefined

    @property
    def undefined_length(self) -> bool:
        return self.length == _UNDEFINED


@dataclass(frozen=True)
class Scan:
    transfer_syntax: str
    implicit: bool
    elements: dict[int, Element]  # the requested top-level tags that are present


class _Unsure(Exception):
    """Input this reader does not vouch for: the careful reader decides."""


def scan(data: bytes, wanted: frozenset[int], encapsulated: frozenset[str]) -> Scan | None:
    """The requested top-level elements of a Part 10 stream, or None if it is not plainly
    well-formed. `encapsulated` names the explicit little-endian transfer syntaxes whose pixel
    data is encapsulated (the caller knows them from its DICOM library)."""
    try:
        return _scan(memoryview(data), wanted, encapsulated)
    except (_Unsure, struct.error, UnicodeDecodeError, IndexError):
        return None


def _scan(buf: memoryview, wanted: frozenset[int], encapsulated: frozenset[str]) -> Scan:
    if len(buf) < _PREAMBLE + 4 or bytes(buf[_PREAMBLE : _PREAMBLE + 4]) != b"DICM":
        raise _Unsure
    pos = _PREAMBLE + 4
    syntax = None
    # File meta: explicit VR little endian, group 2 only.
    while pos + 4 <= len(buf) and _HEADER_LE.unpack_from(buf, pos)[0] == 0x0002:
        tag, vr, value_at, length = _explicit_header(buf, pos)
        if length == _UNDEFINED:
            raise _Unsure
        end = value_at + length
        if end > len(buf):
            raise _Unsure
        if tag == _TRANSFER_SYNTAX:
            if vr != b"UI":
                raise _Unsure
            syntax = bytes(buf[value_at:end]).decode("ascii").rstrip("\x00 ")
        pos = end
    if syntax is None:
        raise _Unsure
    if syntax == _IMPLICIT_LE:
        implicit = True
    elif syntax == _EXPLICIT_LE or syntax in encapsulated:
        implicit = False
    else:
        raise _Unsure  # deflated, big endian, unknown: pydicom's reader decides
    found: dict[int, Element] = {}
    pos, _ = _walk(buf, pos, implicit, wanted, found, depth=0, until_item_end=False)
    if pos != len(buf):
        raise _Unsure
    return Scan(syntax, implicit, found)


def _explicit_header(buf: memoryview, pos: int) -> tuple[int, bytes, int, int]:
    group, elem = _HEADER_LE.unpack_from(buf, pos)
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _SHORT_VRS:
        return group << 16 | elem, vr, pos + 8, _U16.unpack_from(buf, pos + 6)[0]
    if vr in _LONG_VRS:
        if bytes(buf[pos + 6 : pos + 8]) != b"\x00\x00":
            raise _Unsure
        return group << 16 | elem, vr, pos + 12, _U32.unpack_from(buf, pos + 8)[0]
    raise _Unsure


def _walk(
    buf: memoryview,
    pos: int,
    implicit: bool,
    wanted: frozenset[int],
    found: dict[int, Element],
    *,
    depth: int,
    until_item_end: bool,
) -> tuple[int, bool]:
    """Elements from `pos` to the end (top level) or to an item delimiter (inside an item).
    Returns where it stopped and whether it met the item delimiter."""
    size = len(buf)
    last_tag = -1
    while pos < size:
        if pos + 8 > size:
            raise _Unsure
        group, elem = _HEADER_LE.unpack_from(buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:
            if until_item_end and tag == _ITEM_END and _U32.unpack_from(buf, pos + 4)[0] == 0:
                return pos + 8, True
            raise _Unsure
        if tag <= last_tag:
            raise _Unsure  # out of order or repeated: let the careful reader decide
        last_tag = tag
        if implicit:
            vr: bytes | None = None
            value_at, length = pos + 8, _U32.unpack_from(buf, pos + 4)[0]
        else:
            _, vr, value_at, length = _explicit_header(buf, pos)
        if length == _UNDEFINED:
            if not implicit and vr not in (b"SQ", b"OB", b"OW"):
                raise _Unsure  # e.g. UN of undefined length: implicit VR inside
            pos = _skip_items(buf, value_at, implicit, depth + 1, fragments=vr in (b"OB", b"OW"))
            if depth == 0 and tag in wanted:
                found[tag] = Element(None if vr is None else vr.decode(), None, length)
            continue
        end = value_at + length
        if end > size:
            raise _Unsure
        if depth == 0 and tag in wanted:
            # Pixel data is only measured: copying half a megabyte per slice is not free.
            value = None if tag == _PIXEL_DATA else bytes(buf[value_at:end])
            found[tag] = Element(None if vr is None else vr.decode(), value, length)
        pos = end
    if until_item_end:
        raise _Unsure  # an item of undefined length never ended
    return pos, False


def _skip_items(buf: memoryview, pos: int, implicit: bool, depth: int, *, fragments: bool) -> int:
    """Past the items of an undefined-length sequence (or pixel data fragments) and its
    delimiter; nested datasets are walked, so a delimiter inside a value cannot end it early."""
    if depth > _MAX_DEPTH:
        raise _Unsure
    size = len(buf)
    while True:
        if pos + 8 > size:
            raise _Unsure
        group, elem = _HEADER_LE.unpack_from(buf, pos)
        tag = group << 16 | elem
        length = _U32.unpack_from(buf, pos + 4)[0]
        if tag == _SEQUENCE_END:
            if length != 0:
                raise _Unsure
            return pos + 8
        if tag != _ITEM:
            raise _Unsure
        if length == _UNDEFINED:
            if fragments:
                raise _Unsure  # fragments always have a defined length
            pos, ended = _walk(
                buf, pos + 8, implicit, frozenset(), {}, depth=depth, until_item_end=True
            )
            if not ended:
                raise _Unsure
            continue
        end = pos + 8 + length
        if end > size:
            raise _Unsure
        if not fragments:
            # Walk the item's dataset too: it must end exactly at the item's end.
            inner = _walk(
                buf[:end], pos + 8, implicit, frozenset(), {}, depth=depth, until_item_end=False
            )[0]
            if inner != end:
                raise _Unsure
        pos = end
