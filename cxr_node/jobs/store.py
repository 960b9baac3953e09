"""The jobs store: one row per received instance, one committed write per state change.

:class:`JobStore` is the interface the stages use; :class:`SqliteJobStore` is the embedded backend
(SQLite in WAL mode, ``synchronous=FULL`` so a commit is on disk when it returns). A shared PostgreSQL
backend for several nodes would implement the same Protocol.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final, Protocol

from cxr_node.errors import InvalidTransition, StorageError
from cxr_node.jobs.deliveries import DESTINATIONS_SCHEMA, KIND_ORDER, DeliveryQueries
from cxr_node.jobs.states import JobState, can_move, sources_of

SCHEMA_VERSION: Final = 3
_SCHEMA: Final = """
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
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT
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
    PRIMARY KEY (job_id, destination, kind)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
""" + DESTINATIONS_SCHEMA
_MIGRATIONS: Final = {1: "ALTER TABLE results ADD COLUMN arrays BLOB;"}
"""Steps from an older schema version to the next, applied before the CREATE IF NOT EXISTS script."""


@dataclass(frozen=True)
class StoredResult:
    """What inference found for a job: a JSON-able summary and the retrieval embedding (float32 bytes)."""

    job_id: int
    model_name: str
    model_version: str
    created_at: float
    summary: dict[str, Any]
    embedding: bytes | None
    arrays: bytes | None = None


@dataclass(frozen=True)
class Output:
    """One DICOM object written for a job, in the outbox (path relative to the storage root)."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    size_bytes: int


@dataclass(frozen=True)
class NewJob:
    """What the receiver knows about an instance when it records it. No patient identifier in clear."""

    instance_key: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    patient_hash: str
    modality: str
    transfer_syntax: str
    calling_aet: str
    peer: str
    path: str | None
    size_bytes: int


@dataclass(frozen=True)
class Job(NewJob):
    """A job as stored: the instance, where its file is, and where it stands."""

    id: int
    state: JobState
    reason: str | None
    attempts: int
    received_at: float
    updated_at: float


_JOB_COLUMNS: Final = tuple(f.name for f in fields(Job))
_NEW_COLUMNS: Final = tuple(f.name for f in fields(NewJob))


class JobStore(Protocol):
    """The interface every stage uses to read and move jobs."""

    def record(self, new: NewJob, state: JobState, reason: str | None = None) -> tuple[Job, bool]: ...
    def transition(self, job_id: int, target: JobState, reason: str | None = None) -> Job: ...
    def get(self, job_id: int) -> Job | None: ...
    def find(self, instance_key: str) -> Job | None: ...
    def counts(self) -> dict[JobState, int]: ...
    def claim(self, limit: int) -> list[Job]: ...
    def requeue_running(self, reason: str) -> int: ...
    def save_result(
        self,
        job_id: int,
        model: tuple[str, str],
        summary: dict[str, Any],
        embedding: bytes | None,
        arrays: bytes | None = None,
    ) -> Job: ...
    def result(self, job_id: int) -> StoredResult | None: ...
    def save_outputs(self, job_id: int, outputs: list[Output], destinations: list[str]) -> Job: ...
    def outputs(self, job_id: int) -> list[Output]: ...
    def jobs(self, state: JobState | None = None, limit: int = 1000) -> list[Job]: ...
    def close(self) -> None: ...


class SqliteJobStore(DeliveryQueries):
    """The embedded jobs store; safe to share between threads and between processes.

    Parameters
    ----------
    path : Path
        The database file; created with its schema when missing.
    fsync : bool
        ``synchronous=FULL`` when True (a returned commit survives power loss), ``NORMAL`` otherwise.
    readonly : bool
        Open without creating or writing (for ``cxr-node status``).
    """

    def __init__(self, path: Path, fsync: bool = True, readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 30000")
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
                self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: cannot open the jobs database: {exc}") from exc

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self.path}: jobs database schema {version} is newer than this cxr-node ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION:
            has_jobs = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone() is not None
            steps = "".join(_MIGRATIONS.get(v, "") for v in range(version, SCHEMA_VERSION)) if has_jobs else ""
            with self._lock:
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {steps} {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record(self, new: NewJob, state: JobState, reason: str | None = None) -> tuple[Job, bool]:
        """Insert a job for a newly received instance, already triaged to ``state``.

        The insert and its two events (``received``, then the verdict) are one transaction. When a job
        for the same instance exists, nothing changes and it is returned with ``created=False``.

        Returns
        -------
        (Job, bool)
            The job and whether it was created by this call.
        """
        if not can_move(JobState.RECEIVED, state) and state is not JobState.RECEIVED:
            raise InvalidTransition(f"a new job cannot start in state {state}")
        now = time.time()
        values = [getattr(new, name) for name in _NEW_COLUMNS]
        columns = ", ".join((*_NEW_COLUMNS, "state", "reason", "received_at", "updated_at"))
        marks = ", ".join("?" * (len(_NEW_COLUMNS) + 4))
        with self._transaction() as db:
            row = db.execute(
                f"INSERT INTO jobs ({columns}) VALUES ({marks}) ON CONFLICT (instance_key) DO NOTHING RETURNING id",
                (*values, state.value, reason, now, now),
            ).fetchone()
            if row is None:
                existing = self._select(db, "instance_key = ?", (new.instance_key,))
                return existing[0], False
            self._event(db, row[0], now, None, JobState.RECEIVED, None)
            if state is not JobState.RECEIVED:
                self._event(db, row[0], now, JobState.RECEIVED, state, reason)
            return self._select(db, "id = ?", (row[0],))[0], True

    def transition(self, job_id: int, target: JobState, reason: str | None = None) -> Job:
        """Move a job to ``target`` in one committed write, if its current state allows it.

        Raises
        ------
        InvalidTransition
            When the job does not exist or its state does not lead to ``target``.
        """
        with self._transaction() as db:
            return self._move(db, job_id, target, reason)

    def save_result(
        self,
        job_id: int,
        model: tuple[str, str],
        summary: dict[str, Any],
        embedding: bytes | None,
        arrays: bytes | None = None,
    ) -> Job:
        """Store a running job's inference result and move it to inferred, in one transaction.

        Parameters
        ----------
        job_id : int
            A job in state running.
        model : (str, str)
            The model (manifest) name and version that produced the result.
        summary : dict
            JSON-serialisable findings (probabilities, decision, threshold, mask quality, timings).
        embedding : bytes or None
            The L2-normalised retrieval embedding as float32 bytes.
        arrays : bytes or None
            What the output writers need and the summary cannot hold (lung mask, heatmap), as opaque bytes;
            kept until the outputs are written.
        """
        text = json.dumps(summary, sort_keys=True, allow_nan=False)
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO results"
                " (job_id, model_name, model_version, created_at, summary, embedding, arrays)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, model[0], model[1], time.time(), text, embedding, arrays),
            )
            return self._move(db, job_id, JobState.INFERRED, None)

    def save_outputs(self, job_id: int, outputs: list[Output], destinations: list[str]) -> Job:
        """Record an inferred job's written outputs, one pending delivery per destination and output,
        and move it to written, in one transaction; the result's arrays are dropped (no longer needed)."""
        now = time.time()
        with self._transaction() as db:
            db.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
            db.executemany(
                "INSERT INTO outputs (job_id, kind, sop_class_uid, sop_instance_uid, path, size_bytes, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job_id, o.kind, o.sop_class_uid, o.sop_instance_uid, o.path, o.size_bytes, now) for o in outputs],
            )
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, destination, kind, state, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, 'pending', ?, ?)",
                [(job_id, name, o.kind, now, now) for name in destinations for o in outputs],
            )
            db.execute("UPDATE results SET arrays = NULL WHERE job_id = ?", (job_id,))
            return self._move(db, job_id, JobState.WRITTEN, None)

    def outputs(self, job_id: int) -> list[Output]:
        """Return the outputs written for ``job_id``, in kind order (sr, sc, seg, pr)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, sop_class_uid, sop_instance_uid, path, size_bytes FROM outputs WHERE job_id = ?"
                f" ORDER BY {KIND_ORDER}",
                (job_id,),
            ).fetchall()
        return [Output(*row) for row in rows]

    def result(self, job_id: int) -> StoredResult | None:
        """Return the inference result of ``job_id``, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, model_name, model_version, created_at, summary, embedding, arrays"
                " FROM results WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredResult(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6])

    def _move(self, db: sqlite3.Connection, job_id: int, target: JobState, reason: str | None) -> Job:
        now = time.time()
        allowed = tuple(state.value for state in sources_of(target))
        marks = ", ".join("?" * len(allowed))
        current = self._select(db, "id = ?", (job_id,))
        if not current:
            raise InvalidTransition(f"job {job_id} does not exist")
        updated = db.execute(
            f"UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND state IN ({marks})",
            (target.value, reason, now, job_id, *allowed),
        ).rowcount
        if updated != 1:
            raise InvalidTransition(f"job {job_id} is {current[0].state}, which does not lead to {target}")
        self._event(db, job_id, now, current[0].state, target, reason)
        return self._select(db, "id = ?", (job_id,))[0]

    def claim(self, limit: int) -> list[Job]:
        """Move up to ``limit`` of the oldest queued jobs to running, and return them."""
        now = time.time()
        with self._transaction() as db:
            ids = [
                r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY id LIMIT ?", ("queued", limit))
            ]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? WHERE id = ?",
                    (now, job_id),
                )
                self._event(db, job_id, now, JobState.QUEUED, JobState.RUNNING, None)
            marks = ", ".join("?" * len(ids))
            return self._select(db, f"id IN ({marks}) ORDER BY id", tuple(ids)) if ids else []

    def requeue_running(self, reason: str) -> int:
        """Move every running job back to queued (recovery after a crash); return how many."""
        now = time.time()
        with self._transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET state = 'queued', reason = ?, updated_at = ? WHERE id = ?", (reason, now, job_id)
                )
                self._event(db, job_id, now, JobState.RUNNING, JobState.QUEUED, reason)
            return len(ids)

    def get(self, job_id: int) -> Job | None:
        """Return the job ``job_id``, or None."""
        with self._lock:
            rows = self._select(self._db, "id = ?", (job_id,))
        return rows[0] if rows else None

    def find(self, instance_key: str) -> Job | None:
        """Return the job of the instance ``instance_key``, or None."""
        with self._lock:
            rows = self._select(self._db, "instance_key = ?", (instance_key,))
        return rows[0] if rows else None

    def jobs(self, state: JobState | None = None, limit: int = 1000) -> list[Job]:
        """Return up to ``limit`` jobs, oldest first, optionally only those in ``state``."""
        where, args = ("state = ?", (state.value,)) if state else ("1 = 1", ())
        with self._lock:
            return self._select(self._db, f"{where} ORDER BY id LIMIT ?", (*args, limit))

    def history(self, job_id: int) -> list[tuple[str | None, str, str | None]]:
        """Return a job's transitions, oldest first, as ``(from, to, reason)``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT from_state, to_state, reason FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [tuple(row) for row in rows]

    def counts(self) -> dict[JobState, int]:
        """Return the number of jobs in every state (zero included)."""
        with self._lock:
            rows = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: rows.get(state.value, 0) for state in JobState}

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    @staticmethod
    def _event(
        db: sqlite3.Connection, job_id: int, at: float, src: JobState | None, dst: JobState, reason: str | None
    ) -> None:
        db.execute(
            "INSERT INTO job_events (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
            (job_id, at, src.value if src else None, dst.value, reason),
        )

    @staticmethod
    def _select(db: sqlite3.Connection, where: str, args: tuple[object, ...]) -> list[Job]:
        rows = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE {where}", args).fetchall()
        return [_to_job(row) for row in rows]


def _to_job(row: tuple[object, ...]) -> Job:
    values = dict(zip(_JOB_COLUMNS, row, strict=True))
    values["state"] = JobState(values["state"])
    return Job(**values)  # type: ignore[arg-type]
