"""structlog set-up, done once per process, and the rules that keep patient data out of the logs.

Events are short dotted names (``store.accepted``, ``assoc.opened``) with bound context. Values under the keys
in :data:`PHI_KEYS` never reach a log: :func:`withhold_phi` replaces them. The DICOM libraries (pydicom,
highdicom, pynetdicom) log and warn with the offending value quoted (a birth date, a name): their messages
and Python warnings pass through :class:`RedactQuoted`, which withholds every quoted value.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

PHI_KEYS: Final = frozenset({"patient_id", "patient_name", "patient_birth_date", "accession_number"})
WITHHELD: Final = "<withheld>"
_QUOTED: Final = re.compile(r"'[^']*'|\"[^\"]*\"")


def withhold_phi(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace the value of any PHI key (a safety net: the node never logs one)."""
    for key in PHI_KEYS & event.keys():
        if event[key] not in (None, ""):
            event[key] = WITHHELD
    return event


class RedactQuoted(logging.Filter):
    """Withhold every quoted value in a standard-library log record (the libraries quote the values they
    complain about: ``Invalid value for VR DA: '19700101x'``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message, and its traceback's text, with their quoted values withheld; keep it.

        A traceback quotes what a peer sent (an AE title, a UID) in its exception's message: its text is made
        here, redacted, and kept on the record, which formatters use instead of formatting it again.
        """
        record.msg = _QUOTED.sub(f"'{WITHHELD}'", record.getMessage())
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = _QUOTED.sub(f"'{WITHHELD}'", _TRACEBACKS.formatException(record.exc_info))
        return True


_TRACEBACKS: Final = logging.Formatter()


class JsonRecords(logging.Formatter):
    """A standard-library record (a library's log line, a Python warning) as one JSON object on one line, with the
    keys of the node's own events, so that a log shipper reading JSON lines reads every line."""

    def format(self, record: logging.LogRecord) -> str:
        """``{"event", "logger", "level", "timestamp"}`` (and ``exception``): the message whole, its lines kept."""
        at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        event = {
            "event": record.getMessage().strip(),
            "logger": record.name,
            "level": record.levelname.lower(),
            "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        if record.exc_info:
            event["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(event)


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
            withhold_phi,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom is chatty at INFO (every PDU); keep its warnings and errors only. Python warnings (pydicom's
    # validation warnings among them) go through the same handler, so they are redacted too.
    logging.basicConfig(
        level=logging.WARNING, stream=stream or sys.stderr, format="%(name)s %(levelname)s %(message)s", force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactQuoted())
        if fmt == "json":
            handler.setFormatter(JsonRecords())
    logging.captureWarnings(True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
