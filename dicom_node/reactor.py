"""Event-driven run loops for pynetdicom's per-association threads.

pynetdicom runs two threads per association, and both poll: the DUL thread sleeps
`_run_loop_delay` (1 ms) whenever a pass found nothing to do, and the acceptor's reactor sleeps a
fixed 1 ms before every look at its queues. On one association that adds up to two sleeps per
C-STORE on the answer's path, and every idle pass costs CPU that concurrent associations then
lack (a quarter of the node's CPU went into these passes in a profile of 2,000 small instances).

`make_event_driven` swaps both loops of one association, before its threads start, for copies
that wait instead of sleeping: the DUL thread in `select()` on its socket and a wake-up pipe that
every primitive handed to it writes to; the acceptor on an event that every DIMSE message and
every primitive for the user sets. Both still wake at least every `_MAX_WAIT` seconds for what
nothing signals (the ARTIM and idle timers, a kill from another thread). The loop bodies are
pynetdicom 3.0.4's own, step for step; for any other version the association keeps pynetdicom's
loops (`supported()` is False), so an upgrade can make the node slower but not wrong.

This module imports pynetdicom, `store_codec` and the standard library.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import select
import ssl
import threading
import time
from io import BytesIO
from typing import Any

import pynetdicom
from pydicom.uid import UID
from pynetdicom import association as pynetdicom_association
from pynetdicom import dul as pynetdicom_dul
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.utils import make_target

from dicom_node import store_codec

_VERSION = "3.0.4"
# Longest wait without a signal: bounds how late a timer or a kill from another thread is seen.
_MAX_WAIT = 0.01


def supported() -> bool:
    """Whether the loops below are copies of this pynetdicom's own."""
    return pynetdicom.__version__ == _VERSION


def make_event_driven(assoc: Any) -> bool:
    """Give `assoc` (an acceptor whose threads have not started) the waiting loops; True if done.

    Call from an EVT_CONN_OPEN handler: pynetdicom triggers it before it starts the threads.
    """
    if not supported() or assoc.dul.is_alive() or assoc.is_alive():
        return False
    dul = assoc.dul
    waker = _Waker()
    _signal_on_put(dul.to_provider_queue, waker.wake)
    user_ready = threading.Event()
    _signal_on_put(dul.to_user_queue, user_ready.set)
    _signal_on_put(assoc.dimse.msg_queue, user_ready.set)
    dul._target = make_target(lambda: _run_dul(dul, waker))
    assoc._run_reactor = lambda: _run_acceptor(assoc, user_ready)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        # pynetdicom's standard handlers format every message and PDU for a DEBUG log line
        # that is then dropped; with DEBUG on they stay.
        for event, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event, handler)
    assoc.dimse.send_msg = _quick_store_responses(assoc, assoc.dimse.send_msg)
    assoc.dimse.receive_primitive = _quick_store_requests(assoc, assoc.dimse.receive_primitive)
    return True


_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _quick_store_responses(assoc: Any, send_msg: Any) -> Any:
    """`send_msg` that encodes plain C-STORE responses itself (`store_codec`) and hands them to
    the DUL as pynetdicom would: one P-DATA, the command's last fragment. Anything else, or a
    response someone listens for (EVT_DIMSE_SENT), goes through pynetdicom."""

    def send(primitive: Any, context_id: int) -> None:
        dimse = assoc.dimse
        if (
            not isinstance(primitive, C_STORE)
            or primitive.MessageIDBeingRespondedTo is None
            or primitive.ErrorComment is not None
            or primitive.OffendingElement is not None
            or not isinstance(primitive.Status, int)
            or assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            send_msg(primitive, context_id)
            return
        command = store_codec.c_store_rsp(
            primitive.MessageIDBeingRespondedTo,
            str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID),
            primitive.Status,
        )
        max_pdu = dimse.maximum_pdu_size
        if max_pdu and len(command) + 6 > max_pdu:
            send_msg(primitive, context_id)  # would need fragments: pynetdicom's encoder
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        dimse.dul.send_pdu(pdata)

    return send


def _quick_store_requests(assoc: Any, receive_primitive: Any) -> Any:
    """`receive_primitive` that reads plain C-STORE requests itself (`store_codec.c_store_rq`)
    and queues them as pynetdicom would: a C_STORE primitive with the data set as BytesIO.

    A message is collected fragment by fragment as pynetdicom's `DIMSEMessage.decode_msg` does.
    Once its command set is complete and is anything but a plain C-STORE-RQ (an echo, a request
    on behalf of a C-MOVE, a value pynetdicom would convert or refuse), or anything else is out
    of the ordinary, the primitives received for it so far are handed to pynetdicom's own
    `receive_primitive` in order, and so is the rest of that message: pynetdicom decides.
    """
    dimse = assoc.dimse
    pending: list[Any] = []  # the P-DATA primitives of the message being received
    command = bytearray()
    fragments: list[memoryview] = []
    request: list[store_codec.StoreRequest | int] = []  # the parsed command and its context ID
    to_pynetdicom = False  # the rest of this message goes to pynetdicom

    def reset() -> None:
        pending.clear()
        command.clear()
        fragments.clear()
        request.clear()

    def hand_over() -> None:
        nonlocal to_pynetdicom
        replay = list(pending)
        reset()
        for primitive in replay:
            receive_primitive(primitive)
        to_pynetdicom = dimse.message is not None  # None: pynetdicom completed the message

    def receive(primitive: Any) -> None:
        nonlocal to_pynetdicom
        if to_pynetdicom:
            receive_primitive(primitive)
            to_pynetdicom = dimse.message is not None
            return
        pending.append(primitive)
        if not isinstance(primitive, P_DATA) or assoc.get_handlers(evt.EVT_DIMSE_RECV):
            hand_over()
            return
        for context_id, pdv in primitive.presentation_data_value_list:
            if not pdv:
                hand_over()
                return
            header = pdv[0]
            if header & 1:  # a command fragment
                if request:
                    hand_over()  # more command after the last command fragment
                    return
                command.extend(memoryview(pdv)[1:])
                if header & 2:
                    parsed = store_codec.c_store_rq(bytes(command))
                    if parsed is None:
                        hand_over()
                        return
                    request.extend((parsed, context_id))
            else:
                if not request:
                    hand_over()  # data before its command: pynetdicom's way
                    return
                fragments.append(memoryview(pdv)[1:])
                if header & 2:
                    _queue_store(dimse, request[0], request[1], b"".join(fragments))
                    reset()
                    return  # like pynetdicom, what follows in this P-DATA is not read

    return receive


def _queue_store(dimse: Any, parsed: Any, context_id: Any, dataset: bytes) -> None:
    req = C_STORE()
    req.MessageID = parsed.message_id
    req.Priority = parsed.priority
    # Checked by `c_store_rq`; pynetdicom's setters would check them again.
    req._affected_sop_class_uid = UID(parsed.sop_class_uid)
    req._affected_sop_instance_uid = UID(parsed.sop_instance_uid)
    req.DataSet = BytesIO(dataset)
    req._context_id = context_id
    dimse.msg_queue.put((context_id, req))


class SharedContexts(list):
    """The server's supported presentation contexts, copied cheaply for each association.

    pynetdicom deep-copies the server's contexts for every association it accepts; with every
    storage SOP class in every transfer syntax that re-validates thousands of UIDs (about a
    tenth of a second of CPU per association on this machine). The copy made here is as deep
    as anything negotiation could change: new context objects and new lists of transfer
    syntaxes, holding the same UID strings, which are immutable.
    """

    def __deepcopy__(self, memo: dict) -> list:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


def _signal_on_put(q: queue.Queue, signal: Any) -> None:
    put = q.put

    def put_and_signal(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        signal()

    q.put = put_and_signal  # type: ignore[method-assign]


class _Waker:
    """A pipe the DUL thread can wait on in `select()` beside its socket.

    Writers may outlive the DUL thread (an association thread sending after the end): once
    closed, a wake is a no-op, so a write can never reach a file descriptor number reused since.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        # One read: wake-ups beyond 4,096 leave the pipe readable, and the next select() returns
        # at once to drain the rest.
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self.read_fd, 4096)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._write_fd)
            os.close(self.read_fd)


def _wait_for_io(dul: Any, waker: _Waker) -> None:
    """Until the socket has data, a primitive is handed over, or `_MAX_WAIT` has passed."""
    assoc_socket = dul.socket
    sock = getattr(assoc_socket, "socket", None)
    if sock is None or not getattr(assoc_socket, "_is_connected", False):
        time.sleep(dul._run_loop_delay)  # nothing to select on: as pynetdicom does
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes already buffered, which select() cannot see
    try:
        readable, _, _ = select.select([sock, waker.read_fd], [], [], _MAX_WAIT)
    except (OSError, ValueError):
        return  # closed under us: the next pass reports it (Evt17) as pynetdicom's would
    if waker.read_fd in readable:
        waker.drain()


def _run_dul(dul: Any, waker: _Waker) -> None:
    """pynetdicom 3.0.4's `DULServiceProvider.run_reactor`, waiting where it sleeps."""
    try:
        dul._idle_timer.start()
        sleep = False
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
                sleep = True
            if sleep:
                _wait_for_io(dul, waker)
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    pass
                elif dul._is_transport_event():
                    dul._idle_timer.restart()
            except Exception:
                # As pynetdicom does: bypass the state machine, send an A-ABORT, stop both threads.
                pynetdicom_dul.LOGGER.exception("Exception in DUL.run(), aborting association")
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                dul.socket.send(abort_pdu.encode())
                dul.assoc.is_aborted = True
                dul.assoc.is_established = False
                dul.assoc._kill = True
                dul._kill_thread = True
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            dul.state_machine.do_action(event)
            sleep = False
    finally:
        waker.close()


def _run_acceptor(assoc: Any, user_ready: threading.Event) -> None:
    """pynetdicom 3.0.4's `Association._run_reactor`, waiting where it sleeps."""
    assoc._is_paused = False
    while not assoc._kill:
        user_ready.wait(_MAX_WAIT)
        # Cleared before the queues are read: a put after this point sets it again.
        user_ready.clear()
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)
            # More may be queued already; look again before waiting.
            user_ready.set()
        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            pynetdicom_association.LOGGER.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return
        if assoc.acse.is_aborted():
            log_msg = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            pynetdicom_association.LOGGER.info(log_msg)
            assoc.dul.receive_pdu(wait=False)
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return
        if not assoc.dul.is_alive():
            assoc.kill()
            return
        if assoc.dul.idle_timer_expired():
            pynetdicom_association.LOGGER.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return
