"""WADO-RS answers from the archive: instances in the transfer syntax asked for when one can be
given (as stored, or uncompressed Explicit or Implicit VR Little Endian, decoding when pydicom
can), metadata as DICOM JSON with bulk data by URI, frames, bulk data, and rendered PNG/JPEG
images and thumbnails windowed as the viewer does (`dicom_io.windows`)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_io.windows import WINDOW_PRESETS
from dicomweb.errors import bad_request, not_acceptable, not_found
from dicomweb.index import StoredInstance
from dicomweb.multipart import Choice, Part, media_matches

DICOM = "application/dicom"
OCTETS = "application/octet-stream"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# PS3.18 table 8.7.3-4/-5: the media type of a compressed frame per transfer syntax.
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class CannotGive(Exception):
    """This choice of the Accept header cannot be given for this object."""


def _read(path) -> Dataset:  # noqa: ANN001
    return pydicom.dcmread(path)


def encode_instance(inst: StoredInstance, transfer_syntax: str | None) -> tuple[bytes, str]:
    """(Part 10 bytes, transfer syntax) of an instance in `transfer_syntax` (None: Explicit VR
    Little Endian, PS3.18's default; "*": as stored); CannotGive when it cannot be had."""
    stored = inst.transfer_syntax
    if transfer_syntax in ("*", stored):
        return inst.path.read_bytes(), stored
    wanted = UID(transfer_syntax or ExplicitVRLittleEndian)
    if wanted not in UNCOMPRESSED:
        raise CannotGive(f"radai does not encode {wanted}")
    ds = _read(inst.path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            ds.decompress()
        except Exception as exc:  # noqa: BLE001 - no decoder for this one
            raise CannotGive(f"cannot decode {stored}: {exc}") from None
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = wanted
    ds.save_as(buf, implicit_vr=wanted == ImplicitVRLittleEndian, little_endian=True)
    return buf.getvalue(), str(wanted)


def retrieve(instances: Sequence[StoredInstance], choices: Sequence[Choice]) -> list[Part]:
    """One application/dicom part per instance, in the first choice that all can be given in;
    406 with the reasons when none can."""
    reasons = []
    for choice in choices:
        if not choice.multipart or not media_matches(DICOM, choice.media_type):
            reasons.append(f"{choice.media_type}: not a multipart of application/dicom")
            continue
        try:
            parts = []
            for inst in instances:
                data, ts = encode_instance(inst, choice.transfer_syntax)
                parts.append(Part(f"{DICOM}; transfer-syntax={ts}", data))
            return parts
        except CannotGive as exc:
            reasons.append(str(exc))
    raise not_acceptable("; ".join(reasons) or "nothing acceptable")


def bulk_uri(base: str, inst: StoredInstance, tag: int) -> str:
    return (
        f"{base}/studies/{inst.study_uid}/series/{inst.series_uid}"
        f"/instances/{inst.sop_uid}/bulk/{tag:08X}"
    )


def metadata(inst: StoredInstance, base: str, threshold: int = 1024) -> dict:
    """The instance as DICOM JSON; binary values over `threshold` bytes and the pixel data as
    BulkDataURIs on this service."""
    ds = pydicom.dcmread(inst.path, stop_before_pixels=True)

    def handler(element) -> str:  # noqa: ANN001
        return bulk_uri(base, inst, int(element.tag))

    doc = ds.to_json_dict(bulk_data_threshold=threshold, bulk_data_element_handler=handler)
    if "Rows" in ds:
        encapsulated = UID(inst.transfer_syntax).is_compressed
        vr = "OB" if encapsulated or int(ds.get("BitsAllocated", 16)) <= 8 else "OW"
        doc["7FE00010"] = {"vr": vr, "BulkDataURI": bulk_uri(base, inst, 0x7FE00010)}
    return doc


def bulk(inst: StoredInstance, tag: int, choices: Sequence[Choice]) -> Part:
    """One attribute's value as an application/octet-stream part (pixel data: native, or the
    encapsulated fragments with their transfer syntax when the client takes them)."""
    if not any(media_matches(OCTETS, c.media_type) for c in choices):
        raise not_acceptable("bulk data is given as application/octet-stream only")
    ds = _read(inst.path)
    element = ds.get(tag)
    if element is None or element.VR == "SQ" or not isinstance(element.value, bytes):
        raise not_found(f"no bulk data at {tag:08X} in {inst.sop_uid}")
    if tag == 0x7FE00010 and UID(inst.transfer_syntax).is_compressed:
        return Part(f"{OCTETS}; transfer-syntax={inst.transfer_syntax}", element.value)
    return Part(OCTETS, element.value)


def parse_frames(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise bad_request(f"frame numbers must be integers: {text!r}") from None
    if not numbers or any(n < 1 for n in numbers):
        raise bad_request(f"frame numbers start at 1: {text!r}")
    return numbers


def _native_frames(ds: Dataset, count: int) -> list[bytes]:
    bits = int(ds.BitsAllocated)
    if bits % 8:
        raise CannotGive("frames of 1-bit pixel data are not split")
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    data = ds.PixelData
    return [data[i * size : (i + 1) * size] for i in range(count)]


def frames(inst: StoredInstance, numbers: Sequence[int], choices: Sequence[Choice]) -> list[Part]:
    """The frames asked for: native (application/octet-stream), or compressed as stored when the
    client takes that media type, or decoded when it wants them uncompressed."""
    ds = _read(inst.path)
    if "PixelData" not in ds:
        raise not_found(f"{inst.sop_uid} has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if max(numbers) > count:
        raise not_found(f"{inst.sop_uid} has {count} frame(s), not {max(numbers)}")
    stored = UID(inst.transfer_syntax)
    reasons = []
    for choice in choices:
        try:
            if stored.is_compressed and choice.transfer_syntax in ("*", str(stored)):
                media = FRAME_MEDIA.get(str(stored), OCTETS)
                if not media_matches(media, choice.media_type):
                    raise CannotGive(f"frames are stored as {media}")
                all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
                return [
                    Part(f"{media}; transfer-syntax={stored}", all_frames[n - 1]) for n in numbers
                ]
            if not media_matches(OCTETS, choice.media_type):
                raise CannotGive(f"{choice.media_type} cannot hold uncompressed frames")
            if choice.transfer_syntax not in (None, "*", ExplicitVRLittleEndian):
                raise CannotGive(f"frames are not encoded in {choice.transfer_syntax}")
            if stored.is_compressed:
                try:
                    ds.decompress()
                except Exception as exc:  # noqa: BLE001
                    raise CannotGive(f"cannot decode {stored}: {exc}") from None
            native = _native_frames(ds, count)
            ts = ExplicitVRLittleEndian
            return [Part(f"{OCTETS}; transfer-syntax={ts}", native[n - 1]) for n in numbers]
        except CannotGive as exc:
            reasons.append(str(exc))
    raise not_acceptable("; ".join(reasons) or "nothing acceptable")


# Rendered ------------------------------------------------------------------------------------

RENDERED = {"image/png": "PNG", "image/jpeg": "JPEG"}


def rendered_type(header: str | None) -> str:
    """The image type to render, from the Accept header (PNG unless JPEG is preferred)."""
    from dicomweb.multipart import acceptable

    for choice in acceptable(header, "image/png"):
        for media in RENDERED:
            if media_matches(media, choice.media_type) or (
                choice.multipart and media_matches(media, choice.media_type)
            ):
                return media
    raise not_acceptable("rendered images are image/png or image/jpeg")


def _window(params: dict[str, str], ds: Dataset) -> tuple[float, float] | None:
    if "window" in params:
        parts = params["window"].split(",")
        try:
            center, width = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise bad_request(
                f"window must be center,width[,function]: {params['window']!r}"
            ) from None
        if width <= 0:
            raise bad_request("window width must be positive")
        return center, width
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = ds.WindowCenter, ds.WindowWidth
        center = center[0] if isinstance(center, Sequence) else center
        width = width[0] if isinstance(width, Sequence) else width
        return float(center), float(width)
    if ds.get("Modality") == "CT":
        return WINDOW_PRESETS["Mediastinum"]
    return None


def _viewport(params: dict[str, str]) -> tuple[int, int] | None:
    if "viewport" not in params:
        return None
    try:
        w, h = (int(v) for v in params["viewport"].split(",")[:2])
    except ValueError:
        raise bad_request(f"viewport must be width,height: {params['viewport']!r}") from None
    if not (0 < w <= 4096 and 0 < h <= 4096):
        raise bad_request("viewport must be 1..4096 pixels each way")
    return w, h


def render(
    inst: StoredInstance,
    media: str,
    params: dict[str, str],
    *,
    frame: int = 1,
    thumbnail: bool = False,
) -> bytes:
    """One frame as a PNG or JPEG, windowed (the request's window, the instance's VOI, a CT
    preset, or its range) and fitted into the viewport (128 pixels for a thumbnail)."""
    ds = _read(inst.path)
    if "PixelData" not in ds:
        raise not_found(f"{inst.sop_uid} has no pixel data to render")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= count:
        raise not_found(f"{inst.sop_uid} has {count} frame(s), not {frame}")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise not_acceptable(f"cannot decode the pixel data to render it: {exc}") from None
    if count > 1:
        pixels = pixels[frame - 1]
    image = _to_8bit(ds, pixels, params)
    size = _viewport(params) or ((128, 128) if thumbnail else None)
    picture = Image.fromarray(image)
    if size is not None:
        picture.thumbnail(size)
    buf = io.BytesIO()
    picture.save(buf, format=RENDERED[media])
    return buf.getvalue()


def _to_8bit(ds: Dataset, pixels: np.ndarray, params: dict[str, str]) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:  # colour: pydicom gives RGB
        if pixels.dtype != np.uint8:
            top = float(pixels.max()) or 1.0
            pixels = (pixels.astype(np.float64) * 255.0 / top).astype(np.uint8)
        return pixels
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    window = _window(params, ds)
    if window is None:
        low, high = float(values.min()), float(values.max())
    else:
        center, width = window
        low, high = center - width / 2.0, center + width / 2.0
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return (scaled * 255.0 + 0.5).astype(np.uint8)


Renderer = Callable[..., bytes]
