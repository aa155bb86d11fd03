"""radai's Celery workers: series selection, the pipeline stages, the DICOM SEG and SR writers,
result recording and export to PACS destinations (volumes are loaded and sent by `dicom_io`).

It may import `db`, `dicom_io` and `ml` of ours (and Celery, pydicom, highdicom); never
`dicom_node`, `dashboard` or `radai`. Tasks are known to the node by name only.
"""
