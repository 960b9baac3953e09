"""An HTTP(S) server the node sends to (a DICOMweb or a FHIR destination): its URL, credentials, TLS and timeout.

:class:`HttpEndpoint` is what :class:`~cxr_node.send.dicomweb.DicomwebTransport` and
:class:`~cxr_node.send.fhir.FhirTransport` share: the URL checked and split, basic or bearer credentials read from
their secret files at each connection (so a rotated secret is used at once; refused when group or others may read
it; never logged), TLS for an https URL with the destination's CA and client certificate, connections made with
the standard library's HTTP client, a GET that says in one line why it failed, and the headers every request
carries. Each service names itself and the media type it accepts.
"""

from __future__ import annotations

import base64
import http.client
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final, Self
from urllib.parse import urlsplit

import structlog

from cxr_node import privacy
from cxr_node.config import Destination
from cxr_node.errors import SendError
from cxr_node.send.scu import ClientTLS

log = structlog.get_logger("cxr_node.send")

USER_AGENT: Final = "cxr-node"
MAX_ANSWER_BYTES: Final = 1 << 20
"""The most of an answer that is read (the rest is dropped with the connection)."""


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


class HttpEndpoint:
    """The HTTP(S) server at the root ``url``; TLS for an https URL (``tls`` names the CA and client certificate).

    Subclasses name their ``service`` (in messages) and the media type they ``accept``.
    """

    service: ClassVar[str] = "HTTP"
    accept: ClassVar[str] = "*/*"

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
    def of(cls, destination: Destination, timeout_s: float) -> Self:
        """The endpoint of a configured destination with a ``url`` (its auth, secret file and TLS files)."""
        if destination.url is None:
            raise SendError(f"destination {destination.name} has no url")
        secret = destination.password_file if destination.auth == "basic" else destination.token_file
        credentials = Credentials(destination.auth, destination.username, secret)
        secure = destination.url.startswith("https:")
        if destination.auth != "none" and not secure:
            log.warning("destination.credentials_in_clear", destination=destination.name, url=destination.url)
        tls = ClientTLS(destination.ca_file, destination.cert_file, destination.key_file) if secure else None
        return cls(destination.url, credentials, timeout_s, tls)

    def __str__(self) -> str:
        return f"{self.url} ({self.service}{', TLS' if self.secure else ''})"

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
        headers = {"User-Agent": USER_AGENT, "Accept": self.accept}
        authorization = self.credentials.header()
        if authorization is not None:
            headers["Authorization"] = authorization
        return headers

    def get(self, path: str, accept: str | None = None) -> int:
        """GET ``<root><path>`` on a connection of its own and return the HTTP status (the answer is dropped).

        Raises
        ------
        SendError
            When the server cannot be reached, with why in one line.
        """
        headers = self.headers() if accept is None else {**self.headers(), "Accept": accept}
        connection = self.connection()
        try:
            connection.request("GET", f"{self.root}{path}", headers=headers)
            response = connection.getresponse()
            response.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            raise SendError(f"{self} could not be reached: {why(exc)}") from exc
        finally:
            connection.close()
        return response.status


def why(exc: BaseException) -> str:
    """Why a request failed, in a few words (an untrusted certificate, a timeout, the error's first line)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); check ca_file"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
