"""C-STORE statuses the node answers, and the exception that carries one to the handler.

Storage Service Class statuses (PS3.4 B.2.3): A7xx Refused: Out of Resources, A9xx Error: Data Set
does not match SOP Class, Cxxx Error: Cannot understand. The low byte says which check failed.
"""

from __future__ import annotations

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # generic
TOO_LARGE = 0xA701  # instance exceeds RADAI_MAX_INSTANCE_MB
DISK_LOW = 0xA702  # free disk below RADAI_MIN_FREE_DISK_MB, or the filesystem full (ENOSPC)
CANNOT_RECORD = 0xA703  # the database cannot be written: never acknowledge an unrecorded instance
DOES_NOT_MATCH_SOP_CLASS = 0xA900
SOP_CLASS_MISMATCH = 0xA900  # dataset's SOP Class UID differs from the request's
PIXEL_DATA_LENGTH = 0xA901  # pixel data length disagrees with rows/columns/bits/frames
VALUE_TOO_LONG = 0xA902  # an identifying attribute exceeds its VR's maximum length (PS3.5 6.2)
CANNOT_UNDERSTAND = 0xC000  # not parseable as a DICOM dataset
MISSING_UID = 0xC001  # Study/Series/SOP Instance UID missing or not a valid UID
SOP_INSTANCE_MISMATCH = 0xC002  # dataset's SOP Instance UID differs from the request's
PROCESSING_FAILURE = 0x0110  # unexpected error inside the node


class Refusal(Exception):
    """An object the node will not store, with the status to answer and a reason for people."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
