"""Images for the study viewer: a CT series as a Hounsfield volume, SEG segments and the saliency
map on the same grid, and axial slices composed into RGB with window/level and overlays.

The series is loaded by the pipeline's own loader (`dicom_io.series`), so the findings'
`slice_index`, the saliency array and the SEG frames (matched by referenced SOP Instance UID) all
line up with the volume's first axis, and a series the pipeline would refuse is refused here with
the same reason. Pure numpy, pydicom and highdicom: no Streamlit here, so the app can cache these
objects and tests can check them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np

from dicom_io.series import SeriesError, load_series
from dicom_io.windows import WINDOW_PRESETS as WINDOW_PRESETS  # the presets the viewer offers

LUNG_COLOR = (0, 150, 255)
LESION_COLORS = [
    (255, 60, 60),
    (255, 200, 0),
    (0, 220, 120),
    (230, 0, 230),
    (255, 130, 0),
    (0, 230, 230),
    (160, 100, 255),
]


class ImagingError(Exception):
    """The series or an overlay cannot be shown; the message is for people (no patient data)."""


@dataclass(frozen=True)
class CTVolume:
    hu: np.ndarray  # int16 (z, y, x), read-only: shared between sessions by the app's cache
    sop_instance_uids: tuple[str, ...]  # in volume order
    # Each slice's position along the slice normal (mm, ascending, volume order): what lines a
    # slice up with another study's; empty for volumes not read from DICOM.
    positions_mm: tuple[float, ...] = ()

    @property
    def slices(self) -> int:
        return int(self.hu.shape[0])


@dataclass(frozen=True)
class Segment:
    number: int
    label: str
    color: tuple[int, int, int]
    layer: int  # index into SegOverlay.layers
    slices: tuple[int, ...]  # volume indices where the segment has pixels
    # The segment's Tracking UID: the same nodule carries it in every study of the patient.
    tracking_uid: str | None = None


@dataclass(frozen=True)
class SegOverlay:
    segments: tuple[Segment, ...]
    # Each layer holds segments that do not overlap, as segment numbers (0: none): the lung and
    # its lesions overlap, so one label map would lose pixels, and one boolean volume per segment
    # would cost far more memory on long series.
    layers: tuple[np.ndarray, ...]


def load_ct(paths: list[str] | tuple[str, ...]) -> CTVolume:
    """The series in HU (int16) in the pipeline's slice order (`dicom_io.series.load_series`)."""
    if not paths:
        raise ImagingError("the series has no instances in the archive")
    try:
        volume = load_series(paths, dtype=np.int16)
    except SeriesError as exc:
        raise ImagingError(str(exc)) from None
    volume.hu.setflags(write=False)
    normal = np.cross(volume.row_cosine, volume.column_cosine)
    positions = tuple(
        float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in volume.datasets
    )
    return CTVolume(
        hu=volume.hu, sop_instance_uids=volume.sop_instance_uids, positions_mm=positions
    )


def load_seg(path: str, volume: CTVolume) -> SegOverlay:
    """The segments of a SEG instance on the volume's grid, matched by source SOP Instance UID."""
    try:
        return _seg_overlay(hd.seg.segread(path), volume)
    except ImagingError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable SEG must not take the viewer down
        raise ImagingError(f"cannot read the SEG: {type(exc).__name__}") from None


def _seg_overlay(seg: hd.seg.Segmentation, volume: CTVolume) -> SegOverlay:
    referenced = {
        str(inst.ReferencedSOPInstanceUID)
        for series in seg.get("ReferencedSeriesSequence", [])
        for inst in series.ReferencedInstanceSequence
    }
    # Instances the SEG never referenced stay empty (highdicom refuses unknown UIDs).
    present = [i for i, uid in enumerate(volume.sop_instance_uids) if uid in referenced]
    if not present:
        raise ImagingError("the SEG does not reference this series")
    uids = [volume.sop_instance_uids[i] for i in present]
    shape = volume.hu.shape
    layers: list[np.ndarray] = []
    segments: list[Segment] = []
    dtype = np.uint8 if len(seg.SegmentSequence) < 256 else np.uint16
    lesion_colors = iter(LESION_COLORS * (1 + len(seg.SegmentSequence) // len(LESION_COLORS)))
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=[number],
            assert_missing_frames_are_empty=True,
            dtype=bool,
        )[..., 0]
        mask = np.zeros(shape, dtype=bool)
        mask[present] = pixels
        layer = next((i for i, lay in enumerate(layers) if not (lay[mask] != 0).any()), None)
        if layer is None:
            layers.append(np.zeros(shape, dtype=dtype))
            layer = len(layers) - 1
        layers[layer][mask] = number
        label = str(item.get("SegmentLabel", f"Segment {number}"))
        color = LUNG_COLOR if label.lower() == "lung" else next(lesion_colors)
        slices = tuple(int(z) for z in np.nonzero(mask.any(axis=(1, 2)))[0])
        tracking = item.get("TrackingUID")
        segments.append(
            Segment(number, label, color, layer, slices, str(tracking) if tracking else None)
        )
    for lay in layers:
        lay.setflags(write=False)
    return SegOverlay(segments=tuple(segments), layers=tuple(layers))


def load_saliency(path: str, volume: CTVolume) -> np.ndarray:
    """The saliency map (float16, volume order, 0..1), checked against the volume's shape."""
    try:
        with np.load(path) as data:
            # The pipeline writes float16: kept as it is, cleaned in place (a float32 copy and
            # two temporaries of a 600-slice map would be gigabytes).
            out = np.array(data["saliency"], dtype=np.float16)
    except (OSError, KeyError, ValueError) as exc:
        raise ImagingError(f"cannot read the saliency map: {type(exc).__name__}") from None
    if out.shape != volume.hu.shape:
        raise ImagingError(f"saliency map {out.shape} does not match the series {volume.hu.shape}")
    # The pipeline writes scores in 0..1; they are shown as they are, not stretched per study,
    # so that a weak map looks weak. NaN and negatives become 0, above 1 (and +inf) 1. Done on
    # the bit patterns: numpy emulates float16 arithmetic, which made this 4x the file's read
    # time, while positive float16 values sort like their bits as unsigned integers.
    bits = out.view(np.uint16)
    bits[(bits & 0x8000) != 0] = 0  # sign set: negatives, -0, -inf, negative NaNs
    bits[bits > 0x7C00] = 0  # the remaining NaNs (exponent all ones, mantissa not zero)
    np.minimum(bits, 0x3C00, out=bits)  # 0x3C00 is 1.0; +inf is 0x7C00
    out.setflags(write=False)
    return out


def window(hu_slice: np.ndarray, center: float, width: float) -> np.ndarray:
    """uint8 grey levels of a HU slice under a window (center, width)."""
    width = max(float(width), 1.0)
    low = center - width / 2
    scaled = (hu_slice.astype(np.float32) - low) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def compose(
    volume: CTVolume,
    z: int,
    center: float,
    width: float,
    *,
    seg: SegOverlay | None = None,
    show_segments: tuple[int, ...] = (),
    seg_opacity: float = 0.4,
    saliency: np.ndarray | None = None,
    saliency_opacity: float = 0.0,
) -> np.ndarray:
    """One axial slice as uint8 RGB (y, x, 3), overlays alpha-blended onto the windowed CT."""
    grey = window(volume.hu[z], center, width).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if saliency is not None and saliency_opacity > 0:
        heat = saliency[z].astype(np.float32)
        # Faint saliency is noise to the eye: only the upper part of the range is tinted.
        alpha = (saliency_opacity * np.clip((heat - 0.2) / 0.8, 0, 1))[..., None]
        color = np.stack([np.full_like(heat, 255), 255 * (1 - heat), np.zeros_like(heat)], -1)
        rgb = rgb * (1 - alpha) + color * alpha
    if seg is not None and show_segments:
        for segment in seg.segments:
            if segment.number not in show_segments:
                continue
            mask = seg.layers[segment.layer][z] == segment.number
            if not mask.any():
                continue
            color = np.asarray(segment.color, dtype=np.float32)
            if seg_opacity > 0:
                rgb[mask] = rgb[mask] * (1 - seg_opacity) + color * seg_opacity
            # A solid outline keeps a small lesion findable under a faint fill, and the
            # tissue inside it readable when the fill is turned down to nothing.
            rgb[outline(mask)] = color
    return np.clip(rgb, 0, 255).astype(np.uint8)


def outline(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """The inner border of a 2D mask, `thickness` pixels wide (4-connected erosion)."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner
