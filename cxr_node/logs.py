"""structlog set-up, done once per process, and the hashing of patient identifiers.

Events are short dotted names (``store.accepted``, ``assoc.opened``) with bound context. Values under
the keys in :data:`PHI_KEYS` never reach a log in clear: :func:`hash_phi` replaces them by a salted hash.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

PHI_KEYS: Final = frozenset({"patient_id", "patient_name", "patient_birth_date", "accession_number"})
_SALT: Final = b"cxr-node/phi/v1"


def hash_identifier(value: str) -> str:
    """Return a stable 16-hex-digit hash of a patient identifier, safe to log and to store."""
    return hashlib.sha256(_SALT + value.strip().encode("utf-8", "replace")).hexdigest()[:16]


def hash_phi(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace the value of any PHI key by its hash."""
    for key in PHI_KEYS & event.keys():
        value = event[key]
        event[key] = hash_identifier(str(value)) if value not in (None, "") else value
    return event


def configure(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog and the standard library logging it shares (pynetdicom logs through it).

    Parameters
    ----------
    level : str
        debug, info, warning or error.
    fmt : str
        ``json`` (one object per line, for journald) or ``console``.
    stream : file, optional
        Where to write; standard error by default.
    """
    numeric = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            hash_phi,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom is chatty at INFO (every PDU); keep its warnings and errors only.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
