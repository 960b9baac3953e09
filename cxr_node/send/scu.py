"""A C-ECHO / C-STORE SCU: used to deliver results, and by admins to test connectivity.

Statuses are read through :mod:`cxr_node.dicom.status`; a refused association or a network failure is a
:class:`~cxr_node.errors.SendError` with the peer named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from cxr_node.dicom import status
from cxr_node.errors import SendError

MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (odd context IDs 1-255, PS3.8 9.3.2.2)."""
_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class PeerAddress:
    """A DICOM peer: AE title, host and port."""

    ae_title: str
    host: str
    port: int

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

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreResult:
    """The outcome of sending one file."""

    path: Path
    status: int | None
    comment: str = ""

    @property
    def ok(self) -> bool:
        """True for Success or a warning status."""
        return self.status is not None and not status.is_failure(self.status)


@contextmanager
def _association(ae: AE, peer: PeerAddress) -> Iterator[Association]:
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "could not be opened"
        raise SendError(f"association with {peer} {why}; check the AE title, host, port and the peer's allow-list")
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
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    with _association(ae, peer) as assoc:
        reply = assoc.send_c_echo()
    if "Status" not in reply:
        raise SendError(f"no C-ECHO response from {peer}")
    return int(reply.Status)


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
    ae = AE(ae_title=calling_aet)
    for sop_class, syntax in _contexts(ds for _, ds in files):
        ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    with _association(ae, peer) as assoc:
        for path, _ in files:
            results.append(_store_one(assoc, path))
    return results


def _contexts(headers: Iterable[Dataset]) -> list[tuple[str, str]]:
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
    return sorted(wanted)


def _store_one(assoc: Association, path: Path) -> StoreResult:
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    try:
        ds = dcmread(path)
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in accepted and (key[0], ExplicitVRLittleEndian) in accepted:
            ds.decompress()  # the peer refused this compression: send it uncompressed
        reply = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError, NotImplementedError, InvalidDicomError, OSError) as exc:
        return StoreResult(path, None, str(exc).splitlines()[0])
    if "Status" not in reply:
        return StoreResult(path, None, "no response (association lost or timed out)")
    return StoreResult(path, int(reply.Status), str(reply.get("ErrorComment", "")))
