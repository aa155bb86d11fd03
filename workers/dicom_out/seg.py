"""DICOM Segmentation writer: the lung mask and each detected lesion of a CT series as one BINARY
SEG instance (segment 1 "Lung", then "Lesion N" per non-empty label N), labelled NOT FOR CLINICAL
USE, with UIDs derived from a seed so that reprocessing the same input gives the same instance.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from workers.dicom_out import long_string

__all__ = [
    "LESION_PROPERTY_TYPE",
    "LUNG_TRACKING_ID",
    "NOT_FOR_CLINICAL_USE",
    "build_segmentation",
    "derive_uid",
    "lesion_tracking_id",
]

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
LUNG_TRACKING_ID = "Lung"
# "Nodule" describes shape only; "Neoplasm" or "Mass" would claim a diagnosis (or a size above
# 3 cm) that a segmentation model trained on synthetic lesions cannot support.
LESION_PROPERTY_TYPE = codes.SCT.Nodule

# Fixed namespace: changing it would change every seeded UID ever issued.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/radai/dicom_out")


def derive_uid(seed: str, purpose: str) -> str:
    """A UID under the UUID arc (2.25) that depends only on ``seed`` and ``purpose``."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{purpose}:{seed}').int}"


def lesion_tracking_id(label: int) -> str:
    """The tracking identifier shared by a lesion's SEG segment and its SR measurement group."""
    return f"Lesion {label}"


def _uid(seed: str | None, purpose: str) -> str:
    return hd.UID() if seed is None else derive_uid(seed, purpose)


def _algorithm_identification(name: str, version: str) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence of the radai model that produced the masks."""
    return hd.AlgorithmIdentificationSequence(
        name=name,
        family=codes.DCM.ArtificialIntelligence,
        version=long_string.as_one(version),
        source="radai",
    )


def _check_inputs(
    source_images: list[pydicom.Dataset], lung_mask: np.ndarray, lesion_labels: np.ndarray
) -> None:
    if not source_images:
        raise ValueError("source_images is empty")
    expected = (len(source_images), int(source_images[0].Rows), int(source_images[0].Columns))
    for name, array in (("lung_mask", lung_mask), ("lesion_labels", lesion_labels)):
        if array.shape != expected:
            raise ValueError(f"{name} has shape {array.shape}, expected (z, y, x) = {expected}")
    if lesion_labels.dtype.kind not in "iub" or (
        lesion_labels.dtype.kind == "i" and lesion_labels.size and lesion_labels.min() < 0
    ):
        raise ValueError("lesion_labels must hold non-negative integer labels")


def _present_labels(lesion_labels: np.ndarray, planes: np.ndarray) -> list[int]:
    """The non-zero labels, in increasing order, found plane by plane (np.unique would sort a
    copy of the whole volume)."""
    found: set[int] = set()
    for z in planes:
        found.update(int(v) for v in np.unique(lesion_labels[z]))
    return sorted(found - {0})


def _segment_codes(
    lung_mask: np.ndarray, lesion_labels: np.ndarray, labels: list[int], planes: np.ndarray
) -> np.ndarray:
    """(planes, rows, cols) codes on the given planes only, for `_Segmentation`: bit 0 set in
    the lung, and the lesion's index in ``labels`` (1-based) above it; filled plane by plane so
    that no whole-volume temporary is made."""
    dtype = np.uint8 if len(labels) < 128 else np.uint16 if len(labels) < 32768 else np.uint32
    index = np.zeros(max(labels, default=0) + 1, dtype=dtype)
    index[labels] = np.arange(1, len(labels) + 1)
    codes = np.empty((len(planes), *lung_mask.shape[1:]), dtype=dtype)
    for i, z in enumerate(planes):
        np.left_shift(index[lesion_labels[z]], 1, out=codes[i])
        codes[i] |= lung_mask[z] != 0
    return codes


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, fed one compact code array instead of a stack of masks.

    highdicom takes overlapping segments only as a (planes, rows, cols, segments) stack, one
    byte a voxel per segment, and checks for overlap by summing that stack into an int64 array:
    for a clinical CT with a dozen lesions that is several gigabytes. Here each voxel holds one
    code (bit 0: lung; the rest: the lesion's index in the segment list, from
    `_segment_codes`), each segment's frame is cut from it plane by plane, and the overlap is
    found a plane at a time. Only `build_segmentation` constructs this class, always with such
    codes; the frames, and so the SEG, are those highdicom makes from the stack.
    """

    @classmethod
    def _check_and_cast_pixel_array(  # type: ignore[override]
        cls,
        pixel_array: np.ndarray,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray, hd.seg.SegmentsOverlapValues]:
        overlap = any(bool(np.any((plane & 1).astype(bool) & (plane > 1))) for plane in pixel_array)
        values = hd.seg.SegmentsOverlapValues
        return pixel_array, values.YES if overlap else values.NO

    @staticmethod
    def _get_segment_pixel_array(  # type: ignore[override]
        pixel_array: np.ndarray,
        segment_number: int,
        described_segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        max_fractional_value: int,
        dtype: type,
    ) -> np.ndarray:
        if segment_number == 1:
            return (pixel_array & 1).astype(dtype)
        return ((pixel_array >> 1) == segment_number - 1).astype(dtype)


def build_segmentation(
    source_images: list[pydicom.Dataset],
    lung_mask: np.ndarray,
    lesion_labels: np.ndarray,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 901,
    instance_uid_seed: str | None = None,
    tracking: Mapping[int, tuple[str, str]] | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG of the lungs and lesions of a single-frame CT series.

    ``source_images`` are the series' datasets in the order of the masks' first axis; both masks
    are (z, y, x) with one z per source image. Segment 1 is "Lung"; then one segment per lesion
    label present in ``lesion_labels``, in increasing label order, labelled and tracked as
    "Lesion N" (N is the label, so segment numbers skip nothing even where labels do). Frames
    without any segmented pixel are left out. With ``instance_uid_seed`` every UID the SEG
    creates (series, instance, tracking, dimension organization) is derived from it; without,
    they are random. ``tracking`` maps a label to the nodule's (Tracking UID, Tracking ID), the
    same in every study of the patient (follow-up); the segment label stays "Lesion N".
    """
    lung_mask = np.asarray(lung_mask)
    lesion_labels = np.asarray(lesion_labels)
    _check_inputs(source_images, lung_mask, lesion_labels)
    if lesion_labels.dtype == bool:
        lesion_labels = lesion_labels.view(np.uint8)

    algorithm = _algorithm_identification(algorithm_name, algorithm_version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="Lung",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Lung,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=LUNG_TRACKING_ID,
            tracking_uid=_uid(instance_uid_seed, "seg.tracking.lung"),
        )
    ]
    # Only the planes with anything segmented go to highdicom (it leaves the empty ones out
    # anyway): its checks make whole-array temporaries, one of them int64.
    planes = np.flatnonzero(lung_mask.any(axis=(1, 2)) | lesion_labels.any(axis=(1, 2)))
    if planes.size == 0:
        planes = np.arange(len(source_images))  # nothing at all: every frame, as highdicom does
    labels = _present_labels(lesion_labels, planes)
    for label in labels:
        uid, tracking_id = (tracking or {}).get(
            label,
            (_uid(instance_uid_seed, f"seg.tracking.lesion.{label}"), lesion_tracking_id(label)),
        )
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=len(descriptions) + 1,
                segment_label=lesion_tracking_id(label),
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=LESION_PROPERTY_TYPE,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_id=tracking_id,
                tracking_uid=uid,
                anatomic_regions=[codes.SCT.Lung],
            )
        )

    seg = _Segmentation(
        source_images=source_images,
        pixel_array=_segment_codes(lung_mask, lesion_labels, labels, planes),
        plane_positions=[
            hd.PlanePositionSequence(
                hd.CoordinateSystemNames.PATIENT, source_images[z].ImagePositionPatient
            )
            for z in planes
        ],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(instance_uid_seed, "seg.series"),
        series_number=series_number,
        sop_instance_uid=_uid(instance_uid_seed, "seg.instance"),
        instance_number=1,
        manufacturer="radai",
        manufacturer_model_name=algorithm_name,
        # highdicom's hint says str or tuple[str]; it takes a list of values as pydicom does.
        software_versions=cast("str | tuple[str]", long_string.as_values(algorithm_version)),
        # Required by Enhanced General Equipment; software has no serial number of its own.
        device_serial_number="1",
        content_label="RADAI_SEG",
        content_description=f"radai lung and lesion segmentation - {NOT_FOR_CLINICAL_USE}",
        omit_empty_frames=True,
        series_description=f"radai SEG - {NOT_FOR_CLINICAL_USE}",
    )
    if instance_uid_seed is not None:
        # highdicom draws this one at random; seeded, a rerun should differ only in its dates.
        dimension_uid = derive_uid(instance_uid_seed, "seg.dimension-organization")
        for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
            item.DimensionOrganizationUID = dimension_uid
    seg.ImageComments = (
        f"{NOT_FOR_CLINICAL_USE}. Research software output ({algorithm_name} "
        f"{algorithm_version}); not validated for diagnosis or patient care."
    )
    return seg
