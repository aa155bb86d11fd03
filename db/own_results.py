"""radai's own results as they come back in: a SEG or SR that a worker built and stored into an
archive by STOW-RS may reach the node as an instance of the study it describes (when the archive
is the node itself). It is kept like any instance, but it is not new input: it neither reopens
the study nor changes the job key (the hash of the input instances), so a study is not analysed
again because of its own result. Recognised by SOP Class and the series description the workers
write (`workers/dicom_out/`)."""

from __future__ import annotations

SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
RESULT_SOP_CLASSES = frozenset({SEGMENTATION, COMPREHENSIVE_3D_SR})
# workers/dicom_out/seg.py and sr.py begin every result series' description so.
SERIES_PREFIXES = ("radai SEG", "radai SR")


def is_own_result(sop_class_uid: str | None, series_description: str | None) -> bool:
    return sop_class_uid in RESULT_SOP_CLASSES and (series_description or "").startswith(
        SERIES_PREFIXES
    )
