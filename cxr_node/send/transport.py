"""How outputs travel to one destination: a :class:`Transport` opens :class:`Link` s, the Dispatcher does the rest.

The Dispatcher (:mod:`cxr_node.send.deliver`) owns the delivery semantics (order, claims, retries, dead letters,
alarms); a transport only moves files. Two exist: :class:`DimseTransport` (a C-STORE association, which
negotiates the SOP classes the peer accepts) and :class:`~cxr_node.send.dicomweb.DicomwebTransport` (STOW-RS,
which cannot negotiate: a server says it refuses a SOP class only in its answer to a store). A worklist triage
destination gets a :class:`TriageLink`: :class:`~cxr_node.send.hl7.Hl7Transport` (ORU^R01 over MLLP) or
:class:`~cxr_node.send.fhir.FhirTransport` (a FHIR transaction Bundle), which send messages built from the
stored result, never a file.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom.association import Association

from cxr_node.config import DeliverySettings, Destination
from cxr_node.errors import SendError
from cxr_node.results.kinds import OUTPUT_TRANSFER_SYNTAXES
from cxr_node.send.scu import PeerAddress, StoreResult, associate, store

if TYPE_CHECKING:
    from cxr_node.send.triage import TriageFacts


class Link(Protocol):
    """One open way to a destination (an association, an HTTP connection), used for one delivery round."""

    @property
    def accepted(self) -> frozenset[str]:
        """The SOP class UIDs this link may send."""
        ...

    @property
    def alive(self) -> bool:
        """False once the destination is gone (refused the connection, lost it, refused our credentials)."""
        ...

    def send(self, path: Path) -> StoreResult:
        """Send one DICOM file; a failure is a result (with ``permanent``/``refused`` set when known)."""
        ...

    def close(self) -> None:
        """Release the link (nothing happens when it is already gone)."""
        ...


@runtime_checkable
class TriageLink(Link, Protocol):
    """A link to a worklist triage destination: it delivers messages built from :class:`TriageFacts`."""

    def deliver(self, facts: TriageFacts) -> StoreResult:
        """Send the message of ``facts`` and judge the answer (a failure is a result, as :meth:`Link.send`)."""
        ...


class Transport(Protocol):
    """Opens links to one destination and probes what it accepts."""

    def probe(self, sop_classes: Sequence[str]) -> frozenset[str]:
        """Which of ``sop_classes`` the destination accepts, as far as can be known before sending.

        Raises
        ------
        SendError
            When the destination cannot be reached or refuses the node; the message says which.
        """
        ...

    def open(self, sop_classes: Sequence[str], refused: Collection[str] = ()) -> Link:
        """A link proposing ``sop_classes``. ``refused``: the classes the destination was last seen refusing;
        a transport that negotiates asks again, one that cannot leaves them out.

        Raises
        ------
        SendError
            When the destination cannot be reached or refuses the node.
        """
        ...


class DimseLink:
    """An established association; the SOP classes are those the peer accepted."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self._accepted = frozenset(str(cx.abstract_syntax) for cx in assoc.accepted_contexts)

    @property
    def accepted(self) -> frozenset[str]:
        """SOP classes with an accepted presentation context."""
        return self._accepted

    @property
    def alive(self) -> bool:
        """True while the association is established."""
        return bool(self.assoc.is_established)

    def send(self, path: Path) -> StoreResult:
        """C-STORE the file at ``path``."""
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            return StoreResult(path, None, f"output file unreadable: {exc}")
        return store(self.assoc, ds, path)

    def close(self) -> None:
        """Release the association if it is still up."""
        if self.assoc.is_established:
            self.assoc.release()


class DimseTransport:
    """C-STORE over an association per round, calling as ``delivery.calling_ae_title`` (TLS when configured)."""

    def __init__(self, destination: Destination, calling_aet: str, timeout_s: float) -> None:
        self.peer = PeerAddress.of(destination)
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s

    def probe(self, sop_classes: Sequence[str]) -> frozenset[str]:
        """Negotiate ``sop_classes`` and release: the accepted ones."""
        link = self.open(sop_classes)
        link.close()
        return link.accepted & frozenset(sop_classes)

    def open(self, sop_classes: Sequence[str], refused: Collection[str] = ()) -> DimseLink:
        """Associate proposing every class in ``sop_classes`` (``refused`` is asked again: it negotiates)."""
        contexts = [(sop_class, OUTPUT_TRANSFER_SYNTAXES) for sop_class in sop_classes]
        return DimseLink(associate(self.peer, self.calling_aet, contexts, self.timeout_s))

    def __str__(self) -> str:
        return str(self.peer)


def transport_for(destination: Destination, delivery: DeliverySettings) -> Transport:
    """The transport of ``destination``'s protocol, with its timeout (else ``delivery.timeout_s``).

    Raises
    ------
    SendError
        When the destination's settings cannot make a transport (e.g. an unusable URL).
    """
    timeout_s = destination.timeout_s or delivery.timeout_s
    if destination.protocol == "hl7":
        from cxr_node.send.hl7 import Hl7Transport

        return Hl7Transport.of(destination, timeout_s, delivery.calling_ae_title)
    if destination.protocol == "fhir":
        from cxr_node.send.fhir import FhirTransport

        return FhirTransport.of(destination, timeout_s)
    if destination.protocol == "dicomweb":
        from cxr_node.send.dicomweb import DicomwebTransport

        return DicomwebTransport.of(destination, timeout_s)
    if destination.ae_title is None:  # config validation requires it; kept for the type checker
        raise SendError(f"destination {destination.name} has no ae_title")
    return DimseTransport(destination, delivery.calling_ae_title, timeout_s)
