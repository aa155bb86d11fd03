"""radai's shared DICOM I/O: what more than one service reads, sends or parses the same way.

`series` loads a CT series into a Hounsfield volume in the one slice order that the worker's
findings and the viewer's slider both use; `cstore` is the one C-STORE client (exports and
`radai send`); `archive` is the DICOMweb client of workers on other machines (WADO-RS into a
bounded on-disk cache, STOW-RS); `destinations` parses and formats `AET@HOST:PORT`; `windows`
holds the display window presets; `backoff` is the one retry schedule for peers that are down
(PACS, broker).

It imports nothing of radai's (only pydicom, pynetdicom, dicomweb-client and numpy), so that
`dicom_node`, `workers`, `dashboard` and `radai` may all import it and dependencies still point
one way; it reads no settings (its callers pass them) and touches no database.
"""
