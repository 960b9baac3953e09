"""The node's one SCU: every association it opens (deliveries, probes, ``cxr-node echo`` and ``send``).

A :class:`PeerAddress` names the peer and, for a configured destination, its TLS settings, so the admin's
connectivity test (``cxr-node echo <destination>``) opens the same kind of association as the deliveries:
same calling AE title, same TLS. Statuses are read through :mod:`cxr_node.dicom.status`; a refused
association or a network failure is a :class:`~cxr_node.errors.SendError` naming the peer.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.association import Association

from cxr_node.config import Destination
from cxr_node.dicom import status
from cxr_node.dicom.sop import VERIFICATION_CLASS
from cxr_node.errors import SendError

MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (odd context IDs 1-255, PS3.8 9.3.2.2)."""
_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")

Context = tuple[str, Sequence[str]]
"""A presentation context to propose: an abstract syntax and its transfer syntaxes."""


@dataclass(frozen=True)
class ClientTLS:
    """The TLS side of an association the node opens: the CA to trust and, optionally, its own certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A TLS 1.2+ client context that verifies the peer against ``ca_file`` (or the system's CAs).

        Raises
        ------
        SendError
            When a certificate or key file cannot be read.
        """
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
            )
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file and self.key_file:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise SendError(f"TLS files cannot be used: {exc}") from exc
        return context


@dataclass(frozen=True)
class PeerAddress:
    """A DICOM peer: AE title, host, port, and TLS when the association is encrypted."""

    ae_title: str
    host: str
    port: int
    tls: ClientTLS | None = None

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Parse ``AE@host:port``.

        Raises
        ------
        ValueError
            When ``text`` is not of that form.
        """
        match = _ADDRESS.match(text.strip())
        if not match:
            raise ValueError(f"expected AE@host:port, found {text!r}")
        return cls(match["ae"], match["host"], int(match["port"]))

    @staticmethod
    def matches(text: str) -> bool:
        """True when ``text`` has the form ``AE@host:port``."""
        return _ADDRESS.match(text.strip()) is not None

    @classmethod
    def of(cls, destination: Destination) -> PeerAddress:
        """The peer of a configured DIMSE destination, with its TLS settings.

        Raises
        ------
        SendError
            When ``destination`` is not a DIMSE peer (protocol dicomweb).
        """
        ae_title, host, port = destination.ae_title, destination.host, destination.port
        if destination.protocol != "dimse" or ae_title is None or host is None or port is None:
            raise SendError(f"destination {destination.name} is not a DICOM AE (protocol {destination.protocol})")
        tls = ClientTLS(destination.ca_file, destination.cert_file, destination.key_file) if destination.tls else None
        return cls(ae_title, host, port, tls)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


@dataclass(frozen=True)
class StoreResult:
    """The outcome of sending one data set or file.

    ``status`` is the DICOM status (a C-STORE response, or a STOW-RS Warning/Failure Reason), None when no answer
    said one. ``permanent``: a retry cannot succeed (the delivery is dead at once). ``refused``: the destination
    does not accept this SOP class (recorded as refused, with an alarm, as when an association refuses it).
    """

    path: Path | None
    status: int | None
    comment: str = ""
    permanent: bool = False
    refused: bool = False

    @property
    def ok(self) -> bool:
        """True for Success or a warning status (PS3.4 B.2.3)."""
        return self.status is not None and not status.is_failure(self.status)


def associate(peer: PeerAddress, calling_aet: str, contexts: Iterable[Context], timeout_s: float) -> Association:
    """Open an association with ``peer`` proposing ``contexts``.

    Raises
    ------
    SendError
        When the peer rejects or aborts it, cannot be reached, or TLS fails; the message says which.
    """
    ae = AE(ae_title=calling_aet)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    tls_args = (peer.tls.context(), peer.host) if peer.tls else None
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError, ValueError, RuntimeError) as exc:
        raise SendError(f"association with {peer} could not be opened: {exc}") from exc
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "rejected"
        elif assoc.is_aborted:
            why = "aborted (the peer is down or unreachable, or refused TLS)"
        else:
            why = "could not be opened"
        raise SendError(f"association with {peer} {why}; check the AE title, host, port and the peer's allow-list")
    return assoc


@contextmanager
def association(
    peer: PeerAddress, calling_aet: str, contexts: Iterable[Context], timeout_s: float
) -> Iterator[Association]:
    """:func:`associate`, released (or left aborted) when the block ends."""
    assoc = associate(peer, calling_aet, contexts, timeout_s)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def echo(peer: PeerAddress, calling_aet: str = "CXR_NODE", timeout_s: float = 10.0) -> int:
    """Send a C-ECHO to ``peer`` and return its status.

    Raises
    ------
    SendError
        When no association could be made or no response came.
    """
    with association(peer, calling_aet, [(VERIFICATION_CLASS, DEFAULT_TRANSFER_SYNTAXES)], timeout_s) as assoc:
        reply = assoc.send_c_echo()
    if "Status" not in reply:
        raise SendError(f"no C-ECHO response from {peer}")
    return int(reply.Status)


def store(assoc: Association, ds: Dataset, path: Path | None = None) -> StoreResult:
    """C-STORE one data set over an open association; a failure to send is a result, not an exception.

    A compressed data set whose compression the peer refused (but whose uncompressed form it accepted) is sent
    decompressed.
    """
    try:
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        if key not in accepted and (key[0], ExplicitVRLittleEndian) in accepted:
            ds.decompress()
        reply = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError, NotImplementedError) as exc:
        return StoreResult(path, None, str(exc).splitlines()[0][:200])
    if "Status" not in reply:
        return StoreResult(path, None, "no response (association lost or timed out)")
    return StoreResult(path, int(reply.Status), str(reply.get("ErrorComment", ""))[:200])


def send_files(
    paths: Iterable[Path], peer: PeerAddress, calling_aet: str = "CXR_NODE", timeout_s: float = 60.0
) -> list[StoreResult]:
    """C-STORE every file in ``paths`` to ``peer`` over one association, each in its own transfer syntax.

    Files that are not DICOM are reported with status None and a comment, never sent.
    """
    files, results = [], []
    for path in paths:
        try:
            files.append((path, dcmread(path, stop_before_pixels=True)))
        except (InvalidDicomError, OSError) as exc:
            results.append(StoreResult(path, None, f"not a readable DICOM file: {exc}"))
    if not files:
        return results
    with association(peer, calling_aet, _contexts(ds for _, ds in files), timeout_s) as assoc:
        for path, _ in files:
            results.append(_store_file(assoc, path))
    return results


def _store_file(assoc: Association, path: Path) -> StoreResult:
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        return StoreResult(path, None, str(exc).splitlines()[0])
    return store(assoc, ds, path)


def _contexts(headers: Iterable[Dataset]) -> list[Context]:
    """One presentation context per (SOP class, transfer syntax) of the files, each with one syntax.

    A compressed file also gets an explicit VR little endian context, so it can be sent decompressed to a
    peer that does not accept its compression. Raises SendError beyond the 128 contexts an association allows.
    """
    wanted: set[tuple[str, str]] = set()
    for ds in headers:
        sop_class, syntax = str(ds.SOPClassUID), UID(ds.file_meta.TransferSyntaxUID)
        wanted.add((sop_class, str(syntax)))
        if syntax.is_compressed:
            wanted.add((sop_class, ExplicitVRLittleEndian))
    if len(wanted) > MAX_CONTEXTS:
        raise SendError(
            f"the files need {len(wanted)} presentation contexts, more than {MAX_CONTEXTS}: send fewer kinds"
        )
    return [(sop_class, [syntax]) for sop_class, syntax in sorted(wanted)]
