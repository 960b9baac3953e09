"""The streaming receive path (cxr_node.receive.streaming) over real associations: stored bytes, PDU sizes, peers
that abort or break off mid-transfer, malformed P-DATA.

The reference for "byte-identical" is pynetdicom 3.0.4's own receive path: a stock pynetdicom AE, in this process,
copying the file it spooled (``STORE_RECV_CHUNKED_DATASET``) for the same sent file.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from cxr_node.app import Receiver
from cxr_node.dicom import status
from cxr_node.jobs import spool
from cxr_node.receive.streaming import StreamingAssociation, StreamingDUL, split_pdvs
from tests.conftest import StartNode, free_port, require_tool
from tests.integration.helpers import echo, small_cr
from tests.syntaxes import Variant

HOST: Final = "127.0.0.1"


class StockScp:
    """pynetdicom's own SCP (no node code on its receive path), keeping a copy of each data set it spooled."""

    def __init__(self, folder: Path, max_pdu: int) -> None:
        self.folder = folder
        self.port = free_port()
        ae = AE(ae_title="CXR_NODE")
        ae.add_supported_context(ComputedRadiographyImageStorage, ALL_TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = max_pdu
        self.ae = ae
        self.kept: list[Path] = []

    def __enter__(self) -> StockScp:
        chunked = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._restore = chunked
        self.ae.start_server((HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._keep)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.ae.shutdown()
        _config.STORE_RECV_CHUNKED_DATASET = self._restore

    def _keep(self, event: Event) -> int:
        target = self.folder / f"stock-{len(self.kept)}.dcm"
        shutil.copyfile(event.dataset_path, target)
        self.kept.append(target)
        return status.SUCCESS


def send_pynetdicom(port: int, path: Path, syntax: str) -> int:
    """C-STORE the file ``path`` as it is (data set bytes streamed unparsed); return the status."""
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(ComputedRadiographyImageStorage, [syntax])
        assoc = ae.associate(HOST, port, ae_title="CXR_NODE")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def send_storescu(port: int, path: Path, max_send_pdu: int) -> str:
    """Send ``path`` with DCMTK storescu in PDUs of at most ``max_send_pdu``; return what it printed."""
    command = [require_tool("storescu"), "-v", "-aec", "CXR_NODE", "--max-send-pdu", str(max_send_pdu)]
    done = subprocess.run([*command, HOST, str(port), str(path)], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def stored_file(node: Receiver) -> Path:
    """The one file the node stored (its only job's)."""
    [job] = node.store.jobs.query()
    assert job.path is not None
    return node.settings.storage.root / job.path


@pytest.mark.parametrize("max_pdu", [16384, 262144, 0], ids=["16k", "256k", "unlimited"])
@pytest.mark.parametrize("name", ["explicit_le", "j2k_lossless", "rle", "deflated_le"])
def test_pynetdicom_send_is_stored_byte_identical_to_pynetdicoms_own_path(
    start_node: StartNode, syntax_variants: dict[str, Variant], name: str, max_pdu: int, tmp_path: Path
) -> None:
    """A file sent in PDUs of any size the node announces is stored with the bytes pynetdicom itself spools."""
    variant = syntax_variants[name]
    node = start_node(**{"node.max_pdu": max_pdu})
    assert send_pynetdicom(node.port, variant.path, variant.transfer_syntax) == status.SUCCESS
    with StockScp(tmp_path, max_pdu) as stock:
        assert send_pynetdicom(stock.port, variant.path, variant.transfer_syntax) == status.SUCCESS
    assert stored_file(node).read_bytes() == stock.kept[0].read_bytes()


@pytest.mark.parametrize("max_send_pdu", [4096, 16384, 131072])
def test_storescu_send_is_stored_byte_identical_to_pynetdicoms_own_path(
    start_node: StartNode, chest_cr: Path, max_send_pdu: int, tmp_path: Path
) -> None:
    """DCMTK storescu's PDUs of 4 KiB to 128 KiB give the file pynetdicom itself spools (storescu re-encodes)."""
    node = start_node()
    out = send_storescu(node.port, chest_cr, max_send_pdu)
    assert "Received Store Response (Success)" in out, out
    with StockScp(tmp_path, 262144) as stock:
        out = send_storescu(stock.port, chest_cr, max_send_pdu)
        assert "Received Store Response (Success)" in out, out
    assert stored_file(node).read_bytes() == stock.kept[0].read_bytes()


def test_accepted_associations_stream(start_node: StartNode, chest_cr: Path) -> None:
    """Every association the node accepts runs the streaming DUL and event-driven reactor."""
    node = start_node()
    assert node.server is not None
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, node.port, ae_title="CXR_NODE")
    try:
        [accepted] = node.server.ae.active_associations
        assert isinstance(accepted, StreamingAssociation) and isinstance(accepted.dul, StreamingDUL)
        assert assoc.send_c_store(small_cr(chest_cr, "streams")).Status == status.SUCCESS
    finally:
        assoc.release()


# --- peers that break off ---------------------------------------------------------------------------------------


def store_pdatas(chest_cr: Path, name: str) -> list[Any]:
    """The P-DATA primitives of a C-STORE-RQ of a 512-pixel CR on context 1, in PDUs of at most 16 KiB."""
    ds = small_cr(chest_cr, name, size=512)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(1, 16384))


def broken_association(node: Receiver) -> Any:
    """A pynetdicom association proposing CR storage in explicit VR little endian (context 1)."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(HOST, node.port, ae_title="CXR_NODE")
    assert assoc.is_established
    return assoc


def abort_mid_transfer(assoc: Any, pdatas: list[Any]) -> None:
    """Send half of a C-STORE's P-DATA PDUs, then an A-ABORT."""
    for pdata in pdatas[: len(pdatas) // 2]:
        assoc.dul.send_pdu(pdata)
    assoc.abort()


def close_mid_pdu(assoc: Any, pdatas: list[Any]) -> None:
    """Send the command set, then the first 5000 bytes of a 16 KiB P-DATA-TF PDU, then close the sending side."""
    raw: socket.socket = assoc.dul.socket.socket
    raw.sendall(_encoded(pdatas[0]))
    raw.sendall(bytes((0x04, 0)) + (16384).to_bytes(4, "big") + bytes(5000))
    raw.shutdown(socket.SHUT_WR)


def _encoded(primitive: Any) -> bytes:
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def malformed_pdv(assoc: Any, pdatas: list[Any]) -> None:
    """Send a P-DATA-TF whose PDV item runs past the end of the PDU."""
    raw: socket.socket = assoc.dul.socket.socket
    body = (1000).to_bytes(4, "big") + bytes((1, 0x03)) + bytes(20)
    raw.sendall(bytes((0x04, 0)) + len(body).to_bytes(4, "big") + body)


@pytest.mark.parametrize("break_off", [abort_mid_transfer, close_mid_pdu, malformed_pdv])
def test_peer_breaking_off_mid_transfer_leaves_nothing_and_the_node_serves_on(
    start_node: StartNode, chest_cr: Path, break_off: Callable[[Any, list[Any]], None]
) -> None:
    """A C-STORE broken off (A-ABORT, connection closed inside a PDU, malformed PDV) stores nothing; others go on."""
    node = start_node()
    assert node.server is not None
    server = node.server
    assoc = broken_association(node)
    break_off(assoc, store_pdatas(chest_cr, break_off.__name__))
    assert wait_for(lambda: not server.ae.active_associations, 10.0), "the broken association is still open"
    if assoc.is_established:
        assoc.abort()
    assert node.store.jobs.query() == []
    assert not list((node.settings.storage.root / spool.INBOX).rglob("*.dcm"))
    assert echo(node.port) == status.SUCCESS
    assert send_pynetdicom(node.port, _saved(chest_cr, node, "after"), ExplicitVRLittleEndian) == status.SUCCESS


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _saved(chest_cr: Path, node: Receiver, name: str) -> Path:
    path = node.settings.storage.root.parent / f"{name}.dcm"
    small_cr(chest_cr, name).save_as(path, enforce_file_format=True)
    return path


# --- the PDV parser ---------------------------------------------------------------------------------------------


def pdv(context: int, control: int, fragment: bytes) -> bytes:
    """One encoded PDV item."""
    return (len(fragment) + 2).to_bytes(4, "big") + bytes((context, control)) + fragment


def test_split_pdvs_returns_views_of_each_item() -> None:
    """Two PDV items come back as (context ID, control header + fragment) views, in order."""
    body = memoryview(pdv(1, 0x03, b"command") + pdv(1, 0x02, b"data"))
    assert [(c, bytes(v)) for c, v in split_pdvs(body) or []] == [(1, b"\x03command"), (1, b"\x02data")]


@pytest.mark.parametrize(
    "body",
    [b"", b"\x00\x00", (1).to_bytes(4, "big") + b"\x01", (100).to_bytes(4, "big") + b"\x01\x02abc"],
    ids=["empty", "short-length", "item-under-2-bytes", "item-past-the-end"],
)
def test_split_pdvs_refuses_malformed_bodies(body: bytes) -> None:
    """A body that is empty, cut inside a length, or whose item is too short or too long is refused."""
    assert split_pdvs(memoryview(body)) is None
