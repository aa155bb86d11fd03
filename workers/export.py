"""Export of result files (DICOM SEG and SR, Part 10) to a PACS destination by C-STORE: one
association per call, each file sent in its own SOP class and transfer syntax, every network wait
bounded, and failures reported as `ExportError` marked permanent or transient for retry decisions.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association

Destination = tuple[str, str, int]

# Success, plus the warnings the storage service defines: coercion, elements discarded, data set
# does not match the SOP class. The instance was stored in all of these cases.
OK_STATUSES = frozenset({0x0000, 0x0001, 0xB000, 0xB006, 0xB007})
MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1..255


class ExportError(Exception):
    """A send to `destination` failed; `permanent` says whether retrying the same send is futile."""

    def __init__(self, destination: Destination, reason: str, permanent: bool) -> None:
        super().__init__(f"{format_destination(destination)}: {reason}")
        self.destination = destination
        self.reason = reason
        self.permanent = permanent


def format_destination(destination: Destination) -> str:
    """`AET@HOST:PORT`, with an IPv6 host in brackets."""
    aet, host, port = destination
    if ":" in host:
        host = f"[{host}]"
    return f"{aet}@{host}:{port}"


def backoff_seconds(attempt: int, base: float = 5.0, cap: float = 300.0) -> float:
    """Seconds to wait before retry `attempt` (0 = first retry): base * 2**attempt, at most cap."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, not {attempt}")
    # Past 2**63 the product can overflow a float; the cap has long been reached by then.
    if attempt >= 63:
        return cap
    return min(cap, base * 2**attempt)


def _is_transient_status(status: int) -> bool:
    # 0xA7xx is "out of resources": the destination may well accept the same file later.
    return status & 0xFF00 == 0xA700


def send_to_destination(
    paths: list[Path],
    destination: Destination,
    *,
    calling_aet: str = "RADAI",
    timeout: float = 30,
) -> None:
    """C-STORE each Part 10 file in `paths` to `destination` (aet, host, port) over one association.

    Connecting, association negotiation, each blocking socket operation and each C-STORE are
    bounded by `timeout` seconds; pynetdicom starts the C-STORE response clock when the data set
    is queued, so one file's upload and its response must fit in `timeout` together. Files are
    read before connecting: an unreadable one raises pydicom's or the OS's error and nothing is
    sent. Raises `ExportError` on any failure: permanent for a permanent rejection, a SOP class or
    transfer syntax the destination refuses, or a failure status other than 0xA7xx; transient
    otherwise (unreachable, transient rejection, aborted, timed out, 0xA7xx).
    """
    if not paths:
        return
    files = []
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        files.append((Path(path), str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
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

    def on_open(event: evt.Event) -> None:
        nonlocal connected
        connected = True
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom clears the socket timeout after connecting; a peer that stops reading would
        # then block the DUL thread in send() forever, and with it abort() and release().
        sock.settimeout(timeout)

    try:
        assoc = ae.associate(host, port, ae_title=aet, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    except ValueError as exc:  # e.g. an AE title pynetdicom refuses to encode
        raise ExportError(destination, f"invalid association request: {exc}", True) from exc
    if not assoc.is_established:
        raise _association_failure(assoc, destination, connected, timeout)
    try:
        _store_all(assoc, files, destination)
    except ExportError:
        if assoc.is_established:
            assoc.release()
        raise
    except BaseException:
        assoc.abort()
        raise
    assoc.release()


def _association_failure(
    assoc: Association, destination: Destination, connected: bool, timeout: float
) -> ExportError:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        reason = f"association rejected ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"
        # Result 0x02 is "rejected (transient)", e.g. the peer's association limit was reached.
        return ExportError(destination, reason, permanent=rsp.result != 0x02)
    if not connected:
        return ExportError(destination, f"could not connect within {timeout:g} s", False)
    if assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        rejected = ", ".join(
            f"{cx.abstract_syntax.name}/{cx.transfer_syntax[0].name}"
            for cx in assoc.rejected_contexts
        )
        reason = f"no presentation context accepted ({rejected})"
        return ExportError(destination, reason, True)
    reason = f"association aborted or not answered within {timeout:g} s"
    return ExportError(destination, reason, False)


def _store_all(
    assoc: Association, files: list[tuple[Path, str, str]], destination: Destination
) -> None:
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    for path, sop, ts in files:
        if (sop, ts) not in accepted:
            reason = f"{path.name}: destination did not accept {UID(sop).name} in {UID(ts).name}"
            raise ExportError(destination, reason, True)
    for path, _sop, _ts in files:
        rsp = assoc.send_c_store(pydicom.dcmread(path))
        status = rsp.get("Status") if rsp else None
        if status is None:
            reason = f"{path.name}: no C-STORE response (timed out or association aborted)"
            raise ExportError(destination, reason, False)
        status = int(status)
        if status not in OK_STATUSES:
            reason = f"{path.name}: C-STORE failed with status 0x{status:04X}"
            raise ExportError(destination, reason, not _is_transient_status(status))
