"""The embedded backend of the durable store: one SQLite file under ``storage.root`` (WAL, ``synchronous=FULL``).

:class:`SqliteStore` composes the SQL store's three parts (:mod:`cxr_node.jobs.sql`) over one
:class:`Database`: a connection, its lock, its transactions (``BEGIN IMMEDIATE``: one writer at a time) and the
schema migrations (SQLite's ``user_version``). Safe to share between threads and between processes on one host.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from cxr_node.errors import StorageError
from cxr_node.jobs.sql import SQLITE, Dialect, SqlStore
from cxr_node.jobs.wakeup import Listener, Topic, Wakeup

SCHEMA_VERSION: Final = 7
_GOLIVE_TABLES: Final = """
CREATE TABLE IF NOT EXISTS model_modes (
    model_key TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_at REAL NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS model_mode_events (
    id INTEGER PRIMARY KEY,
    model_key TEXT NOT NULL,
    mode TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_at REAL NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS model_mode_events_by_key ON model_mode_events (model_key, id);
CREATE TABLE IF NOT EXISTS candidate_results (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    model_key TEXT NOT NULL,
    created_at REAL NOT NULL,
    summary TEXT NOT NULL,
    PRIMARY KEY (job_id, model_key)
);
CREATE INDEX IF NOT EXISTS candidate_results_by_model ON candidate_results (model_key, job_id);
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    source_id TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    label TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL DEFAULT '',
    code TEXT NOT NULL DEFAULT '',
    reported_at REAL,
    received_at REAL NOT NULL,
    UNIQUE (source, source_id)
);
CREATE INDEX IF NOT EXISTS outcomes_by_accession ON outcomes (accession_number, id);
CREATE INDEX IF NOT EXISTS jobs_by_accession ON jobs (accession_number);
"""
"""The go-live tables (schema 7): each model version's current mode, every setting made, and the results of the
candidate models run beside the configured one (``models.candidates``), and the sites' final findings (ground
truth, ``outcomes``) the radiologists' reports send back."""
_SCHEMA: Final = (
    """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    instance_key TEXT NOT NULL UNIQUE,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    patient_hash TEXT NOT NULL,
    modality TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    peer TEXT NOT NULL,
    path TEXT,
    size_bytes INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    holder TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS holders (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    renewed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    holder TEXT
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
CREATE TABLE IF NOT EXISTS results (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    created_at REAL NOT NULL,
    summary TEXT NOT NULL,
    embedding BLOB,
    arrays BLOB
);
CREATE TABLE IF NOT EXISTS outputs (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    send_order INTEGER NOT NULL DEFAULT 0,
    mode TEXT NOT NULL DEFAULT 'live',
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    updated_at REAL NOT NULL,
    holder TEXT,
    lease_until REAL,
    PRIMARY KEY (job_id, destination, kind)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS destinations (
    name TEXT PRIMARY KEY,
    reachable INTEGER NOT NULL,
    accepted TEXT NOT NULL,
    refused TEXT NOT NULL,
    error TEXT,
    probed_at REAL NOT NULL,
    down_since REAL,
    retry_at REAL NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0
);
"""
    + _GOLIVE_TABLES
)
_KEEP_LIVE: Final = """
INSERT INTO model_modes (model_key, mode, set_by, set_at, reason)
SELECT DISTINCT r.model_name || '/' || r.model_version, 'live', 'schema upgrade', CAST(strftime('%s', 'now') AS REAL),
    'outputs written before go-live modes existed, all of them live'
FROM results r WHERE EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = r.job_id)
ON CONFLICT (model_key) DO NOTHING;
INSERT INTO model_mode_events (model_key, mode, set_by, set_at, reason)
SELECT model_key, mode, set_by, set_at, reason FROM model_modes WHERE set_by = 'schema upgrade';
"""
"""Schema 7 keeps every model version that wrote outputs before it live, as its outputs were: an upgrade of the
node never changes what a model's outputs say (a new model version starts in ``golive.initial_mode``)."""
_MIGRATIONS: Final = {
    1: "ALTER TABLE results ADD COLUMN arrays BLOB;",
    3: "ALTER TABLE outputs ADD COLUMN send_order INTEGER NOT NULL DEFAULT 0;"
    " UPDATE outputs SET send_order = CASE kind WHEN 'sr' THEN 0 WHEN 'sc' THEN 1 WHEN 'seg' THEN 2 ELSE 3 END;",
    4: "ALTER TABLE jobs ADD COLUMN holder TEXT; ALTER TABLE jobs ADD COLUMN lease_until REAL;",
    5: "ALTER TABLE deliveries ADD COLUMN holder TEXT; ALTER TABLE deliveries ADD COLUMN lease_until REAL;"
    " ALTER TABLE job_events ADD COLUMN holder TEXT;",
    6: "ALTER TABLE outputs ADD COLUMN mode TEXT NOT NULL DEFAULT 'live';\n" + _GOLIVE_TABLES + _KEEP_LIVE,
}
"""Steps from an older schema version to the next, applied before the CREATE IF NOT EXISTS script (version 3
stored no send order; its kinds were sent SR, SC, SEG, GSPS; version 6 no go-live modes: its outputs were written
live, as every output was then)."""


class Database:
    """One SQLite connection with its lock, schema migrations and transactions.

    Parameters
    ----------
    path : Path
        The database file; created with its schema when missing.
    fsync : bool
        ``synchronous=FULL`` when True (a returned commit survives power loss), ``NORMAL`` otherwise.
    readonly : bool
        Open without creating or writing (for ``cxr-node status``).
    wakeup : Wakeup or None
        Told, after each commit, which topics the transaction changed (:meth:`wake`), so consumers in other
        processes act at once instead of at their next poll.

    Raises
    ------
    StorageError
        When the file cannot be opened or was written by a newer schema.
    """

    dialect: Final[Dialect] = SQLITE

    def __init__(self, path: Path, fsync: bool = True, readonly: bool = False, wakeup: Wakeup | None = None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.wakeup = wakeup
        self.migrated_from: int | None = None  # the schema version found, when this open migrated it (0: created)
        self._topics: set[Topic] = set()
        try:
            if readonly:
                self.connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.connection.execute("PRAGMA busy_timeout = 30000")
            if not readonly:
                self.connection.execute("PRAGMA journal_mode = WAL")
                self.connection.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
                self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: cannot open the jobs database: {exc}") from exc

    def _migrate(self) -> None:
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self.path}: jobs database schema {version} is newer than this cxr-node ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            has_jobs = self.connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
            steps = "".join(_MIGRATIONS.get(v, "") for v in range(version, SCHEMA_VERSION)) if has_jobs else ""
            with self.lock:
                self.connection.executescript(
                    f"BEGIN IMMEDIATE; {steps} {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            self.migrated_from = version if has_jobs else 0

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads outside a transaction.

        Raises
        ------
        StorageError
            When SQLite fails (the file gone, I/O error, locked past the busy timeout).
        """
        with self.lock, self._errors("read failed"):
            yield self.connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the write lock (``BEGIN IMMEDIATE``) for the block; commit at its end, roll back on error.

        Raises
        ------
        StorageError
            When SQLite fails (disk full, I/O error, locked past the busy timeout).
        """
        with self.lock, self._errors("write failed"):
            self.connection.execute("BEGIN IMMEDIATE")
            self._topics.clear()
            try:
                yield self.connection
            except BaseException:
                if self.connection.in_transaction:
                    self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")
            topics, self._topics = self._topics, set()
        if self.wakeup is not None:
            for topic in topics:
                self.wakeup.notify(topic)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: jobs database {what}: {exc}") from exc

    def wake(self, topic: Topic) -> None:
        """Inside a transaction: once it commits, wake the consumers of ``topic``."""
        self._topics.add(topic)

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.connection.close()


class SqliteStore(SqlStore[Database]):
    """The embedded store: jobs, results and deliveries over one SQLite database (the arguments are
    :class:`Database`'s)."""

    def __init__(self, path: Path, fsync: bool = True, readonly: bool = False, wakeup: Wakeup | None = None) -> None:
        super().__init__(Database(path, fsync=fsync, readonly=readonly, wakeup=wakeup))

    @property
    def path(self) -> Path:
        """The database file."""
        return self.db.path

    def listen(self, topic: Topic) -> Listener:
        """Wake-up calls of ``topic`` from this node's processes on this host (plain timeouts when read-only)."""
        return self.db.wakeup.listen(topic) if self.db.wakeup is not None else Listener(None)

    def close(self) -> None:
        """Close the connection."""
        self.db.close()
