"""DICOMweb in: the STOW-RS endpoint (PS3.18 10.5), the SCP's door over HTTP(S), in the receiver process.

``POST {base}/studies`` and ``POST {base}/studies/{study}`` take ``multipart/related; type="application/dicom"``.
Before a byte of the body is read, the request is refused when its route, address (403), bearer token (401),
media type (415), framing (411) or announced size (413) is wrong, or when the store is full or down (503,
the HTTP form of 0xA700); an ``Expect: 100-continue`` client is refused before it sends the body. Each part
then streams to a spool file and goes through :func:`~cxr_node.receive.stow_parts.store_part` (the SCP's checks
and :meth:`~cxr_node.receive.intake.Intake.accept`): an instance is listed as stored only after fsync and commit.

Every connection is bounded: a slot among ``stow.max_connections`` (``max_connections_per_peer`` per address,
the SCP's :class:`~cxr_node.receive.connections.PeerSlots`), ``header_timeout_s`` for the TLS handshake and the
headers, ``request_timeout_s`` for the body, ``idle_timeout_s`` of silence at most (:class:`DeadlineSocket`);
one request per connection. A failure never crosses the handler: it becomes an HTTP status and is logged
without patient data, the path (it holds a Study UID) or the token.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import http
import ipaddress
import json
import socket
import ssl
import sys
import tempfile
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from pydicom.uid import UID

from cxr_node.config import StowSettings
from cxr_node.dicom import status
from cxr_node.errors import ConfigError
from cxr_node.jobs import spool
from cxr_node.privacy import read_secret
from cxr_node.receive.connections import GuardedSocket, PeerSlots, RateLimitedLog, SharedPortServer
from cxr_node.receive.intake import Intake, Peer
from cxr_node.receive.multipart import (
    Body,
    BodyTooLarge,
    ChunkedBody,
    LengthBody,
    MalformedBody,
    MultipartReader,
    valid_boundary,
)
from cxr_node.receive.scp import tls_context
from cxr_node.receive.stow_parts import (
    DICOM_JSON,
    CappedSpool,
    PartResult,
    http_status,
    response_body,
    store_part,
    warnings,
)

log = structlog.get_logger("cxr_node.receive")

HEAD_BYTES: Final = 64 * 1024
"""Most bytes read from a connection before its headers are parsed (http.server alone would take 6 MB)."""
MIN_TOKEN: Final = 16
"""Fewest characters of a bearer token."""
LINGER_S: Final = 2.0
LINGER_BYTES: Final = 16 * 1024 * 1024
"""After refusing a request, what is read and dropped at most, so the client sees the answer (not a reset)."""
RETRY_AFTER_S: Final = "30"
BUSY: Final = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
UID_PATTERN: Final = "0123456789."


class Refused(Exception):
    """A request answered with an HTTP error before (or instead of) storing anything."""

    def __init__(self, code: http.HTTPStatus, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.headers = headers or {}


# ------------------------------------------------------------------------------------------- sockets


class DeadlineSocket(GuardedSocket):
    """A connection whose reads end at ``deadline`` and after ``idle_s`` of silence (a slow client costs a
    timeout, not a thread forever); ``close`` gives its slot back (:class:`GuardedSocket`)."""

    deadline: float = float("inf")
    idle_s: float = 30.0
    head_budget: int | None = HEAD_BYTES

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        """Receive as a socket does; raise TimeoutError once the deadline has passed."""
        self._before_read()
        return self._count(super().recv_into(buffer, nbytes, flags))

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """Receive as a socket does, within the same bounds as :meth:`recv_into`."""
        self._before_read()
        data = super().recv(buflen, flags)
        self._count(len(data))
        return data

    def allow(self, seconds: float) -> None:
        """Let reads go on for ``seconds`` from now (the request line and headers are over: no byte budget)."""
        self.deadline = time.monotonic() + seconds
        self.head_budget = None

    def _before_read(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.settimeout(min(self.idle_s, left))

    def _count(self, got: int) -> int:
        """Charge ``got`` bytes to the header budget; a client sending more headers than it is dropped."""
        if self.head_budget is not None:
            self.head_budget -= got
            if self.head_budget < 0:
                raise ConnectionAbortedError(f"request line and headers over {HEAD_BYTES} bytes")
        return got


class DeadlineSSLSocket(DeadlineSocket, ssl.SSLSocket):
    """The same over TLS (installed as the context's ``sslsocket_class``)."""


def read_token(path: Path | None) -> bytes | None:
    """The bearer token: the first line of ``path`` (None when no file is configured).

    The file is checked as ``storage.database_password_file`` is: readable, and by its owner only.

    Raises
    ------
    ConfigError
        When the file cannot be read, others may read it, or the token is shorter than :data:`MIN_TOKEN`.
    """
    if path is None:
        return None
    token = read_secret(path, "stow.token_file", ConfigError).strip()
    if len(token) < MIN_TOKEN:
        raise ConfigError(f"stow.token_file {path}: the token must be at least {MIN_TOKEN} characters")
    return token.encode("utf-8")


# ------------------------------------------------------------------------------------------- server


class StowServer(SharedPortServer, ThreadingHTTPServer):
    """The HTTP(S) server: connection slots, lazy TLS handshakes, SO_REUSEPORT, requests counted for shutdown."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(
        self,
        settings: StowSettings,
        intake: Intake,
        receiving: Path,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.receiving = receiving
        self.reuse_port = reuse_port
        self.token = read_token(settings.token_file)
        self.ssl_context = tls_context(settings.tls, "stow.tls", DeadlineSSLSocket)
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in settings.allowed_ips)
        self.slots = PeerSlots(settings.max_connections_per_peer, settings.max_connections)
        self.refusals = RateLimitedLog()
        self.active = 0
        self.lock = threading.Lock()
        self.address_family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        super().__init__((settings.host, settings.port), StowHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; wrap it for TLS without handshaking (done in its own thread, bounded in time)."""
        client, address = self.socket.accept()
        sock: DeadlineSocket
        if self.ssl_context is not None:
            wrapped = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            if not isinstance(wrapped, DeadlineSSLSocket):
                raise TypeError("the STOW TLS context must make DeadlineSSLSocket connections")
            sock = wrapped
        else:
            sock = DeadlineSocket(client.family, client.type, client.proto, fileno=client.detach())
        sock.idle_s = self.settings.idle_timeout_s
        sock.deadline = time.monotonic() + self.settings.header_timeout_s
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot for the peer, or refuse it at once (503, before any thread is made)."""
        address = client_address[0]
        if self.slots.take(address):
            full = self.slots.open_from(address) >= self.slots.per_peer
            limit = "stow.max_connections_per_peer" if full else "stow.max_connections"
            self.refusals.warning("stow.refused_connection", address, peer=_peer(client_address), limit=limit)
            if not isinstance(request, ssl.SSLSocket):
                with contextlib.suppress(OSError):
                    request.settimeout(0.5)
                    request.sendall(BUSY)
            return False
        if isinstance(request, GuardedSocket):
            request.when_closed(functools.partial(self.slots.give, client_address[0]))
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Finish the TLS handshake in the request's thread, within ``header_timeout_s``, then serve it."""
        with self.lock:
            self.active += 1
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.settings.header_timeout_s)
                    request.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    log.warning("stow.tls_failed", peer=_peer(client_address), error=str(exc)[:200])
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an error that escaped a handler (never printed to stderr with the request); a connection reset
        or a TLS error while the headers arrive is the client's doing, logged without a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.warning("stow.connection_lost", peer=_peer(client_address), error=type(error).__name__)
        else:
            log.exception("stow.unexpected_error", peer=_peer(client_address))

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in progress finish (up to ``grace_s``), close the listening socket."""
        log.info("stow.stopped", unfinished=self.drain(grace_s))


def start_stow(settings: StowSettings, intake: Intake, root: Path, reuse_port: bool = False) -> StowServer:
    """Listen on ``stow.host:stow.port`` in a background thread; return the server.

    Raises
    ------
    ConfigError
        When the address cannot be bound, or the TLS files or the token file are bad.
    """
    receiving = root / spool.RECEIVING
    receiving.mkdir(parents=True, exist_ok=True)
    try:
        server = StowServer(settings, intake, receiving, reuse_port=reuse_port)
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        raise ConfigError(f"stow.host/stow.port: cannot listen on {where}: {exc.strerror}") from exc
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="stow", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    log.info(
        "stow.listening",
        host=host,
        port=port,
        base_path=settings.base_path,
        tls=settings.tls.enabled,
        client_cert=settings.tls.require_client_cert,
        token=settings.token_file is not None,
    )
    if server.token is None and not settings.tls.require_client_cert:
        log.warning("stow.unauthenticated", hint="set stow.token_file or stow.tls.require_client_cert")
    return server


# ------------------------------------------------------------------------------------------- requests


class StowHandler(BaseHTTPRequestHandler):
    """One request per connection: refuse early, or stream the parts through the door and answer in DICOM JSON."""

    server: StowServer
    connection: DeadlineSocket
    protocol_version = "HTTP/1.1"
    server_version = "cxr-node"
    sys_version = ""

    def handle_expect_100(self) -> bool:
        """Answer ``Expect: 100-continue`` with the refusal when there is one, so the body is never sent."""
        try:
            self._preflight()
        except Refused as refused:
            self._refuse(refused, linger=False)
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:
        """Store the instances of a STOW-RS request."""
        self.close_connection = True
        started = time.monotonic()
        structlog.contextvars.bind_contextvars(stow_peer=_peer(self.client_address))
        try:
            study, body, boundary = self._preflight()
            self.connection.allow(self.server.settings.request_timeout_s)
            self._store(study, body, boundary, started)
        except Refused as refused:
            self._refuse(refused, linger=True)
        except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
            log.warning("stow.connection_lost", error=type(exc).__name__, seconds=round(time.monotonic() - started, 3))
        except Exception:
            log.exception("stow.unexpected_error")
            with contextlib.suppress(Exception):
                self._refuse(Refused(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"), linger=True)
        finally:
            structlog.contextvars.unbind_contextvars("stow_peer")

    def do_GET(self) -> None:
        """STOW-RS only: other methods are not allowed on the studies resource, and nothing else exists."""
        self.close_connection = True
        self._refuse(self._not_post(), linger=True)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals: 405 with ``Allow: POST`` for a method it has no handler for (it answered 501
        with an HTML page quoting the method); its other errors (a malformed request line) as it makes them."""
        if code == http.HTTPStatus.NOT_IMPLEMENTED and self.command and self.command.isalpha():
            self.close_connection = True
            self._refuse(Refused(http.HTTPStatus.METHOD_NOT_ALLOWED, "only POST (STOW-RS)", {"Allow": "POST"}), False)
            return
        super().send_error(code, message, explain)

    def _not_post(self) -> Refused:
        try:
            self._check_address()
            self._check_token()
            self._study()
        except Refused as refused:
            return refused
        return Refused(http.HTTPStatus.METHOD_NOT_ALLOWED, "only POST (STOW-RS)", {"Allow": "POST"})

    # -------------------------------------------------------------------------------------- preflight

    def _preflight(self) -> tuple[str | None, Body, str]:
        """Every check made before the body is read; return the target study, the body and the boundary."""
        self._check_address()
        self._check_token()
        study = self._study()
        boundary = self._boundary()
        body = self._body()
        self._check_store()
        return study, body, boundary

    def _study(self) -> str | None:
        """The Study Instance UID of the target (None for ``{base}/studies``); 404 for any other path."""
        path = urlsplit(self.path).path.rstrip("/")
        base = self.server.settings.base_path + "/studies"
        if path == base:
            return None
        head, _, study = path.rpartition("/")
        if head != base:
            raise Refused(http.HTTPStatus.NOT_FOUND, "no such resource")
        if len(study) > 64 or study.strip(UID_PATTERN) or not UID(study).is_valid:
            raise Refused(http.HTTPStatus.BAD_REQUEST, "the study in the path is not a valid UID")
        return study

    def _check_address(self) -> None:
        networks = self.server.networks
        if networks and not any(ipaddress.ip_address(self.client_address[0]) in net for net in networks):
            raise Refused(http.HTTPStatus.FORBIDDEN, "address not allowed (stow.allowed_ips)")

    def _check_token(self) -> None:
        expected = self.server.token
        if expected is None:
            return
        scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Refused(http.HTTPStatus.UNAUTHORIZED, "bearer token required", {"WWW-Authenticate": _challenge()})
        if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected):
            challenge = _challenge('error="invalid_token"')
            raise Refused(http.HTTPStatus.UNAUTHORIZED, "invalid bearer token", {"WWW-Authenticate": challenge})

    def _boundary(self) -> str:
        """The multipart boundary, after checking the media type is ``multipart/related`` of application/dicom."""
        message = Message()
        message["Content-Type"] = self.headers.get("Content-Type") or ""
        wanted = 'multipart/related; type="application/dicom"'
        if message.get_content_type() != "multipart/related":
            raise Refused(http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"expected {wanted}")
        kind = message.get_param("type")
        if kind is not None and str(kind).strip().lower() != "application/dicom":
            raise Refused(http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"only {wanted} (no metadata and bulk data)")
        boundary = message.get_param("boundary")
        if not isinstance(boundary, str) or not valid_boundary(boundary):
            raise Refused(http.HTTPStatus.BAD_REQUEST, "missing or invalid multipart boundary")
        return boundary

    def _body(self) -> Body:
        """The body reader, after checking the framing and the announced size against ``stow.max_body_mb``."""
        limit = self.server.settings.max_body_bytes
        coding = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if coding:
            if coding != "chunked":
                raise Refused(http.HTTPStatus.NOT_IMPLEMENTED, "only the chunked transfer coding")
            return ChunkedBody(self.rfile, limit)
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or ()}
        if len(lengths) > 1:  # which one frames the body is ambiguous (RFC 9112 6.3): a request smuggling vector
            raise Refused(http.HTTPStatus.BAD_REQUEST, "Content-Length given twice with different values")
        length = next(iter(lengths), "")
        if not length:
            raise Refused(http.HTTPStatus.LENGTH_REQUIRED, "Content-Length or chunked transfer coding required")
        if not length.isdigit() or len(length) > 19:
            raise Refused(http.HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        if int(length) > limit:
            raise Refused(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body over stow.max_body_mb")
        return LengthBody(self.rfile, int(length))

    def _check_store(self) -> None:
        """503 (retry later) when the store refuses new instances (queue or disk full) or cannot be read."""
        try:
            full = self.server.intake.pressure.reason()
        except Exception as exc:
            log.error("stow.store_unavailable", error=type(exc).__name__)
            full = "the store cannot be reached; retry later"
        if full:
            raise Refused(http.HTTPStatus.SERVICE_UNAVAILABLE, full, {"Retry-After": RETRY_AFTER_S})

    # -------------------------------------------------------------------------------------- the parts

    def _store(self, study: str | None, body: Body, boundary: str, started: float) -> None:
        reader = MultipartReader(body, boundary)
        results: list[PartResult] = []
        try:
            while (headers := reader.next_part()) is not None:
                if len(results) >= self.server.settings.max_instances:
                    raise BodyTooLarge("more parts than stow.max_instances")
                results.append(self._part(reader, headers, study))
            if not results:
                raise MalformedBody("no parts in the body")
            reader.drain(LINGER_BYTES)
        except (MalformedBody, BodyTooLarge) as exc:
            code = (
                http.HTTPStatus.BAD_REQUEST
                if isinstance(exc, MalformedBody)
                else http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
            self._answer(code, results, started, str(exc))
            return
        self._answer(http_status(results), results, started)

    def _part(self, reader: MultipartReader, headers: dict[str, str], study: str | None) -> PartResult:
        """Spool one part (capped at ``node.max_instance_mb``) and take it through the door."""
        refused = _part_refusal(headers)
        if refused:
            reader.read_part(lambda _data: None)
            log.warning("stow.part_rejected", reason=refused, status=f"0x{status.CANNOT_UNDERSTAND:04X}")
            return PartResult(status.CANNOT_UNDERSTAND, refused)
        intake = self.server.intake
        handle = tempfile.NamedTemporaryFile(dir=self.server.receiving, prefix="stow-", delete=False)  # noqa: SIM115
        path = Path(handle.name)
        try:
            with handle:
                spooled = CappedSpool(handle, intake.max_bytes)
                reader.read_part(spooled.write)
                spooled.finish()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if spooled.overflowed:
            path.unlink(missing_ok=True)
            log.warning(
                "stow.part_rejected", reason="over node.max_instance_mb", status=f"0x{status.INSTANCE_TOO_LARGE:04X}"
            )
            return PartResult(status.INSTANCE_TOO_LARGE, "instance over node.max_instance_mb")
        peer = Peer(ae_title="", address=f"{self._scheme()}://{_peer(self.client_address)}")
        return store_part(path, intake, peer, study)

    def _scheme(self) -> str:
        return "https" if isinstance(self.connection, ssl.SSLSocket) else "http"

    # -------------------------------------------------------------------------------------- answers

    def _answer(self, code: http.HTTPStatus, results: list[PartResult], started: float, error: str = "") -> None:
        stored = sum(result.stored for result in results)
        fields = {"status": int(code), "instances": len(results), "stored": stored, "failed": len(results) - stored}
        seconds = round(time.monotonic() - started, 3)
        if error:
            log.warning("stow.request_failed", **fields, reason=error, seconds=seconds)
        else:
            log.info("stow.request", **fields, seconds=seconds)
        headers = {"Retry-After": RETRY_AFTER_S} if code == http.HTTPStatus.SERVICE_UNAVAILABLE else {}
        notes = warnings(results) + ([f'299 cxr-node "{status.error_comment(error)}"'] if error else [])
        self._send(code, json.dumps(response_body(results)).encode("utf-8"), DICOM_JSON, headers, notes)
        if error:
            self._linger()

    def _refuse(self, refused: Refused, linger: bool) -> None:
        log.warning("stow.refused", status=int(refused.code), reason=refused.reason, peer=_peer(self.client_address))
        self.close_connection = True
        text = f"{int(refused.code)} {refused.code.phrase}: {refused.reason}\n".encode()
        self._send(refused.code, text, "text/plain; charset=utf-8", refused.headers, [])
        if linger:
            self._linger()

    def _send(self, code: int, body: bytes, kind: str, headers: dict[str, str], notes: list[str]) -> None:
        self.connection.settimeout(self.server.settings.idle_timeout_s)
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        for note in notes:
            self.send_header("Warning", note)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends (bounded), so it reads the answer."""
        with contextlib.suppress(OSError, ValueError):
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.allow(LINGER_S)
            dropped = 0
            while dropped < LINGER_BYTES and (data := self.connection.recv(65536)):
                dropped += len(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's access log: it would print the path (a Study UID) to stderr."""

    def log_error(self, format: str, *args: Any) -> None:
        """Log http.server's protocol errors without their arguments (they quote what the client sent)."""
        if format.startswith("code %d") and args:
            log.warning("stow.protocol_error", status=args[0])
        else:
            log.warning("stow.protocol_error", error=format.split("%")[0].strip(" :(") or "error")


def _part_refusal(headers: dict[str, str]) -> str:
    """Why a part is not an application/dicom instance in binary ('' when it is; a part without a type is one)."""
    message = Message()
    message["Content-Type"] = headers.get("content-type") or "application/dicom"
    if message.get_content_type() != "application/dicom":
        return "part is not application/dicom"
    if headers.get("content-transfer-encoding", "binary").strip().lower() not in ("binary", "8bit", "7bit"):
        return "part content transfer encoding is not binary"
    return ""


def _challenge(extra: str = "") -> str:
    return 'Bearer realm="cxr-node"' + (f", {extra}" if extra else "")


def _peer(address: Any) -> str:
    return f"{address[0]}:{address[1]}"
