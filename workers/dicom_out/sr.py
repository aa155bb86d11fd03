"""DICOM SR writer: a TID 1500 Measurement Report (Comprehensive 3D SR) with one TID 1411 group per
lesion referencing its SEG segment (and a TID 1410 group with its long axis drawn on its widest
slice), a lung group, the study's screening probability and a NOT FOR CLINICAL USE statement,
with UIDs derived from a seed like the SEG's.

For OHIF (3.13.2), which merges the measurement groups that share a Tracking Unique Identifier
into one measurement and draws only those with image coordinates: a lesion's planar and
volumetric groups carry the same tracking identifier and UID (they describe the same nodule), so
OHIF draws the long axis labelled with the lesion's volume and diameters; and the lesion groups
come first, since OHIF's SR viewport opens on the first measurement. The lung and screening
groups have no image coordinates to give; radai's OHIF config (viewer/ohif.py) makes OHIF skip
them rather than fail.

Follow-up: each lesion group carries the nodule's Tracking Identifier and Tracking Unique
Identifier, the same in every study of the patient, and, when it was matched in the prior study,
its change (volume change, doubling time, diameter change) and a comparison text; the report
names the prior study (a Comparison to previous studies text and its Study Instance UID) and its
images are listed as Pertinent Other Evidence, or it says why no prior was compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from workers.dicom_out import long_string
from workers.dicom_out.axial_line import AxialLine
from workers.dicom_out.seg import (
    LESION_PROPERTY_TYPE,
    LUNG_TRACKING_ID,
    NOT_FOR_CLINICAL_USE,
    derive_uid,
    lesion_tracking_id,
)

__all__ = [
    "MAX_2D_AXIAL_DIAMETER",
    "MAX_3D_DIAMETER",
    "LUNG_VOLUME",
    "MEAN_HU",
    "PriorReference",
    "SCREENING_PROBABILITY",
    "SCREENING_TRACKING_ID",
    "VOLUME",
    "build_measurement_report",
]

# Measurement concepts, each (name, derivation or None, unit). The diameters follow ml.measure,
# which reproduces pyradiomics: the 3D one is the largest distance between vertices of the
# marching-cubes mesh, exactly IBSI "Maximum 3D diameter of a mesh" (L0JK, in CID 7470 Linear
# Measurements); IBSI has no per-slice diameter, so the axial one is SCT Diameter with derivation
# Maximum (CID 7464), which no other measurement here uses. Mean HU is written in the TID 1419
# form, a quantity plus a modifier: Attenuation Coefficient, derivation Mean, unit Hounsfield.
VOLUME = (codes.SCT.Volume, None, codes.UCUM.CubicMillimeter)
MAX_3D_DIAMETER = (codes.IBSI.Maximum3DDiameterOfAMesh, None, codes.UCUM.Millimeter)
MAX_2D_AXIAL_DIAMETER = (codes.SCT.Diameter, codes.SCT.Maximum, codes.UCUM.Millimeter)
MEAN_HU = (codes.DCM.AttenuationCoefficient, codes.SCT.Mean, codes.UCUM.HounsfieldUnit)
LUNG_VOLUME = (codes.SCT.Volume, None, Code("ml", "UCUM", "milliliter"))
# A probability in [0, 1] for the whole study. DCM 111047 "Probability of cancer" is the CAD
# concept for it (CID 6048); change it here if the model's output comes to mean something else.
SCREENING_PROBABILITY = (codes.DCM.ProbabilityOfCancer, None, codes.UCUM.NoUnits)
SCREENING_TRACKING_ID = "Screening"
# The malignancy model's output has no standard concept: it is not a probability of cancer but of
# a rating radiologists would give (LIDC-IDRI, 4-5 of 5), so it gets a code of our own (a private
# coding scheme, "99" prefix per PS3.16) and a text saying what it is.
MALIGNANCY_RATING_PROBABILITY = (
    Code("RADAI-MAL-1", "99RADAI", "Probability of readers' malignancy rating 4-5 of 5"),
    None,
    codes.UCUM.NoUnits,
)
MALIGNANCY_NOTE = (
    "Malignancy score: an estimate of the LIDC-IDRI radiologists' impression (rating 4-5 of 5), "
    "not pathology, not a diagnosis"
)

# Change since the prior study: no DCM or SCT concept names a lesion's volume change,
# volume-doubling time or diameter change, so they get private codes (as the malignancy score
# does), with UCUM units; the comparison itself is DCM 111424 "Comparison to previous studies".
VOLUME_CHANGE = (
    Code("RADAI-FU-1", "99RADAI", "Volume change since prior study"),
    None,
    codes.UCUM.Percent,
)
DOUBLING_TIME = (Code("RADAI-FU-2", "99RADAI", "Volume doubling time"), None, codes.UCUM.Day)
DIAMETER_CHANGE = (
    Code("RADAI-FU-3", "99RADAI", "Maximum 3D diameter change since prior study"),
    None,
    codes.UCUM.Millimeter,
)
COMPARISON = codes.DCM.ComparisonToPreviousStudies
LONG_AXIS = (codes.SCT.LongAxis, None, codes.UCUM.Millimeter)


@dataclass(frozen=True)
class PriorReference:
    """The prior study a report compared with (its images as (SOP class, SOP instance) UIDs), or
    ``reason`` why none was compared."""

    study_uid: str | None = None
    series_uid: str | None = None
    instances: tuple[tuple[str, str], ...] = ()
    study_date: str | None = None
    reason: str | None = None


_QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_PROCEDURE = Code("169069000", "SCT", "Computed tomography of chest")
_DISCLAIMER = (
    f"{NOT_FOR_CLINICAL_USE}. Produced automatically by radai research software; not validated "
    "for diagnosis or patient care."
)
_LESION_KEYS = ("label", "volume_mm3", "max_3d_diameter_mm", "max_2d_axial_diameter_mm")


def _uid(seed: str | None, purpose: str) -> str:
    return hd.UID() if seed is None else derive_uid(seed, purpose)


def _measurement(concept: tuple[Code, Code | None, Code], value: float) -> hd.sr.Measurement:
    name, derivation, unit = concept
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name.meaning} is not a finite number: {value}")
    # The algorithm is identified once per group, which covers its measurements.
    return hd.sr.Measurement(name=name, value=value, unit=unit, derivation=derivation)


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _laterality(location: str | None) -> Code | None:
    """Right or Left when the free-text location names exactly one side."""
    words = set((location or "").lower().replace(",", " ").split())
    right, left = "right" in words, "left" in words
    if right == left:
        return None
    return codes.SCT.Right if right else codes.SCT.Left


def _segments(segmentation: hd.seg.Segmentation) -> dict[str, tuple[int, str | None]]:
    """Segment number and tracking UID of each segment, by tracking identifier."""
    # Keyed by segment label ("Lesion N"): the tracking identifier is the nodule's across studies.
    found = {}
    for item in segmentation.SegmentSequence:
        key = str(item.SegmentLabel)
        found[key] = (int(item.SegmentNumber), item.get("TrackingUID"))
    return found


def _source_images(
    segmentation: hd.seg.Segmentation,
) -> dict[int, list[hd.sr.SourceImageForSegmentation]]:
    """The CT instances under each segment's frames, read from the per-frame derivation items.

    Built here rather than with ReferencedSegment.from_segmentation, which in highdicom 0.28.2
    fails on segments that are described only in per-frame functional groups.
    """
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    seen: dict[int, dict[str, str]] = {}
    for frame in segmentation.PerFrameFunctionalGroupsSequence:
        # A single-segment SEG moves the segment identification to the shared groups.
        identification = frame.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        number = int(identification[0].ReferencedSegmentNumber)
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                seen.setdefault(number, {})[uid] = str(source.ReferencedSOPClassUID)
    return {
        number: [
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=class_uid, referenced_sop_instance_uid=uid
            )
            for uid, class_uid in sources.items()
        ]
        for number, sources in seen.items()
    }


def _referenced_segment(
    segmentation: hd.seg.Segmentation,
    number: int,
    sources: dict[int, list[hd.sr.SourceImageForSegmentation]],
    source_images: Sequence[pydicom.Dataset],
) -> hd.sr.ReferencedSegment:
    images = sources.get(number) or [
        # A segment with no frame (an empty lung mask) still names the series it came from.
        hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID
        )
        for ds in source_images
    ]
    return hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=number,
        source_images=images,
    )


def _lesion_tracking(
    lesion: Mapping[str, Any], segments: dict[str, tuple[int, str | None]], seed: str | None
) -> hd.sr.TrackingIdentifier:
    """The lesion's tracking identifier and UID: the nodule's across studies when follow-up gave
    them, else its SEG segment's (tracked as "Lesion <label>")."""
    label = int(lesion["label"])
    segment_id = lesion_tracking_id(label)
    if segment_id not in segments:
        raise ValueError(f"the segmentation has no segment for lesion label {label}")
    _, segment_uid = segments[segment_id]
    return hd.sr.TrackingIdentifier(
        uid=lesion.get("tracking_uid") or segment_uid or _uid(seed, f"seg.tracking.lesion.{label}"),
        identifier=lesion.get("tracking_id") or segment_id,
    )


def _lesion_group(
    lesion: Mapping[str, Any],
    segmentation: hd.seg.Segmentation,
    segments: dict[str, tuple[int, str | None]],
    sources: dict[int, list[hd.sr.SourceImageForSegmentation]],
    source_images: Sequence[pydicom.Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
    seed: str | None,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    missing = [key for key in _LESION_KEYS if key not in lesion]
    if missing:
        raise ValueError(f"lesion {lesion!r} lacks {missing}")
    tracking = _lesion_tracking(lesion, segments, seed)  # checks the segment is there
    number, _ = segments[lesion_tracking_id(int(lesion["label"]))]
    measurements = [
        _measurement(VOLUME, lesion["volume_mm3"]),
        _measurement(MAX_3D_DIAMETER, lesion["max_3d_diameter_mm"]),
        _measurement(MAX_2D_AXIAL_DIAMETER, lesion["max_2d_axial_diameter_mm"]),
    ]
    if lesion.get("mean_hu") is not None:
        measurements.append(_measurement(MEAN_HU, lesion["mean_hu"]))
    if lesion.get("malignancy_score") is not None:
        score = float(lesion["malignancy_score"])
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"malignancy_score {score} is outside [0, 1]")
        measurements.append(_measurement(MALIGNANCY_RATING_PROBABILITY, score))
    change = lesion.get("change")
    if change:
        measurements.append(_measurement(VOLUME_CHANGE, change["volume_change_pct"]))
        if change.get("doubling_time_days") is not None:
            measurements.append(_measurement(DOUBLING_TIME, change["doubling_time_days"]))
        if change.get("diameter_change_mm") is not None:
            measurements.append(_measurement(DIAMETER_CHANGE, change["diameter_change_mm"]))
    location = lesion.get("location")
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=_referenced_segment(segmentation, number, sources, source_images),
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        finding_type=LESION_PROPERTY_TYPE,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung, laterality=_laterality(location))],
        algorithm_id=algorithm,
        measurements=measurements,
    )
    if location:
        # TID 1411 allows TEXT qualitative evaluations; the zone has no code we can vouch for.
        group[0].ContentSequence.append(_text(codes.SCT.FindingSite, str(location)))
    if lesion.get("malignancy_score") is not None:
        group[0].ContentSequence.append(_text(codes.DCM.Comment, MALIGNANCY_NOTE))
    if change:
        group[0].ContentSequence.append(_text(COMPARISON, _change_text(change)))
    return group


def _long_axis_group(
    lesion: Mapping[str, Any],
    line: AxialLine,
    source_images: Sequence[pydicom.Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
    tracking: hd.sr.TrackingIdentifier,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The lesion's long axis, tracked as the lesion itself (``tracking``: its volumetric
    group's identifier and UID)."""
    label = int(lesion["label"])
    if not 0 <= line.slice_index < len(source_images):
        raise ValueError(f"lesion {label}'s line is on slice {line.slice_index}, not in the series")
    image = source_images[line.slice_index]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=line.graphic_data(),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=image.SOPClassUID,
                referenced_sop_instance_uid=image.SOPInstanceUID,
            ),
        ),
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        finding_type=LESION_PROPERTY_TYPE,
        algorithm_id=algorithm,
        measurements=[_measurement(LONG_AXIS, line.length_mm)],
    )


def _change_text(change: Mapping[str, Any]) -> str:
    vdt = change.get("doubling_time_days")
    interval = change.get("interval_days")
    return (
        f"Matched in prior study {change['prior_study_uid']}"
        + (f" ({interval:.0f} days earlier)" if interval is not None else "")
        + f": volume {change['prior_volume_mm3']:.1f} mm3 then, "
        f"{change['volume_change_pct']:+.1f} % since"
        + (f", volume doubling time {vdt:.0f} days" if vdt is not None else "")
    )


def build_measurement_report(
    source_images: list[pydicom.Dataset],
    segmentation: hd.seg.Segmentation,
    lesions: list[dict],
    *,
    lung_volume_ml: float | None,
    screening_probability: float | None,
    algorithm_name: str,
    algorithm_version: str,
    screening_algorithm: tuple[str, str] | None = None,
    series_number: int = 902,
    instance_uid_seed: str | None = None,
    prior: PriorReference | None = None,
    axial_lines: Mapping[int, AxialLine] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 Measurement Report of the lesions segmented in ``segmentation``.

    Under Imaging Measurements, per lesion in the order given: when ``axial_lines`` (by lesion
    label) has its line, a TID 1410 planar group with its longest axial diameter as a two-point
    POLYLINE on its CT slice (what viewers that draw only image coordinates, OHIF, show), then
    a TID 1411 group referencing the SEG segment tracked as "Lesion <label>", holding volume
    (mm3), maximum 3D and maximum axial diameters (mm) and mean HU (when not None); both groups
    carry the lesion's tracking identifier and UID (the segment's, or the nodule's across
    studies). Then a TID 1411 group for the lungs (SEG segment "Lung"; its volume in ml when
    ``lung_volume_ml`` is given); then, when ``screening_probability`` is given, a TID 1501
    group "Screening" holding it, identified by ``screening_algorithm`` (name, version) when a
    different model scored the study than segmented it. A Qualitative Evaluations container
    states NOT FOR CLINICAL USE and, without lesions, that none was found. Each lesion dict has
    label, volume_mm3, max_3d_diameter_mm, max_2d_axial_diameter_mm, mean_hu and location (free
    text or None), and may have tracking_uid, tracking_id and change
    (db.findings.LesionChange as a dict). ``prior`` names the prior study compared with (or why
    none was).
    """
    if not source_images:
        raise ValueError("source_images is empty")
    if screening_probability is not None and not 0.0 <= screening_probability <= 1.0:
        raise ValueError(f"screening_probability {screening_probability} is outside [0, 1]")
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name,
        version=algorithm_version,
        family=codes.DCM.ArtificialIntelligence,
        manufacturer="radai",
    )
    labels = [int(lesion["label"]) for lesion in lesions]
    if len(set(labels)) != len(labels):
        raise ValueError(f"lesion labels repeat: {labels}")
    segments = _segments(segmentation)
    sources = _source_images(segmentation)
    if LUNG_TRACKING_ID not in segments:
        raise ValueError("the segmentation has no lung segment")
    lung_number, lung_uid = segments[LUNG_TRACKING_ID]

    groups: list[Any] = []
    for lesion in lesions:
        line = (axial_lines or {}).get(int(lesion["label"]))
        if line is not None:
            tracking = _lesion_tracking(lesion, segments, instance_uid_seed)
            groups.append(_long_axis_group(lesion, line, source_images, algorithm, tracking))
        groups.append(
            _lesion_group(
                lesion, segmentation, segments, sources, source_images, algorithm, instance_uid_seed
            )
        )
    groups.append(
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=lung_uid or _uid(instance_uid_seed, "seg.tracking.lung"),
                identifier=LUNG_TRACKING_ID,
            ),
            referenced_segment=_referenced_segment(
                segmentation, lung_number, sources, source_images
            ),
            finding_category=codes.SCT.AnatomicalStructure,
            finding_type=codes.SCT.Lung,
            algorithm_id=algorithm,
            measurements=(
                [_measurement(LUNG_VOLUME, lung_volume_ml)] if lung_volume_ml is not None else None
            ),
        )
    )
    screener = algorithm
    if screening_algorithm is not None:
        screener = hd.sr.AlgorithmIdentification(
            name=screening_algorithm[0],
            version=screening_algorithm[1],
            family=codes.DCM.ArtificialIntelligence,
            manufacturer="radai",
        )
    if screening_probability is not None:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_uid(instance_uid_seed, "sr.tracking.screening"),
                    identifier=SCREENING_TRACKING_ID,
                ),
                algorithm_id=screener,
                measurements=[_measurement(SCREENING_PROBABILITY, screening_probability)],
            )
        )

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # The device is the algorithm itself, so its UID is stable across studies.
        uid=derive_uid(f"{algorithm_name}/{algorithm_version}", "sr.device"),
        name=algorithm_name,
        manufacturer_name="radai",
        model_name=algorithm_name,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
    )
    evaluations = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence([_text(codes.DCM.Comment, _DISCLAIMER)])
    if not lesions:
        evaluations.ContentSequence.append(
            _text(
                codes.DCM.Finding,
                f"No lesion was found by {algorithm_name} {algorithm_version}.",
            )
        )
    if prior is not None:
        evaluations.ContentSequence.extend(_prior_items(prior))
    report[0].ContentSequence.append(evaluations)

    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_images, segmentation],
        content=report[0],
        series_instance_uid=_uid(instance_uid_seed, "sr.series"),
        series_number=series_number,
        sop_instance_uid=_uid(instance_uid_seed, "sr.instance"),
        instance_number=1,
        manufacturer="radai",
        manufacturer_model_name=algorithm_name,
        software_versions=long_string.as_values(algorithm_version),
        series_description=f"radai SR - {NOT_FOR_CLINICAL_USE}",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    if prior is not None and prior.study_uid and prior.series_uid and prior.instances:
        sr.PertinentOtherEvidenceSequence = _evidence(prior)
    return sr


def _prior_items(prior: PriorReference) -> list[Any]:
    if not prior.study_uid:
        return [_text(COMPARISON, f"No prior study was compared: {prior.reason or 'none found'}")]
    when = f" of {prior.study_date}" if prior.study_date else ""
    return [
        _text(COMPARISON, f"Compared with prior study {prior.study_uid}{when}"),
        hd.sr.UIDRefContentItem(
            name=codes.DCM.StudyInstanceUID,
            value=prior.study_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]


def _evidence(prior: PriorReference) -> list[Dataset]:
    """The prior's images as Pertinent Other Evidence (Hierarchical SOP Instance Reference)."""
    refs = []
    for class_uid, instance_uid in prior.instances:
        ref = Dataset()
        ref.ReferencedSOPClassUID = class_uid
        ref.ReferencedSOPInstanceUID = instance_uid
        refs.append(ref)
    series = Dataset()
    series.SeriesInstanceUID = prior.series_uid
    series.ReferencedSOPSequence = DicomSequence(refs)
    study = Dataset()
    study.StudyInstanceUID = prior.study_uid
    study.ReferencedSeriesSequence = DicomSequence([series])
    return [study]
