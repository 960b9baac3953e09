"""Bounds on each accepted connection, enforced on the socket before pynetdicom reads or buffers anything.

pynetdicom 3.0 sets a timeout on the listening socket only: an accepted socket blocks forever, so a peer that
sends one byte and stalls holds its reader thread, its association slot and about 1.7 MB of memory for good;
and ``max_pdu`` is announced in the A-ASSOCIATE-AC but a P-DATA-TF PDU of any announced length is read.
Its reader (``DULServiceProvider._read_pdu_data``) reads a PDU as ``recv(6)`` for the header, then
``recv(length)``, through ``AssociationSocket.recv``, which calls the wrapped socket's ``recv``; the node's
streaming reader (:mod:`cxr_node.receive.streaming`) calls its ``recv_into``. So the node
hands pynetdicom sockets whose ``recv`` follows the PDU framing of the bytes it returns (:class:`PduGate`) and:

- gives each read a timeout: the time left until the ARTIM deadline (``node.artim_timeout_s`` after the
  connection was accepted) until the first PDU, the A-ASSOCIATE-RQ, is complete; then ``node.network_timeout_s``
  of silence in the middle of a PDU (pynetdicom's own network timeout covers silence *between* PDUs);
- refuses a P-DATA-TF PDU whose header announces more than the node's ``max_pdu`` (:data:`HARD_MAX_PDU` when
  ``max_pdu`` is 0) and any other PDU over :data:`MAX_CONTROL_PDU` as soon as its 6-byte header is in, before
  one byte of its body is read: the peer gets an A-ABORT (service provider, invalid PDU parameter value);
- follows the PDV items inside P-DATA-TF PDUs (:class:`PdvStream`): pynetdicom keeps a command set, and the data
  set of any message but a C-STORE-RQ (those are spooled to a file), in memory, so a command set over
  :data:`MAX_COMMAND_SET` or such a data set over :data:`MAX_MEMORY_DATASET` is refused the same way;
- on any of these, closes the connection and returns end-of-stream, which pynetdicom handles as a closed
  transport (an aborted association, its thread ended, its slot freed).

:class:`PeerSlots` counts open connections per peer address and in all, so one address cannot take every slot
and a flood cannot create threads without bound. ``tests/integration/test_hostile_peers.py`` pins the
pynetdicom behaviour this relies on.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

log = structlog.get_logger("cxr_node.receive")

PDU_HEADER: Final = 6
"""PDU type (1), reserved (1), length (4, big endian): PS3.8 9.3.1."""
P_DATA_TF: Final = 0x04
PDU_TYPES: Final = frozenset(range(0x01, 0x08))
"""The PDU types PS3.8 9.3 defines (A-ASSOCIATE-RQ 0x01 to A-ABORT 0x07)."""
HARD_MAX_PDU: Final = 64 * 1024 * 1024
"""The largest P-DATA-TF accepted when ``node.max_pdu`` is 0 (unlimited): a 4 GB length never allocates."""
MAX_CONTROL_PDU: Final = 1024 * 1024
"""The largest other PDU (an A-ASSOCIATE-RQ with every storage class proposed is about 100 kB)."""
MAX_COMMAND_SET: Final = 64 * 1024
"""The largest DIMSE command set accepted (one is a few hundred bytes)."""
MAX_MEMORY_DATASET: Final = 4 * 1024 * 1024
"""The largest data set of a message other than a C-STORE-RQ (pynetdicom holds those in memory)."""
C_STORE_RQ: Final = 0x0001
A_ABORT_INVALID_PDU_PARAMETER: Final = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06))
"""A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value): PS3.8 9.3.8, Table 9-26."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may do: time to its A-ASSOCIATE-RQ, silence inside a PDU, PDU lengths."""

    artim_s: float
    stall_s: float
    max_pdata: int
    max_other: int = MAX_CONTROL_PDU

    @classmethod
    def from_node(cls, artim_s: float, network_timeout_s: float, max_pdu: int) -> ConnectionLimits:
        """Limits from the node's keys; ``max_pdu`` 0 (unlimited) is capped at :data:`HARD_MAX_PDU`."""
        return cls(artim_s, network_timeout_s, min(max_pdu, HARD_MAX_PDU) if max_pdu else HARD_MAX_PDU)


class PduTooLong(Exception):
    """A PDU header announced more bytes than the node accepts."""


class Dropped(Exception):
    """The connection ran out of time: the ARTIM deadline passed, or a PDU stalled."""


class PduGate:
    """Follows the PDU framing of the bytes received on one connection and enforces its limits.

    Parameters
    ----------
    limits : ConnectionLimits
        The limits.
    accepted_at : float
        ``time.monotonic()`` when the connection was accepted: the ARTIM deadline counts from it.
    """

    def __init__(self, limits: ConnectionLimits, accepted_at: float) -> None:
        self.limits = limits
        self.deadline: float | None = accepted_at + limits.artim_s
        self._header = bytearray()
        self._remaining = 0
        self._pdvs: PdvStream | None = None
        self._messages = PdvStream()

    def timeout(self, now: float) -> float:
        """The socket timeout for the next read.

        Raises
        ------
        Dropped
            The ARTIM deadline has passed and the A-ASSOCIATE-RQ is still incomplete.
        """
        if self.deadline is None:
            return self.limits.stall_s
        left = self.deadline - now
        if left <= 0:
            raise Dropped(f"no complete A-ASSOCIATE-RQ within node.artim_timeout_s ({self.limits.artim_s:g} s)")
        return min(left, self.limits.stall_s)

    def timed_out(self, now: float) -> str:
        """Why a read that timed out at ``now`` ends the connection."""
        try:
            self.timeout(now)
        except Dropped as exc:
            return str(exc)
        return f"no data for node.network_timeout_s ({self.limits.stall_s:g} s) inside a PDU"

    def feed(self, data: bytes | memoryview) -> None:
        """Account for ``data`` just received.

        Raises
        ------
        PduTooLong
            A PDU header in ``data`` announces more than the limits allow.
        """
        view, at = memoryview(data), 0
        while at < len(view):
            if self._remaining:
                taken = min(self._remaining, len(view) - at)
                if self._pdvs is not None:
                    self._pdvs.feed(view[at : at + taken])
                self._remaining -= taken
                at += taken
                if not self._remaining:
                    self.deadline = None
                continue
            part = view[at : at + PDU_HEADER - len(self._header)]
            self._header += part
            at += len(part)
            if len(self._header) == PDU_HEADER:
                self._start_pdu(self._header[0], int.from_bytes(self._header[2:6], "big"))

    def _start_pdu(self, pdu_type: int, length: int) -> None:
        self._header.clear()
        if pdu_type not in PDU_TYPES:  # pynetdicom would read its body as further PDUs
            raise PduTooLong(f"unknown PDU type 0x{pdu_type:02X}")
        limit, key = (self.limits.max_pdata, "node.max_pdu") if pdu_type == P_DATA_TF else (self.limits.max_other, "")
        if length > limit:
            which = "P-DATA-TF" if pdu_type == P_DATA_TF else f"PDU type 0x{pdu_type:02X}"
            raise PduTooLong(f"{which} of {length} bytes over the {limit} accepted{f' ({key})' if key else ''}")
        self._remaining = length
        self._pdvs = self._messages if pdu_type == P_DATA_TF else None
        if not length:
            self.deadline = None


class PdvStream:
    """Follows the PDV items of the P-DATA-TF bodies of one connection (PS3.8 9.3.5, Annex E.2) and bounds what
    pynetdicom buffers in memory: command sets, and the data sets of messages other than C-STORE-RQ."""

    def __init__(self, max_command: int = MAX_COMMAND_SET, max_dataset: int = MAX_MEMORY_DATASET) -> None:
        self.max_command, self.max_dataset = max_command, max_dataset
        self._head = bytearray()
        self._left = 0
        self._control = 0
        self._command = bytearray()
        self._spooled = False
        self._dataset = 0

    def feed(self, data: memoryview) -> None:
        """Account for bytes of P-DATA-TF bodies; raise PduTooLong past a bound."""
        at = 0
        while at < len(data):
            if self._left:
                part = data[at : at + min(self._left, len(data) - at)]
                self._fragment(part)
                self._left -= len(part)
                at += len(part)
                if not self._left:
                    self._fragment_done()
                continue
            part = data[at : at + 6 - len(self._head)]
            self._head += part
            at += len(part)
            if len(self._head) == 6:  # item length (4), context ID (1), message control header (1)
                self._left, self._control = max(int.from_bytes(self._head[:4], "big") - 2, 0), self._head[5]
                self._head.clear()
                if not self._left:
                    self._fragment_done()

    def _fragment(self, part: memoryview) -> None:
        if self._control & 1:
            self._command += part
            if len(self._command) > self.max_command:
                raise PduTooLong(f"command set over {self.max_command} bytes")
        elif not self._spooled:
            self._dataset += len(part)
            if self._dataset > self.max_dataset:
                raise PduTooLong(f"data set of a message other than C-STORE over {self.max_dataset} bytes")

    def _fragment_done(self) -> None:
        if self._control & 3 == 3:  # the last fragment of a command set
            self._spooled = command_field(bytes(self._command)) == C_STORE_RQ
            self._command.clear()
            self._dataset = 0
        elif self._control & 3 == 2:  # the last fragment of a data set
            self._spooled, self._dataset = False, 0


def command_field(command: bytes) -> int | None:
    """The Command Field (0000,0100) of an encoded command set (implicit VR little endian), if present."""
    at = 0
    while at + 8 <= len(command):
        tag, length = struct.unpack_from("<LL", command, at)
        if tag == 0x01000000:  # (0000,0100): group 0000 then element 0100, little endian
            return int.from_bytes(command[at + 8 : at + 10], "little") if length >= 2 else None
        at += 8 + length
    return None


class GuardedSocket(socket.socket):
    """A TCP socket whose reads (``recv``, ``recv_into``) go through a :class:`PduGate`; ``close`` runs a callback."""

    gate: PduGate | None = None
    peer: str = ""
    _on_close: weakref.finalize[Any, Any] | None = None

    @classmethod
    def adopt(cls, sock: socket.socket) -> GuardedSocket:
        """Take over ``sock`` (an accepted connection); ``sock`` must not be used afterwards."""
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """Receive as a socket does, within the gate's limits; b'' once the connection has been dropped."""
        gate = self.gate
        if gate is None:
            return super().recv(buflen, flags)
        try:
            self.settimeout(gate.timeout(time.monotonic()))
            data = super().recv(buflen, flags)
            gate.feed(data)
        except TimeoutError:
            return self._drop(gate.timed_out(time.monotonic()))
        except Dropped as exc:
            return self._drop(str(exc))
        except PduTooLong as exc:
            self._send_quietly(A_ABORT_INVALID_PDU_PARAMETER)
            return self._drop(str(exc))
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        """Receive into ``buffer`` as a socket does, within the gate's limits (as :meth:`recv`); 0 once dropped."""
        size = nbytes or memoryview(buffer).nbytes
        gate = self.gate
        if gate is None:
            return super().recv_into(buffer, size, flags)
        try:
            self.settimeout(gate.timeout(time.monotonic()))
            got = super().recv_into(buffer, size, flags)
            gate.feed(memoryview(buffer)[:got])
        except TimeoutError:
            self._drop(gate.timed_out(time.monotonic()))
            return 0
        except Dropped as exc:
            self._drop(str(exc))
            return 0
        except PduTooLong as exc:
            self._send_quietly(A_ABORT_INVALID_PDU_PARAMETER)
            self._drop(str(exc))
            return 0
        return got

    def when_closed(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once when this socket is closed (or collected without being closed)."""
        self._on_close = weakref.finalize(self, callback)

    def close(self) -> None:
        """Close the socket and run the close callback."""
        if self._on_close is not None:
            self._on_close()
        super().close()

    def _drop(self, reason: str) -> bytes:
        self.gate = None
        log.warning("assoc.dropped", peer=self.peer, reason=reason)
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)
        return b""

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.settimeout(1.0)
            self.sendall(data)


class GuardedSSLSocket(GuardedSocket, ssl.SSLSocket):
    """The same for TLS: reads of decrypted bytes are gated (installed as the context's ``sslsocket_class``)."""


def guard(sock: socket.socket, limits: ConnectionLimits, peer: str) -> socket.socket:
    """Return ``sock`` (just accepted) as a guarded socket with a fresh gate; TLS sockets must be guarded already."""
    guarded = sock if isinstance(sock, GuardedSocket) else GuardedSocket.adopt(sock)
    guarded.gate = PduGate(limits, time.monotonic())
    guarded.peer = peer
    return guarded


class PeerSlots:
    """Open connections counted per peer address and in all.

    Parameters
    ----------
    per_peer : int
        Most connections from one address (``node.max_associations_per_peer``).
    total : int
        Most connections in all.
    """

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, address: str) -> str:
        """Take a slot for ``address``; return '' when taken, else why not."""
        with self._lock:
            if self._open[address] >= self.per_peer:
                return f"{self._open[address]} connections open from this address (node.max_associations_per_peer)"
            if sum(self._open.values()) >= self.total:
                return f"{self.total} connections open in all (2 x node.max_associations)"
            self._open[address] += 1
            return ""

    def give(self, address: str) -> None:
        """Return a slot taken for ``address``."""
        with self._lock:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]

    def open_from(self, address: str) -> int:
        """How many connections from ``address`` hold a slot now."""
        with self._lock:
            return self._open[address]


class RateLimitedLog:
    """Logs an event at most once per ``every_s`` per key, with how many were suppressed in between."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, event: str, key: str, **fields: Any) -> None:
        """Log ``event`` for ``key`` unless it was logged less than ``every_s`` ago."""
        with self._lock:
            now = self.clock()
            if now - self._last.get(key, float("-inf")) < self.every_s:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        log.warning(event, **fields, **({"suppressed": suppressed} if suppressed else {}))


class SharedPortServer(socketserver.TCPServer):
    """What the receivers' extra listeners (the STOW-RS endpoint, the HL7 listener) share: the port bound with
    SO_REUSEPORT when sibling receiver processes listen on it too, and a stop that lets the connections in progress
    finish. A subclass counts those in ``active`` under ``lock``."""

    reuse_port = False
    active = 0

    def server_bind(self) -> None:
        """Bind, sharing the port with sibling receiver processes when ``reuse_port`` is set."""
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def drain(self, grace_s: float) -> int:
        """Stop accepting, wait up to ``grace_s`` for the connections in progress, close the listening socket;
        return how many were still unfinished."""
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + grace_s
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.active
