"""Moving a single-host node's store onto PostgreSQL (``cxr-node db migrate``): every row, ids and UIDs kept.

The node is stopped first (a live node would go on writing to the SQLite file after the copy). Every table is
copied in id order in one PostgreSQL transaction: either the whole store arrives or nothing does, and a failed
run can simply be repeated. Ids are kept, so job ids in logs, the outputs' paths and their SOP Instance UIDs
(derived from the source image) are exactly what they were; the identity sequences then continue after the
highest id. Jobs that were running when the node stopped are re-queued in the copy (their worker is gone).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cxr_node.errors import StorageError
from cxr_node.jobs.postgres import PostgresStore
from cxr_node.jobs.sqlite import SqliteStore

TABLES: Final = ("jobs", "job_events", "results", "outputs", "deliveries", "destinations")
"""Copied in this order (references first). ``holders`` is not: it names processes of the old host."""
_IDENTITIES: Final = ("jobs", "job_events")
CHUNK: Final = 500
ALIVE_WITHIN_S: Final = 120.0
"""A role that renewed its holder entry this recently is taken to be running still."""


@dataclass(frozen=True)
class Copied:
    """What one migration moved: rows per table, and the running jobs re-queued in the copy."""

    rows: dict[str, int]
    requeued: int


def live_holders(source: SqliteStore, now: float) -> list[str]:
    """Holders of the source that renewed within :data:`ALIVE_WITHIN_S` (the node still runs)."""
    return [h.id for h in source.jobs.holders() if now - h.renewed_at < ALIVE_WITHIN_S]


def migrate(
    source_path: Path, target: PostgresStore, max_attempts: int, progress: Callable[[str, int], None] | None = None
) -> Copied:
    """Copy the SQLite store at ``source_path`` into the empty PostgreSQL store ``target``.

    Raises
    ------
    StorageError
        When the source is missing or still in use, or the target already holds jobs.
    """
    if not source_path.is_file():
        raise StorageError(f"{source_path}: no jobs database there (is it the node's storage.root/jobs.sqlite3?)")
    source = SqliteStore(source_path)  # opened writable: an older file is brought to the current schema first
    try:
        alive = live_holders(source, time.time())
        if alive:
            raise StorageError(
                f"{source_path}: the node still runs ({', '.join(alive)} renewed within {ALIVE_WITHIN_S:.0f} s);"
                " stop it (systemctl stop cxr-node) and run the migration again"
            )
        with target.db.read() as db:
            if db.execute("SELECT 1 FROM jobs LIMIT 1").fetchone() is not None:
                raise StorageError(
                    f"{target.db.url}: the target already holds jobs; migrate into a new, empty database"
                )
        rows = _copy(source.db.connection, target, progress)
    finally:
        source.close()
    moved = target.jobs.release(None, time.time(), max_attempts, "its worker stopped when the node moved hosts")
    return Copied(rows, len(moved))


def _copy(
    source: sqlite3.Connection, target: PostgresStore, progress: Callable[[str, int], None] | None
) -> dict[str, int]:
    counts: dict[str, int] = {}
    with target.db.transaction() as db:
        for table in TABLES:
            columns = _columns(source, table)
            cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid")
            insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            counts[table] = 0
            while chunk := cursor.fetchmany(CHUNK):
                db.executemany(insert, [_row(row) for row in chunk])
                counts[table] += len(chunk)
            if progress is not None:
                progress(table, counts[table])
        for table in _IDENTITIES:
            db.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0)"
                " + 1, false)"
            )
    return counts


def _columns(source: sqlite3.Connection, table: str) -> Sequence[str]:
    return [row[1] for row in source.execute(f"PRAGMA table_info({table})")]


def _row(row: Sequence[object]) -> tuple[object, ...]:
    return tuple(bytes(value) if isinstance(value, memoryview) else value for value in row)

