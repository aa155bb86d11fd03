"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class, acknowledged only after
the instance is on disk durably and recorded in the database.

Every refusal answers a specific status (see `statuses`), keeps the bytes in quarantine, writes an
`ingest_failures` row and an audit entry, and logs a line with UIDs and AE titles only.
"""

from __future__ import annotations

import logging
import socket
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import Verification

from db.session import Database
from dicom_node import recording, statuses
from dicom_node.archive import Archive, free_mb, place, sha256, stage
from dicom_node.inspection import ReceivedObject, inspect_received
from dicom_node.statuses import Refusal

log = logging.getLogger("radai.node")

_STRIPES = 64


@dataclass
class NodeConfig:
    ae_title: str = "RADAI"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: list[str] = field(default_factory=list)
    max_instance_bytes: int = 512 * 1024 * 1024
    min_free_disk_mb: float = 1024.0
    network_timeout: float = 60.0
    max_associations: int = 32


class DicomNode:
    """A pynetdicom server bound to an archive and a database."""

    def __init__(self, db: Database, archive: Archive, config: NodeConfig) -> None:
        self.db = db
        self.archive = archive
        self.config = config
        self.actor = f"node:{config.ae_title}"
        # Serialise work on one SOP Instance UID so two concurrent senders of different content
        # under the same UID cannot both take the primary file.
        self._locks = [threading.Lock() for _ in range(_STRIPES)]
        self._server = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.network_timeout = self.config.network_timeout
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs from senders that allow it
        contexts = [build_context(Verification)]
        contexts += [
            build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            for cx in AllStoragePresentationContexts
        ]
        ae.supported_contexts = contexts
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the node is not running")
        return self._server.server_address[1]

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_CONN_OPEN, _set_nodelay),
        ]
        self._server = self.ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(
            "DICOM node %s listening on %s:%d", self.config.ae_title, self.config.host, self.port
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    def handle_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip()
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        req = event.request
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_instance = str(req.AffectedSOPInstanceUID or "")
        data = b""
        try:
            data = event.encoded_dataset(include_meta=True)
            if len(data) > self.config.max_instance_bytes:
                raise Refusal(
                    statuses.TOO_LARGE,
                    f"instance of {len(data)} bytes exceeds the "
                    f"{self.config.max_instance_bytes}-byte limit",
                )
            if free_mb(self.archive.root) - len(data) / 1e6 < self.config.min_free_disk_mb:
                raise Refusal(
                    statuses.DISK_LOW,
                    f"free disk below {self.config.min_free_disk_mb:.0f} MB; refusing new data",
                )
            obj = inspect_received(data, sop_class, sop_instance)
            status = self._store(obj, data, calling_ae)
            return status
        except Refusal as refusal:
            self._refuse(refusal, data, calling_ae, peer, sop_class, sop_instance)
            return refusal.status
        except Exception as exc:  # noqa: BLE001 - the association must get an answer
            log.exception("C-STORE from %s failed unexpectedly", calling_ae)
            status = statuses.CANNOT_RECORD if _is_db_error(exc) else statuses.PROCESSING_FAILURE
            refusal = Refusal(status, f"{type(exc).__name__}: {str(exc)[:300]}")
            self._refuse(refusal, data, calling_ae, peer, sop_class, sop_instance)
            return status

    def _store(self, obj: ReceivedObject, data: bytes, calling_ae: str) -> int:
        digest = sha256(data)
        folder = self.archive.instance_path(obj.study_uid, obj.series_uid, "x").parent
        staged = stage(folder, data)

        def put(outcome: recording.Outcome) -> str:
            if outcome == recording.Outcome.CONFLICT:
                target = self.archive.conflict_path(
                    obj.study_uid, obj.series_uid, obj.sop_instance_uid, digest
                )
            else:
                target = self.archive.instance_path(
                    obj.study_uid, obj.series_uid, obj.sop_instance_uid
                )
            place(staged, target)
            return str(target)

        lock = self._locks[zlib.crc32(obj.sop_instance_uid.encode()) % _STRIPES]
        try:
            with lock:
                outcome = recording.record_instance(
                    self.db,
                    obj,
                    digest=digest,
                    size=len(data),
                    calling_ae=calling_ae,
                    actor=self.actor,
                    place=put,
                )
        finally:
            staged.unlink(missing_ok=True)  # still there: duplicate, or the transaction failed
        if outcome == recording.Outcome.DUPLICATE:
            log.info("duplicate %s from %s: already held", obj.sop_instance_uid, calling_ae)
        elif outcome == recording.Outcome.CONFLICT:
            log.warning(
                "conflict: %s from %s differs from the copy held; both kept, study flagged",
                obj.sop_instance_uid,
                calling_ae,
            )
        return statuses.SUCCESS

    def _refuse(
        self,
        refusal: Refusal,
        data: bytes,
        calling_ae: str,
        peer: str,
        sop_class: str,
        sop_instance: str,
    ) -> None:
        log.warning(
            "refused %s from %s (%s): 0x%04X %s",
            sop_instance[:64] or "?",
            calling_ae,
            peer,
            refusal.status,
            refusal.reason,
        )
        quarantine: Path | None = None
        try:
            # Oversized data is not copied again; disk-low refusals cannot be kept, by definition.
            if data and refusal.status not in (statuses.TOO_LARGE, statuses.DISK_LOW):
                quarantine = self.archive.keep_refused(data)
        except OSError:
            log.exception("could not keep refused bytes in quarantine")
        study_uid = _peek_study_uid(data)
        try:
            recording.record_refusal(
                self.db,
                status=refusal.status,
                reason=refusal.reason,
                calling_ae=calling_ae,
                peer=peer,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                study_uid=study_uid,
                quarantine_path=str(quarantine) if quarantine else None,
                size=len(data) if data else None,
                actor=self.actor,
            )
        except Exception:  # noqa: BLE001 - the log line above is the record of last resort
            log.exception("could not record the refusal in the database")


def _peek_study_uid(data: bytes) -> str | None:
    if not data:
        return None
    try:
        from io import BytesIO

        import pydicom

        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=[0x0020000D])
        value = ds.get("StudyInstanceUID")
        return str(value) if value else None
    except Exception:  # noqa: BLE001
        return None


def _is_db_error(exc: Exception) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, SQLAlchemyError)


def _handle_echo(event: evt.Event) -> int:
    return statuses.SUCCESS


def _set_nodelay(event: evt.Event) -> None:
    # Nagle's algorithm delays the small PDUs of DIMSE responses: 8-25x slower transfers.
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
