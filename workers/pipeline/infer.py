"""Run the analyser on the volume and describe what it found as `Findings` (db/findings.py).

Takes a `Volume`, its `QAReport` and an `Analyser`; gives the `Analysis`, or ends the study
NOT_APPLICABLE when there is too little lung in view to be a chest CT this pipeline can analyse.
"""

from __future__ import annotations

import numpy as np

from db import StudyState
from db.findings import Findings, Lesion
from dicom_io.series import Volume
from ml.runtime.malignancy import score_lesions
from ml.runtime.qa import QAReport
from ml.runtime.registry import LoadedModel
from workers.pipeline.analysers import Analyser, Analysis
from workers.pipeline.errors import Finished

MIN_LUNG_ML = 200.0  # less than this in view: not a chest CT we can analyse


def run_analyser(analyser: Analyser, volume: Volume) -> Analysis:
    analysis = analyser.analyse(volume.hu, volume.spacing_zyx)
    if analysis.lung_volume_ml < MIN_LUNG_ML:
        raise Finished(
            StudyState.NOT_APPLICABLE,
            f"only {analysis.lung_volume_ml:.0f} ml of lung in the field of view; "
            "not a chest CT this pipeline can analyse",
        )
    return analysis


def grade_lesions(grader: LoadedModel, analysis: Analysis, volume: Volume) -> list[float]:
    """The malignancy model's score for each kept lesion, in the order of `analysis.lesions`."""
    scores = score_lesions(volume.hu, volume.spacing_zyx, analysis.lesion_labels, grader)
    by_label = dict(zip(sorted(m.label for m in analysis.lesions), scores, strict=True))
    return [by_label[m.label] for m in analysis.lesions]


def findings_of(
    analysis: Analysis,
    volume: Volume,
    check: QAReport,
    analyser: Analyser,
    saliency_path: str,
    malignancy: list[float] | None = None,
) -> Findings:
    grades: list[float | None] = list(malignancy) if malignancy else [None] * len(analysis.lesions)
    lesions = tuple(
        Lesion(
            label=m.label,
            volume_mm3=round(m.voxel_volume_mm3, 1),
            max_3d_diameter_mm=round(m.max_3d_diameter_mm, 1),
            max_2d_axial_diameter_mm=round(m.max_2d_axial_diameter_mm, 1),
            mean_hu=round(m.mean_hu, 1) if m.mean_hu is not None else None,
            location=lesion_location(m.centroid_zyx, analysis.lung_mask, volume),
            centroid_zyx=(
                round(float(m.centroid_zyx[0]), 1),
                round(float(m.centroid_zyx[1]), 1),
                round(float(m.centroid_zyx[2]), 1),
            ),
            slice_index=int(round(m.centroid_zyx[0])),
            screening_probability=None if p is None else round(p, 4),
            malignancy_score=None if g is None else round(g, 4),
        )
        for m, p, g in zip(
            analysis.lesions,
            analysis.lesion_probabilities,
            grades,
            strict=True,
        )
    )
    return Findings(
        screening_probability=round(float(analysis.screening_probability), 4),
        triage_score=round(float(analysis.triage_score), 4),
        priority=int(analysis.priority),
        lung_volume_ml=round(float(analysis.lung_volume_ml), 1),
        lesions=lesions,
        series_uid=str(volume.datasets[0].SeriesInstanceUID),
        slices=len(volume.datasets),
        saliency_path=saliency_path,
        saliency_method=analyser.saliency_method,
        input_qa=check.to_dict(),
        pipeline=analyser.name,
    )


def lesion_location(centroid_zyx: tuple[float, float, float], lung: np.ndarray, vol: Volume) -> str:
    """Side from patient coordinates (LPS: +x is patient-left), zone from the lung's extent."""
    z, y, x = centroid_zyx
    row, col = np.asarray(vol.row_cosine), np.asarray(vol.column_cosine)
    dy, dx = vol.spacing_zyx[1], vol.spacing_zyx[2]
    point = np.asarray(vol.origin_xyz) + row * x * dx + col * y * dy
    lung_x = [
        float((np.asarray(vol.origin_xyz) + row * xx * dx)[0])
        for xx in np.nonzero(lung.any(axis=(0, 1)))[0][[0, -1]]
    ]
    side = "left" if point[0] > (lung_x[0] + lung_x[1]) / 2 else "right"
    slices = np.nonzero(lung.any(axis=(1, 2)))[0]
    top_is_high_index = vol.origin_xyz[2] < vol.origin_xyz[2] + vol.spacing_zyx[0]
    frac = (z - slices[0]) / max(1, slices[-1] - slices[0])
    if top_is_high_index:
        frac = 1 - frac  # volume order runs feet to head: high index is cranial
    zone = "upper" if frac < 1 / 3 else "middle" if frac < 2 / 3 else "lower"
    return f"{side} lung, {zone} zone"
