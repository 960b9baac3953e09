"""Checkpoint files: one model version's in-memory search structure on disk, so start-up at 1M rows is a read.

A checkpoint is a cache of the SQLite rows, never the truth: it records the version's generation and the
largest embedding id it holds (the watermark); the loader checks both against the database, drops rows
deleted since and replays rows added since. File layout (little-endian)::

    b"CXRNBR01" | per partition: centroids f32 | vectors f32 | ids i64 | patient keys i64 | study keys i64
               | trailer (JSON: layout, sizes, CRC-32 of each section) | trailer length u64 | b"CXRNBR01"

Lists follow each other inside a section. The file is written under a temporary name, fsynced, renamed
over the old one and the folder fsynced, so a crash leaves the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np

from cxr_node.neighbours.engine import Block, EngineParams, Partition

MAGIC: Final = b"CXRNBR01"
FORMAT: Final = 1
SUFFIX: Final = ".ckpt"
PARTIAL: Final = ".partial"
_HOST: Final = socket.gethostname()  # temporary files name their writer's host: folders may be shared by hosts
_TAIL: Final = struct.Struct("<Q8s")
_SECTIONS: Final = (("vectors", np.float32), ("ids", np.int64), ("patients", np.int64), ("studies", np.int64))


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, damaged or for another version or generation (it is then ignored)."""


@dataclass(frozen=True)
class Snapshot:
    """What a checkpoint holds: a version's two partitions, its generation and watermark."""

    version: str
    generation: int
    watermark: int
    dim: int
    partitions: dict[bool, Partition]


def path_for(folder: Path, version: str) -> Path:
    """Return the checkpoint file of ``version`` in ``folder`` (named from a hash, never from the version)."""
    return folder / f"{hashlib.sha256(version.encode('utf-8')).hexdigest()[:32]}{SUFFIX}"


def write(path: Path, snapshot: Snapshot) -> int:
    """Write ``snapshot`` to ``path`` durably and atomically; return the file size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    temp = path.with_name(f"{path.name}.{os.getpid()}@{_HOST}{PARTIAL}")
    try:
        with temp.open("wb") as handle:
            handle.write(MAGIC)
            parts = [_write_partition(handle, library, part) for library, part in snapshot.partitions.items()]
            trailer = json.dumps(_trailer(snapshot, parts)).encode("utf-8")
            handle.write(trailer)
            handle.write(_TAIL.pack(len(trailer), MAGIC))
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path.stat().st_size


def read(path: Path, params: EngineParams) -> Snapshot:
    """Return the snapshot in ``path``; every section's size and CRC-32 checked.

    Raises
    ------
    CheckpointError
        When the file is missing, truncated, of another format or damaged.
    """
    try:
        with path.open("rb") as handle:
            trailer = _read_trailer(handle)
            dim = int(trailer["dim"])
            partitions = {bool(p["library"]): _read_partition(handle, p, dim, params) for p in trailer["partitions"]}
    except (OSError, KeyError, TypeError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return Snapshot(trailer["version"], int(trailer["generation"]), int(trailer["watermark"]), dim, partitions)


def remove_stale(path: Path) -> int:
    """Delete the temporary files of ``path`` left by writers that died (kill -9); return how many.

    A temporary file is named after its writer's process id and host (``<pid>@<host>``; a bare ``<pid>`` is this
    host's); one whose process still runs, or that another host writes (a shared folder), is left alone.
    """
    removed = 0
    for temp in path.parent.glob(f"{path.name}.*{PARTIAL}"):
        pid, _, host = temp.name[len(path.name) + 1 : -len(PARTIAL)].partition("@")
        if pid.isdigit() and host in ("", _HOST) and not _alive(int(pid)):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    """Return whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Delete a checkpoint durably (the folder entry is fsynced); nothing happens if it is absent."""
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Fsync a folder so a rename or unlink inside it survives a crash."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# ---------------------------------------------------------------------------------------------- writing


def _write_partition(handle: BinaryIO, library: bool, part: Partition) -> dict[str, Any]:
    """Write one partition's sections; return its layout for the trailer."""
    layout: dict[str, Any] = {
        "library": library,
        "kind": part.kind,
        "trained_size": part.trained_size,
        "sizes": part.list_sizes(),
        "sections": {},
    }
    if part.centroids is not None:
        layout["sections"]["centroids"] = _write_arrays(handle, iter([part.centroids]))
    for name, _ in _SECTIONS:
        layout["sections"][name] = _write_arrays(handle, (getattr(rows, name) for rows in part.lists()))
    return layout


def _write_arrays(handle: BinaryIO, arrays: Iterator[np.ndarray]) -> dict[str, int]:
    """Write arrays one after the other; return the section's offset, length and CRC-32."""
    offset, crc = handle.tell(), 0
    for array in arrays:
        if not array.size:
            continue  # a memoryview of no bytes cannot be cast
        data = np.ascontiguousarray(array).data.cast("B")
        handle.write(data)
        crc = zlib.crc32(data, crc)
    return {"offset": offset, "length": handle.tell() - offset, "crc32": crc}


def _trailer(snapshot: Snapshot, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": snapshot.version,
        "generation": snapshot.generation,
        "watermark": snapshot.watermark,
        "dim": snapshot.dim,
        "partitions": parts,
    }


# ---------------------------------------------------------------------------------------------- reading


def _read_trailer(handle: io.BufferedIOBase) -> dict[str, Any]:
    if handle.read(len(MAGIC)) != MAGIC:
        raise CheckpointError("not a cxr-node neighbour checkpoint (bad magic)")
    end = handle.seek(0, os.SEEK_END)
    handle.seek(end - _TAIL.size)
    length, magic = _TAIL.unpack(handle.read(_TAIL.size))
    if magic != MAGIC or length > end:
        raise CheckpointError("truncated checkpoint (bad tail)")
    handle.seek(end - _TAIL.size - length)
    trailer: dict[str, Any] = json.loads(handle.read(length))
    if trailer.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {trailer.get('format')!r}, expected {FORMAT}")
    return trailer


def _read_partition(handle: io.BufferedIOBase, layout: dict[str, Any], dim: int, params: EngineParams) -> Partition:
    sizes = [int(n) for n in layout["sizes"]]
    sections = layout["sections"]
    centroids = None
    if layout["kind"] == "ivf":
        centroids = np.empty((len(sizes), dim), np.float32)
        _read_into(handle, sections["centroids"], [centroids])
    blocks = [Block(dim, n) for n in sizes]
    for block, n in zip(blocks, sizes, strict=True):
        block.n = n
    for name, _ in _SECTIONS:
        _read_into(handle, sections[name], [getattr(block, name) for block in blocks])
    return Partition.from_blocks(dim, params, centroids, int(layout["trained_size"]), blocks)


def _read_into(handle: io.BufferedIOBase, section: dict[str, int], arrays: list[np.ndarray]) -> None:
    """Fill ``arrays`` in order from a section; check its length and CRC-32."""
    expected = sum(a.nbytes for a in arrays)
    if expected != section["length"]:
        raise CheckpointError(f"section of {section['length']} bytes, expected {expected}")
    handle.seek(section["offset"])
    crc = 0
    for array in arrays:
        if not array.size:
            continue
        view = array.data.cast("B")
        if handle.readinto(view) != len(view):
            raise CheckpointError("truncated checkpoint (short section)")
        crc = zlib.crc32(view, crc)
    if crc != section["crc32"]:
        raise CheckpointError("damaged checkpoint (CRC-32 mismatch)")
