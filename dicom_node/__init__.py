"""radai's DICOM network ingest: the listener (C-ECHO, C-STORE), the durable on-disk archive,
checks on what arrives, study assembly with stability detection, and the outbox dispatcher that
hands finished studies to the work queue; also the sample studies.

It may import `db` and `dicom_io` of ours (and pynetdicom, pydicom, Celery's client); never
`workers` or `ml`: the queue is reached by task name, so the node runs without any model code
installed.
"""
