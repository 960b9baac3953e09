"""Patient identifiers kept only as keyed hashes: HMAC-SHA256 with the site's secret key.

The jobs store and the neighbour index keep a hash of the Patient ID, never the ID, to tell one patient from
another (a patient's own earlier images are never offered as "similar cases"). With a public salt anyone
holding a list of Patient IDs could reverse such hashes; with a key that never leaves the site (created at
install, mode 0600, never logged) they cannot. Changing the key makes every stored hash a stranger's:
``cxr-node index rebuild`` re-hashes the index.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cxr_node.errors import CxrNodeError, StorageError

KEY_BYTES: Final = 32
HASH_HEX: Final = 16
"""Hex digits kept of each hash (64 bits: no collision in any one site's patients)."""


class PatientHasher:
    """Hashes patient identifiers with the site's key; the key is never exposed or logged."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError(f"key must hold at least 16 bytes, found {len(key)}")
        self._key = key

    def __call__(self, value: str) -> str:
        """A stable 16-hex-digit hash of ``value`` (surrounding blanks ignored), safe to store."""
        digest = hmac.new(self._key, value.strip().encode("utf-8", "replace"), hashlib.sha256).hexdigest()
        return digest[:HASH_HEX]

    def __repr__(self) -> str:
        return "PatientHasher(<key withheld>)"


def load_key(path: Path) -> bytes:
    """The site's key from ``path``, created there (random, mode 0600) when it does not exist yet.

    Raises
    ------
    StorageError
        When the file cannot be created or read, holds too few bytes, or group or others may read it.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except FileExistsError:
        pass  # another process created it first: use theirs
    except OSError as exc:
        raise StorageError(f"{path}: cannot create the identifier key ({exc.strerror})") from exc
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StorageError(f"{path}: the identifier key must be readable by its owner only (chmod 600 {path})")
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StorageError(f"{path}: cannot read the identifier key ({exc.strerror})") from exc
    if len(key) < 16:
        raise StorageError(f"{path}: the identifier key holds {len(key)} bytes, 16 or more are needed")
    return key


def read_secret(path: Path, key: str, error: type[CxrNodeError]) -> str:
    """The first line of the secret file ``path`` ("" when the file is empty), which only its owner may read.

    Every secret the node reads from a file (the database password, a destination's password or token, the
    STOW-RS token) goes through here: the same check, the same one-line messages naming the config ``key``.

    Raises
    ------
    CxrNodeError
        ``error`` when the file cannot be read or its group or others may read it.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{key} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(f"{key} {path}: group or others may read it; chmod 600 {path}")
    lines = text.splitlines()
    return lines[0] if lines else ""
