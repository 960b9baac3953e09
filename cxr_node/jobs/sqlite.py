"""The embedded backend of the durable store: one SQLite file under ``storage.root`` (WAL, ``synchronous=FULL``).

:class:`SqliteStore` composes three parts over one :class:`Database` (a connection, its lock and its
transactions): :class:`SqliteJobs`, :class:`SqliteResults` and :class:`SqliteDeliveries`, each satisfying
its Protocol in :mod:`cxr_node.jobs.interfaces`. Every state change is one ``UPDATE ... WHERE state IN
(allowed sources)`` checked against the state machines of :mod:`cxr_node.jobs.states`, with its event row,
in one committed transaction. Safe to share between threads and between processes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

from cxr_node.errors import InvalidTransition, StorageError
from cxr_node.jobs import codec
from cxr_node.jobs.leases import Holder
from cxr_node.jobs.records import DestinationState, Due, HolderState, Job, NewJob, Output, StoredResult
from cxr_node.jobs.states import (
    OPEN_DELIVERIES,
    DeliveryState,
    JobState,
    can_move,
    delivery_sources_of,
    sources_of,
)
from cxr_node.jobs.wakeup import Topic, Wakeup
from cxr_node.results.findings import Findings

SCHEMA_VERSION: Final = 5
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
    send_order INTEGER NOT NULL DEFAULT 0,
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
_MIGRATIONS: Final = {
    1: "ALTER TABLE results ADD COLUMN arrays BLOB;",
    3: "ALTER TABLE outputs ADD COLUMN send_order INTEGER NOT NULL DEFAULT 0;"
    " UPDATE outputs SET send_order = CASE kind WHEN 'sr' THEN 0 WHEN 'sc' THEN 1 WHEN 'seg' THEN 2 ELSE 3 END;",
    4: "ALTER TABLE jobs ADD COLUMN holder TEXT; ALTER TABLE jobs ADD COLUMN lease_until REAL;",
}
"""Steps from an older schema version to the next, applied before the CREATE IF NOT EXISTS script (version 3
stored no send order; its kinds were sent SR, SC, SEG, GSPS)."""
IN_FLIGHT: Final = (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.WRITTEN)
"""States of jobs still in flight (what :meth:`SqliteJobs.oldest_open_age` measures)."""

_JOB_COLUMNS: Final = tuple(f.name for f in fields(Job))
_NEW_COLUMNS: Final = tuple(f.name for f in fields(NewJob))
_OPEN: Final = tuple(state.value for state in OPEN_DELIVERIES)


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


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

    def __init__(self, path: Path, fsync: bool = True, readonly: bool = False, wakeup: Wakeup | None = None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.wakeup = wakeup
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

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads outside a transaction."""
        with self.lock:
            yield self.connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the write lock (``BEGIN IMMEDIATE``) for the block; commit at its end, roll back on error."""
        with self.lock:
            self.connection.execute("BEGIN IMMEDIATE")
            self._topics.clear()
            try:
                yield self.connection
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")
            topics, self._topics = self._topics, set()
        if self.wakeup is not None:
            for topic in topics:
                self.wakeup.notify(topic)

    def wake(self, topic: Topic) -> None:
        """Inside a transaction: once it commits, wake the consumers of ``topic``."""
        self._topics.add(topic)

    def close(self) -> None:
        """Close the connection."""
        with self.lock:
            self.connection.close()


class SqliteJobs:
    """Jobs and their event history (the :class:`~cxr_node.jobs.interfaces.JobStore` of SQLite)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, new: NewJob, state: JobState, reason: str | None = None) -> tuple[Job, bool]:
        """Insert a job for a newly received instance, already triaged to ``state``.

        The insert and its two events (``received``, then the verdict) are one transaction. When a job
        for the same instance exists, nothing changes and it is returned with ``created=False``.
        """
        if not can_move(JobState.RECEIVED, state) and state is not JobState.RECEIVED:
            raise InvalidTransition(f"a new job cannot start in state {state}")
        now = time.time()
        values = [getattr(new, name) for name in _NEW_COLUMNS]
        columns = ", ".join((*_NEW_COLUMNS, "state", "reason", "received_at", "updated_at"))
        with self.db.transaction() as db:
            row = db.execute(
                f"INSERT INTO jobs ({columns}) VALUES ({_marks(columns.split(', '))})"
                " ON CONFLICT (instance_key) DO NOTHING RETURNING id",
                (*values, state.value, reason, now, now),
            ).fetchone()
            if row is None:
                return self.select(db, "instance_key = ?", (new.instance_key,))[0], False
            self.event(db, row[0], now, None, JobState.RECEIVED, None)
            if state is not JobState.RECEIVED:
                self.event(db, row[0], now, JobState.RECEIVED, state, reason)
            if state is JobState.QUEUED:
                self.db.wake("queued")
            return self.select(db, "id = ?", (row[0],))[0], True

    def transition(self, job_id: int, target: JobState, reason: str | None = None) -> Job:
        """Move a job to ``target`` in one committed write, if its current state allows it.

        Raises
        ------
        InvalidTransition
            When the job does not exist or its state does not lead to ``target``.
        """
        with self.db.transaction() as db:
            return self.move(db, job_id, target, reason)

    def move(
        self, db: sqlite3.Connection, job_id: int, target: JobState, reason: str | None, attempt: bool = False
    ) -> Job:
        """Move one job inside the caller's transaction (``attempt`` counts one more attempt).

        Raises
        ------
        InvalidTransition
            When the job does not exist or its state does not lead to ``target``.
        """
        now = time.time()
        allowed = tuple(state.value for state in sources_of(target))
        current = self.select(db, "id = ?", (job_id,))
        if not current:
            raise InvalidTransition(f"job {job_id} does not exist")
        updated = db.execute(
            "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, attempts = attempts + ?, holder = NULL,"
            f" lease_until = NULL WHERE id = ? AND state IN ({_marks(allowed)})",
            (target.value, reason, now, int(attempt), job_id, *allowed),
        ).rowcount
        if updated != 1:
            raise InvalidTransition(f"job {job_id} is {current[0].state}, which does not lead to {target}")
        self.event(db, job_id, now, current[0].state, target, reason)
        if target is JobState.QUEUED:
            self.db.wake("queued")
        elif target is JobState.WRITTEN:
            self.db.wake("deliveries")
        return self.select(db, "id = ?", (job_id,))[0]

    def claim(self, limit: int, holder: Holder, lease_s: float, retries: bool = True) -> list[Job]:
        """Move up to ``limit`` of the oldest queued jobs to running under ``holder``'s lease; return them.

        Each claim is one more attempt. A job on its second or later attempt is claimed alone: if it is what
        killed the last worker, it cannot take a batch of other patients' jobs down with it again. With
        ``retries=False`` only jobs on their first attempt are claimed (to fill a batch).
        """
        now = time.time()
        fresh = "" if retries else " AND attempts = 0"
        with self.db.transaction() as db:
            queued = db.execute(
                f"SELECT id, attempts FROM jobs WHERE state = ?{fresh} ORDER BY id LIMIT ?",
                (JobState.QUEUED.value, limit),
            ).fetchall()
            if not queued:
                return []
            ids = [queued[0][0]] if queued[0][1] else [job_id for job_id, attempts in queued if not attempts]
            jobs = [self.move(db, job_id, JobState.RUNNING, None, attempt=True) for job_id in ids]
            db.executemany(
                "UPDATE jobs SET holder = ?, lease_until = ? WHERE id = ?",
                [(holder.id, now + lease_s, job.id) for job in jobs],
            )
            self._beat(db, holder, now)
            return self.select(db, f"id IN ({_marks(ids)}) ORDER BY id", tuple(ids))

    def renew(self, holder: Holder, lease_s: float) -> int:
        """Extend the lease of every job ``holder`` runs and record that it is alive; return how many jobs."""
        now = time.time()
        with self.db.transaction() as db:
            self._beat(db, holder, now)
            return db.execute(
                "UPDATE jobs SET lease_until = ? WHERE holder = ? AND state = ?",
                (now + lease_s, holder.id, JobState.RUNNING.value),
            ).rowcount

    @staticmethod
    def _beat(db: sqlite3.Connection, holder: Holder, now: float) -> None:
        db.execute(
            "INSERT INTO holders (id, role, renewed_at) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET renewed_at = excluded.renewed_at",
            (holder.id, holder.role, now),
        )

    def release(self, holders: Sequence[str] | None, now: float, max_attempts: int, reason: str) -> list[Job]:
        """Take running jobs back from holders that are gone: those named (every running job when None) and any
        whose lease expired before ``now``. A job back from ``max_attempts`` attempts ends dead; the others are
        queued again. The holders named are forgotten. Returns the jobs moved, in their new state."""
        args: tuple[object, ...] = ()
        if holders is None:
            where = "1 = 1"
        else:
            where, args = f"lease_until < ? OR holder IN ({_marks(holders)})", (now, *holders)
        with self.db.transaction() as db:
            rows = db.execute(
                f"SELECT id, attempts FROM jobs WHERE state = ? AND ({where})", (JobState.RUNNING.value, *args)
            ).fetchall()
            moved = [self._release_one(db, job_id, attempts, max_attempts, reason) for job_id, attempts in rows]
            if holders:
                db.executemany("DELETE FROM holders WHERE id = ?", [(h,) for h in holders])
            return moved

    def _release_one(self, db: sqlite3.Connection, job_id: int, attempts: int, max_attempts: int, reason: str) -> Job:
        if attempts >= max_attempts:
            return self.move(db, job_id, JobState.DEAD, f"gave up after {attempts} attempts: {reason}"[:300])
        return self.move(db, job_id, JobState.QUEUED, reason)

    def holders(self) -> list[HolderState]:
        """Every process that holds or held jobs, with when it last renewed."""
        with self.db.read() as db:
            rows = db.execute("SELECT id, role, renewed_at FROM holders ORDER BY id").fetchall()
        return [HolderState(*row) for row in rows]

    def get(self, job_id: int) -> Job | None:
        """Return the job ``job_id``, or None."""
        with self.db.read() as db:
            rows = self.select(db, "id = ?", (job_id,))
        return rows[0] if rows else None

    def find(self, instance_key: str) -> Job | None:
        """Return the job of the instance ``instance_key``, or None."""
        with self.db.read() as db:
            rows = self.select(db, "instance_key = ?", (instance_key,))
        return rows[0] if rows else None

    def query(self, state: JobState | None = None, limit: int = 1000) -> list[Job]:
        """Return up to ``limit`` jobs, oldest first, optionally only those in ``state``."""
        where, args = ("state = ?", (state.value,)) if state else ("1 = 1", ())
        with self.db.read() as db:
            return self.select(db, f"{where} ORDER BY id LIMIT ?", (*args, limit))

    def history(self, job_id: int) -> list[tuple[str | None, str, str | None]]:
        """Return a job's transitions, oldest first, as ``(from, to, reason)``."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT from_state, to_state, reason FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    def counts(self) -> dict[JobState, int]:
        """Return the number of jobs in every state (zero included)."""
        with self.db.read() as db:
            rows = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: rows.get(state.value, 0) for state in JobState}

    def reasons(self, state: JobState) -> dict[str, int]:
        """Jobs in ``state`` counted by reason."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT COALESCE(reason, ''), COUNT(*) FROM jobs WHERE state = ? GROUP BY reason", (state.value,)
            ).fetchall()
        return {reason: count for reason, count in rows}

    def moves(self, target: JobState, reason_prefix: str) -> int:
        """How many distinct jobs ever moved to ``target`` with a reason starting ``reason_prefix``."""
        with self.db.read() as db:
            row = db.execute(
                "SELECT COUNT(DISTINCT job_id) FROM job_events WHERE to_state = ? AND substr(reason, 1, ?) = ?",
                (target.value, len(reason_prefix), reason_prefix),
            ).fetchone()
        return int(row[0])

    def oldest_open_age(self, now: float) -> float:
        """Seconds since the oldest job still waiting (queued, running, inferred or written) was received."""
        waiting = tuple(state.value for state in IN_FLIGHT)
        with self.db.read() as db:
            row = db.execute(
                f"SELECT MIN(received_at) FROM jobs WHERE state IN ({_marks(waiting)})", waiting
            ).fetchone()
        return 0.0 if row[0] is None else max(0.0, now - row[0])

    def finished_before(self, cutoff: float, states: Sequence[JobState]) -> list[int]:
        """Ids of jobs in ``states`` last updated before ``cutoff``."""
        values = tuple(state.value for state in states)
        with self.db.read() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE state IN ({_marks(values)}) AND updated_at < ? ORDER BY id",
                (*values, cutoff),
            ).fetchall()
        return [row[0] for row in rows]

    def study_jobs(self, study_instance_uid: str) -> list[int]:
        """Ids of every job of one study."""
        with self.db.read() as db:
            rows = db.execute("SELECT id FROM jobs WHERE study_instance_uid = ?", (study_instance_uid,)).fetchall()
        return [row[0] for row in rows]

    def delete(self, job_ids: Sequence[int]) -> int:
        """Delete jobs and everything recorded about them; return how many jobs were deleted."""
        with self.db.transaction() as db:
            for table in ("job_events", "results", "outputs", "deliveries"):
                db.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(i,) for i in job_ids])
            return sum(db.execute("DELETE FROM jobs WHERE id = ?", (i,)).rowcount for i in job_ids)

    @staticmethod
    def event(
        db: sqlite3.Connection, job_id: int, at: float, src: JobState | None, dst: JobState, reason: str | None
    ) -> None:
        """Append one row to a job's history."""
        db.execute(
            "INSERT INTO job_events (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
            (job_id, at, src.value if src else None, dst.value, reason),
        )

    @staticmethod
    def select(db: sqlite3.Connection, where: str, args: tuple[object, ...]) -> list[Job]:
        """Jobs matching a WHERE clause built from constants (values bound as ``args``)."""
        rows = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE {where}", args).fetchall()
        return [_to_job(row) for row in rows]


def _to_job(row: tuple[Any, ...]) -> Job:
    values: dict[str, Any] = dict(zip(_JOB_COLUMNS, row, strict=True))  # column types are the schema's
    values["state"] = JobState(values["state"])
    return Job(**values)


class SqliteResults:
    """Inference results and written outputs (the :class:`~cxr_node.jobs.interfaces.ResultStore` of SQLite)."""

    def __init__(self, db: Database, jobs: SqliteJobs) -> None:
        self.db = db
        self.jobs = jobs

    def save_result(self, job_id: int, findings: Findings, embedding: bytes | None) -> Job:
        """Store a running job's findings (the summary as JSON, the arrays for the writers) and move it to
        inferred, in one transaction.

        Parameters
        ----------
        job_id : int
            A job in state running.
        findings : Findings
            What inference found; its arrays are kept until the outputs are written.
        embedding : bytes or None
            The L2-normalised retrieval embedding as float32 bytes.
        """
        summary = findings.summary
        text = codec.encode_summary(summary)
        arrays = codec.stored_arrays(findings)
        with self.db.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO results"
                " (job_id, model_name, model_version, created_at, summary, embedding, arrays)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, summary.model_name, summary.model_version, time.time(), text, embedding, arrays),
            )
            return self.jobs.move(db, job_id, JobState.INFERRED, None)

    def result(self, job_id: int) -> StoredResult | None:
        """Return the stored result of ``job_id``, or None.

        Raises
        ------
        ValueError
            When the stored summary cannot be decoded.
        """
        with self.db.read() as db:
            row = db.execute(
                "SELECT job_id, created_at, summary, embedding, arrays FROM results WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            return None
        return StoredResult(row[0], row[1], codec.decode_summary(row[2]), row[3], row[4])

    def save_outputs(
        self, job_id: int, outputs: Sequence[Output], destinations: Sequence[str], reason: str | None = None
    ) -> Job:
        """Record an inferred job's written outputs, one pending delivery per destination and output,
        and move it to written (with ``reason``), in one transaction; the result's arrays are dropped."""
        now = time.time()
        with self.db.transaction() as db:
            db.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
            db.executemany(
                "INSERT INTO outputs (job_id, kind, sop_class_uid, sop_instance_uid, path, size_bytes, created_at,"
                " send_order) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (job_id, o.kind, o.sop_class_uid, o.sop_instance_uid, o.path, o.size_bytes, now, o.send_order)
                    for o in outputs
                ],
            )
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, destination, kind, state, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (job_id, name, o.kind, DeliveryState.PENDING.value, now, now)
                    for name in destinations
                    for o in outputs
                ],
            )
            db.execute("UPDATE results SET arrays = NULL WHERE job_id = ?", (job_id,))
            return self.jobs.move(db, job_id, JobState.WRITTEN, reason)

    def outputs(self, job_id: int) -> list[Output]:
        """Return the outputs written for ``job_id``, in send order."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT kind, sop_class_uid, sop_instance_uid, path, size_bytes, send_order FROM outputs"
                " WHERE job_id = ? ORDER BY send_order, kind",
                (job_id,),
            ).fetchall()
        return [Output(*row) for row in rows]


class SqliteDeliveries:
    """Delivery rows and destination states (the :class:`~cxr_node.jobs.interfaces.DeliveryStore` of SQLite).

    A job moves to ``delivered`` when every delivery of it is delivered (or refused by a destination that does
    not accept that kind), and to ``dead`` when one of them is dead and none is still open.
    """

    def __init__(self, db: Database, jobs: SqliteJobs) -> None:
        self.db = db
        self.jobs = jobs

    def due(self, destination: str, now: float, max_jobs: int) -> list[Due]:
        """Outputs due for ``destination`` (pending, or failed with their retry time passed), oldest job first
        and in send order, for at most ``max_jobs`` jobs."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT d.job_id, d.kind, o.path, o.sop_class_uid, o.sop_instance_uid, d.attempts"
                " FROM deliveries d JOIN outputs o ON o.job_id = d.job_id AND o.kind = d.kind"
                f" WHERE d.destination = ? AND d.state IN ({_marks(_OPEN)}) AND d.next_attempt_at <= ?"
                " AND d.job_id IN (SELECT DISTINCT job_id FROM deliveries WHERE destination = ?"
                f"   AND state IN ({_marks(_OPEN)}) AND next_attempt_at <= ? ORDER BY job_id LIMIT ?)"
                " ORDER BY d.job_id, o.send_order, d.kind",
                (destination, *_OPEN, now, destination, *_OPEN, now, max_jobs),
            ).fetchall()
        return [Due(*row) for row in rows]

    def record(
        self,
        job_id: int,
        destination: str,
        kind: str,
        state: DeliveryState,
        status: int | None,
        error: str | None,
        next_attempt_at: float = 0.0,
        count_attempt: bool = True,
    ) -> JobState | None:
        """Record one send outcome; finish the job when nothing of it is still open. Returns the job's new
        state when it changed (delivered or dead), else None.

        Raises
        ------
        InvalidTransition
            When the delivery does not exist or its state does not lead to ``state``.
        """
        allowed = tuple(s.value for s in delivery_sources_of(state))
        with self.db.transaction() as db:
            updated = db.execute(
                "UPDATE deliveries SET state = ?, last_status = ?, last_error = ?, next_attempt_at = ?,"
                " attempts = attempts + ?, updated_at = ? WHERE job_id = ? AND destination = ? AND kind = ?"
                f" AND state IN ({_marks(allowed)})",
                (state.value, status, error, next_attempt_at, int(count_attempt), time.time(), job_id, destination,
                 kind, *allowed),
            ).rowcount  # fmt: skip
            if updated != 1:
                raise InvalidTransition(f"delivery of job {job_id} {kind} to {destination} cannot become {state}")
            return self._settle(db, job_id)

    def _settle(self, db: sqlite3.Connection, job_id: int) -> JobState | None:
        states = {
            DeliveryState(row[0]) for row in db.execute("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))
        }
        job = self.jobs.select(db, "id = ?", (job_id,))
        if not states or states & OPEN_DELIVERIES or not job or job[0].state is not JobState.WRITTEN:
            return None
        if DeliveryState.DEAD in states:
            reason = db.execute(
                "SELECT destination || '/' || kind || ': ' || COALESCE(last_error, '') FROM deliveries"
                " WHERE job_id = ? AND state = ? LIMIT 1",
                (job_id, DeliveryState.DEAD.value),
            ).fetchone()[0]
            self.jobs.move(db, job_id, JobState.DEAD, f"not delivered: {reason}"[:300])
            return JobState.DEAD
        self.jobs.move(db, job_id, JobState.DELIVERED, None)
        return JobState.DELIVERED

    def settle_written(self) -> int:
        """Finish written jobs that have nothing open (no destinations configured, or all refused)."""
        with self.db.transaction() as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM jobs WHERE state = ? AND NOT EXISTS (SELECT 1 FROM deliveries d"
                    f" WHERE d.job_id = jobs.id AND d.state IN ({_marks(_OPEN)}))",
                    (JobState.WRITTEN.value, *_OPEN),
                )
            ]
            return sum(self._settle(db, job_id) is not None or self._finish_empty(db, job_id) for job_id in ids)

    def _finish_empty(self, db: sqlite3.Connection, job_id: int) -> bool:
        if db.execute("SELECT 1 FROM deliveries WHERE job_id = ?", (job_id,)).fetchone() is None:
            self.jobs.move(db, job_id, JobState.DELIVERED, "no destination configured")
            return True
        return False

    def _move_open(self, db: sqlite3.Connection, where: str, args: tuple[object, ...], state: DeliveryState,
                   error_sql: str) -> list[int]:  # fmt: skip
        """Move the open deliveries matching ``where`` to ``state``; return the ids of the jobs they belong to."""
        ids = [row[0] for row in db.execute(f"SELECT DISTINCT job_id FROM deliveries WHERE state IN"
                                            f" ({_marks(_OPEN)}) AND {where}", (*_OPEN, *args))]  # fmt: skip
        db.execute(
            f"UPDATE deliveries SET state = ?, last_error = {error_sql}, updated_at = ? WHERE state IN"
            f" ({_marks(_OPEN)}) AND {where}",
            (state.value, time.time(), *_OPEN, *args),
        )
        return ids

    def refuse(self, destination: str, kinds: Sequence[str]) -> int:
        """Mark open deliveries of ``kinds`` to ``destination`` refused (it does not accept them); return how many."""
        if not kinds:
            return 0
        where, args = f"destination = ? AND kind IN ({_marks(kinds)})", (destination, *kinds)
        with self.db.transaction() as db:
            count = db.execute(
                f"SELECT COUNT(*) FROM deliveries WHERE state IN ({_marks(_OPEN)}) AND {where}", (*_OPEN, *args)
            ).fetchone()[0]
            error = "'the destination does not accept this SOP class'"
            for job_id in self._move_open(db, where, args, DeliveryState.REFUSED, error):
                self._settle(db, job_id)
            return int(count)

    def expire(self, max_age_s: float) -> int:
        """Give up on open deliveries of outputs written more than ``max_age_s`` ago; return how many."""
        where = (
            "EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = deliveries.job_id AND o.kind = deliveries.kind"
            " AND o.created_at < ?)"
        )
        args = (time.time() - max_age_s,)
        with self.db.transaction() as db:
            count = db.execute(
                f"SELECT COUNT(*) FROM deliveries WHERE state IN ({_marks(_OPEN)}) AND {where}", (*_OPEN, *args)
            ).fetchone()[0]
            error = "COALESCE(last_error, '') || ' (gave up: older than the delivery age limit)'"
            for job_id in self._move_open(db, where, args, DeliveryState.DEAD, error):
                self._settle(db, job_id)
            return int(count)

    def resend(self, job_id: int | None = None, dead: bool = False) -> list[int]:
        """Re-queue deliveries: of one job, or of every dead job; return the job ids. A dead job with outputs
        goes back to written with fresh deliveries; one without outputs goes back to queued.

        Raises
        ------
        ValueError
            When the job does not exist or is neither dead nor written.
        """
        with self.db.transaction() as db:
            if job_id is not None:
                ids = [job_id]
            else:
                dead_jobs = db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY id", (JobState.DEAD.value,))
                ids = [row[0] for row in dead_jobs] if dead else []
            for one in ids:
                self._resend_one(db, one)
            return ids

    def _resend_one(self, db: sqlite3.Connection, job_id: int) -> None:
        found = self.jobs.select(db, "id = ?", (job_id,))
        if not found or found[0].state not in (JobState.DEAD, JobState.WRITTEN):
            state = "does not exist" if not found else f"is {found[0].state}"
            raise ValueError(f"job {job_id} {state}; only dead or written jobs can be re-sent")
        has_outputs = db.execute("SELECT 1 FROM outputs WHERE job_id = ?", (job_id,)).fetchone() is not None
        allowed = tuple(s.value for s in delivery_sources_of(DeliveryState.PENDING) | {DeliveryState.PENDING})
        db.execute(
            "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = 0, updated_at = ? WHERE job_id = ?"
            f" AND state IN ({_marks(allowed)})",
            (DeliveryState.PENDING.value, time.time(), job_id, *allowed),
        )
        self.db.wake("deliveries")
        if found[0].state is JobState.DEAD:
            target = JobState.WRITTEN if has_outputs else JobState.QUEUED
            self.jobs.move(db, job_id, target, "re-queued by an operator")
            db.execute("UPDATE jobs SET attempts = 0 WHERE id = ?", (job_id,))  # a fresh start after a fix

    def counts(self) -> dict[tuple[str, str], int]:
        """Deliveries by (destination, state)."""
        with self.db.read() as db:
            rows = db.execute("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state")
            return {(d, s): n for d, s, n in rows.fetchall()}

    def save_destination(self, state: DestinationState) -> None:
        """Record a destination's probe result and backoff."""
        with self.db.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO destinations (name, reachable, accepted, refused, error, probed_at,"
                " down_since, retry_at, failures) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    state.name,
                    int(state.reachable),
                    json.dumps(state.accepted),
                    json.dumps(state.refused),
                    state.error,
                    state.probed_at,
                    state.down_since,
                    state.retry_at,
                    state.failures,
                ),
            )

    def destinations(self) -> dict[str, DestinationState]:
        """Every destination's last recorded state, by name."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT name, reachable, accepted, refused, error, probed_at, down_since, retry_at,"
                " failures FROM destinations"
            ).fetchall()
        return {
            r[0]: DestinationState(r[0], bool(r[1]), json.loads(r[2]), json.loads(r[3]), r[4], r[5], r[6], r[7], r[8])
            for r in rows
        }


class SqliteStore:
    """The embedded store: jobs, results and deliveries over one SQLite database (the arguments are
    :class:`Database`'s)."""

    def __init__(self, path: Path, fsync: bool = True, readonly: bool = False, wakeup: Wakeup | None = None) -> None:
        self.db = Database(path, fsync=fsync, readonly=readonly, wakeup=wakeup)
        self._jobs = SqliteJobs(self.db)
        self._results = SqliteResults(self.db, self._jobs)
        self._deliveries = SqliteDeliveries(self.db, self._jobs)

    @property
    def path(self) -> Path:
        """The database file."""
        return self.db.path

    @property
    def jobs(self) -> SqliteJobs:
        """The jobs."""
        return self._jobs

    @property
    def results(self) -> SqliteResults:
        """Results and outputs."""
        return self._results

    @property
    def deliveries(self) -> SqliteDeliveries:
        """Deliveries and destinations."""
        return self._deliveries

    def close(self) -> None:
        """Close the connection."""
        self.db.close()
