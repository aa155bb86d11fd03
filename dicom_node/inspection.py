"""Checks on a received C-STORE dataset before anything is stored as an instance.

Parses the bytes as sent (no pixel decoding), and refuses what cannot be filed safely: a stream
that is truncated or does not read in its transfer syntax (lengths that lie, unknown VRs),
missing or malformed UIDs (they become path names) or UID attributes encoded as something else,
a dataset that contradicts its C-STORE request, pixel data encoded otherwise than its transfer
syntax requires, and uncompressed pixel data whose length does not fit its own image description.

The text attributes the node records have a defined outcome beyond their VR's maximum length
(PS3.5 table 6.2-1), per attribute (`RECORDED`): the patient's identity (Patient ID, Patient's
Name, Accession Number) is refused (0xA902), because a shortened identifier could name another
patient; descriptive ones (Modality, descriptions, body part, study date) are stored truncated
and the study is flagged. NUL characters inside a value (PostgreSQL text cannot hold them) are
removed and the study is flagged; trailing NULs are padding and dropped like trailing spaces.
A value is never stored as a Python repr: UN-encoded values (an over-long value re-encoded by
its sender) are decoded in the dataset's character set, multiple values joined with "\\".
Integers beyond 32 bits are dropped (the database cannot hold them; IS allows no more).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.charset import TEXT_VR_DELIMS, convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.multival import MultiValue
from pydicom.valuerep import VR, PersonName

from db.flags import FlagKind
from dicom_node import header_scan, statuses
from dicom_node.statuses import Refusal

# A body that does not read in its declared transfer syntax is refused, not re-guessed: pydicom's
# fallback to implicit VR would turn random bytes into a "dataset" of unknown elements.
pydicom.config.assume_implicit_vr_switch = False

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PIXEL_DATA = 0x7FE00010
_KNOWN_VRS = frozenset(vr.value for vr in VR)
_UID_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
# Database columns for integers are 32-bit; IS allows no more (PS3.5 6.2), senders may still.
_INT_RANGE = range(-(2**31), 2**31)


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


@dataclass(frozen=True)
class Limit:
    """How long a recorded attribute may be (PS3.5 table 6.2-1), and what happens beyond."""

    vr: str
    chars: int  # per value; for PN per component group
    refuse: bool  # beyond the limit: refuse the instance (True) or store it truncated (False)


# The text attributes the node records, with their column sizes in db/models.py.
RECORDED: dict[str, Limit] = {
    "PatientID": Limit("LO", 64, refuse=True),
    "PatientName": Limit("PN", 64, refuse=True),
    "AccessionNumber": Limit("SH", 16, refuse=True),
    "Modality": Limit("CS", 16, refuse=False),
    "BodyPartExamined": Limit("CS", 16, refuse=False),
    "StudyDate": Limit("DA", 8, refuse=False),
    "StudyDescription": Limit("LO", 64, refuse=False),
    "SeriesDescription": Limit("LO", 64, refuse=False),
}
TRUNCATED, NUL_REMOVED = "truncated", "nul_removed"


@dataclass(frozen=True)
class Alteration:
    """A value the node changed to record it; says what changed, never the value itself."""

    keyword: str
    change: str  # TRUNCATED or NUL_REMOVED
    received: int  # characters received (truncated) or NULs removed
    kept: int  # characters kept

    @property
    def flag_kind(self) -> FlagKind:
        return FlagKind.VALUE_TRUNCATED if self.change == TRUNCATED else FlagKind.CHARACTERS_REMOVED

    @property
    def reason(self) -> str:
        """The study flag's text: the same for every instance with this alteration."""
        if self.change == TRUNCATED:
            limit = RECORDED[self.keyword]
            return (
                f"{self.keyword} longer than the {limit.chars} characters {limit.vr} allows: "
                "stored truncated"
            )
        return f"NUL characters removed from {self.keyword}"

    def to_detail(self) -> dict:
        return {
            "attribute": self.keyword,
            "change": self.change,
            "received": self.received,
            "kept": self.kept,
        }


@dataclass(frozen=True)
class ReceivedObject:
    """What the node needs to know of an incoming instance; patient fields stay out of logs."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part: str | None
    instance_number: int | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    alterations: tuple[Alteration, ...] = ()


def _as_text(ds: Dataset, keyword: str) -> str | None:
    """The attribute as DICOM text (values joined by backslashes), decoded; None if unreadable."""
    try:
        elem = ds[keyword]
        value = elem.value
        if isinstance(value, bytes):
            # UN: a sender re-encodes a value too long for its VR's 16-bit length as UN.
            encodings = convert_encodings(ds.get("SpecificCharacterSet"))
            if RECORDED.get(keyword, Limit("LO", 0, False)).vr == "PN":
                value = str(PersonName(value, encodings))
            else:
                value = decode_bytes(value, encodings, TEXT_VR_DELIMS)
        elif isinstance(value, MultiValue | list | tuple):
            value = "\\".join(str(v) for v in value)
    except Exception:  # noqa: BLE001 - a broken optional attribute is not a reason to refuse
        return None
    if value is None:
        return None
    return str(value)


def _longest(value: str, vr: str) -> int:
    if vr == "PN":  # the limit is per component group (alphabetic, ideographic, phonetic)
        return max((len(group) for v in value.split("\\") for group in v.split("=")), default=0)
    return max((len(v) for v in value.split("\\")), default=0)


def _text(ds: Dataset, keyword: str, changes: list[Alteration]) -> str | None:
    """A recorded attribute's value, cleaned and checked against its limit (see `RECORDED`)."""
    value = _as_text(ds, keyword)
    if not value:
        return None
    limit = RECORDED[keyword]
    value = value.rstrip(" \x00")  # padding (NUL is UI's, some senders use it everywhere)
    # PostgreSQL text cannot hold NUL: the value keeps the rest, the change is recorded.
    nuls = value.count("\x00")
    if nuls:
        value = value.replace("\x00", "")
        changes.append(Alteration(keyword, NUL_REMOVED, nuls, len(value)))
    if _longest(value, limit.vr) > limit.chars:
        if limit.refuse:
            raise Refusal(
                statuses.VALUE_TOO_LONG,
                f"{keyword} has a value of {_longest(value, limit.vr)} characters; "
                f"{limit.vr} allows {limit.chars}"
                + (" per component group" if limit.vr == "PN" else ""),
            )
        changes.append(Alteration(keyword, TRUNCATED, len(value), limit.chars))
        value = value[: limit.chars]
    return value or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = int(value) if value not in (None, "") else None
    except Exception:  # noqa: BLE001
        return None
    return number if number is None or number in _INT_RANGE else None


def _check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    if _PIXEL_DATA not in ds:
        return
    elem = ds[_PIXEL_DATA]
    syntax = pydicom.uid.UID(transfer_syntax)
    # Encapsulated transfer syntaxes carry pixel data as fragments of undefined length, native
    # ones as one value of defined length (PS3.5 A.4, 7.1): anything else cannot be decoded.
    if syntax.is_encapsulated != elem.is_undefined_length:
        kind = "native" if syntax.is_encapsulated else "encapsulated"
        raise Refusal(
            statuses.CANNOT_UNDERSTAND,
            f"{kind} pixel data does not fit the transfer syntax {syntax.name}",
        )
    if syntax.is_encapsulated:
        return  # its length depends on the codec
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:  # noqa: BLE001
        raise Refusal(
            statuses.PIXEL_DATA_LENGTH, f"pixel data without a usable image description: {exc}"
        ) from None
    if min(rows, cols, bits, samples, frames) <= 0:
        raise Refusal(statuses.PIXEL_DATA_LENGTH, "image dimensions must be positive")
    expected_bits = rows * cols * bits * samples * frames
    expected = (expected_bits + 7) // 8
    actual = len(elem.value) if elem.value is not None else 0
    # Odd lengths are padded to even on the wire.
    if actual not in (expected, expected + (expected % 2)):
        raise Refusal(
            statuses.PIXEL_DATA_LENGTH,
            f"pixel data holds {actual} bytes; {rows}x{cols}x{samples} samples of {bits} bits "
            f"in {frames} frame(s) need {expected}",
        )


class _NotAUid(Exception):
    """A UID attribute encoded with another VR (its value would be read as something else)."""


def _parse(encoded: bytes) -> tuple[Dataset, str]:
    """One pass over the stream: file meta, then every top-level element, lengths checked.

    pydicom's reader quietly accepts a value shorter than its declared length (a truncated file,
    a length that lies) and re-guesses the VR encoding; here both are refusals. Values stay raw
    until read, so only the attributes the node needs are ever decoded.
    """
    fp = BytesIO(encoded)
    read_preamble(fp, force=False)
    meta = _read_file_meta_info(fp)
    if "TransferSyntaxUID" not in meta:
        raise ValueError("the file meta information has no Transfer Syntax UID")
    declared = pydicom.uid.UID(str(meta.TransferSyntaxUID))
    if not declared.is_transfer_syntax:
        raise ValueError(f"unknown transfer syntax {declared}")
    if declared.is_deflated:
        ds = pydicom.dcmread(BytesIO(encoded), force=False)
        return ds, str(declared)
    first = encoded[fp.tell() : fp.tell() + 8]
    if len(first) < 8:
        raise ValueError("no dataset follows the file meta information")
    if not declared.is_implicit_VR and not (first[4:6].isalpha() and first[4:6].isupper()):
        raise ValueError(f"the body is not encoded as its transfer syntax, {declared.name}")
    elements = {}
    end = fp.tell()
    for raw in data_element_generator(fp, declared.is_implicit_VR, declared.is_little_endian):
        if raw.length != 0xFFFFFFFF and raw.value is not None and len(raw.value) != raw.length:
            raise ValueError(
                f"element {raw.tag} declares {raw.length} bytes but only {len(raw.value)} follow"
            )
        if not declared.is_implicit_VR and raw.VR not in _KNOWN_VRS:
            raise ValueError(f"element {raw.tag} has an unknown VR {raw.VR!r}")
        if raw.tag in _UID_TAGS and raw.VR not in (None, "UI", "UN"):
            raise _NotAUid(f"{_UID_TAGS[raw.tag]} is encoded as {raw.VR}, not as a UID (UI)")
        elements[raw.tag] = raw
        end = fp.tell()
    # The reader stops quietly at a partial element header or a stray delimiter: what is left
    # after the last whole element is a truncated or corrupt stream.
    if end != len(encoded):
        raise ValueError(f"{len(encoded) - end} stray bytes end the dataset (truncated?)")
    ds = Dataset(elements)
    ds.set_original_encoding(declared.is_implicit_VR, declared.is_little_endian)
    ds.file_meta = meta
    return ds, str(declared)


def inspect_received(
    encoded: bytes, requested_sop_class: str, requested_sop_instance: str
) -> ReceivedObject:
    """Parse a received Part 10 stream (meta included) and check it can be filed; or raise.

    Plainly well-formed instances that pass every check are read by `header_scan`; everything
    else, refusals included, by pydicom (`_inspect_parsed`), whose reading is the reference.
    """
    quick = _inspect_scanned(encoded, requested_sop_class, requested_sop_instance)
    if quick is not None:
        return quick
    return _inspect_parsed(encoded, requested_sop_class, requested_sop_instance)


# The attributes the quick path reads, with the VR each must have (explicit VR).
_SCANNED = {
    0x00080005: ("SpecificCharacterSet", ("CS",)),
    0x00080016: ("SOPClassUID", ("UI",)),
    0x00080018: ("SOPInstanceUID", ("UI",)),
    0x00080020: ("StudyDate", ("DA",)),
    0x00080050: ("AccessionNumber", ("SH",)),
    0x00080060: ("Modality", ("CS",)),
    0x00081030: ("StudyDescription", ("LO",)),
    0x0008103E: ("SeriesDescription", ("LO",)),
    0x00100010: ("PatientName", ("PN",)),
    0x00100020: ("PatientID", ("LO",)),
    0x00180015: ("BodyPartExamined", ("CS",)),
    0x0020000D: ("StudyInstanceUID", ("UI",)),
    0x0020000E: ("SeriesInstanceUID", ("UI",)),
    0x00200011: ("SeriesNumber", ("IS",)),
    0x00200013: ("InstanceNumber", ("IS",)),
    0x00280002: ("SamplesPerPixel", ("US",)),
    0x00280008: ("NumberOfFrames", ("IS",)),
    0x00280010: ("Rows", ("US",)),
    0x00280011: ("Columns", ("US",)),
    0x00280100: ("BitsAllocated", ("US",)),
    _PIXEL_DATA: ("PixelData", ("OB", "OW")),
}
_SCANNED_TAGS = frozenset(_SCANNED)
_ENCAPSULATED = frozenset(
    str(uid)
    for uid in pydicom.uid.AllTransferSyntaxes
    if uid.is_encapsulated and uid.is_little_endian and not uid.is_implicit_VR
    and not uid.is_deflated
)  # fmt: skip
# Character sets in which ASCII bytes mean ASCII characters (no code extensions).
_ASCII_SAFE_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})
_INTEGER = re.compile(r"^[+-]?[0-9]{1,10}$")


class _Unsure(Exception):
    """The quick path does not vouch for this value: pydicom's reading decides."""


def _inspect_scanned(
    encoded: bytes, requested_sop_class: str, requested_sop_instance: str
) -> ReceivedObject | None:
    found = header_scan.scan(encoded, _SCANNED_TAGS, _ENCAPSULATED)
    if found is None:
        return None
    try:
        return _received_from_scan(found, requested_sop_class, requested_sop_instance)
    except (_Unsure, struct.error, UnicodeDecodeError):
        return None


def _plain(raw: bytes | None) -> str:
    """A single ASCII value without padding; anything that needs more decoding is unsure."""
    if not raw:
        return ""
    if not raw.isascii() or b"\\" in raw or b"\x1b" in raw:
        raise _Unsure
    text = raw.decode("ascii").rstrip(" \x00")
    if not text.isprintable():
        raise _Unsure  # NULs or control characters inside: see _text
    return text


def _received_from_scan(
    found: header_scan.Scan, requested_sop_class: str, requested_sop_instance: str
) -> ReceivedObject:
    values: dict[str, bytes | None] = {}
    for tag, element in found.elements.items():
        keyword, vrs = _SCANNED[tag]
        if element.vr is not None and element.vr not in vrs:
            raise _Unsure
        values[keyword] = element.value
    if _plain(values.get("SpecificCharacterSet")) not in _ASCII_SAFE_CHARSETS:
        raise _Unsure
    uids = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        uids[keyword] = _plain(values.get(keyword))
        if not valid_uid(uids[keyword]):
            raise _Unsure
    if (uids["SOPClassUID"], uids["SOPInstanceUID"]) != (
        requested_sop_class,
        requested_sop_instance,
    ):
        raise _Unsure
    if _PIXEL_DATA in found.elements:
        _check_scanned_pixels(found, values)
    text = {}
    for keyword, limit in RECORDED.items():
        value = _plain(values.get(keyword))
        if _longest(value, limit.vr) > limit.chars:
            raise _Unsure  # refused or truncated: decided and recorded by the careful path
        text[keyword] = value or None
    return ReceivedObject(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax=found.transfer_syntax,
        modality=text["Modality"],
        series_number=_scanned_int(values.get("SeriesNumber")),
        series_description=text["SeriesDescription"],
        body_part=text["BodyPartExamined"],
        instance_number=_scanned_int(values.get("InstanceNumber")),
        patient_id=text["PatientID"],
        patient_name=text["PatientName"],
        accession_number=text["AccessionNumber"],
        study_date=text["StudyDate"],
        study_description=text["StudyDescription"],
    )


def _scanned_int(raw: bytes | None) -> int | None:
    text = _plain(raw).strip(" ")
    if not text:
        return None
    if not _INTEGER.match(text):
        raise _Unsure
    number = int(text)
    return number if number in _INT_RANGE else None


def _scanned_us(raw: bytes | None, default: int | None = None) -> int:
    if raw is None:
        if default is None:
            raise _Unsure
        return default
    if len(raw) != 2:
        raise _Unsure
    return int.from_bytes(raw, "little")


def _check_scanned_pixels(found: header_scan.Scan, values: dict[str, bytes | None]) -> None:
    """`_check_pixel_data` for a scan; any failure is left to the careful path to report."""
    pixels = found.elements[_PIXEL_DATA]
    encapsulated = found.transfer_syntax in _ENCAPSULATED
    if encapsulated != pixels.undefined_length:
        raise _Unsure
    if encapsulated:
        return
    rows = _scanned_us(values.get("Rows"))
    cols = _scanned_us(values.get("Columns"))
    bits = _scanned_us(values.get("BitsAllocated"))
    samples = _scanned_us(values.get("SamplesPerPixel"), default=1)
    frames = _scanned_int(values.get("NumberOfFrames")) if "NumberOfFrames" in values else 1
    frames = frames or 1
    if min(rows, cols, bits, samples, frames) <= 0:
        raise _Unsure
    expected = (rows * cols * bits * samples * frames + 7) // 8
    if pixels.length not in (expected, expected + (expected % 2)):
        raise _Unsure


def _inspect_parsed(
    encoded: bytes, requested_sop_class: str, requested_sop_instance: str
) -> ReceivedObject:
    try:
        ds, transfer_syntax = _parse(encoded)
        uids = {}
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = ds.get(keyword)
            uids[keyword] = str(value) if value is not None else None
    except _NotAUid as exc:
        raise Refusal(statuses.MISSING_UID, str(exc)) from None
    except (InvalidDicomError, EOFError, ValueError, OverflowError, KeyError, TypeError) as exc:
        raise Refusal(statuses.CANNOT_UNDERSTAND, f"cannot parse the dataset: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on hostile input
        raise Refusal(
            statuses.CANNOT_UNDERSTAND, f"cannot parse the dataset: {type(exc).__name__}: {exc}"
        ) from None

    for keyword, value in uids.items():
        if not valid_uid(value):
            shown = "missing" if not value else f"not a valid UID: {value[:80]!r}"
            raise Refusal(statuses.MISSING_UID, f"{keyword} {shown}")
    if uids["SOPClassUID"] != requested_sop_class:
        raise Refusal(
            statuses.SOP_CLASS_MISMATCH,
            f"dataset SOP Class UID {uids['SOPClassUID']} differs from the request's "
            f"{requested_sop_class}",
        )
    if uids["SOPInstanceUID"] != requested_sop_instance:
        raise Refusal(
            statuses.SOP_INSTANCE_MISMATCH,
            f"dataset SOP Instance UID {uids['SOPInstanceUID']} differs from the request's "
            f"{requested_sop_instance}",
        )
    _check_pixel_data(ds, transfer_syntax)
    changes: list[Alteration] = []
    text = {keyword: _text(ds, keyword, changes) for keyword in RECORDED}
    return ReceivedObject(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax=transfer_syntax,
        modality=text["Modality"],
        series_number=_int(ds, "SeriesNumber"),
        series_description=text["SeriesDescription"],
        body_part=text["BodyPartExamined"],
        instance_number=_int(ds, "InstanceNumber"),
        patient_id=text["PatientID"],
        patient_name=text["PatientName"],
        accession_number=text["AccessionNumber"],
        study_date=text["StudyDate"],
        study_description=text["StudyDescription"],
        alterations=tuple(changes),
    )
