"""Shared fixtures: settings on a temporary storage root, a real SCP on a free loopback port, test data."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cxr_node import logs
from cxr_node.app import Receiver
from cxr_node.config import Settings

logs.configure("info", "console")  # captured by pytest, shown with a failing test


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """Return the path of an external tool; skip the test without it, except in CI where it must exist."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} is not installed (apt-get install dcmtk dicom3tools)")
    return path


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid manifest with tiny random models: a worker runs the real path on it, quickly."""
    from tests.models import write_tiny_manifest

    return write_tiny_manifest(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def make_settings(tmp_path: Path, tiny_manifest: Path) -> Callable[..., Settings]:
    """Return a factory of Settings on a temporary storage root and a free loopback port."""

    def factory(**overrides: Any) -> Settings:
        base = {
            "node.host": "127.0.0.1",
            "node.port": free_port(),
            "storage.root": str(tmp_path / "state"),
            "models.manifest": str(tiny_manifest),
            "worker.batch_wait_ms": 20,
            "metrics.port": free_port(),
            "logging.format": "console",
        }
        return Settings().with_overrides({**base, **overrides})

    return factory


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """Settings on a temporary root and a free port, every other key at its default."""
    return make_settings()


StartNode = Callable[..., Receiver]


@pytest.fixture
def start_node(make_settings: Callable[..., Settings]) -> Iterator[StartNode]:
    """Start receivers with setting overrides; stop them all at the end."""
    started: list[Receiver] = []

    def start(**overrides: Any) -> Receiver:
        node = Receiver(make_settings(**overrides)).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop(grace_s=2)


@pytest.fixture
def receiver(settings: Settings) -> Iterator[Receiver]:
    """A running in-process receiver (the real SCP) on a free loopback port."""
    node = Receiver(settings).start()
    try:
        yield node
    finally:
        node.stop(grace_s=5)


@pytest.fixture(scope="session")
def wg04() -> Path:
    """Folder of pydicom-data's test files: NEMA WG04 radiographs (RG1 is a real CR chest PA, 15-bit)."""
    import data_store

    return Path(data_store.__file__).parent / "data"


@pytest.fixture(scope="session")
def chest_cr(wg04: Path) -> Path:
    """A real computed radiograph of the chest, PA, MONOCHROME1, 1955x1841, explicit VR little endian."""
    return wg04 / "RG1_UNCR.dcm"


# PostgreSQL (store backend, issue 15): one real server per session, a fresh database per test.
from tests.postgres import PostgresServer, available  # noqa: E402 - kept next to the fixtures that use it


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on 127.0.0.1 for the session; skips (fails in CI) when none can start."""
    reason = available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs postgresql")
        pytest.skip(reason)
    server = PostgresServer().start()  # also stopped at exit, should the session die before teardown
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL (no password) of a fresh database owned by role cxr, dropped with FORCE after the test."""
    name = postgres_server.unique_name()
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name, ignore_errors=True)


@pytest.fixture
def postgres_password_file(postgres_server: PostgresServer, tmp_path: Path) -> Path:
    """A 0600 file holding the cxr role's password, without a trailing newline."""
    return postgres_server.write_password_file(tmp_path / "db-password")
