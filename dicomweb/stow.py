"""STOW-RS (PS3.18 10.5): each application/dicom part is handed to the node's own store path
(`Store`, the C-STORE handler's), so it is stored, de-duplicated, refused, quarantined and audited
exactly as a C-STORE of the same bytes; the answer lists what was stored and, per failed
instance, its C-STORE status as the Failure Reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset

from dicomweb.multipart import Part

# (Part 10 bytes, SOP Class UID, SOP Instance UID, calling AE, peer) -> C-STORE status.
Store = Callable[[bytes, str, str, str, str], int]

CALLING_AE = "DICOMWEB"
# PS3.18 table 10.5.3-? / PS3.4 B.2.3: the failure reasons radai answers of its own.
DOES_NOT_MATCH = 0xA900  # not of the study named in the request's path
NOT_DICOM = 0xC000  # a part that is not application/dicom


def _is_warning(status: int) -> bool:
    return status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


@dataclass
class Outcome:
    stored: list[tuple[str, str, str]] = field(default_factory=list)  # (class, instance, study)
    warned: list[tuple[str, str, str, int]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (class, instance, status)

    @property
    def http_status(self) -> int:
        """200 all stored; 202 some stored or stored with warnings; 409 none stored."""
        if not self.stored and not self.warned:
            return 409
        return 202 if self.failed or self.warned else 200


def peek_uids(data: bytes) -> tuple[str, str, str]:
    """(SOP Class, SOP Instance, Study Instance UID) as the dataset says, "" where unreadable: the
    store path itself refuses what does not parse, and says why."""
    try:
        ds = pydicom.dcmread(
            BytesIO(data),
            stop_before_pixels=True,
            specific_tags=[0x00080016, 0x00080018, 0x0020000D],
        )
        return tuple(
            str(ds.get(k, "") or "")
            for k in (  # type: ignore[return-value]
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
            )
        )
    except Exception:  # noqa: BLE001 - hostile input: any error means "not readable here"
        return "", "", ""


def with_preamble(data: bytes) -> bytes:
    """`data` as a Part 10 stream with its preamble: some clients (dicomweb-client among them)
    send the file meta group without the 128-byte preamble and "DICM", which the node's parser,
    like C-STORE's, requires."""
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        return b"\x00" * 128 + b"DICM" + data
    return data


def store_parts(
    parts: Sequence[Part], store: Store, *, peer: str, study_uid: str | None
) -> Outcome:
    """Hand each part to `store`; parts that are not application/dicom, or not of `study_uid`
    when the path names one, fail without being stored."""
    outcome = Outcome()
    for part in parts:
        data = with_preamble(part.body)
        sop_class, sop_instance, study = peek_uids(data)
        if part.content_type != "application/dicom":
            outcome.failed.append((sop_class, sop_instance, NOT_DICOM))
            continue
        if study_uid is not None and study and study != study_uid:
            outcome.failed.append((sop_class, sop_instance, DOES_NOT_MATCH))
            continue
        status = store(data, sop_class, sop_instance, CALLING_AE, peer)
        if status == 0:
            outcome.stored.append((sop_class, sop_instance, study))
        elif _is_warning(status):
            outcome.warned.append((sop_class, sop_instance, study, status))
        else:
            outcome.failed.append((sop_class, sop_instance, status))
    return outcome


def response(outcome: Outcome, base: str, study_uid: str | None) -> dict:
    """The STOW-RS response dataset as DICOM JSON (PS3.18 table 10.5.3-3)."""
    ds = Dataset()
    if study_uid:
        ds.RetrieveURL = f"{base}/studies/{study_uid}"
    referenced = []
    for sop_class, sop_instance, study in outcome.stored:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.RetrieveURL = f"{base}/studies/{study}/instances/{sop_instance}"
        referenced.append(item)
    for sop_class, sop_instance, study, status in outcome.warned:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.RetrieveURL = f"{base}/studies/{study}/instances/{sop_instance}"
        item.WarningReason = status
        referenced.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if outcome.failed:
        failed = []
        for sop_class, sop_instance, status in outcome.failed:
            item = Dataset()
            if sop_class:
                item.ReferencedSOPClassUID = sop_class
            if sop_instance:
                item.ReferencedSOPInstanceUID = sop_instance
            item.FailureReason = status
            failed.append(item)
        ds.FailedSOPSequence = failed
    return ds.to_json_dict()
