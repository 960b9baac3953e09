"""One STOW-RS part through the same door as a C-STORE data set, and the DICOM JSON answer to a request.

A part is spooled to a file in the receiving folder (capped at ``node.max_instance_mb``, like the SCP's spool
files), then checked as the SCP checks what it negotiated and received: a DICOM file (``DICM``, a bounded File
Meta group), a SOP class and transfer syntax the SCP would accept on a presentation context (:func:`~cxr_node.
dicom.sop.scp_contexts`), the size, inflated size and header bounds (:func:`~cxr_node.receive.guards.admitted`),
then :meth:`~cxr_node.receive.intake.Intake.accept` (fsync, rename, commit, and only then Success). Its status
is the one the SCP would have answered; the spool file never outlives the part.
"""

from __future__ import annotations

import functools
import http
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID

from cxr_node.dicom import status
from cxr_node.dicom.sop import scp_contexts
from cxr_node.errors import RejectedInstance
from cxr_node.receive.guards import PREAMBLE, admitted, dataset_offset
from cxr_node.receive.intake import DEFER_SIZE, Intake, Peer, StoreOutcome

log = structlog.get_logger("cxr_node.receive")

FILE_META_GROUP: Final = b"\x02\x00"
"""Group 0002 in little endian: how File Meta Information without a preamble starts."""
MAX_FILE_META: Final = 64 * 1024
"""Most bytes of File Meta Information read from a part (one is a few hundred bytes)."""
DICOM_JSON: Final = "application/dicom+json"
REFERENCED_SOP_SEQUENCE: Final = "00081199"
FAILED_SOP_SEQUENCE: Final = "00081198"
REFERENCED_SOP_CLASS_UID: Final = "00081150"
REFERENCED_SOP_INSTANCE_UID: Final = "00081155"
FAILURE_REASON: Final = "00081197"
"""PS3.18 10.5.3 (Store Instances Response Module): tags of the response, as DICOM JSON keys (PS3.18 F.2)."""


@dataclass(frozen=True)
class PartResult:
    """What became of one part: its status (a C-STORE status code), the reason, and its UIDs when read."""

    status: int
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    @property
    def stored(self) -> bool:
        """True when the instance is acknowledged (fsynced and committed, or a known identical re-send)."""
        return not status.is_failure(self.status)


class CappedSpool:
    """A part's spool file that stops growing past ``max_bytes`` (what follows is counted and dropped).

    A part that starts with the File Meta Information but no preamble (what ``pydicom.dcmwrite`` writes for a
    data set read without one, as dicomweb-client sends it) gets the 128-byte preamble and ``DICM`` prefix of the
    DICOM file format (PS3.10 7.1) in front; the bytes received are kept as they are.
    """

    def __init__(self, handle: IO[bytes], max_bytes: int) -> None:
        self.handle = handle
        self.max_bytes = max_bytes
        self.received = 0
        self.head: bytearray | None = bytearray()

    @property
    def overflowed(self) -> bool:
        """True when the part was larger than ``max_bytes``."""
        return self.received > self.max_bytes

    def write(self, data: memoryview) -> None:
        """Write ``data`` unless the part is now over the cap (then truncate what was written)."""
        was_over = self.overflowed
        self.received += len(data)
        if self.overflowed:
            if not was_over:
                self.head = None
                self.handle.seek(0)
                self.handle.truncate()
            return
        if self.head is not None:
            self.head += data
            if len(self.head) >= PREAMBLE:
                self._start()
            return
        self.handle.write(data)

    def finish(self) -> None:
        """Write what is still held of a part shorter than the preamble."""
        if self.head is not None and not self.overflowed:
            self._start()

    def _start(self) -> None:
        head, self.head = bytes(self.head or b""), None
        if len(head) >= PREAMBLE and head[128:132] != b"DICM" and head[:2] == FILE_META_GROUP:
            self.handle.write(bytes(128) + b"DICM")
        self.handle.write(head)


@functools.cache
def _accepted_syntaxes() -> dict[str, frozenset[str]]:
    """The transfer syntaxes the SCP accepts per SOP class (what association negotiation would allow)."""
    return {str(abstract): frozenset(str(ts) for ts in syntaxes) for abstract, syntaxes in scp_contexts()[1:]}


def store_part(path: Path, intake: Intake, peer: Peer, study: str | None) -> PartResult:
    """Check and store the complete part spooled at ``path``; never raises, and ``path`` is gone afterwards.

    Parameters
    ----------
    path : Path
        The part's content (a DICOM file) in the storage root's receiving folder.
    intake : Intake
        The receiver's intake (the same as the SCP's).
    peer : Peer
        The sender.
    study : str or None
        The Study Instance UID of the request's target resource (``POST .../studies/{study}``), if any.
    """
    try:
        return _store(path, intake, peer, study)
    except RejectedInstance as exc:
        log.warning("stow.part_rejected", reason=exc.reason, status=f"0x{exc.status:04X}")
        return PartResult(exc.status, exc.reason)
    except Exception as exc:
        log.exception("stow.unexpected_error")
        return PartResult(status.UNEXPECTED_FAILURE, f"internal error: {type(exc).__name__}")
    finally:
        path.unlink(missing_ok=True)  # moved into place when accepted; otherwise dropped


def _store(path: Path, intake: Intake, peer: Peer, study: str | None) -> PartResult:
    syntax = _transfer_syntax(path)
    with admitted(path, syntax, intake.max_bytes, None) as readable:
        try:
            ds = dcmread(readable, defer_size=DEFER_SIZE)
        except Exception as exc:
            log.warning("stow.undecodable", error=str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
            raise RejectedInstance(status.CANNOT_UNDERSTAND, "data set cannot be decoded") from exc
        sop_class, sop_instance = _uid(ds, "SOPClassUID"), _uid(ds, "SOPInstanceUID")
        refused = _refusal(ds, syntax, study)
        if refused is not None:
            log.warning("stow.part_rejected", reason=refused.reason, status=f"0x{refused.status:04X}")
            return PartResult(refused.status, refused.reason, sop_class, sop_instance)
        outcome: StoreOutcome = intake.accept(ds, path, syntax, peer)
    return PartResult(outcome.status, outcome.comment, sop_class, sop_instance)


def _transfer_syntax(path: Path) -> str:
    """The part's transfer syntax from its File Meta Information, read only when that group is small."""
    with path.open("rb") as fp:
        offset = dataset_offset(fp)
    if offset - PREAMBLE > MAX_FILE_META:
        raise RejectedInstance(status.HEADER_TOO_COMPLEX, f"file meta information over {MAX_FILE_META} bytes")
    try:
        meta = read_file_meta_info(path)
        syntax = str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    except (struct.error, ValueError, OSError, EOFError) as exc:
        raise RejectedInstance(status.CANNOT_UNDERSTAND, "file meta information cannot be read") from exc
    if not syntax:
        raise RejectedInstance(status.CANNOT_UNDERSTAND, "file meta information has no Transfer Syntax UID")
    return syntax


def _refusal(ds: Dataset, syntax: str, study: str | None) -> RejectedInstance | None:
    """Why the SCP would not have taken this instance before its intake (no context for it, or another study)."""
    sop_class = _uid(ds, "SOPClassUID")
    accepted = _accepted_syntaxes().get(sop_class)
    if sop_class and accepted is None:
        return RejectedInstance(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP class is not a storage class accepted")
    if accepted is not None and syntax not in accepted:
        return RejectedInstance(status.CANNOT_UNDERSTAND, "transfer syntax not accepted for this SOP class")
    if study is not None and _uid(ds, "StudyInstanceUID") != study:
        return RejectedInstance(status.IDENTIFIER_INVALID, "StudyInstanceUID differs from the request's study")
    return None


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID of ``ds`` as text when it is a valid UID, else '' (never echo invalid received values)."""
    try:
        value = str(ds.get(keyword, "") or "").strip("\x00 ")
    except Exception:
        return ""
    return value if value and UID(value).is_valid else ""


# ------------------------------------------------------------------------------------------- response


def response_body(results: Sequence[PartResult]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 10.5.3) of ``results`` in DICOM JSON (PS3.18 F.2)."""
    body: dict[str, Any] = {}
    stored = [_item(result) for result in results if result.stored]
    failed = [{**_item(result), FAILURE_REASON: _us(result.status)} for result in results if not result.stored]
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if stored:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
    return body


def _item(result: PartResult) -> dict[str, Any]:
    return {
        REFERENCED_SOP_CLASS_UID: _ui(result.sop_class_uid),
        REFERENCED_SOP_INSTANCE_UID: _ui(result.sop_instance_uid),
    }


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _us(value: int) -> dict[str, Any]:
    return {"vr": "US", "Value": [value]}


def http_status(results: Sequence[PartResult]) -> http.HTTPStatus:
    """200 when every instance was stored, 202 when some were, 409 when none (503 when none for lack of
    resources: the client should retry later, as a PACS does after 0xA700)."""
    stored = sum(result.stored for result in results)
    if results and stored == len(results):
        return http.HTTPStatus.OK
    if stored:
        return http.HTTPStatus.ACCEPTED
    if results and all(result.status == status.OUT_OF_RESOURCES for result in results):
        return http.HTTPStatus.SERVICE_UNAVAILABLE
    return http.HTTPStatus.CONFLICT


def warnings(results: Sequence[PartResult], most: int = 8) -> list[str]:
    """HTTP ``Warning`` field values (PS3.18 8.4.4) naming the distinct failure reasons, at most ``most``."""
    reasons = dict.fromkeys(status.error_comment(r.reason) for r in results if not r.stored and r.reason)
    return [f'299 cxr-node "{reason.replace(chr(34), chr(39))}"' for reason in list(reasons)[:most]]
