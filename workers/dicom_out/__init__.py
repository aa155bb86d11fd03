"""DICOM output writers: the lung and lesion segmentation as DICOM SEG and the lesion measurements
as a TID 1500 Comprehensive 3D SR referencing it, both marked NOT FOR CLINICAL USE.
"""

from workers.dicom_out.seg import build_segmentation
from workers.dicom_out.sr import build_measurement_report

__all__ = ["build_measurement_report", "build_segmentation"]
