"""WADO-RS retrieval of instances, frames and pixel data: the transfer syntax negotiation of
PS3.18 8.7 (client's order, `*`, 406 with reasons decided before the first byte), and a
response that reads its instances one at a time while it is sent."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    SegmentationStorage,
    generate_uid,
)

from dicomweb import multipart, wado
from dicomweb.errors import HttpError
from dicomweb.index import StoredInstance
from dicomweb.multipart import Choice, FilePart, Part, acceptable, parse
from dicomweb.transcode import CannotGive
from tests.kit.dicomweb import ct_instance, save

STUDY, SERIES = generate_uid(), generate_uid()
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'


def _stored(ds: Dataset, folder: Path) -> StoredInstance:
    path = save(ds, folder)
    return StoredInstance(
        STUDY,
        SERIES,
        ds.SOPInstanceUID,
        ds.SOPClassUID,
        str(ds.file_meta.TransferSyntaxUID),
        path,
    )


def _binary_seg(folder: Path) -> StoredInstance:
    """A BINARY segmentation's pixel layout (1 bit): no pixel codec takes it."""
    ds = ct_instance(STUDY, SERIES, size=16)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = bytes(16 * 16 // 8)
    return _stored(ds, folder)


def _accept(*syntaxes: str) -> list[Choice]:
    header = ", ".join(f"{DICOM_ACCEPT}; transfer-syntax={ts}" for ts in syntaxes)
    return acceptable(header, wado.DICOM)


def _body(parts) -> list[Part]:  # noqa: ANN001
    boundary = multipart.new_boundary()
    body = b"".join(multipart.stream(parts, boundary))
    return parse(body, multipart.content_type(wado.DICOM, boundary))[1]


def test_each_instance_in_the_first_acceptable_syntax_it_can_be_given_in(tmp_path: Path) -> None:
    ct = _stored(ct_instance(STUDY, SERIES, size=16), tmp_path)
    seg = _binary_seg(tmp_path)
    jls = str(JPEGLSLossless)

    # JPEG-LS only: the segmentation cannot be, so nothing is sent (406 naming it and why).
    with pytest.raises(HttpError) as err:
        wado.retrieve([ct, seg], _accept(jls))
    assert err.value.status == 406
    assert seg.sop_uid in err.value.reason and "1 bits stored" in err.value.reason

    # JPEG-LS, else as stored: the CT is encoded, the segmentation sent as stored.
    parts = list(wado.retrieve([ct, seg], _accept(jls, "*;q=0.5")))
    assert [p.content_type for p in parts] == [
        f"application/dicom; transfer-syntax={jls}",
        f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}",
    ]
    assert isinstance(parts[1], FilePart)  # as stored: the file itself, read while sent
    body = _body(parts)
    encoded = pydicom.dcmread(io.BytesIO(body[0].body))
    assert encoded.file_meta.TransferSyntaxUID == jls
    assert np.array_equal(encoded.pixel_array, pydicom.dcmread(ct.path).pixel_array)
    assert body[1].body == seg.path.read_bytes()

    # A lossy or unknown syntax only: 406 with the reason, whatever is stored.
    for ts, words in [("1.2.840.10008.1.2.4.50", "lossy"), ("1.2.3", "not a transfer syntax")]:
        with pytest.raises(HttpError) as err:
            wado.retrieve([ct], _accept(ts))
        assert err.value.status == 406 and words in err.value.reason
    with pytest.raises(HttpError) as err:
        wado.retrieve([ct], acceptable("application/dicom+json", wado.DICOM))
    assert err.value.status == 406


def test_no_syntax_named_means_explicit_little_endian_decoded(tmp_path: Path) -> None:
    original = ct_instance(STUDY, SERIES, size=16)
    rle = _stored(ct_instance(STUDY, SERIES, size=16, rle=True), tmp_path)
    (part,) = _body(wado.retrieve([rle], acceptable(DICOM_ACCEPT, wado.DICOM)))
    ds = pydicom.dcmread(io.BytesIO(part.body))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == rle.sop_uid  # a lossless change keeps the instance's UID
    assert ds.PixelData == original.PixelData
    (stored,) = _body(wado.retrieve([rle], _accept("*")))
    assert stored.body == rle.path.read_bytes()


def test_a_series_is_read_one_instance_at_a_time_while_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instances = [
        _stored(ct_instance(STUDY, SERIES, number=n, size=16), tmp_path) for n in range(1, 21)
    ]
    reads: list[Path] = []
    real_read = wado._read

    def counting_read(path):  # noqa: ANN001, ANN202
        reads.append(Path(path))
        return real_read(path)

    monkeypatch.setattr(wado, "_read", counting_read)
    pieces = multipart.stream(wado.retrieve(instances, _accept(str(RLELossless))), "b0undary")
    # Planning reads no file whole (RLE takes any CT; the headers checked leave pixels on
    # disk); the first part is made before the response starts, so its failure is still a 406.
    assert reads == [instances[0].path]
    heads = 0
    for piece in pieces:
        if piece.startswith(b"--b0undary\r\n"):
            heads += 1
            assert len(reads) == heads  # this part's instance read, none of the next ones
    assert heads == len(instances) and len(reads) == len(instances)


def test_the_body_streams_files_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = ct_instance(STUDY, SERIES, size=256)  # 128 KiB of pixels
    inst = _stored(big, tmp_path)
    monkeypatch.setattr(multipart, "CHUNK", 16 * 1024)
    pieces = list(multipart.stream([FilePart("application/dicom", inst.path)], "b"))
    assert max(len(p) for p in pieces) <= 16 * 1024
    assert b"".join(pieces[1:-2]) == inst.path.read_bytes()


@pytest.mark.parametrize(
    ("accept", "media", "ts"),
    [
        ('multipart/related; type="image/jls"', "image/jls", str(JPEGLSLossless)),
        ('multipart/related; type="image/x-jls"', "image/jls", str(JPEGLSLossless)),
        ('multipart/related; type="image/dicom-rle"', "image/dicom-rle", str(RLELossless)),
        (
            f'multipart/related; type="application/octet-stream"; transfer-syntax={JPEGLSLossless}',
            "application/octet-stream",
            str(JPEGLSLossless),
        ),
    ],
)
def test_frames_are_encoded_into_the_codec_asked_for(
    tmp_path: Path, accept: str, media: str, ts: str
) -> None:
    ds = ct_instance(STUDY, SERIES, size=16)
    ds.NumberOfFrames = 3
    ds.PixelData = np.arange(3 * 16 * 16, dtype=np.int16).reshape(3, 16, 16).tobytes()
    expected = ds.pixel_array.copy()
    inst = _stored(ds, tmp_path)
    parts = wado.frames(inst, [2, 3], acceptable(accept, wado.OCTETS))
    assert [p.content_type for p in parts] == [f"{media}; transfer-syntax={ts}"] * 2
    for part, number in zip(parts, [2, 3], strict=True):
        single = copy.deepcopy(ds)
        single.NumberOfFrames = 1
        single.PixelData = encapsulate([part.body])
        single.file_meta.TransferSyntaxUID = ts
        assert np.array_equal(single.pixel_array, expected[number - 1])


def test_stored_compressed_frames_as_stored_decoded_or_refused(tmp_path: Path) -> None:
    original = ct_instance(STUDY, SERIES, size=16)
    inst = _stored(ct_instance(STUDY, SERIES, size=16, rle=True), tmp_path)
    rle = str(RLELossless)
    (stored_frame,) = generate_frames(pydicom.dcmread(inst.path).PixelData, number_of_frames=1)
    # As stored, as octets when the syntax is named (`*`), or as its own image type.
    for accept, media in [
        ('multipart/related; type="application/octet-stream"; transfer-syntax=*', wado.OCTETS),
        ('multipart/related; type="image/dicom-rle"', "image/dicom-rle"),
    ]:
        (part,) = wado.frames(inst, [1], acceptable(accept, wado.OCTETS))
        assert part.content_type == f"{media}; transfer-syntax={rle}"
        assert part.body == stored_frame
    # No syntax named: native, decoded.
    (native,) = wado.frames(inst, [1], acceptable(None, wado.OCTETS))
    assert (
        native.content_type == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    )
    assert native.body == original.PixelData
    # JPEG (lossless SV1 by default for image/jpeg) is not produced: 406 with the reason.
    with pytest.raises(HttpError) as err:
        wado.frames(inst, [1], acceptable('multipart/related; type="image/jpeg"', wado.OCTETS))
    assert err.value.status == 406 and "does not encode" in err.value.reason


def test_pixel_data_bulk_in_the_syntax_asked_for(tmp_path: Path) -> None:
    original = ct_instance(STUDY, SERIES, size=16)
    inst = _stored(ct_instance(STUDY, SERIES, size=16, rle=True), tmp_path)
    octets = 'multipart/related; type="application/octet-stream"'
    native = wado.bulk(inst, 0x7FE00010, acceptable(octets, wado.OCTETS))
    assert native.content_type == wado.OCTETS and native.body == original.PixelData
    stored = wado.bulk(inst, 0x7FE00010, acceptable(octets + "; transfer-syntax=*", wado.OCTETS))
    assert stored.content_type.endswith(f"transfer-syntax={RLELossless}")
    assert stored.body == pydicom.dcmread(inst.path).PixelData
    jls = str(JPEGLSLossless)
    encoded = wado.bulk(
        inst, 0x7FE00010, acceptable(f"{octets}; transfer-syntax={jls}", wado.OCTETS)
    )
    assert encoded.content_type.endswith(f"transfer-syntax={jls}")
    back = copy.deepcopy(original)
    back.PixelData = encoded.body
    back.file_meta.TransferSyntaxUID = jls
    assert np.array_equal(back.pixel_array, original.pixel_array)


def test_a_later_instance_that_cannot_be_decoded_ends_the_body_unfinished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The response has started, so no 406 can be sent: the body stops without its closing
    delimiter (the client sees an incomplete message, never a short one that looks whole)."""
    good = _stored(ct_instance(STUDY, SERIES, number=1, size=16, rle=True), tmp_path)
    damaged = ct_instance(STUDY, SERIES, number=2, size=16, rle=True)
    damaged.PixelData = encapsulate([b"\x01\x00\x00\x00" + bytes(60) + b"\xff" * 8])
    bad = _stored(damaged, tmp_path)
    pieces = []
    with pytest.raises(CannotGive, match=bad.sop_uid):
        for piece in multipart.stream(
            wado.retrieve([good, bad], _accept("1.2.840.10008.1.2.1")), "b"
        ):
            pieces.append(piece)
    assert pieces and not any(p.startswith(b"--b--") for p in pieces)
    assert bad.sop_uid in caplog.text and "cut short" in caplog.text
    # Asked first, the same instance is refused before anything is sent.
    with pytest.raises(HttpError) as err:
        wado.retrieve([bad, good], _accept("1.2.840.10008.1.2.1"))
    assert err.value.status == 406 and "cannot decode" in err.value.reason
