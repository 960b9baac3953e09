"""Results to a DICOMweb server: STOW-RS over the standard library's HTTP client, with TLS and basic or bearer auth.

A :class:`DicomwebTransport` is the DICOMweb side of :mod:`cxr_node.send.transport`: one HTTP(S) connection per
delivery round (kept alive between its requests), one POST to ``<url>/studies`` per output, each answer judged by
:mod:`cxr_node.send.stow`. Its probe (and ``cxr-node echo``) is a QIDO-RS query of one study at the same root: it
checks the address, TLS, the credentials and that a DICOMweb service answers there; which SOP classes the server
stores only its STOW-RS answers can say. Secrets are read from their files at each connection (so a rotated token
is used at once), refused when group or others may read them, and never logged.
"""

from __future__ import annotations

import http.client
import io
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import ClassVar

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from cxr_node.errors import SendError
from cxr_node.send import stow
from cxr_node.send.http import Credentials, HttpEndpoint, read_secret, why
from cxr_node.send.scu import StoreResult

__all__ = ["Credentials", "DicomwebLink", "DicomwebTransport", "read_secret"]

_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
"""What a kept-alive connection the server closed meanwhile raises: the request is sent again once, on a new one."""


class DicomwebTransport(HttpEndpoint):
    """STOW-RS to the DICOMweb root ``url``; TLS for an https URL (``tls`` names the CA and client certificate)."""

    service: ClassVar[str] = "DICOMweb"
    accept: ClassVar[str] = stow.ACCEPT

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
        found = self.get("/studies?limit=1", accept=stow.DICOM_JSON)
        if found not in (200, 204):
            raise SendError(f"{self} answered the probe (QIDO-RS) with {stow.explain(found)}")
        return found

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
            return StoreResult(path, None, f"{self.transport} could not be reached: {why(exc)}")
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
