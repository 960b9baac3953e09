"""STOW-RS without I/O (PS3.18 10.5): the request body, and what a server's answer means for one instance.

An answer is judged per instance from its Referenced SOP Sequence (stored, perhaps with a Warning Reason) and
Failed SOP Sequence (with a Failure Reason), in DICOM JSON or XML, then from the HTTP status alone. The verdict
maps onto the outcomes the DIMSE deliveries have: delivered; retried with backoff (attempts counted); dead at
once (a retry cannot help); refused (the server does not take this SOP class: an alarm); or the destination is
down (backs off as a whole, no attempt counted: unreachable, busy, or refusing the node's credentials).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET  # a bounded answer from the configured server; expat >= 2.4 (no entity bombs)
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from cxr_node.dicom import status

DICOM_JSON: Final = "application/dicom+json"
DICOM_XML: Final = "application/dicom+xml"
ACCEPT: Final = f"{DICOM_JSON}, {DICOM_XML};q=0.5"
"""What the node asks the answer to be: DICOM JSON (PS3.18 F.2), else the Native DICOM Model (PS3.19 A.1)."""
MAX_ANSWER_BYTES: Final = 1 << 20
"""The most of an answer read: one instance's answer is a few kilobytes."""

# Attributes of the Store Instances response (PS3.18 10.5.3, Table 10.5.3-3)
FAILED_SOP_SEQUENCE: Final = "00081198"
REFERENCED_SOP_SEQUENCE: Final = "00081199"
REFERENCED_SOP_INSTANCE_UID: Final = "00081155"
FAILURE_REASON: Final = "00081197"
WARNING_REASON: Final = "00081196"

# Failure Reason values besides the C-STORE statuses of cxr_node.dicom.status (PS3.18 10.5.3; PS3.4 Annex C)
PROCESSING_FAILURE: Final = 0x0110
"""Processing failure: the server failed for a reason of its own (retried)."""
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
"""Referenced SOP Class not supported: the server does not store this SOP class (refused, an alarm)."""
TRANSFER_SYNTAX_NOT_SUPPORTED: Final = 0xC122
"""Referenced Transfer Syntax not supported (permanent: the node writes one transfer syntax)."""

_DOWN: Final[dict[int, str]] = {
    401: "the server refused the node's credentials (check auth, username, password_file or token_file)",
    403: "the server forbids the node to store (check its permissions for the node's user)",
    404: "no DICOMweb service at this URL (check url: the DICOMweb root, e.g. http://host:8042/dicom-web)",
    405: "this URL does not take STOW-RS (check url: the DICOMweb root)",
    429: "the server is busy (too many requests)",
    502: "the server's gateway failed",
    503: "the server is unavailable",
    504: "the server's gateway timed out",
}
"""HTTP statuses that say the destination, not the instance, is the problem: it backs off as a whole."""
_RETRIED: Final = frozenset({408, 425})
"""4xx statuses worth a retry (request timeout, too early); every other 4xx is permanent, every other 5xx retried."""


@dataclass(frozen=True)
class Verdict:
    """What one STOW-RS answer means for one instance.

    ``status`` is the DICOM status (0, the Warning Reason or the Failure Reason), None when the answer said none.
    """

    status: int | None
    comment: str
    ok: bool = False
    permanent: bool = False
    refused: bool = False
    down: bool = False


def body(data: bytes, boundary: str) -> bytes:
    """A multipart/related request body holding one Part 10 file (PS3.18 8.6.1.2).

    Raises
    ------
    ValueError
        When ``boundary`` occurs in ``data`` or is not a valid MIME boundary.
    """
    if not re.fullmatch(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", boundary) or boundary.encode() in data:
        raise ValueError(f"boundary {boundary!r} is not usable for this body")
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def content_type(boundary: str) -> str:
    """The Content-Type header of a :func:`body` made with ``boundary``."""
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def judge(http_status: int, media_type: str, answer: bytes, sop_instance_uid: str) -> Verdict:
    """The verdict on ``sop_instance_uid`` from an answer: its entry in the answer first, else the HTTP status."""
    found = _entry(media_type, answer, sop_instance_uid)
    if found is not None:
        return found
    return _by_http_status(http_status)


def _entry(media_type: str, answer: bytes, uid: str) -> Verdict | None:
    try:
        stored, failed = parse(media_type, answer)
    except ValueError:
        return None
    if uid in failed:
        return _failure(failed[uid])
    if uid in stored:
        code = stored[uid] or status.SUCCESS
        if not status.is_warning(code):
            code = status.SUCCESS
        return Verdict(code, "" if code == status.SUCCESS else f"stored with warning 0x{code:04X}", ok=True)
    return None


def _failure(reason: int | None) -> Verdict:
    code = reason if reason is not None else PROCESSING_FAILURE
    comment = f"the server did not store it: failure reason 0x{code:04X}"
    if code == SOP_CLASS_NOT_SUPPORTED:
        return Verdict(code, "the server does not accept this SOP class (failure reason 0x0122)", refused=True)
    if code == PROCESSING_FAILURE or 0xA700 <= code <= 0xA7FF:
        return Verdict(code, comment)
    return Verdict(code, comment, permanent=True)


def _by_http_status(code: int) -> Verdict:
    phrase = _phrase(code)
    if code == HTTPStatus.OK:
        return Verdict(status.SUCCESS, "", ok=True)  # "all stored" (PS3.18 10.5.3), even without a readable answer
    if code in _DOWN:
        return Verdict(None, f"{phrase}: {_DOWN[code]}", down=True)
    if 300 <= code < 400:
        return Verdict(None, f"{phrase}: redirected; configure the final URL", down=True)
    if code == HTTPStatus.ACCEPTED:
        return Verdict(None, f"{phrase} without this instance among the stored ones")
    if code in _RETRIED or code >= 500 or code < 200:
        return Verdict(None, phrase)
    return Verdict(None, f"{phrase}: a retry cannot succeed", permanent=True)


def _phrase(code: int) -> str:
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def explain(code: int) -> str:
    """``HTTP <code> <phrase>``, with what to check when the status says the destination is the problem."""
    return f"{_phrase(code)}: {_DOWN[code]}" if code in _DOWN else _phrase(code)


def parse(media_type: str, answer: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """The stored instances (with their Warning Reason) and the failed ones (with their Failure Reason), by SOP
    Instance UID, from a Store Instances response in DICOM JSON or XML.

    Raises
    ------
    ValueError
        When ``answer`` is neither, or not a response data set.
    """
    kind = media_type.split(";")[0].strip().lower()
    if kind in (DICOM_JSON, "application/json"):
        return _parse_json(answer)
    if kind in (DICOM_XML, "application/xml", "text/xml"):
        return _parse_xml(answer)
    raise ValueError(f"not a DICOM JSON or XML answer: {media_type or 'no Content-Type'}")


def _parse_json(answer: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    try:
        data = json.loads(answer)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        raise ValueError("not a DICOM JSON data set")
    return dict(_json_items(data, REFERENCED_SOP_SEQUENCE, WARNING_REASON)), dict(
        _json_items(data, FAILED_SOP_SEQUENCE, FAILURE_REASON)
    )


def _json_items(data: dict[str, Any], sequence: str, reason: str) -> Iterator[tuple[str, int | None]]:
    for item in _json_values(data, sequence):
        if isinstance(item, dict):
            uids = _json_values(item, REFERENCED_SOP_INSTANCE_UID)
            codes = [code for code in _json_values(item, reason) if isinstance(code, int)]
            if uids and isinstance(uids[0], str):
                yield uids[0], codes[0] if codes else None


def _json_values(data: dict[str, Any], tag: str) -> list[Any]:
    element = data.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values if isinstance(values, list) else []


def _parse_xml(answer: bytes) -> tuple[dict[str, int | None], dict[str, int | None]]:
    try:
        root = ET.fromstring(answer)  # noqa: S314 - see the import
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from exc
    return dict(_xml_items(root, REFERENCED_SOP_SEQUENCE, WARNING_REASON)), dict(
        _xml_items(root, FAILED_SOP_SEQUENCE, FAILURE_REASON)
    )


def _xml_items(root: ET.Element, sequence: str, reason: str) -> Iterator[tuple[str, int | None]]:
    for attribute in root.iter():
        if attribute.tag.endswith("DicomAttribute") and attribute.get("tag", "").upper() == sequence:
            for item in (child for child in attribute if child.tag.endswith("Item")):
                uid, code = _xml_value(item, REFERENCED_SOP_INSTANCE_UID), _xml_value(item, reason)
                if uid:
                    yield uid, int(code) if code and code.isdigit() else None


def _xml_value(item: ET.Element, tag: str) -> str | None:
    for attribute in item:
        if attribute.tag.endswith("DicomAttribute") and attribute.get("tag", "").upper() == tag:
            for value in attribute:
                if value.tag.endswith("Value") and value.text:
                    return value.text.strip()
    return None
