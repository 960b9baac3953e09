"""The sd_notify client: real AF_UNIX datagram sockets standing in for systemd's notification socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cxr_node.notify import ENV_KEYS, Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a path, as systemd binds /run/systemd/notify; yields (NOTIFY_SOCKET, socket)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield str(path), sock


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace; yields ('@name', socket)."""
    name = f"cxr-node-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield "@" + name, sock


def received(sock: socket.socket) -> list[str]:
    """Return the lines of the next datagram on ``sock``."""
    return sock.recv(4096).decode("utf-8").splitlines()


def test_ready_sends_ready_and_status(listener: tuple[str, socket.socket]) -> None:
    """ready() sends READY=1 and the status line in one datagram."""
    address, sock = listener
    assert Notifier.from_environ({"NOTIFY_SOCKET": address}).ready("3 children up, port 11112")
    assert received(sock) == ["READY=1", "STATUS=3 children up, port 11112"]


def test_abstract_socket(abstract_listener: tuple[str, socket.socket]) -> None:
    """An '@name' NOTIFY_SOCKET reaches the abstract socket of that name."""
    address, sock = abstract_listener
    assert Notifier.from_environ({"NOTIFY_SOCKET": address}).ready()
    assert received(sock) == ["READY=1"]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.stopping(), ["STOPPING=1"]),
        (lambda n: n.stopping("draining"), ["STOPPING=1", "STATUS=draining"]),
        (lambda n: n.status("worker restarting"), ["STATUS=worker restarting"]),
        (lambda n: n.watchdog(), ["WATCHDOG=1"]),
        (lambda n: n.extend_timeout(1.5), ["EXTEND_TIMEOUT_USEC=1500000"]),
        (lambda n: n.notify(RELOADING=1, STATUS="reloading"), ["RELOADING=1", "STATUS=reloading"]),
    ],
)
def test_messages(listener: tuple[str, socket.socket], call, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Each helper sends the sd_notify fields systemd expects."""
    address, sock = listener
    assert call(Notifier(address))
    assert received(sock) == expected


def test_newlines_in_status_are_flattened(listener: tuple[str, socket.socket]) -> None:
    """A multi-line status cannot inject another KEY=value field."""
    address, sock = listener
    Notifier(address).status("first\nREADY=1")
    assert received(sock) == ["STATUS=first READY=1"]


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_no_socket_is_a_no_op(environ: dict[str, str]) -> None:
    """Without a usable NOTIFY_SOCKET every call returns False and sends nothing."""
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert not notifier.ready("up")
    assert not notifier.stopping()
    assert not notifier.watchdog()


def test_send_failure_is_logged_not_raised(tmp_path: Path) -> None:
    """A socket nobody listens on gives False and a notify.failed event, never an exception."""
    with capture_logs() as events:
        assert not Notifier(str(tmp_path / "gone.sock")).ready()
    assert [e["event"] for e in events] == ["notify.failed"]


def test_watchdog_interval_is_half_the_timeout() -> None:
    """WATCHDOG_USEC=30 s for this pid gives a 15 s ping interval."""
    environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(environ).watchdog_interval() == 15.0


@pytest.mark.parametrize(
    "environ",
    [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "x"}, {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}],
)
def test_no_watchdog(environ: dict[str, str]) -> None:
    """No, zero, malformed or another process's watchdog gives no interval."""
    assert Notifier.from_environ(environ, pid=4242).watchdog_interval() is None


def test_env_keys_cover_what_is_read() -> None:
    """ENV_KEYS names every variable from_environ reads, so a caller can pass just those."""
    assert set(ENV_KEYS) == {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "relative.sock"}, "address: expected an absolute path"),
        ({"address": "/run/x", "watchdog_usec": 0}, "watchdog_usec: expected a positive"),
    ],
)
def test_construction_checks(kwargs: dict[str, object], message: str) -> None:
    """An invalid address or watchdog value is refused at construction, naming the argument."""
    with pytest.raises(ValueError, match=message):
        Notifier(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "message"), [({}, "at least one"), ({"ready": 1}, "upper-case")])
def test_bad_fields(tmp_path: Path, fields: dict[str, object], message: str) -> None:
    """notify() refuses an empty message or a key that is not an sd_notify variable name."""
    with pytest.raises(ValueError, match=message):
        Notifier(str(tmp_path / "n.sock")).notify(**fields)  # type: ignore[arg-type]


def test_extend_timeout_needs_a_positive_duration() -> None:
    """extend_timeout(0) is a programming error, not a silent no-op."""
    with pytest.raises(ValueError, match="seconds"):
        Notifier().extend_timeout(0)
