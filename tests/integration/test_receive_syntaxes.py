"""Every accepted transfer syntax over real associations: pynetdicom and DCMTK storescu to the node's SCP.

Each test gets its own receiver (a fresh storage root), so the variant's SOP Instance UID is new to it and
a job in the store is this send's, never a duplicate of an earlier one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE

from cxr_node.app import Receiver
from cxr_node.dicom import status
from cxr_node.jobs.states import JobState
from tests.conftest import require_tool
from tests.integration.helpers import echo
from tests.syntaxes import SYNTAXES, Variant, pixels

STORESCU_PROPOSALS: Final[dict[UID, tuple[str, ...]]] = {
    ExplicitVRLittleEndian: ("-xe",),
    ImplicitVRLittleEndian: ("-xi",),
    ExplicitVRBigEndian: ("-xb",),  # without it storescu converts big endian to little endian
    DeflatedExplicitVRLittleEndian: ("-xd",),
    JPEGBaseline8Bit: ("-xy",),
    JPEGExtended12Bit: ("-xx",),
    JPEGLosslessSV1: ("-xs",),
    JPEGLSLossless: ("-xt",),
    JPEGLSNearLossless: ("-xu",),
    JPEG2000Lossless: ("-xv",),
    JPEG2000: ("-xw",),
    RLELossless: ("-xr",),
}
"""storescu's option proposing each syntax; JPEG lossless process 14 (.57) has none: a profile file does it."""

ENCAPSULATED: Final = [name for name, spec in SYNTAXES.items() if spec.uid.is_encapsulated]


def send_with_pynetdicom(port: int, variant: Variant, _workdir: Path) -> None:
    """C-STORE the file as it is, proposing its own transfer syntax only; assert Success."""
    sop_class = dcmread(variant.path, stop_before_pixels=True).SOPClassUID
    ae = AE(ae_title="PACS")
    ae.add_requested_context(sop_class, [variant.transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    assert assoc.is_established
    try:
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts] == [variant.transfer_syntax]
        reply = assoc.send_c_store(variant.path)
    finally:
        assoc.release()
    assert reply.Status == status.SUCCESS


def send_with_storescu(port: int, variant: Variant, workdir: Path) -> None:
    """Send the file with DCMTK storescu proposing its syntax; assert storescu printed Success."""
    proposal = STORESCU_PROPOSALS.get(variant.transfer_syntax) or storescu_profile(variant, workdir)
    out = storescu(port, variant.path, *proposal)
    assert "Received Store Response (Success)" in out, out


SENDERS: Final[dict[str, Callable[[int, Variant, Path], None]]] = {
    "pynetdicom": send_with_pynetdicom,
    "storescu": send_with_storescu,
}


def storescu(port: int, path: Path, *options: str) -> str:
    """Run ``storescu -v`` to the node with ``options``; return everything it printed."""
    command = [require_tool("storescu"), "-v", "-aec", "CXR_NODE", *options, "127.0.0.1", str(port), str(path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return out.stdout + out.stderr


def storescu_profile(variant: Variant, workdir: Path) -> tuple[str, ...]:
    """Write a storescu association profile proposing the variant's class in its syntax only."""
    sop_class = dcmread(variant.path, stop_before_pixels=True).SOPClassUID
    config = workdir / "storescu.cfg"
    config.write_text(
        "[[TransferSyntaxes]]\n[Sent]\n"
        f"TransferSyntax1 = {variant.transfer_syntax}\n"
        "[[PresentationContexts]]\n[Sent]\n"
        f"PresentationContext1 = {sop_class}\\Sent\n"
        "[[Profiles]]\n[Sent]\nPresentationContexts = Sent\n"
    )
    return ("-xf", str(config), "Sent")


@pytest.mark.parametrize("sender", SENDERS)
@pytest.mark.parametrize("name", SYNTAXES)
def test_variant_is_queued_and_stored_as_sent(
    receiver: Receiver, syntax_variants: dict[str, Variant], name: str, sender: str, tmp_path: Path
) -> None:
    """An instance in any accepted syntax is answered Success, queued, and stored as sent, pixels intact."""
    variant = syntax_variants[name]
    SENDERS[sender](receiver.port, variant, tmp_path)
    [job] = receiver.store.jobs.query()
    sent = dcmread(variant.path, stop_before_pixels=True)
    assert (job.state, job.sop_instance_uid) == (JobState.QUEUED, sent.SOPInstanceUID)
    assert job.transfer_syntax == variant.transfer_syntax
    stored = dcmread(receiver.settings.storage.root / job.path)
    assert stored.file_meta.TransferSyntaxUID == variant.transfer_syntax
    assert stored.PixelData == dcmread(variant.path).PixelData  # stored as received, not re-encoded
    np.testing.assert_array_equal(stored.pixel_array, pixels(variant.path))


@pytest.mark.parametrize("name", ENCAPSULATED)
def test_storescu_cannot_transcode_a_compressed_file_to_uncompressed(
    receiver: Receiver, syntax_variants: dict[str, Variant], name: str
) -> None:
    """storescu proposing uncompressed syntaxes only fails to send a compressed file; nothing is stored."""
    variant = syntax_variants[name]
    out = storescu(receiver.port, variant.path)
    assert "unable to convert dataset from" in out and "Store Failed" in out, out
    assert "Received Store Response (Success)" not in out
    assert receiver.store.jobs.query() == []
    assert echo(receiver.port) == status.SUCCESS
