"""The association's receive path: P-DATA streamed from the socket into the spool file, threads woken by events.

pynetdicom 3.0.4 (pinned) runs two threads per association that poll: the DUL reactor checks the socket with a
zero-timeout ``select`` and sleeps 1 ms when idle, and the association reactor sleeps 1 ms between looks at its
queues. Each P-DATA-TF PDU is read in 4 KiB ``recv`` calls, joined, copied to ``bytes``, decoded into PDV items
(copied again) and turned into a primitive before the DIMSE layer writes the data set fragment to the spool file.
With 4 associations in one process the 8 polling threads hand the GIL over thousands of times a second.

This module replaces those parts, and only those, for the associations the node accepts:

- :class:`StreamingDUL` waits in ``select`` on the socket *and* a wake-up pipe written whenever a primitive is
  queued for sending (a C-STORE response), instead of sleeping and polling;
- in the established state (Sta6) with nothing else pending, it reads a P-DATA-TF PDU with ``recv_into`` into
  one reusable buffer, checks its PDV items and hands memoryviews of them to pynetdicom's DIMSE layer, which
  writes the data set fragments to the spool file: no per-PDU copies. This is exactly what pynetdicom's state
  machine does for Evt10 in Sta6 (action DT-2: the P-DATA indication to the DIMSE provider, state unchanged), less
  the ``EVT_DATA_RECV``/``EVT_PDU_RECV``/``EVT_FSM_TRANSITION`` notifications (the node binds none; pynetdicom's
  debug log loses its line per P-DATA PDU). Every other PDU, and any PDU in another state, takes pynetdicom's path;
- :class:`StreamingAssociation` sleeps on an event set when a DIMSE message, an ACSE primitive or the DUL's end
  arrives, instead of every millisecond.

Reads still go through the connection's :class:`~cxr_node.receive.connections.GuardedSocket` (``recv_into`` is
gated like ``recv``), so the ARTIM deadline, stalls, PDU length and PDV bounds hold as before; the bytes written to
the spool file are the same, so stored files are byte-identical. ``tests/integration/test_streaming.py`` runs real
associations through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any, Final, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler
from pynetdicom.utils import make_target

from cxr_node.receive.connections import P_DATA_TF, PDU_TYPES

ESTABLISHED: Final = "Sta6"
WAIT_S: Final = 0.05
"""Longest sleep of either thread: bounds how late a timer (ARTIM, network timeout) or a kill is noticed."""
IDLE: Final = "Sta1"
"""The state machine's idle state (PS3.8 9.2): no transport connection."""
_CLOSED: Final = frozenset({"Evt17", "Evt18"})
"""Transport connection closed, ARTIM timer expired (PS3.8 Table 9-9)."""
DUL_LOG: Final = logging.getLogger("pynetdicom.dul")  # pynetdicom's loggers and words, as in the code replaced
ASSOC_LOG: Final = logging.getLogger("pynetdicom.assoc")


class SignallingQueue(queue.Queue[Any]):
    """A queue that calls ``signal()`` after each ``put``, so a thread can sleep until something arrives."""

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item`` and signal."""
        super().put(item, block, timeout)
        self._signal()


class WakePipe:
    """A pipe whose read end ``select`` can wait on; ``wake()`` from any thread, safe after ``close()``."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        """Make the read end readable (a full pipe is already readable)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        """Empty the pipe."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        """Close both ends (later ``wake()`` calls do nothing: the descriptors may be reused)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._write_fd)
                os.close(self.read_fd)


class StreamingDUL(DULServiceProvider):
    """pynetdicom's DUL provider, waiting on events instead of polling, streaming P-DATA in the established state.

    Parameters
    ----------
    assoc : Association
        The association (a :class:`StreamingAssociation`).
    activity : threading.Event
        Set whenever a primitive is queued for the association thread, and when this thread ends.
    """

    def __init__(self, assoc: Association, activity: threading.Event) -> None:
        super().__init__(assoc)
        self._wake = WakePipe()
        self._activity = activity
        self.to_provider_queue = SignallingQueue(self._wake.wake)
        self.to_user_queue = SignallingQueue(activity.set)
        self._buffer = bytearray()

    def kill_dul(self) -> None:
        """Stop the reactor (and wake it to notice)."""
        super().kill_dul()
        self._wake.wake()

    def stop_dul(self) -> bool:
        """Stop the reactor when idle (Sta1), waking it to notice."""
        stopped = super().stop_dul()
        if stopped:
            self._wake.wake()
        return stopped

    def run_reactor(self) -> None:
        """pynetdicom's reactor loop, with :meth:`_wait` where it slept 1 ms; the wake pipe is closed at the end."""
        try:
            self._reactor()
        finally:
            self._wake.close()
            self._activity.set()

    def _reactor(self) -> None:
        self._idle_timer.start()
        while not self._kill_thread:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                self._abort_hard()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait()
                continue
            try:  # a request pynetdicom cannot act on (an even presentation context ID) raises here
                self.state_machine.do_action(event)
            except Exception:
                self._abort_hard()
                return
            if event in _CLOSED and self.state_machine.current_state == IDLE and not self.assoc.is_established:
                self._no_request()  # closed before any association

    def _abort_hard(self) -> None:
        """What pynetdicom does when its reactor raises: send an A-ABORT, bypassing the state machine, and stop."""
        DUL_LOG.exception("Exception in DUL.run(), aborting association")
        self.abort_and_stop()
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True

    def _no_request(self) -> None:
        """Tell an acceptor waiting for the A-ASSOCIATE-RQ that none will come, as its wait timing out does (None):
        it stops and closes the connection at once rather than at ``node.acse_timeout_s``."""
        cast(Any, self.to_user_queue).put(None)

    def abort_and_stop(self) -> None:
        """Send the peer an A-ABORT (service provider, reason not specified), bypassing the state machine, and stop
        this reactor."""
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x00
        with contextlib.suppress(OSError, AttributeError):
            cast(Any, self.socket).send(abort.encode())
        self._kill_thread = True
        self._wake.wake()
        self._no_request()

    def _wait(self) -> None:
        """Sleep until the socket is readable, a primitive is queued, or :data:`WAIT_S` passes."""
        raw = self.socket.socket if self.socket is not None else None
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        watched: list[Any] = [self._wake.read_fd]
        if raw is not None and self.socket is not None and self.socket._is_connected:
            watched.append(raw)
        try:
            select.select(watched, [], [], WAIT_S)
        except (OSError, ValueError):  # the socket was closed under us: the next loop notices
            select.select([self._wake.read_fd], [], [], 0.001)
        self._wake.drain()

    # --------------------------------------------------------------------------------------- reading

    def _read_pdu_data(self) -> None:
        """Read one PDU: a P-DATA-TF in Sta6 is streamed (:meth:`_stream_pdata`), any other goes pynetdicom's way."""
        if self.state_machine.current_state != ESTABLISHED or not self.event_queue.empty():
            super()._read_pdu_data()
            return
        header = self._recv_exact(6)
        if header is None:
            self.event_queue.put("Evt17")  # closed before the whole PDU was received
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in PDU_TYPES:
            DUL_LOG.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        if pdu_type == P_DATA_TF:
            self._stream_pdata(length)
        else:
            self._decode_other(header, length)

    def _recv_exact(self, length: int) -> memoryview | None:
        """Read exactly ``length`` bytes into the reusable buffer; None when the connection ends first."""
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)[:length]
        raw = cast(socket.socket, cast(Any, self.socket).socket)
        at = 0
        try:
            while at < length:
                got = raw.recv_into(view[at:], length - at)
                if not got:
                    return None
                at += got
        except (OSError, TimeoutError):
            return None
        return view

    def _stream_pdata(self, length: int) -> None:
        """Read a P-DATA-TF body and give its PDVs, as views of the buffer, to the DIMSE provider (Evt10 in Sta6)."""
        body = self._recv_exact(length)
        if body is None:
            DUL_LOG.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        pdvs = split_pdvs(body)
        if pdvs is None:
            DUL_LOG.error("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return
        primitive = P_DATA()
        primitive._presentation_data_value_list = cast(list[tuple[int, bytes]], pdvs)
        try:
            self.assoc.dimse.receive_primitive(primitive)
        finally:
            pdvs.clear()  # no view of the buffer outlives this PDU: the next one is read into it

    def _decode_other(self, header: memoryview, length: int) -> None:
        """pynetdicom's handling of a whole PDU other than P-DATA-TF (its header already read)."""
        bytestream = bytearray(header)
        try:
            bytestream += cast(Any, self.socket).recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if len(bytestream) != 6 + length:
            DUL_LOG.error("The received PDU is shorter than expected")
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(bytestream)
        except Exception:
            DUL_LOG.exception("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


def split_pdvs(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """The (context ID, message control header + fragment) PDV items of a P-DATA-TF body; None when malformed.

    PS3.8 9.3.5: each item is a 4-byte big-endian length, then that many bytes: the presentation context ID and
    the fragment with its 1-byte message control header. An item shorter than 2 bytes, or running past the body,
    makes the PDU invalid (pynetdicom answers such a PDU with an A-ABORT, as here through Evt19).
    """
    pdvs, at, end = [], 0, len(body)
    if not end:
        return None
    while at < end:
        if at + 4 > end:
            return None
        item = int.from_bytes(body[at : at + 4], "big")
        if item < 2 or at + 4 + item > end:
            return None
        pdvs.append((body[at + 4], body[at + 5 : at + 4 + item]))
        at += 4 + item
    return pdvs


class StreamingAssociation(Association):
    """pynetdicom's acceptor association whose reactor sleeps on an event instead of waking every millisecond.

    Made from the association pynetdicom builds for each connection by :func:`streaming` (the class is swapped,
    the DUL provider and the message queue replaced before the socket is read).
    """

    activity: threading.Event

    def run_reactor(self) -> None:
        """pynetdicom's association reactor; where it raises (pynetdicom cannot negotiate a request: a presentation
        context without a transfer syntax), the peer gets an A-ABORT and the connection is closed at once. Left to
        pynetdicom, the thread ended with the connection still open and counted, with no timeout to close it."""
        try:
            super().run_reactor()
        except Exception as exc:
            ASSOC_LOG.warning("Association request not negotiable, aborted: %s", type(exc).__name__)
            dul = cast(StreamingDUL, self.dul)
            dul.abort_and_stop()
            self.is_aborted, self.is_established, self._kill = True, False, True
            sock = cast(Any, dul.socket)
            if self._server is not None and sock is not None and sock.socket is not None:
                self._server.shutdown_request(sock.socket)

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (``Association._run_reactor`` of 3.0.4), waiting on :attr:`activity`."""
        self._is_paused = False
        while not self._kill:
            self.activity.wait(WAIT_S)
            self.activity.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self.activity.set()  # another message may have arrived meanwhile: look again at once
            if _base_checks(self):
                return


def _base_checks(assoc: Association) -> bool:
    """The checks of pynetdicom 3.0.4's ``Association._run_reactor`` after serving a message; True to stop."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        ASSOC_LOG.info("Association Released")
        assoc.is_released = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
        assoc.kill()
        return True
    if assoc.acse.is_aborted():
        ASSOC_LOG.info("Association Aborted" + (" (A-P-ABORT)" if assoc.acse.is_aborted("a-p-abort") else ""))
        assoc.dul.receive_pdu(wait=False)
        assoc.is_aborted = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc.kill()
        return True
    if not assoc.dul.is_alive():
        assoc.kill()
        return True
    if assoc.dul.idle_timer_expired():
        DUL_LOG.error("Network timeout reached")
        if assoc.network_timeout_response == "A-RELEASE":
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc.release()
            assoc._is_paused = False
        else:
            assoc.abort()
        assoc.kill()
        return True
    return False


def streaming(assoc: Association) -> StreamingAssociation:
    """Turn an acceptor association pynetdicom just built (socket set, not started) into a streaming one."""
    old = assoc.dul
    assoc.__class__ = StreamingAssociation
    streamer = cast(StreamingAssociation, assoc)
    streamer.activity = threading.Event()
    dul = StreamingDUL(streamer, streamer.activity)
    dul.socket = old.socket
    dul.event_queue = old.event_queue  # holds Evt5 (transport connection indication), put when the socket was set
    streamer.dul = dul
    streamer.acse_timeout = streamer.acse_timeout  # the setters put the timeouts on the new DUL's timers
    streamer.network_timeout = streamer.network_timeout
    streamer.dimse.msg_queue = SignallingQueue(streamer.activity.set)
    cast(Any, streamer)._target = make_target(streamer.run_reactor)  # the thread's target: bound before the swap
    return streamer


class StreamingRequestHandler(RequestHandler):
    """pynetdicom's request handler, building :class:`StreamingAssociation` acceptors."""

    def _create_association(self) -> Association:
        return streaming(super()._create_association())
