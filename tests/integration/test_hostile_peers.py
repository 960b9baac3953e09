"""Hostile and broken peers against the real SCP on loopback: stalled connections, floods, over-long PDUs, over-size
instances, deflate bombs and absurd headers. Each is bounded and answered, and the node keeps serving others.

Client sockets from 127.0.0.2 play a second host (all of 127.0.0.0/8 is local on Linux).
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)
from structlog.testing import capture_logs

from cxr_node.app import Receiver
from cxr_node.dicom import status
from cxr_node.jobs import spool
from cxr_node.jobs.states import JobState
from cxr_node.receive.connections import A_ABORT_INVALID_PDU_PARAMETER
from cxr_node.receive.guards import dataset_offset
from tests.conftest import StartNode
from tests.integration.helpers import echo, small_cr

HOST: Final = "127.0.0.1"
OTHER_HOST: Final = "127.0.0.2"
MB: Final = 1024 * 1024
A_ASSOCIATE_RQ_HEADER: Final = b"\x01\x00\x00\x00\x01\x00"
"""The header of an A-ASSOCIATE-RQ announcing 256 bytes that never come."""


def stalled(node: Receiver, payload: bytes, source: str = HOST) -> socket.socket:
    """A connection to the node that sends ``payload`` and then nothing."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect((HOST, node.port))
    if payload:
        sock.sendall(payload)
    return sock


def closed_within(sock: socket.socket, limit_s: float) -> float | None:
    """Seconds until the node closes ``sock`` (data before the close is read and dropped); None if it stays open."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(4096):
            sock.settimeout(max(limit_s - (time.monotonic() - started), 0.001))
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; return whether it held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def idle(node: Receiver) -> bool:
    """True when the node holds no connection and no association."""
    assert node.server is not None
    return not node.server.ae.active_associations and node.server.slots.open_from(HOST) == 0


@contextmanager
def associated(node: Receiver, *contexts: tuple[str, list[str]], source: str = HOST) -> Iterator[Association]:
    """An association with the node (Verification unless ``contexts`` are given); released or aborted at the end."""
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for abstract, syntaxes in contexts or ((Verification, [ExplicitVRLittleEndian]),):
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate(HOST, node.port, ae_title="CXR_NODE", bind_address=(source, 0))
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def exchange(assoc: Association, request: C_STORE, context_id: int) -> Any:
    """Send a request pynetdicom's own calls would not send as it is, and return the answer (None if none came)."""
    assoc._reactor_checkpoint.clear()  # as pynetdicom's own requests do: its reactor must not take the answer
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assoc.dimse.send_msg(request, context_id)
        return assoc.dimse.get_msg(block=True)[1]
    finally:
        assoc._reactor_checkpoint.set()


def store(node: Receiver, path: Path, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """C-STORE the file ``path`` as it is (its data set bytes are streamed unparsed); return the response."""
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # else pynetdicom parses the file (and inflates a bomb) to send it
    try:
        with associated(node, (ComputedRadiographyImageStorage, [syntax])) as assoc:
            assert assoc.is_established
            return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def jobs(node: Receiver) -> int:
    """How many jobs the node's store holds, in any state."""
    return sum(node.store.jobs.counts().values())


def files_under(node: Receiver, *areas: str) -> list[Path]:
    """Every file in the given areas of the node's storage root."""
    root = node.settings.storage.root
    return [path for area in areas for path in (root / area).rglob("*") if path.is_file()]


def rss_mb() -> float:
    """This process's resident memory, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --- connections --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x01", A_ASSOCIATE_RQ_HEADER],
    ids=["silent", "one-byte", "header-only"],
)
def test_stalled_connection_is_dropped_at_the_artim_deadline(start_node: StartNode, payload: bytes) -> None:
    """A connection that never completes its A-ASSOCIATE-RQ is closed after node.artim_timeout_s and its slot freed."""
    node = start_node(**{"node.artim_timeout_s": 1.0})
    sock = stalled(node, payload)
    closed = closed_within(sock, 5.0)
    sock.close()
    assert closed is not None
    assert 0.7 < closed < 3.0
    assert wait_for(lambda: idle(node))
    assert echo(node.port) == status.SUCCESS


def test_echo_gets_through_while_50_connections_stall(start_node: StartNode) -> None:
    """With 50 stalled one-byte connections open, a real peer's C-ECHO gets Success at once; all 50 are dropped."""
    node = start_node(**{"node.artim_timeout_s": 3.0, "node.max_associations_per_peer": 64})
    flood = [stalled(node, b"\x01") for _ in range(50)]
    try:
        assert wait_for(lambda: node.server is not None and node.server.slots.open_from(HOST) == 50)
        started = time.monotonic()
        assert echo(node.port) == status.SUCCESS
        assert time.monotonic() - started < 2.0
        assert all(closed_within(sock, 6.0) is not None for sock in flood)
    finally:
        for sock in flood:
            sock.close()
    assert wait_for(lambda: idle(node))


def test_stalled_pdu_inside_an_association_is_dropped(start_node: StartNode) -> None:
    """A peer that stops in the middle of a PDU is dropped after node.network_timeout_s, its association ended."""
    node = start_node(**{"node.network_timeout_s": 1.0})
    with capture_logs() as logs, associated(node) as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        raw.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"\x00" * 10)
        assert wait_for(lambda: assoc.is_aborted or not assoc.is_established, timeout_s=5.0)
    assert wait_for(lambda: idle(node))
    reasons = [entry.get("reason", "") for entry in logs if entry["event"] == "assoc.dropped"]
    assert any("node.network_timeout_s (1 s) inside a PDU" in reason for reason in reasons)


def test_connections_per_peer_address_are_limited(start_node: StartNode) -> None:
    """Past node.max_associations_per_peer one address's connections are closed at once; other addresses go on."""
    node = start_node(**{"node.max_associations_per_peer": 3, "node.artim_timeout_s": 5.0})
    with capture_logs() as logs:
        held = [stalled(node, b"\x01", source=OTHER_HOST) for _ in range(3)]
        extra = [stalled(node, b"\x01", source=OTHER_HOST) for _ in range(2)]
        try:
            assert all(closed_within(sock, 1.0) is not None for sock in extra)
            assert all(closed_within(sock, 0.2) is None for sock in held)
            with associated(node, source=OTHER_HOST) as refused:
                assert not refused.is_established
            assert echo(node.port) == status.SUCCESS  # another address is not affected
        finally:
            for sock in held + extra:
                sock.close()
    assert node.server is not None
    assert wait_for(lambda: node.server is not None and node.server.slots.open_from(OTHER_HOST) == 0)
    with associated(node, source=OTHER_HOST) as again:
        assert again.is_established
    assert any(entry["event"] == "assoc.refused_connection" for entry in logs)


def test_associations_share_the_scp_contexts(start_node: StartNode) -> None:
    """Pin: pynetdicom gives each association the server's contexts, which the node shares instead of copying."""
    node = start_node()
    with associated(node) as assoc:
        assert assoc.is_established
        assert node.server is not None
        [acceptor] = node.server.active_associations
        assert acceptor.acceptor.supported_contexts is node.server.contexts
        assert assoc.send_c_echo().Status == status.SUCCESS


# --- PDUs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_pdu", "announced"), [(16384, 16385), (0, 0xFFFFFFFF)], ids=["over-max", "4GB"])
def test_over_long_pdu_aborts_without_reading_it(start_node: StartNode, max_pdu: int, announced: int) -> None:
    """A P-DATA-TF announcing more than node.max_pdu (64 MiB when 0) is answered with an A-ABORT at its header."""
    node = start_node(**{"node.max_pdu": max_pdu, "node.network_timeout_s": 30.0})
    with capture_logs() as logs, associated(node) as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        raw.sendall(struct.pack(">BBL", 0x04, 0, announced))
        assert wait_for(lambda: assoc.is_aborted, timeout_s=3.0)
    assert wait_for(lambda: idle(node))
    assert any("over the" in entry.get("reason", "") for entry in logs if entry["event"] == "assoc.dropped")


def test_over_long_pdu_before_the_association_gets_an_a_abort(start_node: StartNode) -> None:
    """Even before any association, a PDU of 4 GB is refused at its header with A-ABORT (provider, reason 6)."""
    node = start_node()
    sock = stalled(node, struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
    assert sock.recv(64) == A_ABORT_INVALID_PDU_PARAMETER
    sock.close()


def test_oversized_echo_data_set_aborts(start_node: StartNode) -> None:
    """A C-ECHO-RQ carrying a data set over 4 MiB (pynetdicom would hold it in memory) aborts the association."""
    node = start_node()
    command = Dataset()
    command.AffectedSOPClassUID, command.CommandField, command.MessageID = Verification, 0x0030, 1
    command.CommandDataSetType = 0x0001
    encoded = encode(command, True, True)
    assert encoded is not None

    def p_data(control: int, fragment: bytes) -> bytes:
        item = struct.pack(">LBB", len(fragment) + 2, 1, control) + fragment
        return struct.pack(">BBL", 0x04, 0, len(item)) + item

    with capture_logs() as logs, associated(node) as assoc:
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        raw.sendall(p_data(0x03, encoded))
        with suppress(OSError):
            for _ in range(5 * MB // 200_000 + 1):
                raw.sendall(p_data(0x00, bytes(200_000)))
        assert wait_for(lambda: assoc.is_aborted, timeout_s=5.0)
    assert wait_for(lambda: idle(node))
    assert any("other than C-STORE" in entry.get("reason", "") for entry in logs if entry["event"] == "assoc.dropped")


def test_pdus_of_exactly_max_pdu_are_accepted(start_node: StartNode, chest_cr: Path, tmp_path: Path) -> None:
    """A sender that fills PDUs up to the node's announced max_pdu stores normally."""
    node = start_node(**{"node.max_pdu": 16384})
    path = tmp_path / "small.dcm"
    small_cr(chest_cr, "exact-pdu", size=256).save_as(path, enforce_file_format=True)
    assert store(node, path).Status == status.SUCCESS


# --- data sets -------------------------------------------------------------------------------------------------


def test_over_size_instance_is_refused_without_spooling_past_the_limit(
    start_node: StartNode, chest_cr: Path, tmp_path: Path
) -> None:
    """A 7 MB instance over node.max_instance_mb 1 is refused (INSTANCE_TOO_LARGE), its spool at most 1 MB, not kept."""
    node = start_node(**{"node.max_instance_mb": 1})
    receiving = node.settings.storage.root / spool.RECEIVING
    largest, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            for path in receiving.glob("*"):
                with suppress(FileNotFoundError):
                    largest[0] = max(largest[0], path.stat().st_size)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = store(node, chest_cr)
    finally:
        done.set()
        watcher.join()
    assert response.Status == status.INSTANCE_TOO_LARGE
    assert response.ErrorComment == "instance over node.max_instance_mb (1 MB)"
    assert largest[0] <= MB  # the watcher may miss the spool file's short life on a busy machine: see test_guards
    assert jobs(node) == 0
    assert files_under(node, spool.RECEIVING, spool.INBOX, spool.QUARANTINE) == []
    path = tmp_path / "small.dcm"
    small_cr(chest_cr, "under-the-limit").save_as(path, enforce_file_format=True)
    assert store(node, path).Status == status.SUCCESS


def deflate_bomb(header: bytes, zeros: int, chunk: int = 16 * MB) -> bytes:
    """A raw deflate stream of ``header`` and then ``zeros`` zero bytes (a multiple of ``chunk``), made cheaply.

    After a full flush a chunk of zeros compresses to the same bytes every time, so one chunk is compressed and
    its output repeated: 1 GiB of zeros costs a few MB of compression work.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return stream + block * (zeros // chunk) + compressor.flush()


def deflated_file(path: Path, meta: FileMetaDataset, stream: bytes) -> Path:
    """Write ``meta`` (as Deflated Explicit VR Little Endian) followed by the deflate ``stream`` as it is."""
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with path.open("wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(fp), meta)
        fp.write(stream)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file, after its File Meta Information."""
    with path.open("rb") as fp:
        dataset_offset(fp)
        return fp.read()


def test_deflate_bomb_is_refused_with_bounded_memory(start_node: StartNode, chest_cr: Path, tmp_path: Path) -> None:
    """1 MB of deflate inflating to 1 GiB is refused (INSTANCE_TOO_LARGE), the receiver's memory growing < 200 MB."""
    node = start_node(**{"node.max_instance_mb": 64})
    ds = small_cr(chest_cr, "bomb")
    del ds.PixelData
    plain = tmp_path / "header.dcm"
    ds.save_as(plain, enforce_file_format=True)
    header = dataset_bytes(plain) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 1024**3)
    bomb = deflated_file(tmp_path / "bomb.dcm", ds.file_meta, deflate_bomb(header, 1024**3))
    assert bomb.stat().st_size < 2 * MB
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = store(node, bomb, DeflatedExplicitVRLittleEndian)
    finally:
        done.set()
        sampler.join()
    assert response.Status == status.INSTANCE_TOO_LARGE
    assert response.ErrorComment == "inflated data set over node.max_instance_mb (64 MB)"
    assert peak[0] - before < 200
    assert jobs(node) == 0
    assert files_under(node, spool.RECEIVING, spool.INBOX) == []


def test_normal_deflated_instance_is_stored_as_received(start_node: StartNode, chest_cr: Path, tmp_path: Path) -> None:
    """A correct deflated instance is inflated for the checks and stored as received, readable by the worker."""
    node = start_node()
    ds = small_cr(chest_cr, "deflated")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert store(node, path, DeflatedExplicitVRLittleEndian).Status == status.SUCCESS
    [job] = node.store.jobs.query(limit=5)
    assert job.state == JobState.QUEUED
    kept = dcmread(node.settings.storage.root / str(job.path))
    assert kept.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert kept.pixel_array.shape == (128, 128)
    assert files_under(node, spool.RECEIVING) == []


def test_deeply_nested_header_is_refused(start_node: StartNode, chest_cr: Path, tmp_path: Path) -> None:
    """A header with 1000 nested sequences is refused with HEADER_TOO_COMPLEX and an ErrorComment; nothing is kept."""
    node = start_node()
    path = tmp_path / "nested.dcm"
    small_cr(chest_cr, "nested").save_as(path, enforce_file_format=True)
    body = b""
    for _ in range(1000):  # (FFFA,FFFA) Digital Signatures Sequence: the last tag, so the order stays valid
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        body = struct.pack("<HH2sHL", 0xFFFA, 0xFFFA, b"SQ", 0, 0xFFFFFFFF) + item
        body += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    with path.open("ab") as fp:
        fp.write(body)
    response = store(node, path)
    assert response.Status == status.HEADER_TOO_COMPLEX
    assert response.ErrorComment == "header: sequences nested over 32 deep"
    assert jobs(node) == 0
    assert echo(node.port) == status.SUCCESS


# --- requests pynetdicom cannot act on ------------------------------------------------------------------------


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def association_rq(context_id: int, syntaxes: tuple[str, ...]) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification with one presentation context, as a hostile peer may
    write it: any context ID, any number of transfer syntaxes (none included)."""
    context = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, Verification.encode())
    context += b"".join(_item(0x40, syntax.encode()) for syntax in syntaxes)
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999.1")
    variable = _item(0x10, b"1.2.840.10008.3.1.1.1") + _item(0x20, context) + _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + b"CXR_NODE".ljust(16) + b"HOSTILE".ljust(16) + b"\0" * 32 + variable
    return struct.pack(">BBL", 1, 0, len(body)) + body


@pytest.mark.parametrize(
    ("context_id", "syntaxes"),
    [(1, ()), (2, (ExplicitVRLittleEndian,)), (0, (ExplicitVRLittleEndian,))],
    ids=["no-transfer-syntax", "even-context-id", "context-id-0"],
)
def test_a_request_pynetdicom_cannot_negotiate_is_aborted_at_once(
    start_node: StartNode, context_id: int, syntaxes: tuple[str, ...]
) -> None:
    """A presentation context without a transfer syntax, or with an even ID, makes pynetdicom raise while it
    negotiates: the peer gets an A-ABORT and the connection is closed at once, never held (16 of them from one
    address locked that address out until the peer closed them, with no timeout to free them)."""
    node = start_node(**{"node.artim_timeout_s": 30.0, "node.acse_timeout_s": 30.0, "node.network_timeout_s": 30.0})
    sock = stalled(node, association_rq(context_id, syntaxes))
    try:
        sock.settimeout(5)
        answer = sock.recv(6)
        assert answer[:1] == b"\x07", answer  # A-ABORT
        assert closed_within(sock, 5.0) is not None
    finally:
        sock.close()
    assert wait_for(lambda: idle(node))
    assert echo(node.port) == status.SUCCESS


def test_an_unknown_pdu_type_is_aborted_at_once(start_node: StartNode) -> None:
    """A first PDU of a type PS3.8 does not define gets an A-ABORT at once: its body is not read as further PDUs
    (60 kB of them logged 10,000 lines), and the connection does not wait out node.network_timeout_s."""
    node = start_node(**{"node.artim_timeout_s": 30.0, "node.network_timeout_s": 30.0})
    sock = stalled(node, b"\x09\x00" + struct.pack(">L", 6000) + b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00" * 600)
    try:
        started = time.monotonic()
        closed = closed_within(sock, 5.0)
        assert closed is not None and time.monotonic() - started < 5.0
    finally:
        sock.close()
    assert node.server is not None
    assert wait_for(lambda: idle(node)), (node.server.ae.active_associations, node.server.slots.open_from(HOST))
    assert echo(node.port) == status.SUCCESS


def test_a_data_set_that_ends_inside_its_pixel_data_is_quarantined(
    start_node: StartNode, chest_cr: Path, tmp_path: Path
) -> None:
    """The last P-DATA fragment ends the data set 1 MB before the end its Pixel Data declares: the header is whole,
    the pixels are not. The node answers 0xA900 and quarantines the file, as for any truncated Pixel Data (the
    deferred value was measured by its declared length, so it was accepted and analysed as undecodable)."""
    node = start_node()
    whole = chest_cr.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) - MB])
    response = store(node, cut)
    assert response.Status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "pixel data has" in str(response.ErrorComment)
    assert node.store.jobs.counts()[JobState.QUARANTINED] == 1
    assert jobs(node) == 1


def test_a_c_store_without_a_data_set_is_refused(start_node: StartNode) -> None:
    """A C-STORE-RQ whose command says no data set follows gets 0xC000 from the node's handler, nothing kept, and
    the association goes on."""
    node = start_node()
    request = C_STORE()  # no data set: its command's CommandDataSetType says none follows
    request.MessageID, request.AffectedSOPClassUID = 7, ComputedRadiographyImageStorage
    request.AffectedSOPInstanceUID, request.Priority = "2.25.1234", 0
    contexts = ((ComputedRadiographyImageStorage, [ExplicitVRLittleEndian]), (Verification, [ExplicitVRLittleEndian]))
    with associated(node, *contexts) as assoc:
        assert assoc.is_established
        answer = exchange(assoc, request, 1)
        assert answer is not None and answer.Status == status.CANNOT_UNDERSTAND
        assert assoc.send_c_echo().Status == status.SUCCESS
    assert jobs(node) == 0


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("AffectedSOPInstanceUID", "2.25.99", status.CANNOT_UNDERSTAND),
        ("AffectedSOPClassUID", DigitalXRayImageStorageForPresentation, status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    ],
)
def test_a_command_naming_another_instance_or_class_than_its_data_set_is_refused(
    start_node: StartNode, chest_cr: Path, field: str, value: str, expected: int
) -> None:
    """A C-STORE-RQ whose Affected SOP Instance (Class) UID differs from its data set's: Success would confirm an
    instance the node did not keep (or file it under another class). It is refused with the reason, nothing kept."""
    node = start_node()
    ds = small_cr(chest_cr, f"mismatch-{field}")
    request = C_STORE()
    request.MessageID, request.Priority = 9, 0
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    setattr(request, field, value)
    request.DataSet = io.BytesIO(encode(ds, False, True))
    contexts = [(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])]
    if field == "AffectedSOPClassUID":
        contexts.append((DigitalXRayImageStorageForPresentation, [ExplicitVRLittleEndian]))
    with associated(node, *contexts) as assoc:
        wanted = request.AffectedSOPClassUID
        answer = exchange(
            assoc, request, next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == wanted)
        )
    assert answer is not None and answer.Status == expected
    assert "is not the command's Affected" in str(answer.ErrorComment)
    assert jobs(node) == 0
