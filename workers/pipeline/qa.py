"""Input QA before any model runs (`ml.runtime.qa`: noise, HU range, slice spacing, truncated
field of view, is it a chest). Takes a `Volume`; gives its `QAReport`, or ends the study
NOT_APPLICABLE with the reasons."""

from __future__ import annotations

from db import StudyState
from dicom_io.series import Volume
from ml.runtime import qa
from workers.pipeline.errors import Finished


def check_input(volume: Volume) -> qa.QAReport:
    report = qa.assess(volume.hu, volume.spacing_zyx)
    if not report.analysable:
        raise Finished(StudyState.NOT_APPLICABLE, "not analysable: " + "; ".join(report.reasons))
    return report
