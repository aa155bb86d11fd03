"""DICOMweb on the node's archive: QIDO-RS (search), WADO-RS (retrieve: instances, metadata as
DICOM JSON, frames, bulk data, rendered images) and STOW-RS (store), under /dicomweb, as a
Starlette app served by uvicorn beside the DICOM listener.

Searches match in the database: the node's study/series/instance index and DICOMweb's own
`qido_studies`/`qido_series` (each study's and series' QIDO attributes and answer, indexed from
its first instance's header on the next search after it arrives: `index`); only keys on other
attributes, and instance-level answers, read headers from the archive. Nothing here writes the
archive itself: STOW-RS hands each received instance to the
node's own store path (injected as a `Store` callable by `radai`, the composition root), so a
STOW is stored, de-duplicated, refused, quarantined and audited exactly as a C-STORE is. Every
request carries a bearer token (`db.api_tokens`) unless anonymous access is configured. This
package imports `db` and `dicom_io` only.
"""
