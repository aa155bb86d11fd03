"""DICOM Segmentation writer: the lung mask and each detected lesion of a CT series as one BINARY
SEG instance (segment 1 "Lung", then "Lesion N" per non-empty label N), labelled NOT FOR CLINICAL
USE, with UIDs derived from a seed so that reprocessing the same input gives the same instance.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

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
        version=version,
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
    if np.issubdtype(lesion_labels.dtype, np.floating) or (lesion_labels < 0).any():
        raise ValueError("lesion_labels must hold non-negative integer labels")


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
    masks = [lung_mask > 0]
    labels = [int(v) for v in np.unique(lesion_labels) if v > 0]
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
        masks.append(lesion_labels == label)

    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=np.stack(masks, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(instance_uid_seed, "seg.series"),
        series_number=series_number,
        sop_instance_uid=_uid(instance_uid_seed, "seg.instance"),
        instance_number=1,
        manufacturer="radai",
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
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
