"""The streaming multipart/related reader and the chunked body decoder: boundaries, framing, hostile input."""

from __future__ import annotations

import contextlib
import io
import random

import pytest

from cxr_node.receive.multipart import (
    CHUNK,
    BodyTooLarge,
    ChunkedBody,
    LengthBody,
    MalformedBody,
    MultipartReader,
    PartLimits,
    parse_headers,
    valid_boundary,
)

BOUNDARY = "b0undary-1"


class Trickle(io.BufferedReader):
    """A reader that hands out at most ``step`` bytes per read (network-sized pieces)."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(io.BytesIO(data))
        self.step = step

    def read(self, size: int | None = -1, /) -> bytes:
        """At most ``step`` bytes."""
        return super().read(self.step if size is None or size < 0 else min(size, self.step))

    def read1(self, size: int = -1, /) -> bytes:
        """At most ``step`` bytes."""
        return super().read1(self.step if size < 0 else min(size, self.step))


def encode(parts: list[bytes], boundary: str = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """A multipart body of ``parts`` (each with a Content-Type header)."""
    out = preamble
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--".encode() + epilogue


def content(reader: MultipartReader) -> bytes:
    """The current part's content, read whole."""
    pieces: list[bytes] = []
    reader.read_part(lambda view: pieces.append(bytes(view)))
    return b"".join(pieces)


def read_all(data: bytes, boundary: str = BOUNDARY, step: int = 1 << 20, **limits: int) -> list[tuple[dict, bytes]]:
    """Every part of ``data`` as (headers, content)."""
    reader = MultipartReader(LengthBody(Trickle(data, step), len(data)), boundary, PartLimits(**limits))
    parts = []
    while (headers := reader.next_part()) is not None:
        parts.append((headers, content(reader)))
    return parts


@pytest.mark.parametrize("step", [1, 3, 7, 64, 1 << 20])
def test_parts_come_out_whole_whatever_the_read_sizes(step: int) -> None:
    """Parts are reassembled exactly when the network hands the body out in pieces of any size."""
    parts = [b"DICM" * 10, b"", b"\r\n--b0undary-", b"--b0undary-1X"[:-1] + b"\n"]
    got = read_all(encode(parts), step=step)
    assert [content for _, content in got] == parts
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in got)


def test_content_that_nearly_matches_the_delimiter_is_kept() -> None:
    """Content holding the boundary without the leading CRLF, or CRLF and a prefix of it, is content."""
    tricky = b"--b0undary-1 in the middle\r\n--b0undary-\r\n\r\n--b0undar"
    assert [c for _, c in read_all(encode([tricky]), step=5)] == [tricky]


def test_large_part_streams_in_bounded_pieces() -> None:
    """A part of several chunks reaches the sink in pieces no larger than one read step."""
    content = random.Random(1).randbytes(3 * CHUNK + 17)
    data = encode([content])
    reader = MultipartReader(LengthBody(io.BufferedReader(io.BytesIO(data)), len(data)), BOUNDARY)
    assert reader.next_part() is not None
    sizes: list[int] = []
    pieces: list[bytes] = []
    reader.read_part(lambda view: (sizes.append(len(view)), pieces.append(bytes(view))))
    assert b"".join(pieces) == content
    assert max(sizes) <= CHUNK + len(reader.delimiter)


def test_preamble_epilogue_and_padding_are_ignored() -> None:
    """A preamble, transport padding after a delimiter and an epilogue do not change the parts."""
    data = (
        b"this is a preamble\r\n"
        + f"--{BOUNDARY} \t\r\n\r\nfirst\r\n--{BOUNDARY}\r\nX-A: 1\r\n\r\nsecond\r\n--{BOUNDARY}--\r\nepilogue".encode()
    )
    got = read_all(data, step=2)
    assert got == [({}, b"first"), ({"x-a": "1"}, b"second")]


def test_quoted_boundary_with_specials_is_matched() -> None:
    """Boundaries with RFC 2046 specials (as dicomweb-client's UUIDs or ones with '=' and '?') work."""
    boundary = "0f3cf5c0-70e0=41ef?baef'c6f9(f65ec3e1)"
    assert valid_boundary(boundary)
    assert [c for _, c in read_all(encode([b"x", b"y"], boundary), boundary)] == [b"x", b"y"]


@pytest.mark.parametrize("boundary", ["", "a" * 71, "ends with space ", "semi;colon", 'quote"', "ümlaut"])
def test_invalid_boundaries_are_refused(boundary: str) -> None:
    """A boundary RFC 2046 does not allow is refused before anything is read."""
    assert not valid_boundary(boundary)
    with pytest.raises(MalformedBody):
        MultipartReader(LengthBody(io.BufferedReader(io.BytesIO(b"")), 0), boundary)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no delimiter at all",
        f"--{BOUNDARY}\r\n\r\ntruncated part".encode(),
        f"--{BOUNDARY}\r\nContent-Type: application/dicom".encode(),
        f"--{BOUNDARY}garbage\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}\r\n folded first\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}\r\nBad Name: 1\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}".encode(),
        f"--{BOUNDARY}".encode() + b" " * 2000 + b"\r\n\r\nx",
    ],
)
def test_malformed_bodies_raise_malformed(data: bytes) -> None:
    """Truncated bodies, broken delimiters and bad header lines raise MalformedBody, never anything else."""
    with pytest.raises(MalformedBody):
        read_all(data, step=3)


def test_header_block_over_its_bound_is_refused_without_reading_on() -> None:
    """Part headers that never end are refused once over the bound (nothing held beyond it)."""
    data = f"--{BOUNDARY}\r\nX: ".encode() + b"a" * 100_000 + b"\r\n\r\nx\r\n" + f"--{BOUNDARY}--".encode()
    with pytest.raises(BodyTooLarge):
        read_all(data, header_bytes=1024)


def test_too_many_part_headers_are_refused() -> None:
    """More header fields than allowed are refused."""
    block = b"".join(f"X-{i}: v\r\n".encode() for i in range(40))
    data = f"--{BOUNDARY}\r\n".encode() + block + b"\r\nx\r\n" + f"--{BOUNDARY}--".encode()
    with pytest.raises(BodyTooLarge):
        read_all(data, headers=32)


def test_folded_header_lines_are_joined() -> None:
    """An obsolete folded header line continues the previous field."""
    assert parse_headers(b"Content-Type: application/dicom;\r\n transfer-syntax=1.2", 8) == {
        "content-type": "application/dicom; transfer-syntax=1.2"
    }


def test_an_unread_part_is_skipped_by_next_part() -> None:
    """Calling next_part() without reading the current part skips its content."""
    data = encode([b"a" * 1000, b"b"])
    reader = MultipartReader(LengthBody(Trickle(data, 7), len(data)), BOUNDARY)
    assert reader.next_part() is not None
    assert reader.next_part() is not None
    pieces: list[bytes] = []
    reader.read_part(lambda view: pieces.append(bytes(view)))
    assert pieces == [b"b"]
    assert reader.next_part() is None


def test_length_body_stops_at_content_length() -> None:
    """Bytes after Content-Length (a next request) are never read as body."""
    body = LengthBody(io.BufferedReader(io.BytesIO(b"0123456789")), 4)
    assert body.read(100) == b"0123"
    assert body.read(100) == b""


def test_length_body_closed_early_is_malformed() -> None:
    """A connection closed before Content-Length bytes arrived is a malformed body."""
    body = LengthBody(io.BufferedReader(io.BytesIO(b"012")), 10)
    body.read(100)
    with pytest.raises(MalformedBody):
        body.read(100)


def chunked(data: bytes, size: int, trailer: bytes = b"") -> bytes:
    """``data`` in the chunked transfer coding, chunks of ``size``."""
    out = b""
    for at in range(0, len(data), size):
        piece = data[at : at + size]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


def test_chunked_body_decodes_and_feeds_the_multipart_reader() -> None:
    """A multipart body in chunks (as dicomweb-client sends over 1 MB) decodes to the same parts."""
    parts = [random.Random(2).randbytes(5000), b"second"]
    wire = chunked(encode(parts), 333, trailer=b"X-Trailer: 1\r\n") + b"NEXT REQUEST"
    source = Trickle(wire, 11)
    reader = MultipartReader(ChunkedBody(source, 1 << 20), BOUNDARY)
    got = []
    while reader.next_part() is not None:
        got.append(content(reader))
    reader.drain(1 << 20)
    assert got == parts
    assert b"".join(iter(lambda: source.read(100), b"")) == b"NEXT REQUEST"


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"zz\r\nabc\r\n0\r\n\r\n", MalformedBody),
        (b"3\r\nabcXX0\r\n\r\n", MalformedBody),
        (b"10\r\nabc", MalformedBody),
        (b"1" * 2000 + b"\r\n", BodyTooLarge),
        (b"ffffffffffffffff\r\n", BodyTooLarge),
        (b"3\r\nabc\r\n0\r\n" + b"X: y\r\n" * 3000 + b"\r\n", BodyTooLarge),
        (b"3\r\nabc\r\n0\r\nX: y", MalformedBody),
    ],
)
def test_hostile_chunked_framing_is_refused(wire: bytes, error: type[Exception]) -> None:
    """Bad chunk sizes, missing CRLFs, huge announced chunks and endless trailers are refused in bounds."""
    body = ChunkedBody(io.BufferedReader(io.BytesIO(wire)), 1 << 20)

    def read_to_end() -> None:
        while body.read(1024):
            pass

    with pytest.raises(error):
        read_to_end()


def test_chunked_body_over_the_limit_is_refused_before_its_bytes_are_read() -> None:
    """The decoded size is checked against the bound as each chunk is announced."""
    body = ChunkedBody(io.BufferedReader(io.BytesIO(b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n")), 1000)
    with pytest.raises(BodyTooLarge):
        body.read(10)


def test_random_garbage_never_raises_anything_else() -> None:
    """Fuzzed bodies end in parts, MalformedBody or BodyTooLarge: no other exception escapes."""
    rng = random.Random(3)
    pieces = [b"\r\n", b"--", BOUNDARY.encode(), b"a", b":", b" ", b"--" + BOUNDARY.encode() + b"--"]
    for _ in range(500):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        with contextlib.suppress(MalformedBody, BodyTooLarge):
            read_all(data, step=rng.randint(1, 9), header_bytes=64, headers=4)
