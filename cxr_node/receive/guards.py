"""Bounds on a received data set, checked before pydicom parses it: size as spooled, size inflated, header shape.

pynetdicom streams each C-STORE data set into a file (``STORE_RECV_CHUNKED_DATASET``). The file comes from
:class:`SpoolFiles`, which stops writing once ``node.max_instance_mb`` is exceeded (the rest of the data set
is still read from the network, and dropped), so an over-size instance never fills the disk. The C-STORE
handler then calls :func:`admitted`, which

1. refuses an instance whose spool file overflowed (:data:`~cxr_node.dicom.status.INSTANCE_TOO_LARGE`);
2. for Deflated Explicit VR Little Endian, inflates the data set as a stream in bounded chunks, first only
   counting (refused over ``node.max_instance_mb``, nothing written), then into a file next to the spool file
   in Explicit VR Little Endian, which is what pydicom parses (pydicom would inflate it whole in memory);
3. walks the encoded header without building it (:class:`HeaderScan`): sequence items, nesting depth,
   elements and the bytes pydicom would hold in memory are bounded (:data:`HEADER_LIMITS`), so a header of a
   million items or a thousand levels is refused (:data:`~cxr_node.dicom.status.HEADER_TOO_COMPLEX`)
   before pydicom allocates for it.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import weakref
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

from pydicom.datadict import dictionary_VR
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import _config, dimse_messages

from cxr_node.dicom import status
from cxr_node.errors import RejectedInstance

INFLATE_OUT: Final = 1 << 20
"""Most bytes inflated per step: a deflate step's output is bounded, whatever the compression ratio."""
READ_CHUNK: Final = 1 << 16
PREAMBLE: Final = 128 + 4
UNDEFINED: Final = 0xFFFFFFFF
ITEM: Final = 0xFFFEE000
ITEM_END: Final = 0xFFFEE00D
SEQUENCE_END: Final = 0xFFFEE0DD
CHARACTER_SET: Final = 0x00080005
LONG_VRS: Final = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
"""Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)."""
KNOWN_VRS: Final = LONG_VRS | frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())


@dataclass(frozen=True)
class HeaderLimits:
    """The most a received header may hold before it is refused.

    A chest radiograph's header has about 150 elements, a few dozen items and a depth of 2 or 3; an SR or an
    enhanced multi-frame header a few thousand items and a depth of 10 or so. ``parsed_bytes`` counts what pydicom
    keeps in memory: values of top-level elements up to ``defer_size`` and everything inside sequences.
    """

    items: int = 50_000
    depth: int = 32
    elements: int = 200_000
    fragments: int = 100_000
    parsed_bytes: int = 64 * 1024 * 1024
    defer_size: int = 64 * 1024


HEADER_LIMITS: Final = HeaderLimits()


# ------------------------------------------------------------------------------------------- spooling


class CappedFile:
    """The file pynetdicom writes a received data set into: stops growing beyond ``max_bytes``.

    pynetdicom uses ``name``, ``write``, ``file.flush()`` and ``close``. Past the cap, what was written is
    truncated away and later writes are counted, not written; :attr:`overflowed` tells the handler.
    """

    def __init__(self, inner: IO[bytes], max_bytes: int | None, flusher: Flusher | None = None) -> None:
        self._inner = inner
        self._raw: IO[bytes] = getattr(inner, "file", inner)  # NamedTemporaryFile's file: no wrapper call per write
        self.max_bytes = max_bytes
        self.received = 0
        self.overflowed = False
        self._flusher = flusher
        self._flushed = 0

    @property
    def name(self) -> str:
        """The file's path."""
        return str(self._inner.name)

    @property
    def file(self) -> CappedFile:
        """Itself (pynetdicom flushes ``file``, as on a NamedTemporaryFile)."""
        return self

    def write(self, data: bytes) -> int:
        """Write ``data`` unless the total received would exceed the cap."""
        self.received += len(data)
        if self.max_bytes is not None and self.received > self.max_bytes:
            if not self.overflowed:
                self.overflowed = True
                self._inner.seek(0)
                self._inner.truncate()
            return len(data)
        written = self._raw.write(data)
        if self._flusher is not None and self.received - self._flushed >= FLUSH_EVERY:
            self._raw.flush()
            if self._flusher.flush(self.name, self._raw.fileno()):
                self._flushed = self.received
        return written

    def flush(self) -> None:
        """Flush what was written."""
        if not self.overflowed:
            self._raw.flush()

    def close(self) -> None:
        """Close the file (it stays on disk: pynetdicom or the intake removes or moves it)."""
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


FLUSH_EVERY: Final = 1 << 20
"""Bytes of a data set received between two background flushes of its spool file (:class:`Flusher`)."""
MAX_FLUSH_ERRORS: Final = 256


class Flusher:
    """Flushes spool files to disk in the background while the rest of their data set still arrives.

    The fsync that makes a received instance durable before Success then waits only for the data that came
    after the last flush: on a disk where an fsync of a whole 7 MB radiograph takes 10 ms or more, that is
    most of the time between the last byte and the answer. A flush is an ``fdatasync`` of a duplicate of the
    file's descriptor in a small thread pool; at most one runs per file, the writer never waits for one.
    It is only ever a head start: durability is still the intake's own fsync, and an error a background
    flush saw is kept for :meth:`settle`, so the instance is refused rather than acknowledged (after a
    failed flush, a later fsync through another descriptor need not report the error again).
    """

    def __init__(self, threads: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool-flush")
        self._lock = threading.Lock()
        self._pending: dict[str, Future[None]] = {}
        self._failed: dict[str, OSError] = {}

    def flush(self, name: str, fd: int) -> bool:
        """Start flushing the file ``name`` (open as ``fd``) unless a flush of it is running; True if started."""
        with self._lock:
            running = self._pending.get(name)
            if running is not None and not running.done():
                return False
            copy = os.dup(fd)
            try:
                started = self._pool.submit(self._sync, name, copy)
            except RuntimeError:  # the interpreter is shutting down
                os.close(copy)
                return False
            self._pending[name] = started
        started.add_done_callback(lambda done: self._forget(name, done))
        return True

    def _forget(self, name: str, done: Future[None]) -> None:
        """Drop a finished flush (its error, if any, stays for :meth:`settle`)."""
        with self._lock:
            if self._pending.get(name) is done:
                del self._pending[name]

    def _sync(self, name: str, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            with self._lock:
                self._failed[name] = exc
                while len(self._failed) > MAX_FLUSH_ERRORS:  # of data sets never settled (their association aborted)
                    del self._failed[next(iter(self._failed))]
        finally:
            os.close(fd)

    def settle(self, name: str) -> OSError | None:
        """Wait for the file's running flush, if any; return the error a flush of it met (once), else None."""
        with self._lock:
            running = self._pending.pop(name, None)
        if running is not None:
            running.result()
        with self._lock:
            return self._failed.pop(name, None)


class SpoolFiles:
    """A ``NamedTemporaryFile`` stand-in for pynetdicom: capped files in ``folder``, findable by path."""

    def __init__(self, folder: Path, max_bytes: int | None = None, flush: bool = False) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.flusher = Flusher() if flush else None
        self._open: weakref.WeakValueDictionary[str, CappedFile] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> CappedFile:
        """Open a new capped temporary file (the arguments are NamedTemporaryFile's)."""
        capped = CappedFile(
            tempfile.NamedTemporaryFile(*args, **{**kwargs, "dir": self.folder}),  # noqa: SIM115
            self.max_bytes,
            self.flusher,
        )
        with self._lock:
            self._open[capped.name] = capped
        return capped

    def overflow(self, path: Path) -> int | None:
        """Bytes received for the data set spooled at ``path`` when it went over the cap, else None."""
        with self._lock:
            capped = self._open.get(str(path))
        return capped.received if capped is not None and capped.overflowed else None

    def settle(self, path: Path) -> OSError | None:
        """Wait for a background flush of the file at ``path``; the error one met, else None."""
        return self.flusher.settle(str(path)) if self.flusher is not None else None


def install_spool(folder: Path, max_bytes: int | None = None, flush: bool = False) -> SpoolFiles:
    """Make pynetdicom spool received data sets into capped files in ``folder`` (process-wide, pynetdicom 3.0).

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each data set to ``dimse_messages.NamedTemporaryFile``
    as it arrives; this replaces that name with a :class:`SpoolFiles`. With ``flush`` (``storage.fsync``) each
    file is flushed to disk in the background while it arrives (:class:`Flusher`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = SpoolFiles(folder, max_bytes, flush)
    _config.STORE_RECV_CHUNKED_DATASET = True
    setattr(dimse_messages, "NamedTemporaryFile", files)  # noqa: B010
    return files


def installed_spool() -> SpoolFiles | None:
    """The :class:`SpoolFiles` pynetdicom writes into, if :func:`install_spool` was called in this process."""
    factory = getattr(dimse_messages, "NamedTemporaryFile", None)
    return factory if isinstance(factory, SpoolFiles) else None


# ------------------------------------------------------------------------------------------- admission


@contextmanager
def admitted(
    path: Path, transfer_syntax: str, max_bytes: int, spool: SpoolFiles | None, limits: HeaderLimits = HEADER_LIMITS
) -> Iterator[Path]:
    """Check a spooled instance against the bounds; yield the file for pydicom to parse.

    Parameters
    ----------
    path : Path
        The data set as received, in the DICOM file format (pynetdicom's spool file).
    transfer_syntax : str
        The transfer syntax of its presentation context.
    max_bytes : int
        ``node.max_instance_mb`` in bytes: the most a data set may be, as received or inflated.
    spool : SpoolFiles or None
        Where pynetdicom's spool files come from (to see whether this one overflowed).
    limits : HeaderLimits
        The header bounds.

    Yields
    ------
    Path
        ``path``, or for a deflated data set its inflated copy (removed when the block ends).

    Raises
    ------
    RejectedInstance
        Over a bound, or not decodable as a deflate stream; the status and reason to answer with.
    """
    received = spool.overflow(path) if spool is not None else None
    if received is not None:
        raise RejectedInstance(status.INSTANCE_TOO_LARGE, f"instance over node.max_instance_mb ({_mb(max_bytes)})")
    failed = spool.settle(path) if spool is not None else None
    if failed is not None:
        raise RejectedInstance(status.OUT_OF_RESOURCES, f"cannot store: {failed.strerror or failed}")
    if UID(transfer_syntax) != DeflatedExplicitVRLittleEndian:
        scan_file(path, UID(transfer_syntax), limits)
        yield path
        return
    inflated = path.with_name(path.name + ".inflated")
    try:
        inflate_file(path, inflated, max_bytes)
        scan_file(inflated, ExplicitVRLittleEndian, limits)
        yield inflated
    finally:
        inflated.unlink(missing_ok=True)


def _mb(size: int) -> str:
    return f"{size / 1024 / 1024:g} MB"


# ------------------------------------------------------------------------------------------- deflate


def inflate(source: BinaryIO, sink: BinaryIO | None, max_bytes: int) -> int:
    """Inflate the raw deflate stream read from ``source`` into ``sink`` (or only count); return its size.

    Memory stays bounded whatever the ratio: at most :data:`READ_CHUNK` in and :data:`INFLATE_OUT` out per step.

    Raises
    ------
    RejectedInstance
        INSTANCE_TOO_LARGE past ``max_bytes`` inflated; CANNOT_UNDERSTAND for a corrupt or truncated stream.
    """
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while not inflater.eof:
            data = inflater.unconsumed_tail or source.read(READ_CHUNK)
            if not data:
                raise RejectedInstance(status.CANNOT_UNDERSTAND, "deflated data set is truncated")
            out = inflater.decompress(data, INFLATE_OUT)
            total += len(out)
            if total > max_bytes:
                reason = f"inflated data set over node.max_instance_mb ({_mb(max_bytes)})"
                raise RejectedInstance(status.INSTANCE_TOO_LARGE, reason)
            if sink is not None:
                sink.write(out)
    except zlib.error as exc:
        raise RejectedInstance(status.CANNOT_UNDERSTAND, "deflated data set is corrupt") from exc
    return total


def inflate_file(path: Path, target: Path, max_bytes: int) -> None:
    """Write ``path`` (deflated) to ``target`` as Explicit VR Little Endian, after checking its inflated size."""
    meta = read_file_meta_info(path)
    with path.open("rb") as source:
        offset = dataset_offset(source)
        inflate(source, None, max_bytes)
        source.seek(offset)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        with target.open("wb") as sink:
            sink.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(DicomFileLike(sink), meta)
            inflate(source, sink, max_bytes)


def dataset_offset(fp: BinaryIO) -> int:
    """Position ``fp`` (a DICOM file) at its data set, after the File Meta Information, and return it."""
    fp.seek(128)
    if fp.read(4) != b"DICM":
        raise RejectedInstance(status.CANNOT_UNDERSTAND, "received file has no DICM prefix")
    position = PREAMBLE
    while True:
        head = fp.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            fp.seek(position)
            return position
        vr = head[4:6]
        if vr not in KNOWN_VRS and not b"AA" <= vr <= b"ZZ":  # as pydicom reads it: an implicit VR element, whose
            length = struct.unpack("<L", head[4:8])[0]  # 4 length bytes stand where the VR would (else the scan
        elif vr in LONG_VRS:  # would start inside a value, at bytes pydicom never reads as elements)
            length = struct.unpack("<L", fp.read(4))[0]
            position += 4
        else:
            length = struct.unpack("<H", head[6:8])[0]
        position += 8 + length
        fp.seek(position)


# ------------------------------------------------------------------------------------------- header scan


def scan_file(path: Path, transfer_syntax: UID, limits: HeaderLimits = HEADER_LIMITS) -> None:
    """Walk the header of the DICOM file ``path`` encoded in ``transfer_syntax``; raise when over ``limits``.

    A transfer syntax pydicom does not know is taken as explicit VR little endian (as every private one is).
    """
    known = transfer_syntax.is_transfer_syntax
    implicit = transfer_syntax.is_implicit_VR if known else False
    little = transfer_syntax.is_little_endian if known else True
    with path.open("rb") as fp:
        dataset_offset(fp)
        HeaderScan(fp, implicit, little, limits).run()


@dataclass
class _Open:
    """A sequence, an item or an undefined-length value (fragments) being walked; ``end`` None when undefined."""

    kind: str
    end: int | None


class HeaderScan:
    """Walks an encoded data set as pydicom would read it, counting, without building anything.

    It follows pydicom's leniencies that change the structure (an explicit VR that is not two letters read as
    implicit; UN of undefined length, or an unknown tag whose value starts with an item, read as a sequence).
    What it cannot follow inside a sequence of defined length is skipped to that sequence's end (pydicom parses
    such a sequence only when it is used); inside one of undefined length (parsed at once) it is refused.
    """

    def __init__(self, fp: BinaryIO, implicit: bool, little: bool, limits: HeaderLimits) -> None:
        self.fp, self.implicit, self.limits = fp, implicit, limits
        self.endian = "<" if little else ">"
        self.stack: list[_Open] = []
        self.depth = self.items = self.elements = self.fragments = self.parsed = 0

    def run(self) -> None:
        """Walk to the end of the data set."""
        while True:
            self._close_finished()
            head = self.fp.read(8)
            if len(head) < 8:
                return  # end of the data set (or truncated: pydicom reports it)
            tag = (struct.unpack(self.endian + "H", head[:2])[0] << 16) | struct.unpack(self.endian + "H", head[2:4])[0]
            top = self.stack[-1].kind if self.stack else "dataset"
            if not self._step(top, tag, head):
                return

    def _step(self, top: str, tag: int, head: bytes) -> bool:
        """Handle one tag; False to stop walking."""
        if top in ("sequence", "fragments"):
            return self._in_sequence(top, tag, self._u32(head[4:8]))
        if tag == ITEM_END and top == "item":
            self._pop()
            return True
        if tag in (ITEM, ITEM_END, SEQUENCE_END):
            return self._malformed("an item tag among elements") if self.stack else False  # pydicom stops there
        self._element(tag, head)
        return True

    def _in_sequence(self, top: str, tag: int, length: int) -> bool:
        if tag == SEQUENCE_END:
            self._pop()
        elif tag != ITEM:
            return self._malformed(f"tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item was expected")
        elif top == "fragments":
            self._count("fragments", "fragments")
            if len(self.stack) > 1:  # inside a sequence pydicom reads them
                self._hold(length)
            self._skip(length)
        else:
            self._count("items", "sequence items")
            self.stack.append(_Open("item", None if length == UNDEFINED else self.fp.tell() + length))
        return True

    def _element(self, tag: int, head: bytes) -> None:
        vr, length = self._vr_and_length(head)
        self._count("elements", "elements")
        if self._is_sequence(tag, vr, length):
            self.depth += 1
            if self.depth > self.limits.depth:
                reason = f"header: sequences nested over {self.limits.depth} deep"
                raise RejectedInstance(status.HEADER_TOO_COMPLEX, reason)
            self.stack.append(_Open("sequence", None if length == UNDEFINED else self.fp.tell() + length))
        elif length == UNDEFINED:
            self.stack.append(_Open("fragments", None))
        else:
            if self.stack or length <= self.limits.defer_size or tag == CHARACTER_SET:
                self._hold(length)
            self._skip(length)

    def _hold(self, length: int) -> None:
        """Count ``length`` bytes of values pydicom keeps in memory."""
        self.parsed += length
        if self.parsed > self.limits.parsed_bytes:
            reason = f"header: values over {_mb(self.limits.parsed_bytes)} to parse"
            raise RejectedInstance(status.HEADER_TOO_COMPLEX, reason)

    def _vr_and_length(self, head: bytes) -> tuple[bytes | None, int]:
        """The explicit VR (None when implicit) and the value length, the file positioned at the value."""
        vr = head[4:6]
        if self.implicit or not (b"AA" <= vr <= b"ZZ"):
            return None, self._u32(head[4:8])
        if vr in LONG_VRS:
            return vr, self._u32(self.fp.read(4))
        return vr, struct.unpack(self.endian + "H", head[6:8])[0]

    def _is_sequence(self, tag: int, vr: bytes | None, length: int) -> bool:
        if vr == b"SQ" or (vr == b"UN" and length == UNDEFINED):
            return True
        if vr is not None and vr in KNOWN_VRS:
            return False
        try:
            return dictionary_VR(tag) == "SQ"
        except KeyError:
            return length == UNDEFINED and self._next_is_item()

    def _next_is_item(self) -> bool:
        at = self.fp.tell()
        data = self.fp.read(4)
        self.fp.seek(at)
        return len(data) == 4 and data == struct.pack(self.endian + "HH", 0xFFFE, 0xE000)

    def _count(self, counter: str, what: str) -> None:
        value = getattr(self, counter) + 1
        setattr(self, counter, value)
        if value > getattr(self.limits, counter):
            raise RejectedInstance(status.HEADER_TOO_COMPLEX, f"header: over {getattr(self.limits, counter)} {what}")

    def _close_finished(self) -> None:
        at = self.fp.tell()
        while self.stack:
            end = self.stack[-1].end
            if end is None or at < end:
                return
            self._pop()

    def _pop(self) -> None:
        if self.stack.pop().kind == "sequence":
            self.depth -= 1

    def _malformed(self, what: str) -> bool:
        """Skip to the end of the innermost defined-length container, or refuse."""
        while self.stack:
            opened = self.stack[-1]
            self._pop()
            if opened.end is not None:
                self.fp.seek(opened.end)
                return True
            if opened.kind == "sequence":
                break
        raise RejectedInstance(status.CANNOT_UNDERSTAND, f"header: {what}")

    def _skip(self, length: int) -> None:
        self.fp.seek(length, 1)

    def _u32(self, data: bytes) -> int:
        return int(struct.unpack(self.endian + "L", data)[0]) if len(data) == 4 else 0
