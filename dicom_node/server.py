"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class, acknowledged only after
the instance is on disk durably and recorded in the database.

Durably means in the ingest journal (`journal`: the instance's bytes and who sent it, one
fdatasync shared with concurrent senders), written while the instance is parsed. The file is
then renamed into the archive and the index rows committed without waiting for the disk, and the
C-STORE answered; `durability` syncs files, folders and index in the background, in groups, and
only then lets the journal drop the record. At start, whatever the journal still holds is filed
and indexed again (`replay`) before the node listens. pynetdicom polls its sockets and queues
with short sleeps; the node shortens the DUL's sleep for its own associations (`poll_seconds`).

Every refusal answers a specific status (see `statuses`), keeps the bytes in quarantine, writes an
`ingest_failures` row and an audit entry, and logs a line with UIDs and AE titles only. With a
certificate and key the node speaks only TLS (see `tls`); with an allow-list of networks, an
association from any other address is rejected (A-ASSOCIATE-RJ) and audited.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import sqlite3
import ssl
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import psycopg
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from db import audit
from db.audit_actions import AuditAction
from db.models import utcnow
from db.session import Database
from dicom_node import reactor, recording, statuses, store_codec, tls
from dicom_node.archive import Archive, free_mb, place, sha256, stage
from dicom_node.durability import Durability
from dicom_node.inspection import ReceivedObject, inspect_received
from dicom_node.journal import Journal, Record
from dicom_node.replay import replay
from dicom_node.statuses import Refusal

log = logging.getLogger("radai.node")

_STRIPES = 64
_INLINE_BYTES = 256 * 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, no reason given. The standard has no
# diagnostic for "address not allowed"; the reason goes to the log and the audit trail instead.
_REJECT_NOT_ALLOWED = (0x01, 0x01, 0x01)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    allowed_networks: list[str] = field(default_factory=list)
    # How often acknowledged instances are synced in the background (files, folders, index);
    # until then the journal holds them.
    sync_seconds: float = 0.05
    # The DUL reactor's sleep between polls of an idle socket (pynetdicom's default is 1 ms, paid
    # up to twice per instance on one association).
    poll_seconds: float = 0.0002
    # Association threads wait for their socket and queues instead of polling (`reactor`);
    # `poll_seconds` then applies only where pynetdicom's version is not the one it copies.
    event_driven: bool = True
    # Several node processes listen on this port (SO_REUSEPORT; `dicom_node.listeners`): each
    # needs a journal folder of its own, and on PostgreSQL two processes recording one SOP
    # Instance UID are kept apart by a lock in the database (the node's own locks are per
    # process; SQLite's BEGIN IMMEDIATE already orders writers across processes).
    shared_port: bool = False
    journal_folder: str = ".journal"


def parse_networks(values: list[str]) -> list[Network]:
    """CIDRs (or single addresses) as networks; ValueError names the one that does not parse."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP network in CIDR notation: {value!r}") from None
    return networks


def address_allowed(address: str, networks: list[Network]) -> bool:
    """Whether `address` lies in one of `networks`; an empty list allows every address."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in net for net in networks)


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
        # SQLite takes one writer at a time and makes the others wait in its busy handler, which
        # sleeps 1 to 100 ms between tries: concurrent associations queue here instead, and the
        # next one starts the moment the last commit ends.
        self._sqlite_writer = threading.Lock() if db.is_sqlite else contextlib.nullcontext()
        self._server = None
        self.networks = parse_networks(config.allowed_networks)
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if config.tls_ca is not None and config.tls_cert is None:
            raise ValueError("a TLS CA is given but no certificate and key")
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="radai-store")
        self.journal = Journal(archive.root / config.journal_folder)
        self.durability = Durability(db, self.journal, interval=config.sync_seconds)
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.network_timeout = self.config.network_timeout
        # A peer that sent something other than an association request holds a slot until this
        # runs out: keep it no longer than the network timeout.
        ae.acse_timeout = min(30.0, self.config.network_timeout)
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
        context: ssl.SSLContext | None = None
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            # Built here, not in __init__, so a renewed certificate is picked up on restart.
            context = tls.server_context(
                self.config.tls_cert, self.config.tls_key, self.config.tls_ca
            )
        left = self.journal.open()
        try:
            if left:
                counts = replay(self.db, self.archive, left, actor=self.actor)
                self.journal.applied(left)
                log.info("replayed %d journal records of an earlier run: %s", len(left), counts)
        except BaseException:
            self.journal.close()  # nothing is lost: the records stay for the next start
            raise
        self.durability.start()
        handlers = [
            # The handshake goes first: nothing else may read or write a socket still shaking hands.
            (evt.EVT_CONN_OPEN, self._handshake),
            (evt.EVT_CONN_OPEN, self._tune_socket),
            (evt.EVT_CONN_OPEN, self._tune_polling),
            (evt.EVT_REQUESTED, self._check_peer),
            (evt.EVT_C_ECHO, _handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
        ]
        try:
            if self.config.shared_port:
                self._server = _start_shared_port_server(
                    self.ae, (self.config.host, self.config.port), handlers, context
                )
            else:
                self._server = self.ae.start_server(
                    (self.config.host, self.config.port),
                    block=False,
                    evt_handlers=handlers,
                    ssl_context=context,
                )
        except BaseException:
            self.durability.stop()
            self.journal.close()  # another start may follow: release the journal's lock
            raise
        if self.config.event_driven and reactor.supported():
            self._server.contexts = reactor.SharedContexts(self._server.contexts)
        log.info(
            "DICOM node %s listening on %s:%d (%s%s%s)",
            self.config.ae_title,
            self.config.host,
            self.port,
            "TLS only" if context else "no TLS",
            ", client certificates required" if self.config.tls_ca else "",
            f", allowed networks {', '.join(map(str, self.networks))}" if self.networks else "",
        )

    def _tune_socket(self, event: evt.Event) -> None:
        _tune_socket(event, self.config.network_timeout)

    def _tune_polling(self, event: evt.Event) -> None:
        if self.config.event_driven and reactor.make_event_driven(event.assoc):
            return
        # `_run_loop_delay` is the DUL's knob ("higher uses less CPU when idle, but increases the
        # latency to respond"); it is read on every loop, so this takes effect at once.
        # Each association's poll costs CPU while it waits; with many at once the CPU, not one
        # association's latency, limits the rate: poll less often the more there are.
        active = max(1, len(self.ae.active_associations))
        event.assoc.dul._run_loop_delay = min(0.001, self.config.poll_seconds * active)

    def _handshake(self, event: evt.Event) -> None:
        # Runs in the connection's own thread, before pynetdicom's DUL reads the socket.
        assoc_socket = event.assoc.dul.socket
        sock = getattr(assoc_socket, "socket", None)
        if not isinstance(sock, ssl.SSLSocket):
            return
        host, port = event.address[0], event.address[1]
        try:
            tls.complete_handshake(sock, timeout=float(self.ae.acse_timeout or 30))
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s:%d failed: %s", host, port, _tls_reason(exc))
            assoc_socket.close()
            # No A-ASSOCIATE-RQ can follow: end the association now instead of after the ACSE
            # timeout, so failed handshakes do not hold association slots.
            event.assoc.acse_timeout = 0
            return
        log.info("TLS connection from %s:%d: %s", host, port, tls.describe(sock))

    def _check_peer(self, event: evt.Event) -> None:
        assoc = event.assoc
        address = assoc.requestor.address
        if address_allowed(address, self.networks):
            return
        primitive = assoc.requestor.primitive
        calling_ae = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        peer = f"{address}:{assoc.requestor.port}"
        reason = "address not in the allowed networks"
        log.warning("association from %s (%s) rejected: %s", calling_ae or "?", peer, reason)
        # pynetdicom skips its own negotiation once a handler of EVT_REQUESTED has rejected.
        assoc.acse.send_reject(*_REJECT_NOT_ALLOWED)
        try:
            with self.db.session() as s:
                audit.append(
                    s,
                    self.actor,
                    AuditAction.ASSOCIATION_REFUSED,
                    None,
                    {"peer": peer, "calling_ae": calling_ae, "reason": reason},
                )
        except Exception:  # noqa: BLE001 - the log line above is the record of last resort
            log.exception("could not record the refused association in the database")
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ has gone out
        # before the connection is closed.
        assoc.kill()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        self._pool.shutdown(wait=True)
        self.durability.stop()
        self.journal.close()

    def handle_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip()
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        req = event.request
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_instance = str(req.AffectedSOPInstanceUID or "")
        try:
            data = _part10(event, sop_class, sop_instance)
        except Exception as exc:  # noqa: BLE001 - the association must get an answer
            return self._unexpected(exc, b"", calling_ae, peer, sop_class, sop_instance)
        return self.store(
            data, sop_class=sop_class, sop_instance=sop_instance, calling_ae=calling_ae, peer=peer
        )

    def store(
        self, data: bytes, *, sop_class: str, sop_instance: str, calling_ae: str, peer: str
    ) -> int:
        """Check, keep and record one instance (Part 10 bytes, file meta included); the status to
        answer: durable and recorded on success, refused, quarantined and audited otherwise.
        Every way an instance comes in (C-STORE, DICOMweb's STOW-RS) goes through here."""
        try:
            if len(data) > self.config.max_instance_bytes:
                raise Refusal(
                    statuses.TOO_LARGE,
                    f"instance of {len(data)} bytes exceeds the "
                    f"{self.config.max_instance_bytes}-byte limit",
                )
            # Near the threshold, the journal's copies of instances already filed would fill
            # the disk before the background sync drops them (a slow sync under load let the
            # filesystem fill up): drop them now, so that the check below sees the real space.
            raw_free = free_mb(self.archive.root)
            if raw_free - 2 * len(data) / 1e6 < self.config.min_free_disk_mb + 1:
                self.durability.flush()
            # The journal's copies go once their files are synced: that space counts as free.
            free = self.journal.free_mb_beside(lambda: free_mb(self.archive.root))
            if free - len(data) / 1e6 < self.config.min_free_disk_mb:
                raise Refusal(
                    statuses.DISK_LOW,
                    f"free disk below {self.config.min_free_disk_mb:.0f} MB; refusing new data",
                )
            received_at = utcnow()
            meta = {
                "received_at": received_at.isoformat(),
                "calling_ae": calling_ae,
                "peer": peer,
                "sop_class": sop_class,
                "sop_instance": sop_instance,
            }
            # The journal's fdatasync, writing the file and hashing release the GIL: they run
            # while we parse. Below _INLINE_BYTES, handing the write and the hash to another
            # thread costs more than doing them.
            journalled = self._pool.submit(self.journal.append, meta, data)
            if len(data) < _INLINE_BYTES:
                staged = _done(stage, self.archive.staging, data, sync=False)
                digest = _done(sha256, data)
            else:
                staged = self._pool.submit(stage, self.archive.staging, data, sync=False)
                digest = self._pool.submit(sha256, data)
            try:
                obj = inspect_received(data, sop_class, sop_instance)
            except BaseException:
                _discard(staged)
                self._forget(journalled)
                raise
            return self._store(obj, staged, digest, journalled, len(data), calling_ae, received_at)
        except Refusal as refusal:
            self._refuse(refusal, data, calling_ae, peer, sop_class, sop_instance)
            return refusal.status
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                return self._unexpected(exc, data, calling_ae, peer, sop_class, sop_instance)
            # The filesystem filled up under the free-space check (other writers, a check
            # configured off): out of resources, like the check's own refusal, so that senders
            # retry later; the failed write left no partial file.
            refusal = Refusal(statuses.DISK_LOW, f"the archive's filesystem is full: {exc}")
            self._refuse(refusal, data, calling_ae, peer, sop_class, sop_instance)
            return refusal.status
        except Exception as exc:  # noqa: BLE001 - the association must get an answer
            return self._unexpected(exc, data, calling_ae, peer, sop_class, sop_instance)

    def _unexpected(
        self,
        exc: Exception,
        data: bytes,
        calling_ae: str,
        peer: str,
        sop_class: str,
        sop_instance: str,
    ) -> int:
        log.exception("C-STORE from %s failed unexpectedly", calling_ae)
        status = statuses.CANNOT_RECORD if _is_db_error(exc) else statuses.PROCESSING_FAILURE
        refusal = Refusal(status, f"{type(exc).__name__}: {str(exc)[:300]}")
        self._refuse(refusal, data, calling_ae, peer, sop_class, sop_instance)
        return status

    def _forget(self, journalled: Future) -> None:
        """The instance is refused: its journal record must not be replayed."""
        try:
            record = journalled.result()
        except Exception:  # noqa: BLE001 - the append itself failed: nothing to forget
            return
        self.journal.applied([record])

    def _store(
        self,
        obj: ReceivedObject,
        staged_future: Future,
        digest_future: Future,
        journalled: Future,
        size: int,
        calling_ae: str,
        received_at: datetime,
    ) -> int:
        try:
            staged: Path = staged_future.result()
            digest: str = digest_future.result()
            record: Record = journalled.result()
        except BaseException:
            _discard(staged_future)
            self._forget(journalled)
            raise
        placed: list[Path] = []

        def put(outcome: recording.Outcome) -> str:
            if outcome == recording.Outcome.CONFLICT:
                target = self.archive.conflict_path(
                    obj.study_uid, obj.series_uid, obj.sop_instance_uid, digest
                )
            else:
                target = self.archive.instance_path(
                    obj.study_uid, obj.series_uid, obj.sop_instance_uid
                )
            place(staged, target, sync=False)  # synced in the background; the journal has it
            placed.append(target)
            return str(target)

        lock = self._locks[zlib.crc32(obj.sop_instance_uid.encode()) % _STRIPES]
        try:
            with lock, self._sqlite_writer:
                with self.db.deferred_driver_connection() as connection:
                    outcome = recording.record_plain(
                        connection,
                        self.db.engine.dialect.name,
                        obj,
                        lock_across_processes=self.config.shared_port,
                        digest=digest,
                        size=size,
                        calling_ae=calling_ae,
                        place=put,
                        now=received_at,
                    )
                if outcome is None:
                    with self.db.deferred_session() as s:
                        if self.config.shared_port:
                            recording.lock_uid_across_processes(s, obj.sop_instance_uid)
                        outcome = recording.record_in_session(
                            s,
                            obj,
                            digest=digest,
                            size=size,
                            calling_ae=calling_ae,
                            actor=self.actor,
                            place=put,
                            now=received_at,
                        )
        except BaseException:
            self._forget(journalled)
            raise
        finally:
            staged.unlink(missing_ok=True)  # still there: duplicate, or the transaction failed
        self.durability.add(record, placed[-1] if placed else None)
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


def _part10(event: evt.Event, sop_class: str, sop_instance: str) -> bytes:
    """The received dataset as a Part 10 stream, as `event.encoded_dataset()` gives it."""
    dataset = event.request.DataSet
    plain = sop_class.isascii() and sop_instance.isascii() and sop_class and sop_instance
    if not isinstance(dataset, BytesIO) or not plain:
        return event.encoded_dataset(include_meta=True)  # pynetdicom's encoder decides
    header = store_codec.part10_header(
        sop_class,
        sop_instance,
        str(event.context.transfer_syntax),
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )
    return header + dataset.getvalue()


def _done(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """`fn` run here and now, as a future (its result or its exception)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - handed over, as the pool would
        future.set_exception(exc)
    return future


def _discard(staged: Future) -> None:
    try:
        staged.result().unlink(missing_ok=True)
    except OSError:
        pass  # the write itself failed: nothing to remove


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


class _SharedPortServer(ThreadedAssociationServer):
    """A listening socket other node processes may bind too; the kernel spreads the incoming
    connections among them."""

    def server_bind(self) -> None:
        assert self.socket is not None  # socketserver creates it before binding
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _start_shared_port_server(
    ae: AE, address: tuple[str, int], handlers: list, context: ssl.SSLContext | None
) -> ThreadedAssociationServer:
    """`AE.start_server(block=False)` with `_SharedPortServer` for its server class."""
    server = ae.make_server(
        address, ssl_context=context, evt_handlers=handlers, server_class=_SharedPortServer
    )
    thread = threading.Thread(
        target=make_target(server.serve_forever), name="AcceptorServer-shared", daemon=True
    )
    thread.start()
    ae._servers.append(server)
    return server


def _is_db_error(exc: Exception) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    # The drivers' own errors come from the plain path of `recording.record_plain`.
    return isinstance(exc, SQLAlchemyError | sqlite3.Error | psycopg.Error)


def _handle_echo(event: evt.Event) -> int:
    return statuses.SUCCESS


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _tune_socket(event: evt.Event, network_timeout: float) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is None:
        return
    try:
        # Nagle's algorithm delays the small PDUs of DIMSE responses: 8-25x slower transfers.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Accepted sockets do not inherit the listener's timeout: without one, a peer that stops
        # in the middle of a PDU blocks its reader in recv() and holds its slot for good.
        sock.settimeout(network_timeout)
    except OSError:
        pass
