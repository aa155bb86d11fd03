"""A small C-STORE sender (`radai send`): one association, each file in its own transfer syntax."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # None: the association failed before a response came
    error: str | None = None


def _nodelay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_files(
    paths: list[Path], aet: str, host: str, port: int, calling_aet: str = "RADAI_SCU"
) -> list[SendResult]:
    """Send Part 10 files to AET@HOST:PORT; return one result per file, in order."""
    metas = []
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        metas.append((path, str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    ae = AE(ae_title=calling_aet)
    contexts = sorted({(sop, ts) for _, sop, ts in metas})
    if len(contexts) > 128:
        raise ValueError("more than 128 SOP class/transfer syntax pairs in one send")
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    assoc = ae.associate(host, port, ae_title=aet, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted or unreachable"
        return [SendResult(p, None, f"association {reason}") for p in paths]
    results = []
    try:
        for path, _sop, _ts in metas:
            ds = pydicom.dcmread(path)
            rsp = assoc.send_c_store(ds)
            status = int(rsp.Status) if rsp and "Status" in rsp else None
            results.append(SendResult(path, status, None if status is not None else "no response"))
    finally:
        assoc.release()
    return results
