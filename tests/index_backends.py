"""The neighbour index's case stores for tests: the index tests run on the embedded SQLite file and a real PostgreSQL.

``BACKENDS`` parametrises a fixture (:func:`index_backend`); :class:`IndexBackend` opens as many indexes on one
store as a test needs. Two indexes with folders of their own on one PostgreSQL database stand for two hosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest

from cxr_node.neighbours import DB_NAME, EngineParams, ReplicaIndex
from cxr_node.neighbours.postgres import PgCaseStore
from cxr_node.neighbours.store import CaseStore

BACKENDS: Final = ("sqlite", "postgresql")


@dataclass
class IndexBackend:
    """One case store of one backend: ``open(root)`` gives a new index (a new connection) on it."""

    name: str
    url: str = ""
    password: str = ""

    def store(self) -> CaseStore[Any] | None:
        """A new connection to the PostgreSQL store; None for SQLite (the index opens ``root/neighbours.sqlite3``)."""
        return None if self.name == "sqlite" else PgCaseStore(self.url, self.password)

    def open(self, root: Path, params: EngineParams | None = None) -> ReplicaIndex:
        """A new index with its folder at ``root`` on this backend's store."""
        return ReplicaIndex(root, params, store=self.store())

    def holds_bytes(self, root: Path, secret: bytes) -> bool:
        """Whether the store still holds ``secret``: anywhere in the SQLite file, or as a stored vector."""
        if self.name == "sqlite":
            return secret in (root / DB_NAME).read_bytes()
        with self.connect() as conn:
            row = conn.execute("SELECT EXISTS (SELECT 1 FROM embeddings WHERE vector = %s)", (secret,)).fetchone()
        return bool(row and row[0])

    def connect(self) -> psycopg.Connection[Any]:
        """An autocommit connection to the PostgreSQL database as the node's role (for checks)."""
        return psycopg.connect(self.url, password=self.password, autocommit=True)


def index_backend(request: pytest.FixtureRequest) -> IndexBackend:
    """The backend named by ``request.param``; PostgreSQL's with a fresh database from the session's server."""
    if request.param == "sqlite":
        return IndexBackend("sqlite")
    server = request.getfixturevalue("postgres_server")
    url = request.getfixturevalue("postgres_url")
    return IndexBackend("postgresql", url, server.password)
