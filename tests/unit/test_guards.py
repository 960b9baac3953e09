"""Bounds on received input, without an association: PDU framing, connection slots, spool cap, inflate, header scan,
back-pressure on inodes and rows, and the pixel checks that run before any decoder allocates."""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom.dsutils import encode

from cxr_node.dicom import pixels, status
from cxr_node.dicom.pixels import decode
from cxr_node.errors import PixelDecodeError, RejectedInstance
from cxr_node.jobs.states import JobState
from cxr_node.receive import pressure
from cxr_node.receive.connections import (
    A_ABORT_INVALID_PDU_PARAMETER,
    HARD_MAX_PDU,
    MAX_MEMORY_DATASET,
    ConnectionLimits,
    Dropped,
    GuardedSocket,
    PduGate,
    PduTooLong,
    PdvStream,
    PeerSlots,
    RateLimitedLog,
    command_field,
)
from cxr_node.receive.guards import (
    HEADER_LIMITS,
    HeaderLimits,
    HeaderScan,
    SpoolFiles,
    dataset_offset,
    inflate,
    scan_file,
)
from cxr_node.receive.pressure import Pressure

LIMITS = ConnectionLimits(artim_s=5.0, stall_s=2.0, max_pdata=1000, max_other=4000)


def pdu(pdu_type: int, length: int) -> bytes:
    """A PDU header announcing ``length`` bytes."""
    return struct.pack(">BBL", pdu_type, 0, length)


# --- PDU gate ---------------------------------------------------------------------------------------


def test_gate_follows_pdus_split_anywhere() -> None:
    """PDUs whose headers and bodies arrive in arbitrary pieces are followed; the ARTIM deadline ends with the first."""
    gate = PduGate(LIMITS, accepted_at=0.0)
    stream = pdu(0x01, 300) + b"a" * 300 + pdu(0x04, 1000) + b"p" * 1000 + pdu(0x05, 4) + b"rrrr"
    for at in range(0, len(stream), 7):
        gate.feed(stream[at : at + 7])
        if at + 7 < 306:
            assert gate.deadline == 5.0
    assert gate.deadline is None
    assert gate.timeout(now=100.0) == LIMITS.stall_s


def test_gate_refuses_a_long_p_data_at_its_header() -> None:
    """A P-DATA-TF announcing one byte more than node.max_pdu is refused as soon as its 6-byte header is in."""
    gate = PduGate(LIMITS, accepted_at=0.0)
    gate.feed(pdu(0x01, 10) + b"x" * 10 + pdu(0x04, 1000)[:5])
    with pytest.raises(PduTooLong, match=r"P-DATA-TF of 1001 bytes over the 1000 accepted \(node.max_pdu\)"):
        gate.feed(pdu(0x04, 1001)[5:])


def test_gate_refuses_a_huge_association_request() -> None:
    """A PDU other than P-DATA (an A-ASSOCIATE-RQ of 4 GB) is bounded too."""
    with pytest.raises(PduTooLong, match="PDU type 0x01 of 4294967295 bytes"):
        PduGate(LIMITS, accepted_at=0.0).feed(pdu(0x01, 0xFFFFFFFF))


def test_unlimited_max_pdu_keeps_a_hard_cap() -> None:
    """node.max_pdu 0 (unlimited) still refuses a P-DATA-TF over 64 MiB."""
    limits = ConnectionLimits.from_node(artim_s=1, network_timeout_s=1, max_pdu=0)
    assert limits.max_pdata == HARD_MAX_PDU
    PduGate(limits, 0.0).feed(pdu(0x01, 0) + pdu(0x04, HARD_MAX_PDU))
    with pytest.raises(PduTooLong):
        PduGate(limits, 0.0).feed(pdu(0x01, 0) + pdu(0x04, HARD_MAX_PDU + 1))


def command_set(field: int, with_dataset: bool) -> bytes:
    """An encoded DIMSE command set (implicit VR little endian) with ``field`` as its Command Field."""
    ds = Dataset()
    ds.AffectedSOPClassUID = "1.2.840.10008.1.1"
    ds.CommandField = field
    ds.MessageID = 1
    ds.CommandDataSetType = 0x0001 if with_dataset else 0x0101
    encoded = encode(ds, True, True)
    assert encoded is not None
    return encoded


def pdv(control: int, fragment: bytes) -> bytes:
    """One PDV item of presentation context 1."""
    return struct.pack(">LBB", len(fragment) + 2, 1, control) + fragment


def test_command_field_is_read_from_an_encoded_command_set() -> None:
    """The Command Field is found in an encoded command set; None when there is none."""
    assert command_field(command_set(0x0001, True)) == 0x0001
    assert command_field(command_set(0x0030, False)) == 0x0030
    assert command_field(b"") is None


def test_pdv_stream_bounds_what_pynetdicom_keeps_in_memory() -> None:
    """A C-ECHO's data set past the bound is refused; a C-STORE's data set (spooled to a file) is not counted."""
    stream = PdvStream(max_command=1024, max_dataset=10_000)
    chunk = pdv(0x00, bytes(4000))
    stream.feed(memoryview(pdv(0x03, command_set(0x0001, True)) + chunk * 5 + pdv(0x02, b"end")))
    stream.feed(memoryview(pdv(0x03, command_set(0x0030, True)) + chunk * 2))
    with pytest.raises(PduTooLong, match="other than C-STORE over 10000 bytes"):
        stream.feed(memoryview(chunk))
    with pytest.raises(PduTooLong, match="command set over 1024 bytes"):
        PdvStream(max_command=1024).feed(memoryview(pdv(0x01, bytes(1000)) + pdv(0x01, bytes(100))))


def test_gate_follows_pdv_items_split_across_reads() -> None:
    """PDV items in P-DATA PDUs read in arbitrary pieces are followed: the bound is met at its very byte."""
    gate = PduGate(ConnectionLimits(artim_s=5.0, stall_s=2.0, max_pdata=100_000), accepted_at=0.0)
    items = [pdv(0x03, command_set(0x0030, True))] + [pdv(0x00, bytes(50_000))] * (MAX_MEMORY_DATASET // 50_000)
    items.append(pdv(0x00, bytes(MAX_MEMORY_DATASET % 50_000 + 1)))
    stream = pdu(0x01, 0) + b"".join(pdu(0x04, len(item)) + item for item in items)
    refused_at = None
    for at in range(0, len(stream), 4093):
        try:
            gate.feed(stream[at : at + 4093])
        except PduTooLong:
            refused_at = at
            break
    assert refused_at is not None
    assert refused_at + 4093 >= len(stream)


def test_gate_timeout_counts_down_to_the_artim_deadline() -> None:
    """Before the request is complete a read may wait only until the ARTIM deadline, then the peer is dropped."""
    gate = PduGate(LIMITS, accepted_at=10.0)
    assert gate.timeout(now=10.0) == LIMITS.stall_s
    assert gate.timeout(now=14.0) == pytest.approx(1.0)
    with pytest.raises(Dropped, match="artim_timeout_s"):
        gate.timeout(now=15.0)
    assert "artim_timeout_s" in gate.timed_out(now=15.0)
    assert "network_timeout_s" in gate.timed_out(now=11.0)


@pytest.fixture
def pair() -> Iterator[tuple[GuardedSocket, socket.socket]]:
    """A guarded socket and its peer, connected locally."""
    ours, theirs = socket.socketpair()
    guarded = GuardedSocket.adopt(ours)
    guarded.gate = PduGate(ConnectionLimits(artim_s=0.5, stall_s=0.3, max_pdata=1000), time.monotonic())
    try:
        yield guarded, theirs
    finally:
        guarded.close()
        theirs.close()


def test_guarded_socket_drops_a_stalled_peer(pair: tuple[GuardedSocket, socket.socket]) -> None:
    """A peer that sent one byte and stalls gets end-of-stream after the ARTIM deadline, not a blocked read."""
    guarded, theirs = pair
    theirs.sendall(b"\x01")
    assert guarded.recv(6) == b"\x01"
    started = time.monotonic()
    assert guarded.recv(5) == b""
    assert 0.2 < time.monotonic() - started < 2.0
    assert theirs.recv(10) == b""  # the node closed its side


def test_guarded_socket_aborts_an_over_long_pdu(pair: tuple[GuardedSocket, socket.socket]) -> None:
    """The peer of an over-long P-DATA-TF gets an A-ABORT (provider, invalid PDU parameter) and nothing is read."""
    guarded, theirs = pair
    theirs.sendall(pdu(0x01, 0) + pdu(0x04, 5000) + b"body")
    assert guarded.recv(6) == pdu(0x01, 0)
    assert guarded.recv(6) == b""
    assert theirs.recv(100) == A_ABORT_INVALID_PDU_PARAMETER


def test_guarded_socket_runs_its_close_callback_once() -> None:
    """The slot of a connection is given back once, when its socket closes."""
    ours, theirs = socket.socketpair()
    calls: list[int] = []
    guarded = GuardedSocket.adopt(ours)
    guarded.when_closed(lambda: calls.append(1))
    guarded.close()
    guarded.close()
    theirs.close()
    assert calls == [1]


def test_peer_slots_bound_each_address_and_the_total() -> None:
    """Connections are refused past the per-address limit and past the total; a closed one frees its slot."""
    slots = PeerSlots(per_peer=2, total=3)
    assert [slots.take("10.0.0.1") for _ in range(2)] == ["", ""]
    assert "max_associations_per_peer" in slots.take("10.0.0.1")
    assert slots.take("10.0.0.2") == ""
    assert "in all" in slots.take("10.0.0.3")
    slots.give("10.0.0.1")
    assert slots.take("10.0.0.3") == ""
    assert slots.open_from("10.0.0.1") == 1


def test_rate_limited_log_counts_what_it_suppresses() -> None:
    """A refusal flood logs once per address per period, then says how many it held back."""
    now = [0.0]
    limited = RateLimitedLog(every_s=10.0, clock=lambda: now[0])
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        for _ in range(5):
            limited.warning("assoc.refused_connection", "10.0.0.1", peer="10.0.0.1:1")
        now[0] = 11.0
        limited.warning("assoc.refused_connection", "10.0.0.1", peer="10.0.0.1:2")
    assert [entry.get("suppressed") for entry in logs] == [None, 4]


# --- spooling and inflating ---------------------------------------------------------------------------


def test_spool_file_stops_growing_at_the_cap(tmp_path: Path) -> None:
    """Writes past the cap are counted, not written; the file is emptied and the overflow can be looked up."""
    spool = SpoolFiles(tmp_path, max_bytes=1000)
    spooled = spool(delete=False, mode="wb", suffix=".dcm")
    spooled.write(b"x" * 600)
    spooled.file.flush()
    assert spool.overflow(Path(spooled.name)) is None
    spooled.write(b"x" * 600)
    spooled.write(b"x" * 600)
    spooled.close()
    assert Path(spooled.name).stat().st_size == 0
    assert spool.overflow(Path(spooled.name)) == 1800


def deflated_zeros(size: int, chunk: int = 16 * 1024 * 1024) -> bytes:
    """A raw deflate stream of ``size`` zero bytes (a multiple of ``chunk``), made in a fraction of a second.

    After a full flush the compressor state is the same for every chunk of zeros, so one chunk's output is
    repeated instead of compressing them all.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(chunk)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH) == block
    return block * (size // chunk) + compressor.flush()


def test_deflate_bomb_is_refused_at_the_cap_with_bounded_output() -> None:
    """1 MB inflating to 1 GiB is refused once the inflated size passes the cap, in bounded steps."""
    bomb = deflated_zeros(1024**3)
    assert len(bomb) < 1.1 * 1024**2
    sink = io.BytesIO()
    with pytest.raises(RejectedInstance, match=r"inflated data set over node\.max_instance_mb") as refused:
        inflate(io.BytesIO(bomb), sink, max_bytes=8 * 1024**2)
    assert refused.value.status == status.INSTANCE_TOO_LARGE
    assert len(sink.getvalue()) <= 8 * 1024**2


def test_inflate_round_trips_and_refuses_corrupt_streams() -> None:
    """A normal stream inflates exactly; a truncated or corrupt one is refused as not understood."""
    data = np.random.default_rng(1).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(data) + compressor.flush()
    sink = io.BytesIO()
    assert inflate(io.BytesIO(stream), sink, max_bytes=len(data)) == len(data)
    assert sink.getvalue() == data
    for broken in (stream[: len(stream) // 2], b"\xff" * 100):
        with pytest.raises(RejectedInstance) as refused:
            inflate(io.BytesIO(broken), None, max_bytes=len(data))
        assert refused.value.status == status.CANNOT_UNDERSTAND


# --- header scan ----------------------------------------------------------------------------------------


def write_raw(path: Path, body: bytes, syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write ``body`` (an encoded data set) as a DICOM file with File Meta Information."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as fp:
        fp.write(body)
    return path


def sequence(tag: int, items: bytes, defined: bool = False) -> bytes:
    """An explicit VR little endian SQ element holding ``items``."""
    if defined:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(items)) + items
    end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF) + items + end


def item(content: bytes) -> bytes:
    """An undefined-length sequence item."""
    return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)


def nested(levels: int, tag: int = 0xFFFAFFFA) -> bytes:
    """``levels`` sequences, each the only content of the previous one's single item."""
    body = b""
    for _ in range(levels):
        body = sequence(tag, item(body))
    return body


def scanned(path: Path, syntax: UID) -> tuple[int, bool]:
    """(elements counted, whether the walk reached the end of the file) of a header scan of ``path``."""
    with path.open("rb") as fp:
        dataset_offset(fp)
        scan = HeaderScan(fp, syntax.is_implicit_VR, syntax.is_little_endian, HEADER_LIMITS)
        scan.run()
        return scan.elements, fp.tell() == path.stat().st_size


def test_real_chest_header_passes_in_each_encoding(chest_cr: Path, tmp_path: Path) -> None:
    """The real chest CR's header is walked to its end in explicit, implicit and big endian encodings alike."""
    ds = dcmread(chest_cr)
    expected = (len(ds), True)
    assert scanned(chest_cr, ExplicitVRLittleEndian) == expected
    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        path = tmp_path / f"{syntax}.dcm"
        ds.file_meta.TransferSyntaxUID = syntax
        encoding = {"implicit_vr": syntax.is_implicit_VR, "little_endian": syntax.is_little_endian}
        dcmwrite(path, ds, force_encoding=True, **encoding)
        assert scanned(path, syntax) == expected


def test_too_deep_nesting_is_refused(tmp_path: Path) -> None:
    """A thousand nested sequences are refused before pydicom recurses into them; 32 pass."""
    scan_file(write_raw(tmp_path / "ok.dcm", nested(32)), ExplicitVRLittleEndian)
    with pytest.raises(RejectedInstance, match="nested over 32 deep") as refused:
        scan_file(write_raw(tmp_path / "deep.dcm", nested(1000)), ExplicitVRLittleEndian)
    assert refused.value.status == status.HEADER_TOO_COMPLEX


def test_a_million_items_are_refused_quickly(tmp_path: Path) -> None:
    """One sequence of a million empty items is refused at the item bound, well within a second."""
    empty_item = struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    path = write_raw(tmp_path / "items.dcm", sequence(0xFFFAFFFA, empty_item * 1_000_000))
    started = time.monotonic()
    with pytest.raises(RejectedInstance, match="over 50000 sequence items"):
        scan_file(path, ExplicitVRLittleEndian)
    assert time.monotonic() - started < 1.0


def test_defined_length_sequences_and_small_limits(tmp_path: Path) -> None:
    """Items inside defined-length sequences count too, as do the bytes pydicom would hold."""
    body = sequence(0x00081140, item(b"") * 5, defined=True)
    path = write_raw(tmp_path / "defined.dcm", body)
    scan_file(path, ExplicitVRLittleEndian, HeaderLimits(items=5))
    with pytest.raises(RejectedInstance, match="over 4 sequence items"):
        scan_file(path, ExplicitVRLittleEndian, HeaderLimits(items=4))
    big = struct.pack("<HH2sHL", 0x0009, 0x1001, b"OB", 0, 4096) + bytes(4096)
    with pytest.raises(RejectedInstance, match="values over"):
        scan_file(
            write_raw(tmp_path / "held.dcm", sequence(0xFFFAFFFA, item(big))),
            ExplicitVRLittleEndian,
            HeaderLimits(parsed_bytes=4000),
        )


def test_implicit_vr_sequences_are_found_by_the_dictionary(tmp_path: Path) -> None:
    """In implicit VR a sequence is known from the data dictionary (or an undefined length) and is walked."""

    def implicit_sequence(levels: int) -> bytes:
        body = b""
        for _ in range(levels):
            content = struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
            body = struct.pack("<HHL", 0x0008, 0x1140, len(content)) + content
        return body

    path = write_raw(tmp_path / "implicit.dcm", implicit_sequence(40), ImplicitVRLittleEndian)
    with pytest.raises(RejectedInstance, match="nested over 32 deep"):
        scan_file(path, ImplicitVRLittleEndian)


# --- back-pressure ----------------------------------------------------------------------------------------


class Counts:
    """A job store that only counts (what Pressure reads)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def counts(self) -> dict[JobState, int]:
        """All jobs delivered but ``total``."""
        return {state: (self.total if state is JobState.DELIVERED else 0) for state in JobState}


def test_back_pressure_counts_inodes_and_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inodes used over storage.max_disk_percent, or more jobs than max_jobs, refuse new instances."""
    jobs: Any = Counts(10)
    assert Pressure(jobs, tmp_path, max_depth=100, max_disk_percent=100, max_jobs=11).reason() == ""
    assert "store full (10 jobs" in Pressure(jobs, tmp_path, max_depth=100, max_disk_percent=100, max_jobs=10).reason()
    assert 0.0 <= pressure.inodes_used_fraction(tmp_path) < 1.0
    monkeypatch.setattr(pressure, "disk_used_fraction", lambda root: 0.1)
    monkeypatch.setattr(pressure, "inodes_used_fraction", lambda root: 0.95)  # inode exhaustion cannot be staged
    assert "inodes 95% used" in Pressure(jobs, tmp_path, max_depth=100, max_disk_percent=90).reason()


# --- compressed pixel data ------------------------------------------------------------------------------------


def j2k_image(rows: int = 64, columns: int = 64) -> Dataset:
    """A small real JPEG 2000 lossless MONOCHROME2 image (encoded by openjpeg)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * columns, dtype=np.uint16) % 4096).tobytes()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


@pytest.fixture
def no_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if pydicom's decoders are reached at all."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decoder was asked to allocate")

    monkeypatch.setattr(pixels, "pixel_array", refuse)


def test_small_j2k_decodes() -> None:
    """The checks let a correct JPEG 2000 image through to the decoder."""
    assert decode(j2k_image()).pixels.shape == (64, 64)


def test_j2k_with_absurd_rows_and_columns_is_refused_before_allocation(no_decoder: None) -> None:
    """Rows = Columns = 65535 on a tiny JPEG 2000 stream is refused in one line before any decoder runs."""
    ds = j2k_image()
    ds.Rows = ds.Columns = 65535
    with pytest.raises(PixelDecodeError, match=r"65535 x 65535 x 1 x 16 bits is 8192 MB, over the 256 MB bound"):
        decode(ds)


def test_codestream_that_contradicts_the_header_is_refused(no_decoder: None) -> None:
    """A header of 1000 x 1000 over a 64 x 64 codestream is refused: a decoder allocates what the stream says."""
    ds = j2k_image()
    ds.Rows = ds.Columns = 1000
    with pytest.raises(PixelDecodeError, match="codestream is 64 x 64 x 1, the header says 1000 x 1000 x 1"):
        decode(ds)


def test_offset_tables_and_fragments_must_match_the_frames(no_decoder: None) -> None:
    """A Basic Offset Table of two entries, or an Extended one of three, for one frame is refused."""
    ds = j2k_image()
    frame = bytes(ds.PixelData[16:])  # after the empty offset table item and the fragment's item header
    ds.PixelData = encapsulate([frame, frame], has_bot=True)
    with pytest.raises(PixelDecodeError, match="Basic Offset Table has 2 entries for 1 frame"):
        decode(ds)
    ds = j2k_image()
    ds.ExtendedOffsetTable = bytes(24)
    with pytest.raises(PixelDecodeError, match="Extended Offset Table has 3 entries"):
        decode(ds)
    ds = j2k_image()
    ds.PixelData = b"\xfe\xff\x00\xe0" + struct.pack("<L", 0) + b"\xfe\xff\xdd\xe0" + bytes(4)
    with pytest.raises(PixelDecodeError, match="0 fragment"):
        decode(ds)


def test_jpeg_frame_header_is_read_too(no_decoder: None) -> None:
    """The size in a JPEG SOF segment (after APP and DQT segments) is compared with the header as well."""
    sof = b"\xff\xc1" + struct.pack(">HBHHB", 11, 12, 70, 80, 1) + b"\x01\x11\x00"
    stream = b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 4) + b"JF" + b"\xff\xdb" + struct.pack(">H", 3) + b"q" + sof
    assert pixels._codestream_shape(memoryview(stream)) == (70, 80, 1)
    assert pixels._codestream_shape(memoryview(b"\xff\xd8\xff\xda\x00\x02")) is None


def test_capped_file_stops_growing_at_its_cap(tmp_path: Path) -> None:
    """The spool file of an over-size instance never holds more than the cap: what was written is truncated away
    at the first write past it, later writes are only counted."""
    import tempfile

    from cxr_node.receive.guards import CappedFile

    inner = tempfile.NamedTemporaryFile(dir=tmp_path, delete=False)  # noqa: SIM115 - closed by CappedFile
    capped = CappedFile(inner, max_bytes=1000)
    sizes = []
    for _ in range(5):
        capped.write(b"x" * 300)
        capped.flush()
        sizes.append(Path(capped.name).stat().st_size)
    capped.close()
    assert sizes == [300, 600, 900, 0, 0]
    assert (capped.received, capped.overflowed) == (1500, True)


def test_spool_files_are_flushed_while_they_arrive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With flushing on, a data set's spool file is fdatasynced in the background every FLUSH_EVERY bytes (never
    two flushes of one file at once), the bytes are the ones written, and settling reports no error."""
    import os

    from cxr_node.receive import guards

    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(guards.os, "fdatasync", counting)
    spool = SpoolFiles(tmp_path, flush=True)
    spooled = spool(delete=False, mode="wb", suffix=".dcm")
    piece = bytes(range(256)) * 512  # 128 KiB, as a PDV of a 128 KiB PDU
    for _ in range(40):  # 5 MiB
        spooled.write(piece)
    spooled.close()
    path = Path(spooled.name)
    assert spool.settle(path) is None
    assert path.read_bytes() == piece * 40
    assert 1 <= len(synced) <= 5 and all(size >= guards.FLUSH_EVERY for size in synced)
    assert SpoolFiles(tmp_path).settle(path) is None  # flushing off: nothing to wait for


def test_a_failed_background_flush_refuses_the_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error a background flush met is kept and refuses the instance (0xA700, the PACS retries): after a
    failed fdatasync the intake's own fsync through another descriptor need not report it again."""
    import errno

    from cxr_node.receive import guards

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(guards.os, "fdatasync", failing)
    spool = SpoolFiles(tmp_path, flush=True)
    spooled = spool(delete=False, mode="wb", suffix=".dcm")
    spooled.write(b"\x00" * (guards.FLUSH_EVERY + 1))
    spooled.close()
    path = Path(spooled.name)
    with pytest.raises(RejectedInstance) as refused, guards.admitted(path, str(ExplicitVRLittleEndian), 1 << 30, spool):
        pass
    assert refused.value.status == status.OUT_OF_RESOURCES
    assert refused.value.reason == "cannot store: Input/output error"
    assert spool.settle(path) is None  # reported once


def test_the_scan_starts_where_pydicom_starts_the_data_set(tmp_path: Path) -> None:
    """A File Meta element written with an implicit VR header (its 'VR' bytes no letters: pydicom reads a 4-byte
    length there) made the scan start inside that element's value, where a fake OB element hid the real data set
    from it: a million items behind it were stored (a helper's STOW audit). The scan now starts where pydicom does."""
    empty_item = struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    body = sequence(0xFFFAFFFA, empty_item * 1_000_000)
    value = 32
    fake = struct.pack("<HH2sHL", 0x0009, 0x1000, b"OB", 0, value - 12 + len(body)) + bytes(value - 12)
    path = write_raw(tmp_path / "crafted.dcm", struct.pack("<HHL", 0x0002, 0x0102, value) + fake + body)
    with path.open("rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        pydicom_start = fp.tell()
        assert dataset_offset(fp) == pydicom_start
    with pytest.raises(RejectedInstance, match="over 50000 sequence items"):
        scan_file(path, ExplicitVRLittleEndian)
