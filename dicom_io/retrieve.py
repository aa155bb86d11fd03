"""Query and retrieve from a PACS: C-FIND at study and series level (Study Root), and C-GET of one
series into a folder. Used to fetch a patient's prior study for follow-up.

C-GET is used rather than C-MOVE because the peer then needs no entry for us in its list of
known AEs: the instances come back over the same association. Every network wait is bounded;
a failure of the association or of the operation raises `RetrieveError` with the reason.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association

from dicom_io import rejection
from dicom_io.destinations import format_destination

# What a chest CT prior can be stored as; the C-GET offers these storage classes back to the peer.
RETRIEVABLE = (CTImageStorage, EnhancedCTImageStorage)
PENDING = frozenset({0xFF00, 0xFF01})
StudyRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.2.1")
StudyRootQueryRetrieveInformationModelGet = UID("1.2.840.10008.5.1.4.1.2.2.3")


class RetrieveError(Exception):
    def __init__(self, destination: tuple[str, str, int], reason: str) -> None:
        super().__init__(f"{format_destination(destination)}: {reason}")
        self.destination = destination
        self.reason = reason


@dataclass(frozen=True)
class StudyMatch:
    study_uid: str
    study_date: str  # YYYYMMDD, "" when the peer does not say
    modalities: tuple[str, ...]
    description: str
    instances: int | None


@dataclass(frozen=True)
class SeriesMatch:
    series_uid: str
    modality: str
    description: str
    instances: int | None


def _ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, timeout)
    return ae


def _nodelay(event: evt.Event) -> None:
    dul_socket = event.assoc.dul.socket
    if dul_socket is not None and dul_socket.socket is not None:
        dul_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(
    ae: AE,
    destination: tuple[str, str, int],
    handlers: list,
    ext_neg: list | None = None,
) -> Association:
    aet, host, port = destination
    watch = rejection.Watch()
    assoc = ae.associate(
        host,
        port,
        ae_title=aet,
        ext_neg=ext_neg,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), watch.handler, *handlers],
    )
    if not assoc.is_established:
        rsp = watch.rejection(assoc)
        if rsp is not None:
            raise RetrieveError(destination, rejection.describe(rsp))
        raise RetrieveError(destination, "association not established (refused or unreachable)")
    return assoc


def _find(
    destination: tuple[str, str, int], query: Dataset, calling_aet: str, timeout: float
) -> Iterator[Dataset]:
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, destination, [])
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if not status:
                raise RetrieveError(destination, "C-FIND timed out or the association aborted")
            code = int(status.Status)
            if code in PENDING:
                if identifier is not None:
                    yield identifier
            elif code != 0x0000:
                raise RetrieveError(destination, f"C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def find_studies(
    destination: tuple[str, str, int],
    patient_id: str,
    *,
    calling_aet: str = "RADAI",
    timeout: float = 30.0,
) -> list[StudyMatch]:
    """The studies the peer holds for ``patient_id``, oldest first."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id
    q.StudyInstanceUID = ""
    q.StudyDate = ""
    q.ModalitiesInStudy = ""
    q.StudyDescription = ""
    q.NumberOfStudyRelatedInstances = ""
    out = []
    for ds in _find(destination, q, calling_aet, timeout):
        mods = ds.get("ModalitiesInStudy", "")
        modalities = tuple(str(m) for m in mods) if not isinstance(mods, str) else (mods,)
        out.append(
            StudyMatch(
                study_uid=str(ds.get("StudyInstanceUID", "")),
                study_date=str(ds.get("StudyDate", "") or ""),
                modalities=tuple(m for m in modalities if m),
                description=str(ds.get("StudyDescription", "") or ""),
                instances=_int(ds.get("NumberOfStudyRelatedInstances")),
            )
        )
    return sorted((m for m in out if m.study_uid), key=lambda m: (m.study_date, m.study_uid))


def find_series(
    destination: tuple[str, str, int],
    study_uid: str,
    *,
    calling_aet: str = "RADAI",
    timeout: float = 30.0,
) -> list[SeriesMatch]:
    """The series of one study on the peer."""
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.SeriesDescription = ""
    q.NumberOfSeriesRelatedInstances = ""
    return [
        SeriesMatch(
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=str(ds.get("Modality", "") or ""),
            description=str(ds.get("SeriesDescription", "") or ""),
            instances=_int(ds.get("NumberOfSeriesRelatedInstances")),
        )
        for ds in _find(destination, q, calling_aet, timeout)
        if ds.get("SeriesInstanceUID")
    ]


def get_series(
    destination: tuple[str, str, int],
    study_uid: str,
    series_uid: str,
    folder: Path,
    *,
    calling_aet: str = "RADAI",
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch one series by C-GET into ``folder`` (one Part 10 file per instance, named by its SOP
    Instance UID); return the files. Raises RetrieveError unless every sub-operation succeeded."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        if not uid.replace(".", "").isdigit():
            return 0xA900  # not a UID: never let it name a file
        path = folder / f"{uid}.dcm"
        tmp = path.with_suffix(".part")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        written.append(path)
        return 0x0000

    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop in RETRIEVABLE:
        ae.add_requested_context(sop)
        roles.append(build_role(sop, scp_role=True))
    assoc = _associate(ae, destination, [(evt.EVT_C_STORE, on_store)], ext_neg=roles)
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = series_uid
    failed: int | None = None
    try:
        for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
            if not status:
                raise RetrieveError(destination, "C-GET timed out or the association aborted")
            code = int(status.Status)
            if code not in PENDING and code != 0x0000:
                failed = code
    finally:
        if assoc.is_established:
            assoc.release()
    if failed is not None:
        raise RetrieveError(
            destination, f"C-GET ended with status 0x{failed:04X} ({len(written)} received)"
        )
    return sorted(written)
