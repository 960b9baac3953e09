"""HL7 v2 in: the MLLP listener of the receivers (``hl7_in``), answering each ORU^R01 only after its commit.

Each connection reads MLLP frames (``<VT> message <FS><CR>``) one after the other. A message is read by
:mod:`~cxr_node.outcomes.hl7_message`, its findings mapped and recorded in the store (committed on return),
and only then answered ``AA``; a message that is readable but unusable is answered ``AE`` (nothing recorded),
one that is not an ORU^R01 ``AR``. When the store fails, the connection is closed without an answer: the
sender resends, and a repeat (same MSH-10 and OBX) is recorded once. So a ``kill -9`` at any moment loses
nothing that was acknowledged.

Every connection is bounded: a slot among ``max_connections`` (``max_connections_per_peer`` per address),
the allow-list checked before a byte is read, ``timeout_s`` of silence at most (and for the TLS handshake),
``message_timeout_s`` for one message, ``max_message_bytes`` for its size. Bytes outside MLLP framing, or a
message too large, are answered ``AR`` and the connection closed. A failure never crosses the handler.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import socketserver
import ssl
import threading
import time
from typing import Any, Final

import structlog

from cxr_node.config import Hl7InSettings, Settings
from cxr_node.errors import ConfigError
from cxr_node.jobs.interfaces import OutcomeStore
from cxr_node.jobs.records import NewOutcome
from cxr_node.outcomes import hl7_message
from cxr_node.outcomes.hl7_message import ACCEPTED, ERROR, REJECTED, Refusal, ack, parse_oru, plan
from cxr_node.outcomes.mapping import Mapping, load_mapping
from cxr_node.receive.connections import PeerSlots, RateLimitedLog, SharedPortServer
from cxr_node.receive.scp import tls_context

log = structlog.get_logger(__name__)

START: Final = b"\x0b"
END: Final = b"\x1c\x0d"
BETWEEN_FRAMES: Final = b"\r\n\t "


class NotMllp(Exception):
    """Bytes outside an MLLP frame."""


class TooLarge(Exception):
    """A frame over ``max_message_bytes``; ``prefix`` is what arrived of it."""

    def __init__(self, prefix: bytes) -> None:
        super().__init__("message too large")
        self.prefix = prefix


class NoAnswer(Exception):
    """The message could not be recorded (the store failed): close without an answer, so the sender resends."""


class Framer:
    """MLLP framing: bytes in, whole messages out, each at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.inside = False
        self.broken = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the messages it completed.

        Raises
        ------
        NotMllp
            On bytes other than white space between frames, when no message came before them in ``data`` (else the
            messages come back and :attr:`broken` says what follows them is not MLLP: they are answered first).
        TooLarge
            When a message grows over ``max_bytes``.
        """
        if self.broken:
            raise NotMllp
        self.buffer += data
        frames: list[bytes] = []
        while True:
            if not self.inside:
                del self.buffer[: len(self.buffer) - len(self.buffer.lstrip(BETWEEN_FRAMES))]
                if not self.buffer:
                    return frames
                if self.buffer[:1] != START:
                    self.broken = True
                    if frames:
                        return frames
                    raise NotMllp
                del self.buffer[:1]
                self.inside = True
            end = self.buffer.find(END)
            if end < 0 or end > self.max_bytes:
                if len(self.buffer) > self.max_bytes + len(END):
                    raise TooLarge(bytes(self.buffer[:4096]))
                return frames
            frames.append(bytes(self.buffer[:end]))
            del self.buffer[: end + len(END)]
            self.inside = False

    @property
    def started(self) -> bool:
        """True while a message has begun and not ended."""
        return self.inside


def frame(message: bytes) -> bytes:
    """``message`` in an MLLP frame."""
    return START + message + END


class Hl7Server(SharedPortServer, socketserver.ThreadingTCPServer):
    """The MLLP server: allow-list and connection slots before a thread is made, TLS handshakes in the thread."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, settings: Hl7InSettings, outcomes: OutcomeStore, mapping: Mapping, reuse_port: bool = False):
        self.settings = settings
        self.outcomes = outcomes
        self.mapping = mapping
        self.reuse_port = reuse_port
        self.ssl_context = tls_context(settings.tls, "hl7_in.tls", ssl.SSLSocket)
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_ips)
        self.slots = PeerSlots(settings.max_connections_per_peer, settings.max_connections)
        self.refusals = RateLimitedLog()
        self.active = 0
        self.lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        super().__init__((settings.host, settings.port), Hl7Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse an address outside ``allowed_ips``, or one over its slots, before reading a byte."""
        address = str(client_address[0])
        if self.networks and not any(ipaddress.ip_address(address) in net for net in self.networks):
            self.refusals.warning("hl7.refused_connection", address, peer=_peer(client_address), why="allowed_ips")
            return False
        why = self.slots.take(address)
        if why:
            limit = "max_connections_per_peer" if "this address" in why else "max_connections"
            self.refusals.warning("hl7.refused_connection", address, peer=_peer(client_address), why=limit)
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection in its thread (TLS handshake first, bounded by ``timeout_s``); free its slot."""
        with self.lock:
            self.active += 1
        try:
            connection = self._secured(request, client_address)
            if connection is not None:
                super().process_request_thread(connection, client_address)
        finally:
            self.slots.give(str(client_address[0]))
            with self.lock:
                self.active -= 1

    def _secured(self, request: socket.socket, client_address: Any) -> socket.socket | None:
        request.settimeout(self.settings.timeout_s)
        if self.ssl_context is None:
            return request
        try:
            return self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("hl7.tls_failed", peer=_peer(client_address), error=str(exc)[:200])
            self.shutdown_request(request)
            return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an error that escaped a handler, never to stderr."""
        log.exception("hl7.unexpected_error", peer=_peer(client_address))

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let connections in progress finish (up to ``grace_s``), close the listening socket."""
        log.info("hl7.stopped", unfinished=self.drain(grace_s))


class Hl7Handler(socketserver.BaseRequestHandler):
    """One connection: frames in, one answer per frame, until the peer closes, stalls or misbehaves."""

    server: Hl7Server
    request: socket.socket

    def handle(self) -> None:
        """Read and answer messages; any failure ends this connection only."""
        peer = _peer(self.client_address)
        try:
            self._serve(peer)
        except NotMllp:
            log.warning("hl7.refused", peer=peer, code=REJECTED, reason="bytes outside an MLLP frame")
            self._send(ack(None, REJECTED, "not MLLP: expected <VT> message <FS><CR>", hl7_message.DATA_TYPE_ERROR))
            self._drain()
        except TooLarge as exc:
            limit = self.server.settings.max_message_bytes
            log.warning("hl7.refused", peer=peer, code=REJECTED, reason="message too large", limit=limit)
            header = hl7_message.header_of(exc.prefix)
            self._send(ack(header, REJECTED, f"message larger than {limit} bytes", hl7_message.DATA_TYPE_ERROR))
            self._drain()
        except NoAnswer:
            pass  # logged where it happened; the sender resends
        except TimeoutError:
            log.info("hl7.timed_out", peer=peer)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("hl7.connection_lost", peer=peer, error=type(exc).__name__)

    def _serve(self, peer: str) -> None:
        settings = self.server.settings
        framer = Framer(settings.max_message_bytes)
        began = idle_since = time.monotonic()
        while True:
            now = time.monotonic()
            if framer.started:
                wait = min(settings.timeout_s, began + settings.message_timeout_s - now)
            else:  # white space between frames is no activity: it cannot hold a connection open
                wait = idle_since + settings.timeout_s - now
            if wait <= 0:
                raise TimeoutError
            self.request.settimeout(wait)
            data = self.request.recv(65536)
            if not data:
                return
            was_started = framer.started
            messages = framer.feed(data)
            if framer.started and (not was_started or messages):
                began = time.monotonic()  # a new message began in these bytes: its own time starts
            for message in messages:
                self._send(self.server_answer(message, peer))
            if messages or framer.started:
                idle_since = time.monotonic()
            if framer.broken:  # what followed the messages just answered is not MLLP
                raise NotMllp

    def server_answer(self, message: bytes, peer: str) -> bytes:
        """The ACK of one message, after its findings are committed."""
        return answer(message, self.server.outcomes, self.server.mapping, self.server.settings, peer)

    def _drain(self, seconds: float = 1.0, most: int = 1_048_576) -> None:
        """Half-close, then read and drop what the peer still sends (bounded), so the refusal reaches it before
        the close (closing with unread bytes would reset the connection and could discard the answer)."""
        deadline, dropped = time.monotonic() + seconds, 0
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_WR)
            while dropped < most and (left := deadline - time.monotonic()) > 0:
                self.request.settimeout(left)
                data = self.request.recv(65536)
                if not data:
                    return
                dropped += len(data)

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.request.settimeout(self.server.settings.timeout_s)
            self.request.sendall(frame(data))


def answer(message: bytes, outcomes: OutcomeStore, mapping: Mapping, settings: Hl7InSettings, peer: str = "") -> bytes:
    """Read, map and record one message; return its ACK (AA only once every finding is committed).

    Raises
    ------
    NoAnswer
        When the store fails: nothing is answered, so the sender sends the message again.
    """
    try:
        oru = parse_oru(message, settings.accession_fields)
    except Refusal as refusal:
        control = refusal.header.control_id[:64] if refusal.header else ""
        log.warning("hl7.refused", peer=peer, code=refusal.code, reason=refusal.reason, control_id=control)
        return ack(refusal.header, refusal.code, refusal.reason, refusal.error)
    found = plan(oru, mapping)
    control_id = oru.header.control_id[:64]
    if not found.outcomes:
        if found.only_not_final:
            log.info("hl7.ignored", peer=peer, control_id=control_id, left_out=found.left_out)
            return ack(oru.header, ACCEPTED, "not final: nothing recorded")
        reason = next(iter(found.left_out), "no finding")
        log.warning("hl7.refused", peer=peer, code=ERROR, reason=reason, control_id=control_id, left_out=found.left_out)
        return ack(oru.header, ERROR, f"nothing recorded: {reason}", hl7_message.APPLICATION_ERROR)
    created, reused = _record(found.outcomes, outcomes, peer, control_id)
    labels = sorted({outcome.label for outcome in found.outcomes})
    repeated = len(found.outcomes) - created - reused
    if reused:  # the control ID (and set ID) of another message: its findings are not this one's
        log.warning("hl7.refused", peer=peer, code=ERROR, reason="MSH-10 already used by another message",
                    control_id=control_id, recorded=created, reused=reused)  # fmt: skip
        text = f"MSH-10 already used by another message: {reused} finding(s) not recorded, recorded {created}"
        return ack(oru.header, ERROR, text, hl7_message.APPLICATION_ERROR)
    log.info("hl7.accepted", peer=peer, control_id=control_id, recorded=created,
             repeated=repeated, labels=labels, left_out=found.left_out)  # fmt: skip
    left = sum(found.left_out.values())
    text = f"recorded {created}, repeated {repeated}" + (f", left out {left}" if left else "")
    return ack(oru.header, ACCEPTED, text)


def _record(news: tuple[NewOutcome, ...], outcomes: OutcomeStore, peer: str, control_id: str) -> tuple[int, int]:
    """Record each outcome; return how many were new and how many found another finding under their key (a
    control ID the sender used for another message: what is stored stays)."""
    created = reused = 0
    for new in news:
        try:
            stored, was_new = outcomes.record(new)
        except Exception as exc:  # the store is down or full: no answer, the sender resends
            log.error("hl7.store_failed", peer=peer, control_id=control_id, error=f"{type(exc).__name__}: {exc}"[:300])
            raise NoAnswer from exc
        created += was_new
        reused += not was_new and (stored.accession_number, stored.label) != (new.accession_number, new.label)
    return created, reused


def start_hl7_in(settings: Settings, outcomes: OutcomeStore, reuse_port: bool = False) -> Hl7Server:
    """Listen on ``hl7_in.host:hl7_in.port`` in a background thread; return the server.

    Raises
    ------
    ConfigError
        When the mapping file is bad, the address cannot be bound, or the TLS files cannot be loaded.
    """
    try:
        mapping = load_mapping(settings.outcomes.mapping)
    except ValueError as exc:
        raise ConfigError(f"outcomes.mapping: {exc}") from exc
    section = settings.hl7_in
    try:
        server = Hl7Server(section, outcomes, mapping, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(
            f"hl7_in.host/hl7_in.port: cannot listen on {section.host}:{section.port}: {exc.strerror}"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="hl7_in", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    tls = section.tls
    log.info("hl7.listening", host=host, port=port, tls=tls.enabled, client_cert=tls.require_client_cert,
             allowed_ips=len(section.allowed_ips), mapping=str(settings.outcomes.mapping))  # fmt: skip
    return server


def _peer(client_address: Any) -> str:
    return f"{client_address[0]}:{client_address[1]}"
