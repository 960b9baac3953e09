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

import psycopg

from cxr_node.errors import StorageError
from cxr_node.jobs.postgres import PostgresStore
from cxr_node.jobs.sqlite import SqliteStore

TABLES: Final = (
    "jobs",
    "job_events",
    "results",
    "outputs",
    "deliveries",
    "destinations",
    "model_modes",
    "model_mode_events",
    "candidate_results",
    "outcomes",
)
"""Copied in this order (references first). ``holders`` is not: it names processes of the old host."""
_IDENTITIES: Final = ("jobs", "job_events", "model_mode_events", "outcomes")
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


CASE_TABLES: Final = ("versions", "cases", "embeddings")
"""The neighbour index's tables, copied in this order (references first)."""


def migrate_cases(source_path: Path, url: str, password: str | None) -> dict[str, int]:
    """Copy the neighbour index's SQLite file (``storage.root/index/neighbours.sqlite3``) into the PostgreSQL
    case store at ``url``, ids kept (checkpoints and case numbers stay valid); rows copied per table ({} when
    there is no index yet).

    Raises
    ------
    StorageError
        When the target already holds cases.
    """
    if not source_path.is_file():
        return {}
    from cxr_node.neighbours.postgres import PgCaseStore

    PgCaseStore(url, password).close()  # creates the schema, its counters and triggers
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    try:
        with psycopg.connect(url, password=password) as target, target.transaction():
            if target.execute("SELECT 1 FROM cases LIMIT 1").fetchone() is not None:
                raise StorageError(f"{url}: the target already holds neighbour cases; migrate into an empty database")
            counts: dict[str, int] = {}
            for table in CASE_TABLES:
                columns = _columns(source, table)
                cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid")
                marks = ", ".join(["%s"] * len(columns))
                insert = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
                flag = columns.index("library") if "library" in columns else -1
                counts[table] = 0
                with target.cursor() as out:
                    while chunk := cursor.fetchmany(CHUNK):
                        rows = [_row(row) for row in chunk]
                        if flag >= 0:  # SQLite's 0/1 is PostgreSQL's boolean
                            rows = [(*row[:flag], bool(row[flag]), *row[flag + 1 :]) for row in rows]
                        out.executemany(insert.encode(), rows)
                        counts[table] += len(chunk)
            for table in ("cases", "embeddings"):
                target.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}),"
                    " 0) + 1, false)".encode()
                )
            return counts
    finally:
        source.close()
