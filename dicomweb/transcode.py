"""Changing an instance's transfer syntax for WADO-RS with pydicom's pixel handlers (installed
with radai: pylibjpeg with its libjpeg, openjpeg and RLE plugins, pyjpegls, and pydicom's own RLE
encoder).

radai decodes every stored syntax an installed handler reads and encodes into the lossless
syntaxes an installed handler writes: RLE Lossless, JPEG-LS Lossless and JPEG 2000 Lossless (the
pixel codecs), Deflated Explicit VR Little Endian, and Explicit or Implicit VR Little Endian.
It never encodes a lossy syntax: the archive's pixels would be altered. A lossless change keeps
the SOP Instance UID (PS3.5 annex A); an object without Pixel Data in a pixel codec's syntax is
its Explicit VR Little Endian encoding under that syntax's UID, as PS3.5 A.4 allows.

`check_syntax` answers from the two UIDs and the installed handlers alone (nothing read), so a
multipart response can refuse (406) before its first byte; `check_pixels` adds what a header
says (a codec's bits, samples and photometric interpretation, PS3.5 section 8).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
NATIVE = (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian)  # pixel data stays native
PIXEL_CODECS = (RLELossless, JPEGLSLossless, JPEG2000Lossless)  # lossless, encoded by radai
# Lossy syntaxes (PS3.5 8.2 and 8.4) radai decodes but never produces.
LOSSY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component (lossy allowed)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (lossy allowed)
        "1.2.840.10008.1.2.4.110",  # JPEG XL (lossy allowed)
        "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG recompression
    }
)
# pylibjpeg-openjpeg always encodes six resolution levels: each side needs 2**5 pixels.
J2K_MIN_SIDE = 32
# Pixel elements an encapsulated syntax cannot hold (PS3.5 A.4 covers Pixel Data only).
_FLOAT_PIXELS = ("FloatPixelData", "DoubleFloatPixelData")
_UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")


class CannotGive(Exception):
    """This transfer syntax (or this choice of the Accept header) cannot be given."""


def name(ts: str) -> str:
    uid = UID(ts)
    return f"{uid.name} ({ts})" if uid.name != ts else ts


def producible() -> list[str]:
    """The transfer syntaxes radai can encode instances into with what is installed now."""
    return [*NATIVE, *(ts for ts in PIXEL_CODECS if get_encoder(ts).is_available)]


def check_syntax(stored: str, wanted: str) -> None:
    """CannotGive unless an instance stored in `stored` can be given in `wanted` by the
    installed handlers, as far as the UIDs alone tell."""
    if wanted == stored:
        return
    if not _UID_TEXT.fullmatch(wanted):
        raise CannotGive(f"{wanted[:80]!r} is not a transfer syntax radai knows")
    uid = UID(wanted)
    if uid.is_private or not uid.is_transfer_syntax:
        raise CannotGive(f"{wanted!r} is not a transfer syntax radai knows")
    if uid in LOSSY:
        raise CannotGive(f"radai does not encode {name(wanted)}: it is lossy")
    if uid not in NATIVE and uid not in PIXEL_CODECS:
        raise CannotGive(f"radai does not encode {name(wanted)}")
    if uid in PIXEL_CODECS and not get_encoder(uid).is_available:
        raise CannotGive(f"no encoder for {name(wanted)} is installed")
    if UID(stored).is_compressed and not get_decoder(UID(stored)).is_available:
        raise CannotGive(f"no decoder for the stored {name(stored)} is installed")


def check_pixels(ds: Dataset, stored: str, wanted: str) -> None:
    """CannotGive when the image pixel attributes of `ds` (a header is enough) do not fit the
    pixel codec `wanted` (PS3.5 section 8), or it holds float pixel data."""
    if wanted == stored or UID(wanted) not in PIXEL_CODECS:
        return
    if any(k in ds for k in _FLOAT_PIXELS):
        raise CannotGive(f"float pixel data cannot be encoded in {name(wanted)}")
    if "PixelData" not in ds:
        return
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if UID(stored).is_compressed and samples == 3:
        photometric = "RGB"  # decoding gives RGB (pydicom converts YBR)
    values = (
        photometric,
        samples,
        int(ds.get("PixelRepresentation", 0) or 0),
        int(ds.get("BitsAllocated", 0) or 0),
        int(ds.get("BitsStored", 0) or 0),
    )
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if UID(wanted) == JPEG2000Lossless and min(rows, columns) < J2K_MIN_SIDE:
        raise CannotGive(
            f"{name(wanted)} is encoded with {J2K_MIN_SIDE} pixels or more each way "
            f"(openjpeg's six resolution levels), not {rows}x{columns}"
        )
    for profile in ENCODING_PROFILES.get(UID(wanted), []):
        if values[:2] == profile[:2] and all(
            v in allowed for v, allowed in zip(values[2:], profile[2:], strict=True)
        ):
            return
    raise CannotGive(
        f"{name(wanted)} cannot hold {values[0]} pixels of {values[4]} bits stored in "
        f"{values[3]} allocated, {values[1]} sample(s) per pixel"
    )


def decode(ds: Dataset) -> None:
    """Decode compressed pixel data in place to Explicit VR Little Endian (same UID)."""
    stored = ds.file_meta.TransferSyntaxUID
    if not stored.is_compressed:
        return
    if "PixelData" not in ds:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return
    try:
        ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # noqa: BLE001 - a handler's own failure: say why, no traceback
        raise CannotGive(f"cannot decode the stored {name(stored)}: {exc}") from None


def transcode(ds: Dataset, wanted: str) -> Dataset:
    """`ds` changed in place into `wanted` (already checked by `check_syntax`), keeping its
    SOP Instance UID; CannotGive when a handler fails."""
    stored = str(ds.file_meta.TransferSyntaxUID)
    if stored == wanted:
        return ds
    check_pixels(ds, stored, wanted)
    decode(ds)
    uid = UID(wanted)
    if uid in PIXEL_CODECS and "PixelData" in ds:
        try:
            ds.compress(uid, generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001
            raise CannotGive(f"cannot encode in {name(wanted)}: {exc}") from None
    ds.file_meta.TransferSyntaxUID = uid
    return ds


def part10(ds: Dataset) -> bytes:
    """The DICOM file (Part 10) of `ds` in its file meta's transfer syntax."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode_frames(ds: Dataset, numbers: Sequence[int], wanted: str) -> list[bytes]:
    """The frames `numbers` (from 1) of `ds` each encoded alone in the pixel codec `wanted`
    (the content of an image/jls, image/jp2 or image/dicom-rle part); only those frames are
    encoded."""
    stored = str(ds.file_meta.TransferSyntaxUID)
    check_pixels(ds, stored, wanted)
    decode(ds)
    encoder = get_encoder(UID(wanted))
    try:
        return [encoder.encode(ds, index=n - 1) for n in numbers]
    except Exception as exc:  # noqa: BLE001
        raise CannotGive(f"cannot encode frames in {name(wanted)}: {exc}") from None
