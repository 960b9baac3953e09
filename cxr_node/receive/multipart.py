"""A streaming reader of HTTP request bodies: Content-Length or chunked framing, then multipart/related parts.

Nothing here holds a body in memory: a part's bytes go to a callback as they arrive, in chunks of at most
:data:`CHUNK` bytes, and what is buffered is at most one chunk plus the boundary delimiter. Every input is
bounded: the body in all (:class:`ChunkedBody`, :class:`LengthBody`), a chunk-size line, the trailers, a part's
header block and its header count. A body that breaks the framing raises :class:`MalformedBody`; one over a
bound :class:`BodyTooLarge`. No message repeats the bytes received (they may hold patient data).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

CHUNK: Final = 256 * 1024
"""Most bytes read from the connection per step."""
MAX_CHUNK_LINE: Final = 1024
"""Longest chunk-size line (size, extensions, CRLF) of a chunked body."""
MAX_TRAILERS: Final = 8 * 1024
"""Most bytes of trailer fields after the last chunk."""
MAX_PADDING: Final = 1024
"""Most transport padding (spaces, tabs) after a boundary delimiter."""
BOUNDARY: Final = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
"""RFC 2046 section 5.1.1: 1 to 70 characters of bchars, not ending in a space."""


class MalformedBody(ValueError):
    """The body does not follow its framing (chunked encoding, multipart delimiters, part headers)."""


class BodyTooLarge(ValueError):
    """The body, a chunk line, the trailers or a part's headers are over their bound."""


class Readable(Protocol):
    """What bodies are read from: the connection's buffered reader."""

    def read(self, size: int = -1, /) -> bytes:
        """Read ``size`` bytes; fewer only at the end of the stream."""
        ...

    def read1(self, size: int = -1, /) -> bytes:
        """Read at most ``size`` bytes with at most one read from the connection (what has arrived)."""
        ...

    def readline(self, size: int = -1, /) -> bytes:
        """Read one line of at most ``size`` bytes."""
        ...


class LengthBody:
    """A body of ``length`` bytes (Content-Length), read in steps of at most ``size``."""

    def __init__(self, source: Readable, length: int) -> None:
        self.source = source
        self.left = length

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body; b'' at its end. Raises MalformedBody when the peer closes early."""
        if self.left <= 0:
            return b""
        data = self.source.read1(min(size, self.left))
        if not data:
            raise MalformedBody("connection closed before the end of the body (Content-Length)")
        self.left -= len(data)
        return data


class ChunkedBody:
    """A body in HTTP/1.1 chunked transfer coding (RFC 9112 section 7.1), of at most ``max_bytes`` decoded."""

    def __init__(self, source: Readable, max_bytes: int) -> None:
        self.source = source
        self.max_bytes = max_bytes
        self.total = 0
        self.left = 0
        self.done = False

    def read(self, size: int) -> bytes:
        """Up to ``size`` decoded bytes; b'' after the last chunk and the trailers."""
        if self.done:
            return b""
        if self.left == 0:
            self.left = self._next_size()
            if self.left == 0:
                self._skip_trailers()
                self.done = True
                return b""
        data = self.source.read1(min(size, self.left))
        if not data:
            raise MalformedBody("connection closed inside a chunk")
        self.left -= len(data)
        if self.left == 0 and self._exactly(2) != b"\r\n":
            raise MalformedBody("chunk not followed by CRLF")
        return data

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size and (more := self.source.read(size - len(data))):
            data += more
        return data

    def _next_size(self) -> int:
        line = self.source.readline(MAX_CHUNK_LINE + 1)
        if len(line) > MAX_CHUNK_LINE:
            raise BodyTooLarge(f"chunk-size line over {MAX_CHUNK_LINE} bytes")
        digits = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", digits):
            raise MalformedBody("invalid chunk-size line")
        size = int(digits, 16)
        self.total += size
        if self.total > self.max_bytes:
            raise BodyTooLarge(f"body over {self.max_bytes} bytes")
        return size

    def _skip_trailers(self) -> None:
        seen = 0
        while True:
            line = self.source.readline(MAX_TRAILERS + 1)
            seen += len(line)
            if seen > MAX_TRAILERS:
                raise BodyTooLarge(f"trailers over {MAX_TRAILERS} bytes")
            if not line.endswith(b"\n"):
                raise MalformedBody("connection closed inside the trailers")
            if line in (b"\r\n", b"\n"):
                return


class Body(Protocol):
    """A decoded request body."""

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; b'' at the end."""
        ...


@dataclass(frozen=True)
class PartLimits:
    """The most one part's header block may hold."""

    header_bytes: int = 16 * 1024
    headers: int = 32


def valid_boundary(boundary: str) -> bool:
    """True for a boundary RFC 2046 allows (1-70 bchars, no trailing space)."""
    return bool(BOUNDARY.match(boundary.encode("latin-1", "replace")))


class MultipartReader:
    """Reads the parts of a multipart body one after the other: :meth:`next_part` then :meth:`read_part`.

    Parameters
    ----------
    body : Body
        The decoded body.
    boundary : str
        The boundary parameter of the Content-Type (checked with :func:`valid_boundary` first).
    limits : PartLimits
        Bounds on each part's header block.
    """

    def __init__(self, body: Body, boundary: str, limits: PartLimits = PartLimits()) -> None:
        if not valid_boundary(boundary):
            raise MalformedBody("invalid multipart boundary")
        self.body = body
        self.limits = limits
        self.delimiter = b"\r\n--" + boundary.encode("ascii")
        self.buf = bytearray(b"\r\n")  # the first delimiter may open the body: make it follow a line break
        self.eof = False
        self.state = "preamble"

    def next_part(self) -> dict[str, str] | None:
        """Move to the next part and return its headers (names in lower case); None after the last part.

        Raises
        ------
        MalformedBody
            When the body ends before the close delimiter, or a delimiter or header line is malformed.
        BodyTooLarge
            When a part's header block is over ``limits``.
        """
        if self.state == "body":
            self.read_part(lambda _data: None)  # the caller did not read it: skip it
        if self.state == "preamble":
            self._skip_to_delimiter()
        if self.state == "delimiter":
            self._after_delimiter()
        if self.state == "closed":
            return None
        return self._headers()

    def read_part(self, sink: Callable[[memoryview], object]) -> int:
        """Pass the current part's content to ``sink`` in pieces as it arrives; return its size in bytes."""
        if self.state != "body":
            raise RuntimeError("read_part() needs a part opened by next_part()")
        size, keep = 0, len(self.delimiter) - 1
        while True:
            found = self.buf.find(self.delimiter)
            if found >= 0:
                size += self._emit(found, sink)
                del self.buf[: len(self.delimiter)]
                self.state = "delimiter"  # the part is complete: what follows the delimiter is read next time
                return size
            if len(self.buf) > keep:
                size += self._emit(len(self.buf) - keep, sink)
            if not self._fill():
                raise MalformedBody("body ends inside a part (no closing delimiter)")

    def drain(self, max_bytes: int) -> None:
        """Read and drop what follows the close delimiter (the epilogue), at most ``max_bytes``."""
        self.buf.clear()
        dropped = 0
        while not self.eof and dropped <= max_bytes:
            data = self.body.read(CHUNK)
            dropped += len(data)
            self.eof = not data

    def _emit(self, count: int, sink: Callable[[memoryview], object]) -> int:
        if count:
            with memoryview(self.buf) as view:
                sink(view[:count])
            del self.buf[:count]
        return count

    def _fill(self) -> bool:
        """Read one more step into the buffer; False at the end of the body."""
        if self.eof:
            return False
        data = self.body.read(CHUNK)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _skip_to_delimiter(self) -> None:
        keep = len(self.delimiter) - 1
        while (found := self.buf.find(self.delimiter)) < 0:
            if len(self.buf) > keep:
                del self.buf[: len(self.buf) - keep]
            if not self._fill():
                raise MalformedBody("no multipart boundary delimiter in the body")
        del self.buf[: found + len(self.delimiter)]
        self._after_delimiter()

    def _after_delimiter(self) -> None:
        """After a delimiter: '--' closes the body; else optional padding, then CRLF opens a part."""
        self._need(2)
        if self.buf[:2] == b"--":
            self.state = "closed"
            return
        padding = 0
        while True:
            self._need(padding + 2)
            if self.buf[padding : padding + 2] == b"\r\n":
                break
            if bytes(self.buf[padding : padding + 1]) not in (b" ", b"\t") or padding >= MAX_PADDING:
                raise MalformedBody("boundary delimiter not followed by CRLF or '--'")
            padding += 1
        del self.buf[: padding + 2]
        self.state = "headers"

    def _need(self, count: int) -> None:
        while len(self.buf) < count:
            if not self._fill():
                raise MalformedBody("body ends after a boundary delimiter")

    def _headers(self) -> dict[str, str]:
        """Read the header block of the part just opened (ends with an empty line)."""
        while True:
            if self.buf[:2] == b"\r\n":
                block = b""
                del self.buf[:2]
                break
            end = self.buf.find(b"\r\n\r\n")
            if 0 <= end <= self.limits.header_bytes:
                block = bytes(self.buf[:end])
                del self.buf[: end + 4]
                break
            if len(self.buf) > self.limits.header_bytes + 4:
                raise BodyTooLarge(f"part headers over {self.limits.header_bytes} bytes")
            if not self._fill():
                raise MalformedBody("body ends inside part headers")
        self.state = "body"
        return parse_headers(block, self.limits.headers)


def parse_headers(block: bytes, max_headers: int) -> dict[str, str]:
    """Parse a part's header block (lines ``Name: value``, folded lines joined); names in lower case.

    Raises
    ------
    MalformedBody
        For a line without a colon, an empty or invalid name, or a continuation line first.
    BodyTooLarge
        For more than ``max_headers`` fields.
    """
    headers: dict[str, str] = {}
    last = ""
    for raw in block.split(b"\r\n") if block else []:
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t"):
            if not last:
                raise MalformedBody("part header block starts with a continuation line")
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
            raise MalformedBody("invalid part header line")
        last = name.lower()
        headers[last] = value.strip()
        if len(headers) > max_headers:
            raise BodyTooLarge(f"more than {max_headers} part headers")
    return headers
