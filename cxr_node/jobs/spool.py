"""Durable files: write to a temporary name, fsync, rename into place, fsync the folder.

File names come from :func:`instance_key`, a hash of the SOP Instance UID, never from a value that
came over the wire, so a hostile UID cannot name a path outside the storage root.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

INBOX: Final = "inbox"
QUARANTINE: Final = "quarantine"
SKIPPED: Final = "skipped"
OUTBOX: Final = "outbox"
RECEIVING: Final = "tmp"
"""Where pynetdicom spools data sets while they arrive (same filesystem as the areas, so a rename files them)."""
TMP_SUFFIX: Final = ".partial"
DB_NAME: Final = "jobs.sqlite3"
SPOOL_AREAS: Final = (INBOX, QUARANTINE, SKIPPED, OUTBOX)


def instance_key(sop_instance_uid: str) -> str:
    """Return the 64-hex-digit key naming an instance's files and its job."""
    return hashlib.sha256(sop_instance_uid.strip("\x00 ").encode("ascii", "replace")).hexdigest()


def relative_path(area: str, key: str) -> Path:
    """Return where the instance ``key`` lives inside spool ``area``, relative to the storage root."""
    if area not in SPOOL_AREAS:
        raise ValueError(f"area must be one of {SPOOL_AREAS}, found {area!r}")
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"key must be 64 lowercase hex digits, found {key!r}")
    return Path(area) / key[:2] / f"{key}.dcm"


def output_path(key: str, kind: str) -> Path:
    """Return where the ``kind`` output (sr, sc, seg, pr) of instance ``key`` lives, relative to the storage root."""
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"kind must be a lowercase word, found {kind!r}")
    return relative_path(OUTBOX, key).with_suffix("") / f"{kind}.dcm"


def write_durably(target: Path, data: bytes, fsync: bool = True, exclusive: bool = False) -> None:
    """Write ``data`` to ``target`` so that, once this returns, the file survives a crash.

    The bytes go to a temporary sibling, are flushed and fsynced, renamed over ``target`` (atomic on
    POSIX) and the folder entry is fsynced. A reader never sees a partial file. With ``exclusive``, a
    ``target`` that exists is left as it is and FileExistsError raised (see :func:`_put`).

    Raises
    ------
    OSError
        When any step fails (disk full, permissions); the temporary file is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _replace(target, lambda handle: handle.write(data), fsync, exclusive)
    if fsync:
        fsync_dir(target.parent)


def move_durably(source: Path, target: Path, fsync: bool = True, exclusive: bool = False) -> None:
    """Move the complete file ``source`` to ``target`` so that, once this returns, it survives a crash.

    The file is fsynced and renamed (atomic); across filesystems it is copied to a temporary sibling of
    ``target``, fsynced and renamed instead. The folder entry is fsynced. With ``exclusive``, a ``target``
    that exists is left as it is and FileExistsError raised, ``source`` kept (see :func:`_put`).

    Raises
    ------
    OSError
        When any step fails; ``source`` is then left where it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if fsync:
        fd = os.open(source, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if source.resolve() == target.resolve():  # already there (a file adopted where it lies)
        if fsync:
            fsync_dir(target.parent)
        return
    try:
        _put(source, target, exclusive)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_durably(source, target, fsync, exclusive)
    source.unlink(missing_ok=True)
    if fsync:
        fsync_dir(target.parent)


def _copy_durably(source: Path, target: Path, fsync: bool, exclusive: bool) -> None:
    with source.open("rb") as src:
        _replace(target, lambda handle: shutil.copyfileobj(src, handle, 1 << 20), fsync, exclusive)


def _put(source: Path, target: Path, exclusive: bool) -> None:
    """Rename ``source`` to ``target``; with ``exclusive``, only if no ``target`` exists, decided atomically: a hard
    link fails with FileExistsError when it does, so two receivers of one instance cannot both place their file and
    the second cannot replace the first (the source is removed by the caller). Where the filesystem has no hard
    links, an existence check before the rename decides instead."""
    if not exclusive:
        source.replace(target)
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if target.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from exc
        source.replace(target)


def _replace(target: Path, fill: Callable[[BinaryIO], object], fsync: bool, exclusive: bool = False) -> None:
    """Fill a temporary sibling of ``target``, fsync it, and rename it over ``target`` (with ``exclusive``, only
    where none exists: :func:`_put`); never leave it behind."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with tmp.open("xb") as handle:
            fill(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        _put(tmp, target, exclusive)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename or unlink inside it is durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partials(root: Path, min_age_s: float = 0.0) -> int:
    """Delete temporary files a crash left in the spool areas and in the receiving folder; return how many.

    Call it only while no receiver of this root is running (data sets being received live in RECEIVING), or,
    when other hosts' receivers share the root, with ``min_age_s`` longer than any receive takes: only files
    untouched that long are removed.
    """
    leftovers = [p for area in SPOOL_AREAS for p in (root / area).glob(f"*/.*{TMP_SUFFIX}")]
    leftovers += [p for p in (root / RECEIVING).glob("*") if p.is_file()]
    cutoff = time.time() - min_age_s
    removed = 0
    for leftover in leftovers:
        try:
            if min_age_s <= 0 or leftover.stat().st_mtime < cutoff:
                leftover.unlink(missing_ok=True)
                removed += 1
        except FileNotFoundError:  # its receiver finished with it meanwhile
            continue
    return removed


def iter_spooled(root: Path, area: str) -> list[Path]:
    """Return every instance file in spool ``area`` of ``root`` (temporary files excluded)."""
    return sorted(p for p in (root / area).glob("*/*.dcm") if not p.name.startswith("."))
