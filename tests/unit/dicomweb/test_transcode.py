"""Transfer syntax changes for WADO-RS: what is encoded decodes back to the same pixels, the
SOP Instance UID stays, and what cannot be given is refused with a reason."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicomweb.transcode import (
    PIXEL_CODECS,
    CannotGive,
    check_pixels,
    check_syntax,
    encode_frames,
    part10,
    producible,
    transcode,
)
from tests.kit.dicomweb import ct_instance

CODECS = [str(ts) for ts in PIXEL_CODECS]
SIDE = 40  # JPEG 2000 takes 32 pixels or more each way


def _image(kind: str) -> Dataset:
    """A small image of each pixel layout the codecs must keep exactly."""
    rng = np.random.default_rng(7)
    ds = ct_instance(generate_uid(), generate_uid(), size=SIDE)
    if kind == "ct-signed":  # the full int16 range, noise: nothing to smooth over
        ds.PixelData = rng.integers(-32768, 32767, (SIDE, SIDE)).astype(np.int16).tobytes()
    elif kind == "mono-12bit":
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (SIDE, SIDE)).astype(np.uint16).tobytes()
    elif kind == "rgb":
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8).tobytes()
    elif kind == "multiframe":
        ds.NumberOfFrames = 4
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 256, (4, SIDE, SIDE)).astype(np.uint8).tobytes()
    return ds


def _reread(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


@pytest.mark.parametrize("kind", ["ct-signed", "mono-12bit", "rgb", "multiframe"])
@pytest.mark.parametrize("ts", CODECS)
def test_lossless_round_trip_is_pixel_equal_and_keeps_the_uid(kind: str, ts: str) -> None:
    if ts not in producible():
        pytest.skip(f"no encoder for {ts} installed")
    original = _image(kind)
    expected = original.pixel_array.copy()
    uid = original.SOPInstanceUID
    encoded = _reread(part10(transcode(copy.deepcopy(original), ts)))
    assert encoded.file_meta.TransferSyntaxUID == ts
    assert encoded["PixelData"].is_undefined_length  # encapsulated
    assert encoded.PixelData != original.PixelData
    assert encoded.SOPInstanceUID == uid
    assert encoded.file_meta.MediaStorageSOPInstanceUID == uid
    assert np.array_equal(encoded.pixel_array, expected)

    # And back: the encoded instance decoded to each uncompressed syntax is the original.
    for native in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        decoded = _reread(part10(transcode(copy.deepcopy(encoded), native)))
        assert decoded.file_meta.TransferSyntaxUID == native
        assert decoded.SOPInstanceUID == uid
        assert decoded.PixelData == original.PixelData


def test_one_codec_into_another_and_deflated() -> None:
    original = _image("ct-signed")
    rle = _reread(part10(transcode(copy.deepcopy(original), RLELossless)))
    jls = _reread(part10(transcode(rle, JPEGLSLossless)))
    assert jls.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(jls.pixel_array, original.pixel_array)

    flat = _image("multiframe")
    flat.PixelData = bytes(len(flat.PixelData))  # compressible
    deflated = part10(transcode(copy.deepcopy(flat), DeflatedExplicitVRLittleEndian))
    assert len(deflated) < len(part10(flat)) // 2
    back = _reread(deflated)
    assert back.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert back.PixelData == flat.PixelData


def test_an_object_without_pixel_data_takes_any_syntax_as_its_explicit_encoding() -> None:
    sr = _image("ct-signed")
    del sr.PixelData
    for ts in CODECS:
        back = _reread(part10(transcode(copy.deepcopy(sr), ts)))
        assert back.file_meta.TransferSyntaxUID == ts
        assert back.SOPInstanceUID == sr.SOPInstanceUID and back.StudyDescription == "CHEST CT"


def test_what_cannot_be_given_is_refused_with_a_reason() -> None:
    stored = str(ExplicitVRLittleEndian)
    for wanted, words in [
        (str(JPEGBaseline8Bit), "lossy"),
        ("1.2.840.10008.1.2.4.91", "lossy"),
        ("1.2.3.4", "not a transfer syntax"),
        ("not-a-uid", "not a transfer syntax"),
        ("1.2.840.10008.1.2.4.100", "does not encode"),  # MPEG-2
    ]:
        with pytest.raises(CannotGive, match=words):
            check_syntax(stored, wanted)
    check_syntax(str(JPEGBaseline8Bit), str(JPEGBaseline8Bit))  # as stored: always
    check_syntax(str(JPEGBaseline8Bit), str(ExplicitVRLittleEndian))  # libjpeg decodes it

    binary = _image("ct-signed")  # a BINARY segmentation's layout: 1 bit
    binary.BitsAllocated, binary.BitsStored, binary.HighBit, binary.PixelRepresentation = 1, 1, 0, 0
    binary.PixelData = bytes(SIDE * SIDE // 8)
    for ts in CODECS:
        with pytest.raises(CannotGive, match="1 bits stored"):
            check_pixels(binary, stored, ts)
        with pytest.raises(CannotGive):
            transcode(copy.deepcopy(binary), ts)
    check_pixels(binary, stored, str(ImplicitVRLittleEndian))  # native: anything goes

    small = ct_instance(generate_uid(), generate_uid(), size=16)
    with pytest.raises(CannotGive, match="32 pixels"):
        check_pixels(small, stored, str(JPEG2000Lossless))
    check_pixels(small, stored, str(JPEGLSLossless))


@pytest.mark.parametrize("ts", CODECS)
def test_frames_are_encoded_alone_and_decode_to_their_own_pixels(ts: str) -> None:
    original = _image("multiframe")
    expected = original.pixel_array.copy()
    stored_rle = _reread(part10(transcode(copy.deepcopy(original), RLELossless)))
    for source in (original, stored_rle):
        frames = encode_frames(copy.deepcopy(source), [3, 1], ts)
        assert len(frames) == 2
        for frame, number in zip(frames, [3, 1], strict=True):
            single = copy.deepcopy(original)
            single.NumberOfFrames = 1
            single.PixelData = encapsulate([frame])
            single.file_meta.TransferSyntaxUID = ts
            assert np.array_equal(single.pixel_array, expected[number - 1])


def test_stored_jpeg_ls_and_jpeg_2000_decode_to_little_endian(tmp_path: Path) -> None:
    """Instances stored compressed by someone else are decoded by the installed handlers."""
    for ts in (JPEGLSLossless, JPEG2000Lossless):
        original = _image("mono-12bit")
        stored = copy.deepcopy(original)
        stored.compress(ts, generate_instance_uid=False)
        path = tmp_path / f"{ts}.dcm"
        stored.save_as(path, enforce_file_format=True)
        back = _reread(part10(transcode(pydicom.dcmread(path), ExplicitVRLittleEndian)))
        assert back.PixelData == original.PixelData
        assert back.SOPInstanceUID == original.SOPInstanceUID
