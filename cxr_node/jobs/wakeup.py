"""Wake-up calls between the node's processes on one host: no consumer waits out a polling timer.

A producer calls :meth:`Wakeup.notify` after it commits a change another role acts on (a job queued, outputs
to deliver); each consumer waiting on that topic (:meth:`Wakeup.listen`) returns from its wait at once. The
calls are Linux abstract-namespace UNIX datagrams named after the storage root, so only processes of the same
node (same ``storage.root``, same network namespace) hear each other; nothing is written to disk. A call is a
hint, never the truth: the store is read after every wake-up, consumers still poll at their (now long)
interval, and a lost datagram (a full socket buffer, a consumer restarting) costs one polling interval at
most. On PostgreSQL (DESIGN.md §11) the same topics map onto LISTEN/NOTIFY.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import sys
from pathlib import Path
from typing import Final, Literal

Topic = Literal["queued", "deliveries"]
"""``queued``: a job is waiting for a worker. ``deliveries``: outputs are waiting for the sender."""

SLOTS: Final = 8
"""Consumers of one topic that can listen at once (a notify costs one ``sendto`` per slot, ~2 µs each)."""

_SUPPORTED = sys.platform.startswith("linux")


class Listener:
    """One consumer's end of a topic: :meth:`wait` returns when a producer called, or at the timeout."""

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock

    @property
    def active(self) -> bool:
        """False when no slot was free (or the platform has no abstract sockets): waits are plain timeouts."""
        return self._sock is not None

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a call; True when one came. Every call pending is consumed."""
        if self._sock is None:
            if timeout_s > 0:
                select.select([], [], [], timeout_s)
            return False
        ready, _, _ = select.select([self._sock], [], [], max(timeout_s, 0.0))
        if not ready:
            return False
        self.drain()
        return True

    def drain(self) -> None:
        """Forget the calls already received (before reading the store, so none made after it is lost)."""
        if self._sock is None:
            return
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

    def close(self) -> None:
        """Free the slot."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Wakeup:
    """The wake-up calls of the node whose storage root is ``root``.

    Parameters
    ----------
    root : Path
        The storage root; it names the calls, so two nodes on one host never wake each other.
    """

    def __init__(self, root: Path) -> None:
        self._key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
        self._sender: socket.socket | None = None
        self._sender_pid = -1

    def _address(self, topic: Topic, slot: int) -> bytes:
        return f"\0cxr-node/{self._key}/{topic}/{slot}".encode()

    def listen(self, topic: Topic) -> Listener:
        """Take a free slot of ``topic``; a listener without one (all taken) degrades to plain timeouts."""
        if not _SUPPORTED:
            return Listener(None)
        for slot in range(SLOTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(self._address(topic, slot))
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            return Listener(sock)
        return Listener(None)

    def notify(self, topic: Topic) -> None:
        """Wake every listener of ``topic``; never blocks, never raises (nobody listening is fine)."""
        if not _SUPPORTED:
            return
        sock = self._socket()
        for slot in range(SLOTS):
            try:
                sock.sendto(b"!", self._address(topic, slot))
            except OSError:  # no listener in that slot, or its buffer is full (it is awake already)
                continue

    def _socket(self) -> socket.socket:
        if self._sender is None or self._sender_pid != os.getpid():  # a forked child gets its own
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sender.setblocking(False)
            self._sender_pid = os.getpid()
        return self._sender
