"""The C-STORE client: Part 10 files to one destination over one association, each file in its own
SOP class and transfer syntax, every network wait bounded.

Failures of the association itself (unreachable, rejected, no context accepted, timed out) raise
`StoreError`, marked permanent or transient for retry decisions; so does the first failed file
when ``check`` is set (exports: all or retry). With ``check=False`` every file is tried and
reported (`radai send`: "sent 47 of 48").
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT

from dicom_io import rejection
from dicom_io.destinations import format_destination

# Success, plus the warnings the storage service defines: coercion, elements discarded, data set
# does not match the SOP class. The instance was stored in all of these cases.
OK_STATUSES = frozenset({0x0000, 0x0001, 0xB000, 0xB006, 0xB007})
MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1..255


class StoreError(Exception):
    """A send to `destination` failed; `permanent` says whether retrying the same send is futile."""

    def __init__(self, destination: tuple[str, str, int], reason: str, permanent: bool) -> None:
        super().__init__(f"{format_destination(destination)}: {reason}")
        self.destination = destination
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class StoreResult:
    """One file's outcome; `status` is None when no response came (timed out, aborted)."""

    path: Path
    status: int | None

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    @property
    def permanent(self) -> bool:
        """Whether sending this failed file again is futile; 0xA7xx is "out of resources": the
        destination may well accept the same file later, as it may when no response came."""
        return not self.ok and self.status is not None and self.status & 0xFF00 != 0xA700

    @property
    def reason(self) -> str:
        if self.ok:
            return f"{self.path.name}: stored (0x{self.status:04X})"
        if self.status is None:
            return f"{self.path.name}: no C-STORE response (timed out or association aborted)"
        return f"{self.path.name}: C-STORE failed with status 0x{self.status:04X}"


def send_files(
    paths: Sequence[str | os.PathLike[str]],
    destination: tuple[str, str, int],
    *,
    calling_aet: str = "RADAI",
    timeout: float = 30,
    check: bool = True,
) -> list[StoreResult]:
    """C-STORE each Part 10 file in `paths` to `destination` (aet, host, port) over one association;
    return one result per file tried, in order.

    Connecting, association negotiation, each blocking socket operation and each C-STORE are
    bounded by `timeout` seconds; pynetdicom starts the C-STORE response clock when the data set
    is queued, so one file's upload and its response must fit in `timeout` together. Files are
    read before connecting: an unreadable one raises pydicom's or the OS's error and nothing is
    sent. Raises `StoreError`: permanent for a permanent rejection, a SOP class or transfer
    syntax the destination refuses (then nothing is sent), or (with `check`) a failure status
    other than 0xA7xx; transient otherwise (unreachable, transient rejection, aborted, timed
    out, 0xA7xx). With `check` the first failed file ends the send.
    """
    if not paths:
        return []
    files = []
    for path in map(Path, paths):
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        files.append((path, str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    contexts = sorted({(sop, ts) for _, sop, ts in files})
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"more than {MAX_CONTEXTS} SOP class/transfer syntax pairs in one send")

    aet, host, port = destination
    ae = AE(ae_title=calling_aet)
    # pynetdicom's defaults leave connecting unbounded (the OS gives up after minutes) and the
    # other waits at 30-60 s; one figure for all keeps a dead destination's cost predictable.
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)

    connected = False
    watch = rejection.Watch()
    ended: list[str] = []  # how the peer ended the association before answering, if it did

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)  # set from the event's keyword arguments
        if isinstance(primitive, A_P_ABORT):
            ended.append("the peer closed the connection without answering")
        elif isinstance(primitive, A_ABORT):
            ended.append("the peer aborted it (A-ABORT)")

    def on_open(event: evt.Event) -> None:
        nonlocal connected
        connected = True
        dul_socket = event.assoc.dul.socket
        assert dul_socket is not None and dul_socket.socket is not None  # open: both exist
        sock = dul_socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom clears the socket timeout after connecting; a peer that stops reading would
        # then block the DUL thread in send() forever, and with it abort() and release().
        sock.settimeout(timeout)

    try:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, on_open),
            watch.handler,
            (evt.EVT_ACSE_RECV, on_acse),
        ]
        assoc = ae.associate(host, port, ae_title=aet, evt_handlers=handlers)
    except ValueError as exc:  # e.g. an AE title pynetdicom refuses to encode
        raise StoreError(destination, f"invalid association request: {exc}", True) from exc
    if not assoc.is_established:
        # pynetdicom's race that can drop a rejection (`rejection`) leaves a peer's abort unread
        # too: reading it fires `on_acse`.
        while assoc.dul.receive_pdu(wait=False) is not None:
            pass
        raise _association_failure(assoc, destination, connected, timeout, watch, ended)
    try:
        results = _store_all(assoc, files, destination, check)
    except StoreError:
        if assoc.is_established:
            assoc.release()
        raise
    except BaseException:
        assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()
    return results


def _association_failure(
    assoc: Association,
    destination: tuple[str, str, int],
    connected: bool,
    timeout: float,
    watch: rejection.Watch,
    ended: list[str],
) -> StoreError:
    rsp = watch.rejection(assoc)
    if rsp is not None:
        reason = rejection.describe(rsp)
        # Result 0x02 is "rejected (transient)", e.g. the peer's association limit was reached.
        return StoreError(destination, reason, permanent=rsp.result != 0x02)
    if not connected:
        return StoreError(destination, f"could not connect within {timeout:g} s", False)
    if assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        rejected = ", ".join(
            f"{getattr(cx.abstract_syntax, 'name', '?')}/{cx.transfer_syntax[0].name}"
            for cx in assoc.rejected_contexts
        )
        reason = f"no presentation context accepted ({rejected})"
        return StoreError(destination, reason, True)
    if ended:
        return StoreError(destination, f"association request: {ended[0]}", False)
    reason = f"association request not answered within {timeout:g} s"
    return StoreError(destination, reason, False)


def _send_one(assoc: Association, path: Path) -> Dataset | None:
    try:
        return assoc.send_c_store(pydicom.dcmread(path))
    except RuntimeError:
        # The abort after a timed-out store runs in pynetdicom's own thread: the association can
        # end between our check and pynetdicom's, which raises this. No response, then.
        if assoc.is_established:
            raise
        return None


def _store_all(
    assoc: Association,
    files: list[tuple[Path, str, str]],
    destination: tuple[str, str, int],
    check: bool,
) -> list[StoreResult]:
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    for path, sop, ts in files:
        if (sop, ts) not in accepted:
            reason = f"{path.name}: destination did not accept {UID(sop).name} in {UID(ts).name}"
            raise StoreError(destination, reason, True)
    results = []
    for path, _sop, _ts in files:
        # A store that timed out aborts the association: the files after it get no response.
        rsp = _send_one(assoc, path) if assoc.is_established else None
        status = rsp.get("Status") if rsp else None
        results.append(StoreResult(path, None if status is None else int(status)))
        if check and not results[-1].ok:
            raise StoreError(destination, results[-1].reason, results[-1].permanent)
    return results
