"""The durable store written once in SQL, for every backend: jobs, results and deliveries.

:class:`SqlJobs`, :class:`SqlResults` and :class:`SqlDeliveries` satisfy the Protocols of
:mod:`cxr_node.jobs.interfaces` over any :class:`SqlDatabase`: the embedded SQLite file
(:mod:`cxr_node.jobs.sqlite`) or a PostgreSQL server shared by many hosts (:mod:`cxr_node.jobs.postgres`).
Statements use ``?`` placeholders and SQL both engines speak (``ON CONFLICT``, ``RETURNING``); what differs is
in the :class:`Dialect`. Every state change is one ``UPDATE ... WHERE state IN (allowed sources)`` checked
against the state machines of :mod:`cxr_node.jobs.states`, with its event row, in one committed transaction.

Concurrency: SQLite serialises writers (``BEGIN IMMEDIATE``). On PostgreSQL (read committed) the rows a
transaction decides on are locked: claims take queued jobs ``FOR UPDATE SKIP LOCKED`` (many workers, none
waits on another), and a delivery outcome locks its job row first, so two senders finishing the last two
deliveries of one job cannot both miss finishing it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Any, Final, Generic, Protocol, TypeVar

from cxr_node.config import Destination
from cxr_node.errors import InvalidTransition
from cxr_node.jobs import codec
from cxr_node.jobs.leases import Holder
from cxr_node.jobs.records import (
    OUTCOME_LABELS,
    DestinationState,
    Due,
    HolderState,
    Job,
    ModeRecord,
    NewJob,
    NewOutcome,
    Outcome,
    OutcomeLabel,
    Output,
    PeriodRow,
    StoredResult,
)
from cxr_node.jobs.states import (
    OPEN_DELIVERIES,
    WITHHELD_ERROR,
    DeliveryState,
    JobState,
    can_move,
    delivery_sources_of,
    sources_of,
)
from cxr_node.jobs.wakeup import Topic
from cxr_node.results.findings import MODES, Findings, Mode, Summary


class Rows(Protocol):
    """What a statement returns: a DB-API cursor, as far as the store uses one."""

    @property
    def rowcount(self) -> int:
        """Rows changed by an UPDATE or DELETE."""
        ...

    def fetchone(self) -> Any:
        """The next row, or None."""
        ...

    def fetchall(self) -> list[Any]:
        """Every remaining row."""
        ...

    def __iter__(self) -> Iterator[Any]:
        """The remaining rows."""
        ...


class Cursor(Protocol):
    """A connection inside a transaction (or a read), with ``?`` placeholders on every backend."""

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Rows:
        """Run one statement."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any:
        """Run one statement per row of arguments."""
        ...


@dataclass(frozen=True)
class Dialect:
    """What differs between the engines, as SQL fragments.

    Parameters
    ----------
    name : str
        ``sqlite`` or ``postgresql``.
    lock : str
        Appended to a SELECT whose rows the transaction will change (``FOR UPDATE`` where rows lock).
    skip_locked : str
        Appended to a claim's SELECT: rows another transaction holds are passed over, not waited for.
    """

    name: str
    lock: str = ""
    skip_locked: str = ""


SQLITE: Final = Dialect("sqlite")
POSTGRESQL: Final = Dialect("postgresql", lock=" FOR UPDATE", skip_locked=" FOR UPDATE SKIP LOCKED")


class SqlDatabase(Protocol):
    """One backend's connections and transactions, as the SQL store uses them."""

    @property
    def dialect(self) -> Dialect:
        """The engine's SQL differences."""
        ...

    def read(self) -> AbstractContextManager[Cursor]:
        """A connection for reads outside a write transaction."""
        ...

    def transaction(self) -> AbstractContextManager[Cursor]:
        """One write transaction: committed at the block's end, rolled back on error."""
        ...

    @property
    def migrated_from(self) -> int | None:
        """The schema version the open found and migrated (0: created), or None when it was current."""
        ...

    def wake(self, topic: Topic) -> None:
        """Inside a transaction: once it commits, wake the consumers of ``topic``."""
        ...


CANDIDATES_PER_JOB: Final = 4
"""Jobs a sender's claim looks at per job it wants: those another sender is claiming at the same moment are passed
over, so a few spares keep the claim from coming back empty while others are free."""
TRIAGE_KINDS: Final = tuple(Destination.TRIAGE_KINDS.values())
"""Delivery kinds with no output file: a worklist triage message built from the stored result when it is sent."""
_HELD: Final = (JobState.RUNNING.value, JobState.INFERRED.value)
"""States in which a job belongs to a worker's lease: analysed, or its outputs being written."""
IN_FLIGHT: Final = (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.WRITTEN)
"""States of jobs still in flight (what :meth:`SqlJobs.oldest_open_age` measures)."""

_JOB_COLUMNS: Final = tuple(f.name for f in fields(Job))
_NEW_COLUMNS: Final = tuple(f.name for f in fields(NewJob))
_OPEN: Final = tuple(state.value for state in OPEN_DELIVERIES)


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


class SqlJobs:
    """Jobs and their event history (the :class:`~cxr_node.jobs.interfaces.JobStore`)."""

    def __init__(self, db: SqlDatabase) -> None:
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
        self,
        db: Cursor,
        job_id: int,
        target: JobState,
        reason: str | None,
        attempt: bool = False,
        keep_holder: bool = False,
    ) -> Job:
        """Move one job inside the caller's transaction (``attempt`` counts one more attempt; ``keep_holder``
        leaves it with its holder and lease, as a job inferred stays with the worker writing its outputs).

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
        unhold = "" if keep_holder else ", holder = NULL, lease_until = NULL"
        updated = db.execute(
            f"UPDATE jobs SET state = ?, reason = ?, updated_at = ?, attempts = attempts + ?{unhold}"
            f" WHERE id = ? AND state IN ({_marks(allowed)}) RETURNING {', '.join(_JOB_COLUMNS)}",
            (target.value, reason, now, int(attempt), job_id, *allowed),
        ).fetchall()
        if len(updated) != 1:
            raise InvalidTransition(f"job {job_id} is {current[0].state}, which does not lead to {target}")
        self.event(db, job_id, now, current[0].state, target, reason, current[0].holder)
        if target is JobState.QUEUED:
            self.db.wake("queued")
        elif target is JobState.WRITTEN:
            self.db.wake("deliveries")
        return _to_job(updated[0])

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
                f"SELECT id, attempts FROM jobs WHERE state = ?{fresh} ORDER BY id LIMIT ?"
                + self.db.dialect.skip_locked,
                (JobState.QUEUED.value, limit),
            ).fetchall()
            if not queued:
                return []
            ids = [queued[0][0]] if queued[0][1] else [job_id for job_id, attempts in queued if not attempts]
            # one UPDATE and one batch of events for the whole claim (round trips are the queue's cost)
            rows = db.execute(
                "UPDATE jobs SET state = ?, reason = NULL, updated_at = ?, attempts = attempts + 1, holder = ?,"
                f" lease_until = ? WHERE state = ? AND id IN ({_marks(ids)}) RETURNING {', '.join(_JOB_COLUMNS)}",
                (JobState.RUNNING.value, now, holder.id, now + lease_s, JobState.QUEUED.value, *ids),
            ).fetchall()
            jobs = sorted((_to_job(row) for row in rows), key=lambda job: job.id)
            db.executemany(
                "INSERT INTO job_events (job_id, at, from_state, to_state, reason, holder) VALUES (?, ?, ?, ?, ?, ?)",
                [(job.id, now, JobState.QUEUED.value, JobState.RUNNING.value, None, None) for job in jobs],
            )
            self._beat(db, holder, now)
            return jobs

    def renew(self, holder: Holder, lease_s: float) -> int:
        """Extend the lease of every job ``holder`` runs or writes and record that it is alive; return how many
        jobs."""
        now = time.time()
        with self.db.transaction() as db:
            self._beat(db, holder, now)
            return db.execute(
                "UPDATE jobs SET lease_until = ? WHERE holder = ? AND state IN (?, ?)",
                (now + lease_s, holder.id, *_HELD),
            ).rowcount

    def claim_inferred(self, limit: int, holder: Holder, lease_s: float) -> list[Job]:
        """Take up to ``limit`` inferred jobs nobody is writing (no holder, or its lease ran out) to write their
        outputs under ``holder``'s lease; return them. A job inferred by a live worker stays that worker's."""
        now = time.time()
        with self.db.transaction() as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM jobs WHERE state = ? AND (holder IS NULL OR lease_until < ?) ORDER BY id LIMIT ?"
                    + self.db.dialect.skip_locked,
                    (JobState.INFERRED.value, now, limit),
                )
            ]
            if not ids:
                return []
            db.execute(
                f"UPDATE jobs SET holder = ?, lease_until = ? WHERE id IN ({_marks(ids)})",
                (holder.id, now + lease_s, *ids),
            )
            self._beat(db, holder, now)
            return self.select(db, f"id IN ({_marks(ids)}) ORDER BY id", tuple(ids))

    @staticmethod
    def _beat(db: Cursor, holder: Holder, now: float) -> None:
        db.execute(
            "INSERT INTO holders (id, role, renewed_at) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET renewed_at = excluded.renewed_at",
            (holder.id, holder.role, now),
        )

    def release(self, holders: Sequence[str] | None, now: float, max_attempts: int, reason: str) -> list[Job]:
        """Take running jobs back from holders that are gone: those named (every running job when None) and any
        whose lease expired before ``now``. A job back from ``max_attempts`` attempts ends dead; the others are
        queued again. Inferred jobs those holders were writing are freed for another writer. The holders named
        are forgotten. Returns the jobs moved, in their new state."""
        args: tuple[object, ...] = ()
        if holders is None:
            where = "1 = 1"
        elif holders:
            where, args = f"lease_until < ? OR holder IN ({_marks(holders)})", (now, *holders)
        else:  # no "IN ()": PostgreSQL refuses an empty list
            where, args = "lease_until < ?", (now,)
        with self.db.transaction() as db:
            rows = db.execute(
                f"SELECT id, attempts FROM jobs WHERE state = ? AND ({where}){self.db.dialect.skip_locked}",
                (JobState.RUNNING.value, *args),
            ).fetchall()
            moved = [self._release_one(db, job_id, attempts, max_attempts, reason) for job_id, attempts in rows]
            db.execute(  # inferred jobs whose writer is gone: free for the next worker to write (state unchanged)
                "UPDATE jobs SET holder = NULL, lease_until = NULL WHERE state = ? AND holder IS NOT NULL"
                f" AND ({where})",
                (JobState.INFERRED.value, *args),
            )
            if holders:
                db.executemany("DELETE FROM holders WHERE id = ?", [(h,) for h in holders])
            return moved

    def _release_one(self, db: Cursor, job_id: int, attempts: int, max_attempts: int, reason: str) -> Job:
        if attempts >= max_attempts:
            return self.move(db, job_id, JobState.DEAD, f"gave up after {attempts} attempts: {reason}"[:300])
        return self.move(db, job_id, JobState.QUEUED, reason)

    def held(self) -> dict[str, tuple[int, float]]:
        """Running jobs by holder: how many, and when the first of their leases ends."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT holder, COUNT(*), MIN(lease_until) FROM jobs WHERE state = ? AND holder IS NOT NULL"
                " GROUP BY holder",
                (JobState.RUNNING.value,),
            ).fetchall()
        return {holder: (int(count), float(until or 0.0)) for holder, count, until in rows}

    def throughput(self, since: float) -> dict[str, int]:
        """Jobs each holder finished inferring since ``since`` (what each worker host has done)."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT holder, COUNT(*) FROM job_events WHERE to_state = ? AND at >= ? AND holder IS NOT NULL"
                " GROUP BY holder",
                (JobState.INFERRED.value, since),
            ).fetchall()
        return {holder: int(count) for holder, count in rows}

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
                "SELECT COUNT(DISTINCT job_id) FROM job_events WHERE to_state = ?"
                " AND substr(reason, 1, CAST(? AS INTEGER)) = ?",
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
            for table in ("job_events", "results", "candidate_results", "outputs", "deliveries"):
                db.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(i,) for i in job_ids])
            return sum(db.execute("DELETE FROM jobs WHERE id = ?", (i,)).rowcount for i in job_ids)

    @staticmethod
    def event(
        db: Cursor,
        job_id: int,
        at: float,
        src: JobState | None,
        dst: JobState,
        reason: str | None,
        holder: str | None = None,
    ) -> None:
        """Append one row to a job's history (``holder``: the process that held the job when it moved)."""
        db.execute(
            "INSERT INTO job_events (job_id, at, from_state, to_state, reason, holder) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, at, src.value if src else None, dst.value, reason, holder),
        )

    @staticmethod
    def select(db: Cursor, where: str, args: tuple[object, ...]) -> list[Job]:
        """Jobs matching a WHERE clause built from constants (values bound as ``args``)."""
        rows = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE {where}", args).fetchall()
        return [_to_job(row) for row in rows]


def _to_job(row: tuple[Any, ...]) -> Job:
    values: dict[str, Any] = dict(zip(_JOB_COLUMNS, row, strict=True))  # column types are the schema's
    values["state"] = JobState(values["state"])
    return Job(**values)


class SqlResults:
    """Inference results and written outputs (the :class:`~cxr_node.jobs.interfaces.ResultStore`)."""

    def __init__(self, db: SqlDatabase, jobs: SqlJobs) -> None:
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
                "INSERT INTO results (job_id, model_name, model_version, created_at, summary, embedding, arrays)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET model_name = excluded.model_name,"
                " model_version = excluded.model_version, created_at = excluded.created_at,"
                " summary = excluded.summary, embedding = excluded.embedding, arrays = excluded.arrays",
                (job_id, summary.model_name, summary.model_version, time.time(), text, embedding, arrays),
            )
            return self.jobs.move(db, job_id, JobState.INFERRED, None, keep_holder=True)

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

    def save_candidate(self, job_id: int, summary: Summary) -> None:
        """Store (or replace) what a candidate model (``models.candidates``) found on a job's image, apart from the
        job's own result: the job's state is not touched."""
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO candidate_results (job_id, model_key, created_at, summary) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (job_id, model_key) DO UPDATE SET created_at = excluded.created_at,"
                " summary = excluded.summary",
                (job_id, summary.model_key, time.time(), codec.encode_summary(summary)),
            )

    def candidate_results(self, job_id: int) -> list[Summary]:
        """What the candidate models found on ``job_id``'s image, by model key.

        Raises
        ------
        ValueError
            When a stored summary cannot be decoded.
        """
        with self.db.read() as db:
            rows = db.execute(
                "SELECT summary FROM candidate_results WHERE job_id = ? ORDER BY model_key", (job_id,)
            ).fetchall()
        return [codec.decode_summary(row[0]) for row in rows]

    def beside(self, model_key: str, since: float = 0.0) -> list[tuple[int, Summary, Summary | None]]:
        """Each job a candidate ``model_key`` ran on (recorded at ``since`` or later), with its summary and the
        job's own result's (None when the job has none), in job order."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT c.job_id, c.summary, r.summary FROM candidate_results c"
                " LEFT JOIN results r ON r.job_id = c.job_id"
                " WHERE c.model_key = ? AND c.created_at >= ? ORDER BY c.job_id",
                (model_key, since),
            ).fetchall()
        return [
            (row[0], codec.decode_summary(row[1]), None if row[2] is None else codec.decode_summary(row[2]))
            for row in rows
        ]

    def period(self, since: float, until: float) -> list[PeriodRow]:
        """Every job received in [since, until), in job order, with its result's summary (None when it has none),
        when it was inferred and when its SR was first delivered to a destination.

        Raises
        ------
        ValueError
            When a stored summary cannot be decoded.
        """
        with self.db.read() as db:
            rows = db.execute(
                "SELECT j.id, j.accession_number, j.study_instance_uid, j.modality, j.calling_aet, j.state,"
                " j.received_at, r.summary, r.created_at, (SELECT MIN(d.updated_at) FROM deliveries d"
                " WHERE d.job_id = j.id AND d.kind = 'sr' AND d.state = 'delivered')"
                " FROM jobs j LEFT JOIN results r ON r.job_id = j.id"
                " WHERE j.received_at >= ? AND j.received_at < ? ORDER BY j.id",
                (since, until),
            ).fetchall()
        return [
            PeriodRow(row[0], row[1], row[2], row[3], row[4], JobState(row[5]), float(row[6]),
                      None if row[7] is None else codec.decode_summary(row[7]),
                      None if row[8] is None else float(row[8]), None if row[9] is None else float(row[9]))
            for row in rows
        ]  # fmt: skip

    def save_outputs(
        self,
        job_id: int,
        outputs: Sequence[Output],
        destinations: Sequence[str],
        reason: str | None = None,
        withheld: Sequence[str] = (),
        triage: Sequence[tuple[str, str]] = (),
    ) -> Job:
        """Record an inferred job's written outputs (with the go-live mode each was written in), one pending
        delivery per destination and output (withheld, never sent, for the destinations in ``withheld``), and
        move it to written (with ``reason``), in one transaction; the result's arrays are dropped.

        ``triage`` holds a ``(destination, kind)`` pair for each worklist triage destination the result qualifies
        for (:data:`TRIAGE_KINDS`): one delivery each, with no output file (its message is built from the stored
        result when it is sent), withheld as the others when its destination is in ``withheld``.
        """
        unknown = [kind for _, kind in triage if kind not in TRIAGE_KINDS]
        if unknown:
            raise ValueError(f"triage kinds must be among {TRIAGE_KINDS}, found {unknown}")
        now = time.time()
        with self.db.transaction() as db:
            db.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
            db.executemany(
                "INSERT INTO outputs (job_id, kind, sop_class_uid, sop_instance_uid, path, size_bytes, created_at,"
                " send_order, mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (job_id, o.kind, o.sop_class_uid, o.sop_instance_uid, o.path, o.size_bytes, now, o.send_order,
                     o.mode)
                    for o in outputs
                ],
            )  # fmt: skip
            db.executemany(
                "INSERT INTO deliveries (job_id, destination, kind, state, next_attempt_at, updated_at, last_error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [_delivery_row(job_id, name, o.kind, name in withheld, now) for name in destinations for o in outputs]
                + [_delivery_row(job_id, name, kind, name in withheld, now) for name, kind in triage],
            )
            db.execute("UPDATE results SET arrays = NULL WHERE job_id = ?", (job_id,))
            return self.jobs.move(db, job_id, JobState.WRITTEN, reason)

    def outputs(self, job_id: int) -> list[Output]:
        """Return the outputs written for ``job_id``, in send order."""
        with self.db.read() as db:
            rows = db.execute(
                "SELECT kind, sop_class_uid, sop_instance_uid, path, size_bytes, send_order, mode FROM outputs"
                " WHERE job_id = ? ORDER BY send_order, kind",
                (job_id,),
            ).fetchall()
        return [Output(*row) for row in rows]


def _delivery_row(job_id: int, destination: str, kind: str, withheld: bool, now: float) -> tuple[object, ...]:
    state = DeliveryState.WITHHELD if withheld else DeliveryState.PENDING
    return (job_id, destination, kind, state.value, now, now, WITHHELD_ERROR if withheld else None)


class SqlDeliveries:
    """Delivery rows and destination states (the :class:`~cxr_node.jobs.interfaces.DeliveryStore`).

    A job moves to ``delivered`` when every delivery of it is delivered (or refused by a destination that does
    not accept that kind), and to ``dead`` when one of them is dead and none is still open.
    """

    def __init__(self, db: SqlDatabase, jobs: SqlJobs) -> None:
        self.db = db
        self.jobs = jobs

    def due(
        self, destination: str, now: float, max_jobs: int, holder: Holder | None = None, lease_s: float = 0.0
    ) -> list[Due]:
        """Outputs due for ``destination`` (pending, or failed with their retry time passed), oldest job first
        and in send order, for at most ``max_jobs`` jobs.

        With a ``holder`` (a sender about to send them) the jobs are claimed: their deliveries to
        ``destination`` are leased to it for ``lease_s``, and jobs another sender holds under a live lease are
        passed over, so senders on several hosts share the work without sending one output twice. A sender
        that dies mid-delivery loses its jobs when the lease ends; the next sends the same objects again (same
        SOP Instance UIDs, so the destination still keeps one of each).
        """
        if holder is None:
            with self.db.read() as db:
                return self._due(db, destination, now, max_jobs, None)
        with self.db.transaction() as db:
            # Whole jobs are claimed without ever waiting on a lock. The open delivery rows of a few candidate jobs
            # are locked, skipping rows another sender holds, and only the jobs all of whose open rows this
            # transaction holds are taken; the UPDATE then changes rows already locked here, and checks again that
            # each is still free, so two senders claiming at once never both take one. (Taking a job of which
            # another sender had locked a row waited for that sender, which could be waiting for this one's rows
            # of the same job: PostgreSQL's "deadlock detected".) The job rows are never locked here: a delivery
            # outcome locks its job row after its delivery row, so there is no lock cycle with record().
            free = "(holder IS NULL OR holder = ? OR lease_until < ?)"
            open_due = f"destination = ? AND state IN ({_marks(_OPEN)}) AND next_attempt_at <= ? AND {free}"
            args = (destination, *_OPEN, now, holder.id, now)
            candidates = [
                row[0]
                for row in db.execute(
                    f"SELECT DISTINCT job_id FROM deliveries WHERE {open_due} ORDER BY job_id LIMIT ?",
                    (*args, max_jobs * CANDIDATES_PER_JOB),
                ).fetchall()
            ]
            if not candidates:
                return []
            among = f"{open_due} AND job_id IN ({_marks(candidates)})"
            locked = Counter(
                row[0]
                for row in db.execute(
                    f"SELECT job_id FROM deliveries WHERE {among}{self.db.dialect.skip_locked}", (*args, *candidates)
                ).fetchall()
            )
            if not locked:
                return []
            rows = db.execute(
                f"SELECT job_id, COUNT(*) FROM deliveries WHERE {among} GROUP BY job_id", (*args, *candidates)
            ).fetchall()
            whole = [job_id for job_id, count in sorted(rows) if locked[job_id] == count][:max_jobs]
            if not whole:
                return []
            claimed = db.execute(
                f"UPDATE deliveries SET holder = ?, lease_until = ? WHERE {open_due}"
                f" AND job_id IN ({_marks(whole)}) RETURNING job_id",
                (holder.id, now + lease_s, *args, *whole),
            ).fetchall()
            ids = sorted({row[0] for row in claimed})
            if not ids:
                return []
            return self._due(db, destination, now, max_jobs, ids)

    @staticmethod
    def _due(db: Cursor, destination: str, now: float, max_jobs: int, ids: Sequence[int] | None) -> list[Due]:
        if ids is None:
            among = (
                " AND d.job_id IN (SELECT DISTINCT job_id FROM deliveries WHERE destination = ?"
                f"   AND state IN ({_marks(_OPEN)}) AND next_attempt_at <= ? ORDER BY job_id LIMIT ?)"
            )
            args: tuple[object, ...] = (destination, *_OPEN, now, max_jobs)
        else:
            among, args = f" AND d.job_id IN ({_marks(ids)})", tuple(ids)
        # A triage delivery (kind oru or fhir) has no output of its own: no path, no SOP class; it carries the
        # go-live mode the job's outputs were written in. A DICOM delivery whose output is missing stays unsent.
        rows = db.execute(
            "SELECT d.job_id, d.kind, COALESCE(o.path, ''), COALESCE(o.sop_class_uid, ''),"
            " COALESCE(o.sop_instance_uid, ''), d.attempts, COALESCE(o.mode, (SELECT MIN(m.mode) FROM outputs m"
            " WHERE m.job_id = d.job_id))"
            " FROM deliveries d LEFT JOIN outputs o ON o.job_id = d.job_id AND o.kind = d.kind"
            f" WHERE d.destination = ? AND d.state IN ({_marks(_OPEN)}) AND d.next_attempt_at <= ?{among}"
            f" AND (o.kind IS NOT NULL OR d.kind IN ({_marks(TRIAGE_KINDS)}))"
            " ORDER BY d.job_id, COALESCE(o.send_order, -1), d.kind",
            (destination, *_OPEN, now, *args, *TRIAGE_KINDS),
        ).fetchall()
        return [Due(row[0], row[1], row[2], row[3], row[4], row[5], row[6] or "live") for row in rows]

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
                " attempts = attempts + ?, updated_at = ?, holder = NULL, lease_until = NULL"
                " WHERE job_id = ? AND destination = ? AND kind = ?"
                f" AND state IN ({_marks(allowed)})",
                (state.value, status, error, next_attempt_at, int(count_attempt), time.time(), job_id, destination,
                 kind, *allowed),
            ).rowcount  # fmt: skip
            if updated != 1:
                raise InvalidTransition(f"delivery of job {job_id} {kind} to {destination} cannot become {state}")
            return self._settle(db, job_id)

    def _settle(self, db: Cursor, job_id: int) -> JobState | None:
        # The job row is locked before its deliveries are read: a sender recording another delivery of the same
        # job waits, then reads this one's outcome (each statement of read committed sees the latest commits).
        db.execute(f"SELECT id FROM jobs WHERE id = ?{self.db.dialect.lock}", (job_id,))
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
        reason = WITHHELD_ERROR if DeliveryState.WITHHELD in states else None
        self.jobs.move(db, job_id, JobState.DELIVERED, reason)
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

    def _finish_empty(self, db: Cursor, job_id: int) -> bool:
        if db.execute("SELECT 1 FROM deliveries WHERE job_id = ?", (job_id,)).fetchone() is None:
            reason = "nothing to deliver (no destination configured, or none wants this result)"
            self.jobs.move(db, job_id, JobState.DELIVERED, reason)
            return True
        return False

    def _move_open(self, db: Cursor, where: str, args: tuple[object, ...], state: DeliveryState,
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
        where = (  # all of a job's outputs are recorded at once: a triage delivery (no output) ages with them
            "EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = deliveries.job_id AND o.created_at < ?)"
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

    def _resend_one(self, db: Cursor, job_id: int) -> None:
        found = self.jobs.select(db, "id = ?", (job_id,))
        if not found or found[0].state not in (JobState.DEAD, JobState.WRITTEN):
            state = "does not exist" if not found else f"is {found[0].state}"
            raise ValueError(f"job {job_id} {state}; only dead or written jobs can be re-sent")
        has_outputs = db.execute("SELECT 1 FROM outputs WHERE job_id = ?", (job_id,)).fetchone() is not None
        allowed = tuple(s.value for s in delivery_sources_of(DeliveryState.PENDING) | {DeliveryState.PENDING})
        db.execute(
            "UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = 0, updated_at = ?, holder = NULL,"
            " lease_until = NULL WHERE job_id = ?"
            f" AND state IN ({_marks(allowed)})",
            (DeliveryState.PENDING.value, time.time(), job_id, *allowed),
        )
        self.db.wake("deliveries")
        if found[0].state is JobState.DEAD:
            target = JobState.WRITTEN if has_outputs else JobState.QUEUED
            self.jobs.move(db, job_id, target, "re-queued by an operator")
            db.execute("UPDATE jobs SET attempts = 0 WHERE id = ?", (job_id,))  # a fresh start after a fix

    def renew(self, holder: Holder, lease_s: float) -> int:
        """Extend the leases of the open deliveries ``holder`` claimed (a long round to a slow destination);
        return how many."""
        with self.db.transaction() as db:
            return int(
                db.execute(
                    f"UPDATE deliveries SET lease_until = ? WHERE holder = ? AND state IN ({_marks(_OPEN)})",
                    (time.time() + lease_s, holder.id, *_OPEN),
                ).rowcount
            )

    def release(self, holders: Sequence[str]) -> int:
        """Free the deliveries leased to senders that are gone (so they are sent at once, not after the lease)
        and forget those holders; return how many deliveries were freed."""
        if not holders:
            return 0
        with self.db.transaction() as db:
            freed = db.execute(
                f"UPDATE deliveries SET holder = NULL, lease_until = NULL WHERE holder IN ({_marks(holders)})",
                tuple(holders),
            ).rowcount
            db.executemany("DELETE FROM holders WHERE id = ?", [(h,) for h in holders])
            if freed:
                self.db.wake("deliveries")
            return int(freed)

    def counts(self) -> dict[tuple[str, str], int]:
        """Deliveries by (destination, state)."""
        with self.db.read() as db:
            rows = db.execute("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state")
            return {(d, s): n for d, s, n in rows.fetchall()}

    def save_destination(self, state: DestinationState) -> None:
        """Record a destination's probe result and backoff."""
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO destinations (name, reachable, accepted, refused, error, probed_at, down_since,"
                " retry_at, failures) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " reachable = excluded.reachable, accepted = excluded.accepted, refused = excluded.refused,"
                " error = excluded.error, probed_at = excluded.probed_at, down_since = excluded.down_since,"
                " retry_at = excluded.retry_at, failures = excluded.failures",
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


class SqlModes:
    """The go-live mode of each model version and its history (the :class:`~cxr_node.jobs.interfaces.ModeStore`):
    ``model_modes`` holds the current mode, ``model_mode_events`` every setting, both written in one
    transaction."""

    def __init__(self, db: SqlDatabase) -> None:
        self.db = db

    def current(self, model_key: str) -> ModeRecord | None:
        """The model version's mode as last set, or None when it has no record yet."""
        with self.db.read() as db:
            rows = db.execute(f"SELECT {_MODE_COLUMNS} FROM model_modes WHERE model_key = ?", (model_key,)).fetchall()
        return _to_mode(rows[0]) if rows else None

    def ensure(self, model_key: str, mode: Mode, set_by: str, reason: str | None = None) -> ModeRecord:
        """The model version's mode, recording ``mode`` first when it has none (an existing record is kept)."""
        found = self.current(model_key)
        if found is not None:
            return found
        record = ModeRecord(model_key, _checked(mode), set_by, time.time(), reason)
        with self.db.transaction() as db:
            inserted = db.execute(
                "INSERT INTO model_modes (model_key, mode, set_by, set_at, reason) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (model_key) DO NOTHING RETURNING model_key",
                _mode_values(record),
            ).fetchone()
            if inserted is not None:
                self._event(db, record)
                return record
            row = db.execute(f"SELECT {_MODE_COLUMNS} FROM model_modes WHERE model_key = ?", (model_key,)).fetchone()
            return _to_mode(row)  # another process recorded it first: its record stands

    def set(self, model_key: str, mode: Mode, set_by: str, reason: str | None = None) -> ModeRecord:
        """Record an operator's setting of the model version's mode, with its history row."""
        if not set_by.strip():
            raise ValueError("set_by: say who sets the mode (a name), found an empty string")
        record = ModeRecord(model_key, _checked(mode), set_by, time.time(), reason)
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO model_modes (model_key, mode, set_by, set_at, reason) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (model_key) DO UPDATE SET mode = excluded.mode, set_by = excluded.set_by,"
                " set_at = excluded.set_at, reason = excluded.reason",
                _mode_values(record),
            )
            self._event(db, record)
        return record

    def all(self) -> list[ModeRecord]:
        """Every model version's current mode, by model key."""
        with self.db.read() as db:
            rows = db.execute(f"SELECT {_MODE_COLUMNS} FROM model_modes ORDER BY model_key").fetchall()
        return [_to_mode(row) for row in rows]

    def history(self, model_key: str | None = None) -> list[ModeRecord]:
        """Every setting, oldest first, of one model version (or of all when None)."""
        where, args = ("model_key = ?", (model_key,)) if model_key is not None else ("1 = 1", ())
        with self.db.read() as db:
            rows = db.execute(f"SELECT {_MODE_COLUMNS} FROM model_mode_events WHERE {where} ORDER BY id", args)
            return [_to_mode(row) for row in rows.fetchall()]

    @staticmethod
    def _event(db: Cursor, record: ModeRecord) -> None:
        db.execute(
            "INSERT INTO model_mode_events (model_key, mode, set_by, set_at, reason) VALUES (?, ?, ?, ?, ?)",
            _mode_values(record),
        )


_MODE_COLUMNS: Final = "model_key, mode, set_by, set_at, reason"


def _checked(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, found {mode!r}")
    return mode


def _mode_values(record: ModeRecord) -> tuple[object, ...]:
    return (record.model_key, record.mode, record.set_by, record.set_at, record.reason)


def _to_mode(row: Sequence[Any]) -> ModeRecord:
    return ModeRecord(str(row[0]), _checked(str(row[1])), str(row[2]), float(row[3]), row[4])


_OUTCOME_COLUMNS: Final = ("source", "source_id", "accession_number", "label", "study_instance_uid", "code",
                           "reported_at", "id", "received_at")  # fmt: skip


class SqlOutcomes:
    """The sites' final findings (the :class:`~cxr_node.jobs.interfaces.OutcomeStore`)."""

    def __init__(self, db: SqlDatabase) -> None:
        self.db = db

    def record(self, new: NewOutcome) -> tuple[Outcome, bool]:
        """Record ``new`` (committed on return) unless its source and source_id are already recorded."""
        if new.label not in OUTCOME_LABELS:
            raise ValueError(f"outcome label must be one of {', '.join(OUTCOME_LABELS)}, found {new.label!r}")
        if not new.source or not new.source_id or not new.accession_number.strip():
            raise ValueError("an outcome needs its source, source_id and accession number")
        with self.db.transaction() as db:
            created = db.execute(
                "INSERT INTO outcomes (source, source_id, accession_number, label, study_instance_uid, code,"
                " reported_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, source_id) DO NOTHING",
                (new.source, new.source_id, new.accession_number.strip(), new.label, new.study_instance_uid, new.code,
                 new.reported_at, time.time()),
            ).rowcount  # fmt: skip
            row = db.execute(
                f"SELECT {', '.join(_OUTCOME_COLUMNS)} FROM outcomes WHERE source = ? AND source_id = ?",
                (new.source, new.source_id),
            ).fetchone()
        return _to_outcome(row), created == 1

    def query(self, since: float = 0.0, until: float | None = None) -> list[Outcome]:
        """Outcomes reported (else received) in [since, until), oldest first."""
        when = "COALESCE(reported_at, received_at)"
        with self.db.read() as db:
            rows = db.execute(
                f"SELECT {', '.join(_OUTCOME_COLUMNS)} FROM outcomes WHERE {when} >= ? AND {when} < ?"
                f" ORDER BY {when}, id",
                (since, until if until is not None else float("inf")),
            ).fetchall()
        return [_to_outcome(row) for row in rows]

    def after(self, outcome_id: int, limit: int = 1000) -> list[Outcome]:
        """Up to ``limit`` outcomes recorded after the one with id ``outcome_id``, in the order they were recorded."""
        with self.db.read() as db:
            rows = db.execute(
                f"SELECT {', '.join(_OUTCOME_COLUMNS)} FROM outcomes WHERE id > ? ORDER BY id LIMIT ?",
                (outcome_id, limit),
            ).fetchall()
        return [_to_outcome(row) for row in rows]

    def studies(self, outcome: Outcome) -> list[str]:
        """The studies an outcome is about: its Study Instance UID when it names one, else those of the jobs stored
        under its accession number."""
        if outcome.study_instance_uid:
            return [outcome.study_instance_uid]
        with self.db.read() as db:
            rows = db.execute(
                "SELECT DISTINCT study_instance_uid FROM jobs WHERE accession_number = ? ORDER BY study_instance_uid",
                (outcome.accession_number,),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def for_accessions(self, accessions: Iterable[str]) -> list[Outcome]:
        """Every outcome of these accession numbers, whenever reported, in the order recorded."""
        wanted = sorted({a.strip() for a in accessions if a.strip()})
        found: list[Outcome] = []
        with self.db.read() as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = db.execute(
                    f"SELECT {', '.join(_OUTCOME_COLUMNS)} FROM outcomes WHERE accession_number IN ({_marks(chunk)})",
                    tuple(chunk),
                ).fetchall()
                found += [_to_outcome(row) for row in rows]
        return sorted(found, key=lambda outcome: outcome.id)

    def for_accession(self, accession_number: str) -> list[Outcome]:
        """Every outcome of one accession number, oldest first."""
        with self.db.read() as db:
            rows = db.execute(
                f"SELECT {', '.join(_OUTCOME_COLUMNS)} FROM outcomes WHERE accession_number = ? ORDER BY id",
                (accession_number.strip(),),
            ).fetchall()
        return [_to_outcome(row) for row in rows]


def _to_outcome(row: Sequence[Any]) -> Outcome:
    values = dict(zip(_OUTCOME_COLUMNS, row, strict=True))
    label: OutcomeLabel = values["label"] if values["label"] in OUTCOME_LABELS else "not_assessable"
    reported = values["reported_at"]
    return Outcome(
        source=str(values["source"]), source_id=str(values["source_id"]),
        accession_number=str(values["accession_number"]), label=label,
        study_instance_uid=str(values["study_instance_uid"]), code=str(values["code"]),
        reported_at=None if reported is None else float(reported), id=int(values["id"]),
        received_at=float(values["received_at"]),
    )  # fmt: skip


D = TypeVar("D", bound=SqlDatabase)


class SqlStore(Generic[D]):
    """A backend's :class:`~cxr_node.jobs.interfaces.Store` but for ``listen`` and ``close``: the three parts
    over its database ``db``."""

    def __init__(self, db: D) -> None:
        self.db = db
        self._jobs = SqlJobs(db)
        self._results = SqlResults(db, self._jobs)
        self._deliveries = SqlDeliveries(db, self._jobs)
        self._modes = SqlModes(db)
        self._outcomes = SqlOutcomes(db)

    @property
    def migrated_from(self) -> int | None:
        """The schema version this open found and migrated (0: created it), or None when it was current."""
        return self.db.migrated_from

    @property
    def jobs(self) -> SqlJobs:
        """The jobs."""
        return self._jobs

    @property
    def results(self) -> SqlResults:
        """Results and outputs."""
        return self._results

    @property
    def deliveries(self) -> SqlDeliveries:
        """Deliveries and destinations."""
        return self._deliveries

    @property
    def modes(self) -> SqlModes:
        """The go-live mode of each model version."""
        return self._modes

    @property
    def outcomes(self) -> SqlOutcomes:
        """The sites' final findings (ground truth)."""
        return self._outcomes
