"""The systemd notification protocol (sd_notify(3)): tell the service manager we are ready, alive, stopping.

Dependency-free: each message is one AF_UNIX datagram of ``KEY=VALUE`` lines sent to the socket that
systemd names in ``$NOTIFY_SOCKET`` (a file-system path, or ``@name`` for an abstract socket). Without that
variable every call is a no-op, so the same code runs under ``Type=notify``, in a container and in a
terminal. This module reads no environment itself (``config.py`` is the only reader of ``os.environ``):
the caller passes the mapping to :meth:`Notifier.from_environ`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import structlog

log = structlog.get_logger("cxr_node.notify")

ENV_KEYS: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""The variables :meth:`Notifier.from_environ` reads (all set by systemd; none need be present)."""

_KEY: Final = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class Notifier:
    """Sends sd_notify messages to one socket; does nothing when ``address`` is None.

    Parameters
    ----------
    address : str or None
        ``$NOTIFY_SOCKET`` as systemd sets it: an absolute path, or ``@name`` for an abstract socket.
    watchdog_usec : int or None
        ``$WATCHDOG_USEC`` when the watchdog is enabled for this process (``WatchdogSec=`` in the unit).
    """

    address: str | None = None
    watchdog_usec: int | None = None

    def __post_init__(self) -> None:
        if self.address is not None and not self.address.startswith(("/", "@")):
            raise ValueError(f"address: expected an absolute path or @abstract name, found {self.address!r}")
        if self.watchdog_usec is not None and self.watchdog_usec <= 0:
            raise ValueError(f"watchdog_usec: expected a positive number of microseconds, found {self.watchdog_usec}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> Notifier:
        """Return the notifier systemd set up for process ``pid`` (this process by default).

        An unset or empty ``NOTIFY_SOCKET``, or a kind of address this client does not speak (``vsock:``),
        gives a disabled notifier. The watchdog counts only when ``WATCHDOG_PID`` is unset or is ``pid``.
        """
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("notify.unsupported_socket", address=address)
            address = None
        return cls(address, _watchdog_usec(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``NOTIFY_SOCKET`` was set)."""
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message of ``KEY=value`` fields; return True when it was sent.

        Keys are sd_notify variable names (``READY``, ``STATUS``, ...); newlines in values become spaces.
        A failed send is logged (``notify.failed``) and returns False: the service keeps running.
        """
        if self.address is None:
            return False
        message = _message(fields)
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, target)
        except OSError as exc:
            log.warning("notify.failed", address=self.address, error=exc.strerror or str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``): a ``Type=notify`` unit becomes active."""
        return self.notify(READY=1, **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        return self.notify(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows (``STATUS=``)."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``); call at least every :meth:`watchdog_interval` seconds."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on a start or stop (``EXTEND_TIMEOUT_USEC``)."""
        if seconds <= 0:
            raise ValueError(f"seconds: expected a positive duration, found {seconds}")
        return self.notify(EXTEND_TIMEOUT_USEC=round(seconds * 1_000_000))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WatchdogSec=``), or None when there is no watchdog."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    usec, for_pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if for_pid and (not for_pid.isdigit() or int(for_pid) != pid):
        return None
    return int(usec)


def _status(text: str | None) -> dict[str, str]:
    return {} if text is None else {"STATUS": text}


def _message(fields: Mapping[str, str | int]) -> bytes:
    if not fields:
        raise ValueError("fields: expected at least one KEY=value, found none")
    lines = []
    for key, value in fields.items():
        if not _KEY.match(key):
            raise ValueError(f"fields: expected an upper-case variable name, found {key!r}")
        lines.append(f"{key}={' '.join(str(value).splitlines())}")
    return ("\n".join(lines) + "\n").encode("utf-8")
