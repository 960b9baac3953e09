"""Results to a DICOMweb server: STOW-RS over the standard library's HTTP client, with TLS and basic or bearer auth.

A :class:`DicomwebTransport` is the DICOMweb side of :mod:`cxr_node.send.transport`: one HTTP(S) connection per
delivery round (kept alive between its requests), one POST to ``<url>/studies`` per output, each answer judged by
:mod:`cxr_node.send.stow`. Its probe (and ``cxr-node echo``) is a QIDO-RS query of one study at the same root: it
checks the address, TLS, the credentials and that a DICOMweb service answers there; which SOP classes the server
stores only its STOW-RS answers can say. Secrets are read from their files at each connection (so a rotated token
is used at once), refused when group or others may read them, and never logged.
"""

from __future__ import annotations

import base64
import http.client
import io
import ssl
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from cxr_node import privacy
from cxr_node.config import Destination
from cxr_node.errors import SendError
from cxr_node.send import stow
from cxr_node.send.scu import ClientTLS, StoreResult

log = structlog.get_logger("cxr_node.send")

USER_AGENT: Final = "cxr-node"
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
"""What a kept-alive connection the server closed meanwhile raises: the request is sent again once, on a new one."""


def read_secret(path: Path, key: str) -> str:
    """The first line of the secret file ``path`` (the config key ``key`` names it in messages).

    Raises
    ------
    SendError
        When it cannot be read, is empty, or group or others may read it.
    """
    secret = privacy.read_secret(path, key, SendError).strip()
    if not secret:
        raise SendError(f"{key} {path}: the file is empty")
    return secret


@dataclass(frozen=True)
class Credentials:
    """How the node authenticates: nothing, HTTP basic (user and a password file) or a bearer token file."""

    scheme: str = "none"
    username: str | None = None
    secret_file: Path | None = None

    def header(self) -> str | None:
        """The Authorization header's value, read from the secret file now; None without auth.

        Raises
        ------
        SendError
            When the secret file is unusable (see :func:`read_secret`).
        """
        if self.scheme == "none" or self.secret_file is None:
            return None
        if self.scheme == "basic":
            password = read_secret(self.secret_file, "password_file")
            return "Basic " + base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")
        return "Bearer " + read_secret(self.secret_file, "token_file")

    def __repr__(self) -> str:
        return f"Credentials({self.scheme}, user={self.username!r}, file={self.secret_file})"


class DicomwebTransport:
    """STOW-RS to the DICOMweb root ``url``; TLS for an https URL (``tls`` names the CA and client certificate)."""

    def __init__(self, url: str, credentials: Credentials, timeout_s: float, tls: ClientTLS | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SendError(f"{url}: not an http(s) URL")
        self.url = url.rstrip("/")
        self.secure = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.root = parts.path.rstrip("/")
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.tls = (tls or ClientTLS()) if self.secure else None

    @classmethod
    def of(cls, destination: Destination, timeout_s: float) -> DicomwebTransport:
        """The transport of a configured ``protocol: dicomweb`` destination."""
        if destination.url is None:
            raise SendError(f"destination {destination.name} has no url")
        secret = destination.password_file if destination.auth == "basic" else destination.token_file
        credentials = Credentials(destination.auth, destination.username, secret)
        tls = ClientTLS(destination.ca_file, destination.cert_file, destination.key_file)
        secure = destination.url.startswith("https:")
        if destination.auth != "none" and not secure:
            log.warning("destination.credentials_in_clear", destination=destination.name, url=destination.url)
        return cls(destination.url, credentials, timeout_s, tls if secure else None)

    def __str__(self) -> str:
        return f"{self.url} (DICOMweb{', TLS' if self.secure else ''})"

    def connection(self) -> http.client.HTTPConnection:
        """A new connection to the server (not yet connected).

        Raises
        ------
        SendError
            When the TLS files cannot be used.
        """
        if self.tls is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self.tls.context())
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def headers(self) -> dict[str, str]:
        """The headers every request carries (Authorization read from its file now)."""
        headers = {"User-Agent": USER_AGENT, "Accept": stow.ACCEPT}
        authorization = self.credentials.header()
        if authorization is not None:
            headers["Authorization"] = authorization
        return headers

    def probe(self, sop_classes: Sequence[str]) -> frozenset[str]:
        """Query one study (QIDO-RS) to check address, TLS, credentials and service; every class is assumed
        accepted until a STOW-RS answer says otherwise.

        Raises
        ------
        SendError
            When the server cannot be reached or answers anything but 200 or 204; the message says why.
        """
        self.query()
        return frozenset(sop_classes)

    def query(self) -> int:
        """GET ``<url>/studies?limit=1`` and return the HTTP status when it is 200 or 204 (``cxr-node echo``).

        Raises
        ------
        SendError
            As :meth:`probe`.
        """
        headers = {**self.headers(), "Accept": stow.DICOM_JSON}
        connection = self.connection()
        try:
            connection.request("GET", f"{self.root}/studies?limit=1", headers=headers)
            response = connection.getresponse()
            response.read(stow.MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            raise SendError(f"{self} could not be reached: {_why(exc)}") from exc
        finally:
            connection.close()
        if response.status not in (200, 204):
            raise SendError(f"{self} answered the probe (QIDO-RS) with {stow.explain(response.status)}")
        return response.status

    def open(self, sop_classes: Sequence[str], refused: Collection[str] = ()) -> DicomwebLink:
        """A link sending ``sop_classes`` but those the server was last seen refusing.

        Raises
        ------
        SendError
            When a secret or TLS file is unusable (the connection itself is made by the first request).
        """
        return DicomwebLink(self, self.headers(), frozenset(sop_classes) - frozenset(refused))


class DicomwebLink:
    """One kept-alive connection to a DICOMweb server for one delivery round."""

    def __init__(self, transport: DicomwebTransport, headers: dict[str, str], accepted: frozenset[str]) -> None:
        self.transport = transport
        self.headers = headers
        self._accepted = accepted
        self._alive = True
        self._connection = transport.connection()
        self._used = False

    @property
    def accepted(self) -> frozenset[str]:
        """The SOP classes to send (those the server was last seen refusing are left out)."""
        return self._accepted

    @property
    def alive(self) -> bool:
        """False once the server could not be reached, or said it (not the instance) is the problem."""
        return self._alive

    def send(self, path: Path) -> StoreResult:
        """POST the file at ``path`` to ``<url>/studies`` and judge the answer for its SOP Instance UID."""
        try:
            data = path.read_bytes()
            uid = str(
                dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
            )
        except (InvalidDicomError, OSError, AttributeError) as exc:
            return StoreResult(path, None, f"output file unreadable: {exc}")
        boundary = _boundary(data)
        try:
            status, media_type, answer = self._post(stow.body(data, boundary), stow.content_type(boundary))
        except (OSError, http.client.HTTPException) as exc:
            self._alive = False
            return StoreResult(path, None, f"{self.transport} could not be reached: {_why(exc)}")
        verdict = stow.judge(status, media_type, answer, uid)
        if verdict.down:
            self._alive = False
        return StoreResult(path, verdict.status, verdict.comment, verdict.permanent, verdict.refused)

    def _post(self, payload: bytes, media_type: str) -> tuple[int, str, bytes]:
        headers = {**self.headers, "Content-Type": media_type, "Content-Length": str(len(payload))}
        target = f"{self.transport.root}/studies"
        for attempt in (1, 2):
            try:
                self._connection.request("POST", target, body=payload, headers=headers)
                response = self._connection.getresponse()
                answer = response.read(stow.MAX_ANSWER_BYTES)
            except _STALE:
                self._connection.close()
                if attempt == 2 or not self._used:
                    raise
                continue
            self._used = True
            if not response.isclosed():  # an answer longer than read: this connection cannot be reused
                self._connection.close()
            return response.status, response.getheader("Content-Type", ""), answer
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()


def _boundary(data: bytes) -> str:
    for _ in range(8):
        boundary = uuid.uuid4().hex
        if boundary.encode() not in data:
            return boundary
    raise SendError("no multipart boundary found that the file does not contain")  # pragma: no cover


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); check ca_file"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
