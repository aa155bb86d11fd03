"""radai's Celery workers: series selection, volume loading, the pipeline stages, the DICOM SEG and
SR writers, result recording and export to PACS destinations.

It may import `db` and `ml` of ours (and Celery, pydicom, highdicom); never `dicom_node`,
`dashboard` or `radai`. Tasks are known to the node by name only.
"""
