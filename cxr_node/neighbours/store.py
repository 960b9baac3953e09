"""The durable half of the index: the case store every backend implements, and its embedded backend, SQLite.

:class:`CaseStore` is the interface the index uses; :class:`SqliteCaseStore` keeps the cases in one file on
this host, :class:`~cxr_node.neighbours.postgres.PgCaseStore` in a PostgreSQL database every host shares. Either
is the source of truth; the search structures in memory and the checkpoint files are caches of it. Both run the
same SQL (:class:`~cxr_node.neighbours.sql.SqlCaseStore`); this module holds what is SQLite's own: the connection
and its lock, transactions and snapshots, the schema, bulk inserts (``executemany``) and the reads of ids.

SQLite in WAL mode with ``synchronous=FULL``: a write that returned is on disk and survives kill -9 or power
loss. ``secure_delete`` is on, so a purged case's rows are overwritten, not just unlinked. One row per image
(``cases``, keyed by SOP Instance UID; its id gives the case number) and one row per image and model version
(``embeddings``: the unit float32 vector, the partition it belongs to and its two exclusion keys). Embedding
ids only grow (AUTOINCREMENT), which is what lets a checkpoint name the rows it holds by a watermark.

Schema versions (SQLite's ``user_version``): 1, the first layout; 2, the same tables, cleaned once when a
version-1 file is first opened: cases whose identifiers no report can write (an invalid UID, which an
older node indexed) are deleted, and accession numbers or dates that cannot be written are cleared
(:func:`~cxr_node.neighbours.cases.indexable`). ``cxr-node index check`` / ``drop-invalid`` run the
same checks on demand.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import numpy as np

from cxr_node.errors import StorageError
from cxr_node.neighbours.cases import Case, Label, NewCase
from cxr_node.neighbours.engine import Floats, Int64s, Rows
from cxr_node.neighbours.sql import CASE_COLUMNS, CHUNK_ROWS, NEW_CASE_COLUMNS, Changes, Dialect, SqlCaseStore

__all__ = [  # CHUNK_ROWS and Changes stay importable from here, where the index has always found them
    "CHUNK_ROWS",
    "FIRST_SCHEMA",
    "PAGE_SIZE",
    "SCHEMA_VERSION",
    "SQLITE",
    "CaseStore",
    "Changes",
    "SqliteCaseStore",
]

SCHEMA_VERSION: Final = 2
FIRST_SCHEMA: Final = 1  # files of this version are cleaned of invalid cases when first opened
PAGE_SIZE: Final = 16384  # a 512-d float32 vector (2 KiB) wastes little of a page; set before the first table
_IN_LIMIT: Final = 500  # ids bound per "IN (...)" statement (SQLite allows 32766; keeps statements small)
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    study_instance_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_date TEXT NOT NULL,
    patient_hash TEXT NOT NULL,
    label TEXT CHECK (label IS NULL OR label IN ('covid', 'non-covid')),
    source TEXT NOT NULL CHECK (source IN ('store', 'library')),
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_by_study ON cases (study_instance_uid);
CREATE TABLE IF NOT EXISTS versions (
    model_version TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version TEXT NOT NULL REFERENCES versions (model_version),
    case_id INTEGER NOT NULL REFERENCES cases (id),
    library INTEGER NOT NULL,
    patient_key INTEGER NOT NULL,
    study_key INTEGER NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (case_id, model_version)
);
CREATE INDEX IF NOT EXISTS embeddings_by_version ON embeddings (model_version, library, id);
"""
SQLITE: Final = Dialect(
    arrays=False,
    list_limit=_IN_LIMIT,
    next_generation="generation + 1",
    delete_orphans="DELETE FROM cases WHERE id NOT IN (SELECT case_id FROM embeddings)",
    count="SELECT COUNT(*) FROM embeddings",
)
"""SQLite's SQL differences: one ``?`` per listed value, embeddings counted row by row."""

Tx = TypeVar("Tx")
"""A backend's write transaction handle, passed back to the writes that run inside it."""


class CaseStore(Protocol[Tx]):
    """The case store as the index uses it: every backend of the neighbour cases implements this.

    Writes that change the search structures (``insert``, ``replace``, ``purge``) run inside the caller's
    :meth:`transaction` and return the :class:`Changes` the index applies to its in-memory partitions.
    """

    @property
    def shared(self) -> bool:
        """True when other hosts write the store: their purges cannot delete this host's checkpoint files, so
        the index deletes those itself when it finds rows purged (False: one host, one folder)."""
        ...

    def transaction(self) -> AbstractContextManager[Tx]:
        """Hold the write lock for the block; commit at its end, roll back on error."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Read in one consistent snapshot for the block."""
        ...

    def data_version(self) -> int:
        """A number that changes when another process or host commits (the index then catches up); cheap."""
        ...

    def truncate_wal(self) -> None:
        """Bound the store's write-ahead log after a large write."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...

    def version_info(self, version: str) -> tuple[int, int] | None:
        """``(dim, generation)`` of a model version, or None."""
        ...

    def count(self, version: str, library: bool | None = None) -> int:
        """How many embeddings a model version has (of one partition when ``library`` is given)."""
        ...

    def versions(self) -> list[str]:
        """The model versions the store knows, sorted."""
        ...

    def insert(self, tx: Tx, version: str, vectors: Floats, cases: Sequence[NewCase]) -> tuple[list[Case], Changes]:
        """Add one embedding per case inside ``tx``."""
        ...

    def replace(self, tx: Tx, version: str, dim: int, items: Iterable[tuple[NewCase, Floats]]) -> tuple[int, Changes]:
        """Replace every embedding of ``version`` inside ``tx``."""
        ...

    def set_label(self, study_uid: str, label: Label | None) -> int:
        """Set the label of every case of a study."""
        ...

    def purge(self, tx: Tx, study_uid: str) -> tuple[int, Changes]:
        """Delete a study's cases and embeddings inside ``tx``."""
        ...

    def ids(self, version: str, library: bool, upto: int | None = None) -> Int64s:
        """Embedding ids of one partition, ascending."""
        ...

    def max_id(self, version: str) -> int:
        """The highest embedding id of a version (0 when none)."""
        ...

    def stream(self, version: str, library: bool, dim: int, after: int, upto: int) -> Iterator[Rows]:
        """The rows of one partition with ids in ``(after, upto]``, in chunks."""
        ...

    def fetch(self, version: str, ids: Int64s, dim: int) -> Rows:
        """The rows with the given ids."""
        ...

    def cases(self, ids: Sequence[int]) -> dict[int, Case]:
        """The cases of the given embedding ids."""
        ...

    def invalid(self) -> list[tuple[Case, tuple[str, ...]]]:
        """Every stored case that fails today's identifier checks, with its problems."""
        ...

    def clean(self, tx: Tx) -> tuple[int, int, Changes]:
        """Inside ``tx``, delete the cases that cannot be named and clear identifiers that cannot be written;
        return (cases deleted, cases cleared, changes)."""
        ...


class SqliteCaseStore(SqlCaseStore[sqlite3.Connection]):
    """Cases and embeddings in one SQLite file; safe to share between threads and processes.

    Parameters
    ----------
    path : Path
        The database file; created with its schema when missing.
    fsync : bool
        ``synchronous=FULL`` when True (a returned commit survives power loss), ``NORMAL`` otherwise.

    Raises
    ------
    StorageError
        When the file cannot be opened or was written by a newer schema.
    """

    shared: Final = False
    """Every process that writes the file runs on this host and shares its checkpoint folder."""
    dialect = SQLITE

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only takes effect on a new file
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
            self._db.execute("PRAGMA secure_delete = ON")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: cannot open the neighbour index database: {exc}") from exc

    def _migrate(self) -> None:
        found = self._schema()
        if found > SCHEMA_VERSION:
            raise StorageError(f"{self.path}: index schema {found} is newer than this cxr-node ({SCHEMA_VERSION})")
        if found < FIRST_SCHEMA:
            self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif found < SCHEMA_VERSION:
            self._upgrade()

    def _schema(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _upgrade(self) -> None:
        """Version 1 → 2, once, whichever process opens the file first: clean it of invalid cases.

        Checkpoints written before keep the deleted vectors' ids; loading one reconciles it with the
        database, so none is ever served.
        """
        with self.transaction() as db:
            if self._schema() < SCHEMA_VERSION:  # another process may have upgraded it meanwhile
                self.clean(db)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------------ plumbing

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the write lock (``BEGIN IMMEDIATE``) for the block; commit at its end, roll back on error.

        Raises
        ------
        StorageError
            When SQLite fails (disk full, database locked past the busy timeout, I/O error).
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"{self.path}: neighbour index write failed: {exc}") from exc
                raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Read in one snapshot for the block (no-op inside a transaction, which is one already)."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN")
            try:
                yield
            finally:
                self._db.execute("COMMIT")

    def data_version(self) -> int:
        """Return SQLite's ``data_version``: it changes when another connection commits."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def truncate_wal(self) -> None:
        """Copy the WAL into the database and truncate it (bounds disk; drops purged pages from the WAL)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------ SQLite's own SQL

    def _read(self, sql: str, args: Sequence[Any] = (), *, binary: bool = False) -> list[Any]:
        """Run one read under the connection's lock; return its rows (BLOBs come back as bytes either way)."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _add_cases(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]], now: float) -> list[Any]:
        """Insert new cases (``executemany``); read them back above the old largest id (AUTOINCREMENT)."""
        before = db.execute("SELECT COALESCE(MAX(id), 0) FROM cases").fetchone()[0]
        marks = ", ".join("?" * (len(NEW_CASE_COLUMNS) + 1))
        db.executemany(
            f"INSERT INTO cases ({', '.join(NEW_CASE_COLUMNS)}, added_at) VALUES ({marks})",
            [(*row, now) for row in rows],
        )
        return db.execute(f"SELECT {CASE_COLUMNS} FROM cases c WHERE c.id > ?", (before,)).fetchall()

    def _add_embeddings(
        self, db: sqlite3.Connection, version: str, rows: list[tuple[int, bool, int, int, bytes]], returning: bool
    ) -> list[Any]:
        """Insert embeddings (``executemany``); when ``returning``, read them back above the old largest id."""
        before = db.execute("SELECT COALESCE(MAX(id), 0) FROM embeddings").fetchone()[0]
        db.executemany(
            "INSERT INTO embeddings (model_version, case_id, library, patient_key, study_key, vector)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(version, case_id, int(library), *rest) for case_id, library, *rest in rows],
        )
        if not returning:
            return []
        return db.execute("SELECT id, case_id, library FROM embeddings WHERE id > ?", (before,)).fetchall()

    def _delete_embeddings(self, db: sqlite3.Connection, where: str, args: Sequence[Any], columns: str) -> list[Any]:
        """Read ``columns`` of the embeddings ``where`` selects, then delete them."""
        rows = db.execute(f"SELECT {columns} FROM embeddings WHERE {where}", args).fetchall()
        db.execute(f"DELETE FROM embeddings WHERE {where}", args)
        return rows

    # ------------------------------------------------------------------------------------------ reads

    def ids(self, version: str, library: bool, upto: int | None = None) -> Int64s:
        """Return the sorted embedding ids of a partition (those ``<= upto`` when given)."""
        limit = -1 if upto is None else upto
        with self._lock:
            cursor = self._db.execute(
                "SELECT id FROM embeddings WHERE model_version = ? AND library = ? AND (? < 0 OR id <= ?) ORDER BY id",
                (version, int(library), limit, limit),
            )
            return np.fromiter((r[0] for r in cursor), np.int64)

    def max_id(self, version: str) -> int:
        """Return the largest embedding id of a version (0 when none)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM embeddings WHERE model_version = ?", (version,)).fetchone()
        return int(row[0] or 0)
