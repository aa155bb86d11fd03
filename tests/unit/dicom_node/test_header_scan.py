"""The quick reader (`header_scan` through `inspection._inspect_scanned`) against pydicom's reading
(`inspection._inspect_parsed`): on well-formed instances of the common shapes it answers, and
answers the same; on corrupted or unusual input it either steps aside (None) or still agrees.
It must never accept what the careful reader refuses."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicom_node import header_scan
from dicom_node.inspection import _inspect_parsed, _inspect_scanned
from dicom_node.statuses import Refusal
from tests.helpers import CT_IMAGE, ct_dataset, part10

UID = "1.2.826.0.1.3680043.8.498.77"


def _body(ds: Dataset, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _with_sequences(ds: Dataset) -> Dataset:
    # pydicom writes sequences and their items with undefined length.
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT_IMAGE
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "1", "99X", "a code"
    ref.PurposeOfReferenceCodeSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([ref, Dataset()])
    ds.ProcedureCodeSequence = Sequence([])
    return ds


def _shapes() -> dict[str, tuple[bytes, str]]:
    """(Part 10 bytes, transfer syntax) of each shape the quick path must read."""
    plain = ct_dataset("1.2.3", "1.2.4", UID)
    plain.StudyDate, plain.AccessionNumber = "20261130", "ACC1"
    plain.StudyDescription, plain.SeriesDescription = "CT CHEST", "AXIAL 1.25"
    plain.BodyPartExamined, plain.SeriesNumber, plain.InstanceNumber = "CHEST", 3, "  12 "
    plain.SpecificCharacterSet = "ISO_IR 100"
    plain.PatientName = "DOE^JANE^^DR"
    seq = _with_sequences(ct_dataset("1.2.3", "1.2.4", UID))
    rle = ct_dataset("1.2.3", "1.2.4", UID)
    rle.PixelData = encapsulate([b"\x00\x01" * 10, b"\x02" * 7])
    rle["PixelData"].VR = "OB"
    rle["PixelData"].is_undefined_length = True
    frames = ct_dataset("1.2.3", "1.2.4", UID)
    frames.NumberOfFrames = 3
    frames.PixelData = b"\x01\x00" * 16 * 3
    shapes = {
        "explicit": (_body(plain), ExplicitVRLittleEndian),
        "implicit": (_body(plain, implicit=True), ImplicitVRLittleEndian),
        "sequences explicit": (_body(seq), ExplicitVRLittleEndian),
        "sequences implicit": (_body(seq, implicit=True), ImplicitVRLittleEndian),
        "encapsulated": (_body(rle), RLELossless),
        "frames": (_body(frames), ExplicitVRLittleEndian),
    }
    return {name: (part10(body, CT_IMAGE, UID, ts), ts) for name, (body, ts) in shapes.items()}


SHAPES = _shapes()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_well_formed_instances_are_read_quickly_and_alike(name):
    data, syntax = SHAPES[name]
    quick = _inspect_scanned(data, CT_IMAGE, UID)
    assert quick is not None, "the quick path stepped aside on a plain instance"
    assert quick == _inspect_parsed(data, CT_IMAGE, UID)
    assert quick.transfer_syntax == syntax


def test_values_read_quickly_are_the_dataset_s():
    quick = _inspect_scanned(SHAPES["explicit"][0], CT_IMAGE, UID)
    assert quick is not None
    assert (quick.patient_name, quick.study_date, quick.instance_number) == (
        "DOE^JANE^^DR",
        "20261130",
        12,
    )
    assert (quick.series_number, quick.body_part, quick.modality) == (3, "CHEST", "CT")


def test_a_delimiter_inside_a_value_does_not_end_a_sequence_early():
    ds = _with_sequences(ct_dataset("1.2.3", "1.2.4", UID))
    # The bytes of a sequence delimiter, inside a text value of the first item.
    ds.ReferencedImageSequence[0].ReferencedFrameNumber = None
    ds.ReferencedImageSequence[1].StudyDescription = "\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    data = part10(_body(ds), CT_IMAGE, UID)
    quick = _inspect_scanned(data, CT_IMAGE, UID)
    assert quick is not None and quick == _inspect_parsed(data, CT_IMAGE, UID)


def test_unusual_input_is_left_to_the_careful_reader():
    ds = ct_dataset("1.2.3", "1.2.4", UID)
    ds.SpecificCharacterSet = "ISO 2022 IR 87"
    assert _inspect_scanned(part10(_body(ds), CT_IMAGE, UID), CT_IMAGE, UID) is None
    long_name = ct_dataset("1.2.3", "1.2.4", UID)
    long_name.PatientName = "A" * 70
    assert _inspect_scanned(part10(_body(long_name), CT_IMAGE, UID), CT_IMAGE, UID) is None
    short = ct_dataset("1.2.3", "1.2.4", UID)
    short.PixelData = b"\x00" * 10  # 4 x 4 x 16 bits need 32 bytes
    assert _inspect_scanned(part10(_body(short), CT_IMAGE, UID), CT_IMAGE, UID) is None
    data = SHAPES["explicit"][0]
    assert header_scan.scan(data[:-1], frozenset(), frozenset()) is None  # truncated
    assert header_scan.scan(data + b"\x00", frozenset(), frozenset()) is None  # stray byte


def _agree(data: bytes) -> None:
    quick = _inspect_scanned(data, CT_IMAGE, UID)
    if quick is None:
        return
    try:
        careful = _inspect_parsed(data, CT_IMAGE, UID)
    except Refusal as refusal:
        pytest.fail(f"the quick path accepted what the careful one refuses: {refusal.reason}")
    assert quick == careful


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SHAPES)), st.data())
def test_corrupted_instances_are_never_read_differently(name, data):
    body = bytearray(SHAPES[name][0])
    start = 132  # after the preamble: the meta and the body alike
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(start, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(start, len(body)))
    _agree(bytes(body[:cut]))


_ASCII = st.characters(min_codepoint=0, max_codepoint=127)


@settings(max_examples=300, deadline=None)
@given(
    st.text(_ASCII, max_size=80),
    st.text(_ASCII, max_size=80),
    st.text(_ASCII, max_size=14),
    st.booleans(),
)
def test_text_values_are_read_alike(description, name, number, implicit):
    ds = ct_dataset("1.2.3", "1.2.4", UID)
    ds.StudyDescription, ds.PatientName = description, name
    raw = number.encode("ascii")
    raw += b" " * (len(raw) % 2)
    # Raw, so that pydicom writes the bytes as they are, valid IS or not.
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", len(raw), raw, 0, implicit, True)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    try:
        body = _body(ds, implicit=implicit)
    except Exception:  # noqa: BLE001 - a value pydicom will not write is not a case
        return
    _agree(part10(body, CT_IMAGE, UID, syntax))
