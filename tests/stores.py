"""The store's backends for tests: every store test runs against the embedded SQLite file and a real PostgreSQL.

``BACKENDS`` parametrises a fixture; :class:`Backend` opens as many stores on one database as a test needs
(two stores on one database stand for two processes, or two hosts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from cxr_node.jobs import spool
from cxr_node.jobs.postgres import PostgresStore
from cxr_node.jobs.sqlite import SqliteStore

BACKENDS: Final = ("sqlite", "postgresql")

AnyStore = SqliteStore | PostgresStore


@dataclass
class Backend:
    """One database of one backend: ``open()`` gives a new store (a new connection) on it."""

    name: str
    path: Path
    url: str = ""
    password: str = ""

    def open(self, readonly: bool = False) -> AnyStore:
        """A new store on this backend's database."""
        if self.name == "sqlite":
            return SqliteStore(self.path, readonly=readonly)
        return PostgresStore(self.url, password=self.password, readonly=readonly)


def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backend named by ``request.param`` with a fresh database (PostgreSQL's from the session's server)."""
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path / spool.DB_NAME)
    server = request.getfixturevalue("postgres_server")
    url = request.getfixturevalue("postgres_url")
    return Backend("postgresql", tmp_path / spool.DB_NAME, url, server.password)
