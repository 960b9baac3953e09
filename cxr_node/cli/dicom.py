"""Talking DICOM to a peer by hand: ``echo`` and ``send``, over the same SCU the deliveries use (for a DICOMweb
destination, over the same QIDO-RS probe and STOW-RS link; ``echo`` of a worklist triage destination is its
probe: an MLLP connection test for HL7, ``GET metadata`` for FHIR)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_node.cli.common import Subparsers, destination, dicomweb_destination, expand, peer, settings
from cxr_node.errors import CxrNodeError
from cxr_node.send.scu import PeerAddress

if TYPE_CHECKING:
    from cxr_node.config import Destination
    from cxr_node.send.dicomweb import DicomwebTransport
    from cxr_node.send.scu import StoreResult

CALLING_HELP = "our AE title (default: delivery.calling_ae_title for a destination, else CXR_NODE)"


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a peer given as AE@host:port or as a destination name from the config; QIDO-RS a DICOMweb one."""
    from cxr_node.dicom import status
    from cxr_node.send.scu import echo

    found = dicomweb_destination(args, args.dest)
    if found is not None:
        return _echo_dicomweb(args, found)
    if not PeerAddress.matches(args.dest) and destination(args, args.dest).triage_kind:
        return _echo_triage(args, destination(args, args.dest))
    address, calling = peer(args, args.dest)
    result = echo(address, calling_aet=calling)
    print(f"C-ECHO {address}: status 0x{result:04X}")
    return 0 if status.is_success(result) else 1


def _transport(args: argparse.Namespace, destination: Destination) -> DicomwebTransport:
    from cxr_node.send.dicomweb import DicomwebTransport

    return DicomwebTransport.of(destination, destination.timeout_s or settings(args).delivery.timeout_s)


def _echo_dicomweb(args: argparse.Namespace, destination: Destination) -> int:
    """Probe a DICOMweb destination as the sender does (QIDO-RS of one study, same TLS and credentials)."""
    transport = _transport(args, destination)
    print(f"QIDO-RS {transport}: HTTP {transport.query()}")
    return 0


def _echo_triage(args: argparse.Namespace, found: Destination) -> int:
    """Probe a worklist triage destination as the sender does: connect over MLLP (HL7), GET metadata (FHIR)."""
    from cxr_node.send.fhir import FhirTransport
    from cxr_node.send.transport import transport_for

    transport = transport_for(found, settings(args).delivery)
    if isinstance(transport, FhirTransport):
        print(f"GET metadata {transport}: HTTP {transport.metadata()}")
    else:
        transport.probe([])
        print(f"MLLP {transport}: connected (no message sent)")
    return 0


def _send_dicomweb(args: argparse.Namespace, destination: Destination, files: list[Path]) -> list[StoreResult]:
    """STOW-RS each file to a DICOMweb destination, as the deliveries do."""
    link = _transport(args, destination).open([])
    try:
        return [link.send(path) for path in files]
    finally:
        link.close()


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files (or every file under folders) to a peer."""
    from cxr_node.send.scu import send_files

    files = expand(args.files)
    if not files:
        raise CxrNodeError("no files to send: give DICOM files or folders that contain them")
    found = dicomweb_destination(args, args.to)
    if found is not None:
        results = _send_dicomweb(args, found, files)
    else:
        address, calling = peer(args, args.to)
        results = send_files(files, address, calling_aet=calling)
    for r in results:
        code = "----" if r.status is None else f"{r.status:04X}"
        print(f"0x{code}  {r.path}{'  ' + r.comment if r.comment else ''}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} sent, {failed} failed")
    return 0 if failed == 0 else 1


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``echo`` and ``send`` to ``sub``."""
    echo_help = "C-ECHO a DICOM peer (QIDO-RS for DICOMweb, an MLLP connection for HL7, GET metadata for FHIR)"
    p = sub.add_parser("echo", parents=[common], help=echo_help)
    p.add_argument("dest", help="AE@host:port, or a destination name from the config (its TLS and auth are used)")
    p.add_argument("--calling-aet", default=None, help=CALLING_HELP)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", parents=[common], help="C-STORE DICOM files to a peer (STOW-RS for a DICOMweb one)")
    p.add_argument("files", nargs="+", help="DICOM files or folders")
    p.add_argument("--to", required=True, help="AE@host:port, or a destination name from the config")
    p.add_argument("--calling-aet", default=None, help=CALLING_HELP)
    p.set_defaults(func=cmd_send)
