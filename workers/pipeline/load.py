"""Load the selected series into a Hounsfield volume with the one series loader
(`dicom_io.series`, the viewer's too). Takes `Selected`; gives a `Volume`, or ends the study:
NOT_APPLICABLE for a series that cannot be a volume (gaps, mixed sizes), FAILED for pixels that
cannot be decoded."""

from __future__ import annotations

from db import StudyState
from dicom_io.series import UndecodablePixels, UnusableSeries, Volume, load_series
from workers.pipeline.errors import Finished
from workers.pipeline.select import Selected


def load_volume(selected: Selected) -> Volume:
    try:
        return load_series(selected.files)
    except UnusableSeries as exc:
        raise Finished(StudyState.NOT_APPLICABLE, f"series not usable: {exc}") from None
    except UndecodablePixels as exc:
        raise Finished(StudyState.FAILED, str(exc)) from None
