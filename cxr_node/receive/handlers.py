"""pynetdicom event handlers: unpack the event, call :class:`~cxr_node.receive.intake.Intake`, answer.

No exception crosses the association: anything unexpected is logged and answered with a failure status.
Each association runs in a thread of its own: when it is established, its identity (``assoc``, ``calling_aet``,
``peer``) is bound to that thread's structlog context, so every event logged for it carries them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from cxr_node.dicom import status
from cxr_node.errors import RejectedInstance
from cxr_node.receive.guards import admitted, installed_spool
from cxr_node.receive.intake import DEFER_SIZE, Intake, Peer, StoreOutcome

log = structlog.get_logger("cxr_node.receive")


def _peer(event: Event) -> Peer:
    requestor = event.assoc.requestor
    return Peer(ae_title=str(requestor.ae_title).strip(), address=f"{requestor.address}:{requestor.port}")


def handle_echo(event: Event) -> int:
    """C-ECHO: always Success while the SCP is up."""
    log.debug("echo.received")
    return status.SUCCESS


def handle_store(event: Event, intake: Intake) -> Dataset:
    """C-STORE: check the spooled data set's bounds, hand it to the intake and turn its outcome into a response.

    pynetdicom has written the data set, as received, to a file in the DICOM file format
    (``STORE_RECV_CHUNKED_DATASET``); its size, inflated size and header shape are checked first
    (:func:`~cxr_node.receive.guards.admitted`), then only its header is parsed, the pixel data is never read.
    A deflated data set is parsed from its inflated copy; the file kept is the one received.
    """
    if cast(Path | None, event.dataset_path) is None:  # typed a Path; None when the command says no data set
        reason = "C-STORE-RQ without a data set"
        log.warning("store.rejected", reason=reason, status=f"0x{status.CANNOT_UNDERSTAND:04X}")
        return _response(StoreOutcome(status.CANNOT_UNDERSTAND, reason))
    path, syntax = Path(event.dataset_path), str(event.context.transfer_syntax)
    try:
        with admitted(path, syntax, intake.max_bytes, installed_spool()) as readable:
            ds = _header(readable)
            if ds is None:
                return _response(StoreOutcome(status.CANNOT_UNDERSTAND, "data set cannot be decoded"))
            _check_command(event, ds)
            return _response(intake.accept(ds, path, syntax, _peer(event)))
    except RejectedInstance as exc:
        path.unlink(missing_ok=True)
        log.warning("store.rejected", reason=exc.reason, status=f"0x{exc.status:04X}")
        return _response(StoreOutcome(exc.status, status.error_comment(exc.reason)))
    except Exception as exc:
        log.exception("store.unexpected_error")
        return _response(StoreOutcome(status.UNEXPECTED_FAILURE, f"internal error: {type(exc).__name__}"))


def _check_command(event: Event, ds: Dataset) -> None:
    """Raise RejectedInstance when the C-STORE-RQ names another instance or SOP class than its data set holds
    (PS3.7 9.3.1.1): the response would confirm an instance the node did not keep, or file it under another class.

    Only what both carry is compared (a data set without a SOP Instance UID is the intake's to refuse).
    """
    request = cast(C_STORE, event.request)
    for command, keyword, status_code in (
        (request.AffectedSOPInstanceUID, "SOPInstanceUID", status.CANNOT_UNDERSTAND),
        (request.AffectedSOPClassUID, "SOPClassUID", status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    ):
        own = str(ds.get(keyword, "") or "").strip(" \0")
        said = str(command or "").strip(" \0")
        if own and said and own != said:
            raise RejectedInstance(status_code, f"{keyword} is not the command's Affected {keyword}")


def _header(path: Path) -> Dataset | None:
    """The data set at ``path`` with large values deferred; None when pydicom cannot decode it at all."""
    try:
        return dcmread(path, defer_size=DEFER_SIZE)
    except Exception as exc:  # the peer sent bytes pydicom cannot decode at all
        log.warning("store.undecodable", error=str(exc).splitlines()[0][:120])
        return None


def _response(outcome: StoreOutcome) -> Dataset:
    reply = Dataset()
    reply.Status = outcome.status
    if outcome.comment and not status.is_success(outcome.status):
        reply.ErrorComment = outcome.comment
    return reply


def on_established(event: Event) -> None:
    """Bind the association's identity to its thread's log context, and log it."""
    peer = _peer(event)
    structlog.contextvars.bind_contextvars(assoc=id(event.assoc), calling_aet=peer.ae_title, peer=peer.address)
    log.info("assoc.opened")


def on_released(event: Event) -> None:
    """Log an association released by the peer."""
    log.info("assoc.closed", how="released")
    structlog.contextvars.clear_contextvars()


def on_aborted(event: Event) -> None:
    """Log an aborted association."""
    log.warning("assoc.closed", how="aborted")
    structlog.contextvars.clear_contextvars()


def on_rejected(event: Event) -> None:
    """Log an association the node rejected (unknown calling/called AE, too many associations)."""
    requestor = event.assoc.requestor
    log.warning(
        "assoc.rejected",
        calling_aet=str(requestor.ae_title).strip(),
        called_aet=_requested_called_aet(event),
        peer=f"{requestor.address}:{requestor.port}",
    )


def event_handlers(intake: Intake) -> list[Any]:
    """Return the ``evt_handlers`` list for the SCP."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [intake]),
        (evt.EVT_ESTABLISHED, on_established),
        (evt.EVT_RELEASED, on_released),
        (evt.EVT_ABORTED, on_aborted),
        (evt.EVT_REJECTED, on_rejected),
    ]


def _requested_called_aet(event: Any) -> str:
    """The called AE title the peer asked for (which may be wrong), not the node's own."""
    primitive = getattr(event.assoc.requestor, "primitive", None)
    called = getattr(primitive, "called_ae_title", None)
    return str(called if called is not None else event.assoc.acceptor.ae_title).strip()
