"""WADO-RS answers from the archive: instances in the transfer syntax asked for when one can be
given (as stored, decoded to Explicit or Implicit VR Little Endian, or encoded into a lossless
syntax: `dicomweb.transcode`), streamed one instance at a time; metadata as DICOM JSON with bulk
data by URI; frames and bulk data, also transcoded; and rendered PNG/JPEG images and thumbnails
windowed as the viewer does (`dicom_io.windows`)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_io.windows import WINDOW_PRESETS
from dicomweb.errors import bad_request, not_acceptable, not_found
from dicomweb.index import StoredInstance
from dicomweb.multipart import Choice, FilePart, Part, media_matches
from dicomweb.transcode import (
    PIXEL_CODECS,
    UNCOMPRESSED,
    CannotGive,
    check_pixels,
    check_syntax,
    decode,
    encode_frames,
    name,
    part10,
    transcode,
)

log = logging.getLogger("radai.dicomweb")

DICOM = "application/dicom"
OCTETS = "application/octet-stream"
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
# The syntax a frame media type means when the Accept names none (PS3.18 table 8.7.3-5), and
# the older names clients still send.
FRAME_DEFAULT_SYNTAX = {
    "image/jpeg": str(JPEGLosslessSV1),
    "image/jls": str(JPEGLSLossless),
    "image/jp2": str(JPEG2000Lossless),
    "image/dicom-rle": str(RLELossless),
}
MEDIA_ALIASES = {"image/x-jls": "image/jls", "image/x-dicom-rle": "image/dicom-rle"}


def _read(path) -> Dataset:  # noqa: ANN001
    return pydicom.dcmread(path)


def _header(path) -> Dataset:  # noqa: ANN001
    """The instance with its large values left on disk (read if touched): enough to check its
    pixel attributes and whether it has pixel data."""
    try:
        return pydicom.dcmread(path, defer_size=4096)
    except Exception as exc:  # noqa: BLE001 - an archived file that no longer parses
        raise CannotGive(f"cannot read the archived file: {exc}") from None


def _target(inst: StoredInstance, transfer_syntax: str | None) -> str:
    if transfer_syntax == "*":
        return inst.transfer_syntax
    return transfer_syntax or str(ExplicitVRLittleEndian)


@dataclass(frozen=True)
class Planned:
    """An instance and the syntaxes it may be given in, the client's preference first."""

    inst: StoredInstance
    syntaxes: tuple[str, ...]


def plan(instances: Sequence[StoredInstance], choices: Sequence[Choice]) -> list[Planned]:
    """Each instance's acceptable syntaxes that the installed handlers can give it in (its
    header is read only when a pixel codec must be checked); 406 with the reasons when an
    instance has none."""
    reasons: list[str] = []
    asked: list[str | None] = []
    for choice in choices:
        if not choice.multipart or not media_matches(DICOM, choice.media_type):
            reasons.append(f"{choice.media_type}: not a multipart of {DICOM}")
        else:
            asked.append(choice.transfer_syntax)
    if not asked:
        raise not_acceptable("; ".join(reasons) or "nothing acceptable")
    planned = []
    for inst in instances:
        why: list[str] = []
        header: Dataset | None = None
        syntaxes: list[str] = []
        for ts in dict.fromkeys(_target(inst, a) for a in asked):
            try:
                check_syntax(inst.transfer_syntax, ts)
                if ts != inst.transfer_syntax and UID(ts) in PIXEL_CODECS:
                    header = header if header is not None else _header(inst.path)
                    check_pixels(header, inst.transfer_syntax, ts)
                syntaxes.append(ts)
            except CannotGive as exc:
                why.append(str(exc))
        if not syntaxes:
            raise not_acceptable(f"{inst.sop_uid}: " + "; ".join(reasons + why))
        planned.append(Planned(inst, tuple(syntaxes)))
    return planned


def _give(planned: Planned) -> Part | FilePart:
    """The instance's part in the first of its syntaxes that works: as stored, the file itself
    (read while sent); else transcoded in memory."""
    inst, why = planned.inst, []
    for ts in planned.syntaxes:
        content_type = f"{DICOM}; transfer-syntax={ts}"
        if ts == inst.transfer_syntax:
            return FilePart(content_type, inst.path)
        try:
            ds = _read(inst.path)
        except Exception as exc:  # noqa: BLE001 - an archived file that no longer parses
            why.append(f"cannot read the archived file: {exc}")
            continue
        try:
            return Part(content_type, part10(transcode(ds, ts)))
        except CannotGive as exc:
            why.append(str(exc))
    raise CannotGive(f"{inst.sop_uid}: " + "; ".join(why))


def retrieve(
    instances: Sequence[StoredInstance], choices: Sequence[Choice]
) -> Iterator[Part | FilePart]:
    """One application/dicom part per instance, each in the first acceptable syntax it can be
    given in, made one at a time as the response is sent. Everything that can refuse is decided
    before the first part: 406 with the reasons when an instance has no acceptable syntax the
    installed handlers can give it in (`plan`) or the first cannot be encoded. A later instance
    whose handler fails in every acceptable syntax (damaged pixel data) ends the body without
    its closing delimiter, so the client sees an incomplete response, and is logged."""
    planned = plan(instances, choices)
    try:
        first = _give(planned[0])
    except CannotGive as exc:
        raise not_acceptable(str(exc)) from None
    return _parts(first, planned[1:])


def _parts(first: Part | FilePart, rest: Sequence[Planned]) -> Iterator[Part | FilePart]:
    yield first
    for planned in rest:
        try:
            yield _give(planned)
        except CannotGive as exc:
            log.error("WADO-RS response cut short, its closing delimiter not sent: %s", exc)
            raise


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
    """One attribute's value as an application/octet-stream part. Pixel data in the syntax
    asked for: as stored (`*` or its syntax: the encapsulated fragments of a compressed one),
    native when none or an uncompressed one is named (PS3.18's default; decoded if stored
    compressed), or encapsulated in a lossless pixel codec radai encodes."""
    wanted = [c for c in choices if media_matches(OCTETS, c.media_type)]
    if not wanted:
        raise not_acceptable("bulk data is given as application/octet-stream only")
    ds = _read(inst.path)
    element = ds.get(tag)
    if element is None or element.VR == "SQ" or not isinstance(element.value, bytes):
        raise not_found(f"no bulk data at {tag:08X} in {inst.sop_uid}")
    if tag != 0x7FE00010:
        return Part(OCTETS, element.value)
    stored, reasons = inst.transfer_syntax, []
    for choice in wanted:
        ts = _target(inst, choice.transfer_syntax)
        try:
            check_syntax(stored, ts)
            if ts == stored:
                given = ds
            elif UID(ts) in UNCOMPRESSED:
                given = _read(inst.path)
                decode(given)
            elif UID(ts) in PIXEL_CODECS:
                given = transcode(_read(inst.path), ts)
            else:
                raise CannotGive(f"pixel data is not given alone in {name(ts)}")
            if UID(ts).is_compressed:
                return Part(f"{OCTETS}; transfer-syntax={ts}", given.PixelData)
            return Part(OCTETS, given.PixelData)
        except CannotGive as exc:
            reasons.append(str(exc))
    raise not_acceptable("; ".join(reasons))


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


def _frame_target(stored: str, choice: Choice) -> tuple[str, str]:
    """(transfer syntax, part media type) of frames for one Accept choice: `*` as stored, a
    named syntax, else the choice's compressed media type as stored when it is (its default
    syntax when not), else native Explicit VR Little Endian. Compressed frames are their
    image/... type, or application/octet-stream when that is asked for with a syntax named."""
    media = MEDIA_ALIASES.get(choice.media_type, choice.media_type)
    if choice.transfer_syntax == "*":
        ts = stored
    elif choice.transfer_syntax:
        ts = choice.transfer_syntax
    elif media in FRAME_DEFAULT_SYNTAX:
        ts = stored if FRAME_MEDIA.get(stored) == media else FRAME_DEFAULT_SYNTAX[media]
    else:
        ts = str(ExplicitVRLittleEndian)
    if UID(ts) in UNCOMPRESSED:
        ts = str(ExplicitVRLittleEndian)  # native frames are the same bytes either way
    offered = FRAME_MEDIA.get(ts, OCTETS)
    if media_matches(offered, media):
        return ts, offered
    if choice.transfer_syntax and media == OCTETS:
        return ts, OCTETS  # compressed frames as octets when the syntax is named (or `*`)
    raise CannotGive(f"frames in {name(ts)} are {offered}, not {choice.media_type}")


def frames(inst: StoredInstance, numbers: Sequence[int], choices: Sequence[Choice]) -> list[Part]:
    """The frames asked for, each a part in the first acceptable form: as stored (compressed
    frames as they are), native (application/octet-stream, decoded if stored compressed), or
    each frame encoded alone in a lossless pixel codec radai encodes (image/jls, image/jp2,
    image/dicom-rle); 406 with the reasons when none can be given."""
    ds = _read(inst.path)
    if "PixelData" not in ds:
        raise not_found(f"{inst.sop_uid} has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if max(numbers) > count:
        raise not_found(f"{inst.sop_uid} has {count} frame(s), not {max(numbers)}")
    stored = inst.transfer_syntax
    reasons = []
    for choice in choices:
        try:
            ts, media = _frame_target(stored, choice)
            check_syntax(stored, ts)
            content_type = f"{media}; transfer-syntax={ts}"
            if ts == stored and UID(ts).is_compressed:
                wanted = set(numbers)
                found = {
                    n: frame
                    for n, frame in enumerate(
                        generate_frames(ds.PixelData, number_of_frames=count), start=1
                    )
                    if n in wanted
                }
                return [Part(content_type, found[n]) for n in numbers]
            if UID(ts) in UNCOMPRESSED:
                given = _read(inst.path) if UID(stored).is_compressed else ds
                decode(given)
                native = _native_frames(given, count)
                return [Part(content_type, native[n - 1]) for n in numbers]
            if UID(ts) in PIXEL_CODECS:
                encoded = encode_frames(_read(inst.path), numbers, ts)
                return [Part(content_type, frame) for frame in encoded]
            raise CannotGive(f"frames are not given in {name(ts)}")
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
