"""Deliveries: one row per (job, destination, output kind), and what each destination accepts.

A mixin of :class:`cxr_node.jobs.store.SqliteJobStore` (same connection and transactions). A job moves
to ``delivered`` when every delivery of it is delivered (or refused by a destination that does not accept
that kind), and to ``dead`` when one of them is dead and none is still pending.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final

from cxr_node.jobs.states import JobState

PENDING: Final = "pending"
FAILED: Final = "failed"
DELIVERED: Final = "delivered"
REFUSED: Final = "refused"
DEAD: Final = "dead"
OPEN: Final = (PENDING, FAILED)
DELIVERY_STATES: Final = (PENDING, FAILED, DELIVERED, REFUSED, DEAD)
KIND_ORDER: Final = "CASE kind WHEN 'sr' THEN 0 WHEN 'sc' THEN 1 WHEN 'seg' THEN 2 ELSE 3 END"
"""SQL ordering outputs as they are sent: the SR first, then the overlay, the SEG and the GSPS."""

DESTINATIONS_SCHEMA: Final = """
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


@dataclass(frozen=True)
class Due:
    """One output of one job that is due to be sent to one destination."""

    job_id: int
    kind: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int


@dataclass(frozen=True)
class DestinationState:
    """What the last probe found and whether the destination is backing off."""

    name: str
    reachable: bool
    accepted: list[str]
    refused: list[str]
    error: str | None
    probed_at: float
    down_since: float | None
    retry_at: float
    failures: int


class DeliveryQueries:
    """Delivery rows and destination states; mixed into the SQLite jobs store."""

    _db: sqlite3.Connection

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...  # provided by the store
    def _move(self, db: sqlite3.Connection, job_id: int, target: JobState, reason: str | None) -> Any: ...
    def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def due(self, destination: str, now: float, max_jobs: int) -> list[Due]:
        """Outputs due for ``destination`` (pending, or failed with their retry time passed), oldest job first,
        for at most ``max_jobs`` jobs."""
        with self._read() as db:
            rows = db.execute(
                "SELECT d.job_id, d.kind, o.path, o.sop_class_uid, o.sop_instance_uid, d.attempts"
                " FROM deliveries d JOIN outputs o ON o.job_id = d.job_id AND o.kind = d.kind"
                " WHERE d.destination = ? AND d.state IN ('pending', 'failed') AND d.next_attempt_at <= ?"
                " AND d.job_id IN (SELECT DISTINCT job_id FROM deliveries WHERE destination = ?"
                "   AND state IN ('pending', 'failed') AND next_attempt_at <= ? ORDER BY job_id LIMIT ?)"
                f" ORDER BY d.job_id, {KIND_ORDER.replace('kind', 'd.kind')}",
                (destination, now, destination, now, max_jobs),
            ).fetchall()
        return [Due(*row) for row in rows]

    def record_delivery(
        self,
        job_id: int,
        destination: str,
        kind: str,
        state: str,
        status: int | None,
        error: str | None,
        next_attempt_at: float = 0.0,
        count_attempt: bool = True,
    ) -> JobState | None:
        """Record one send outcome; finish the job when nothing of it is still open. Returns the job's new
        state when it changed (delivered or dead), else None."""
        if state not in DELIVERY_STATES:
            raise ValueError(f"state must be one of {DELIVERY_STATES}, found {state!r}")
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, last_status = ?, last_error = ?, next_attempt_at = ?,"
                " attempts = attempts + ?, updated_at = ? WHERE job_id = ? AND destination = ? AND kind = ?",
                (state, status, error, next_attempt_at, int(count_attempt), now, job_id, destination, kind),
            )
            return self._settle(db, job_id)

    def _settle(self, db: sqlite3.Connection, job_id: int) -> JobState | None:
        states = [row[0] for row in db.execute("SELECT state FROM deliveries WHERE job_id = ?", (job_id,))]
        job_state = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if not states or any(s in OPEN for s in states) or job_state is None or job_state[0] != "written":
            return None
        if DEAD in states:
            reason = db.execute(
                "SELECT destination || '/' || kind || ': ' || COALESCE(last_error, '') FROM deliveries"
                " WHERE job_id = ? AND state = 'dead' LIMIT 1",
                (job_id,),
            ).fetchone()[0]
            self._move(db, job_id, JobState.DEAD, f"not delivered: {reason}"[:300])
            return JobState.DEAD
        self._move(db, job_id, JobState.DELIVERED, None)
        return JobState.DELIVERED

    def settle_written(self) -> int:
        """Finish written jobs that have nothing open (no destinations configured, or all refused)."""
        with self._transaction() as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM jobs WHERE state = 'written' AND NOT EXISTS (SELECT 1 FROM deliveries d"
                    " WHERE d.job_id = jobs.id AND d.state IN ('pending', 'failed'))"
                )
            ]
            return sum(self._settle(db, job_id) is not None or self._finish_empty(db, job_id) for job_id in ids)

    def _finish_empty(self, db: sqlite3.Connection, job_id: int) -> bool:
        if db.execute("SELECT 1 FROM deliveries WHERE job_id = ?", (job_id,)).fetchone() is None:
            self._move(db, job_id, JobState.DELIVERED, "no destination configured")
            return True
        return False

    def refuse(self, destination: str, kinds: list[str]) -> int:
        """Mark open deliveries of ``kinds`` to ``destination`` refused (it does not accept them); return how many."""
        if not kinds:
            return 0
        marks = ", ".join("?" * len(kinds))
        with self._transaction() as db:
            ids = [
                row[0]
                for row in db.execute(
                    f"SELECT DISTINCT job_id FROM deliveries WHERE destination = ? AND kind IN ({marks})"
                    " AND state IN ('pending', 'failed')",
                    (destination, *kinds),
                )
            ]
            count = db.execute(
                f"UPDATE deliveries SET state = 'refused', last_error = 'the destination does not accept this"
                f" SOP class', updated_at = ? WHERE destination = ? AND kind IN ({marks})"
                " AND state IN ('pending', 'failed')",
                (time.time(), destination, *kinds),
            ).rowcount
            for job_id in ids:
                self._settle(db, job_id)
            return count

    def expire(self, max_age_s: float) -> int:
        """Give up on open deliveries of outputs written more than ``max_age_s`` ago; return how many."""
        cutoff = time.time() - max_age_s
        with self._transaction() as db:
            rows = db.execute(
                "SELECT d.job_id, d.destination, d.kind FROM deliveries d JOIN outputs o ON o.job_id = d.job_id"
                " AND o.kind = d.kind WHERE d.state IN ('pending', 'failed') AND o.created_at < ?",
                (cutoff,),
            ).fetchall()
            for job_id, destination, kind in rows:
                db.execute(
                    "UPDATE deliveries SET state = 'dead', last_error = COALESCE(last_error, '') || ' (gave up:"
                    " older than the delivery age limit)', updated_at = ? WHERE job_id = ? AND destination = ?"
                    " AND kind = ?",
                    (time.time(), job_id, destination, kind),
                )
            for job_id in {row[0] for row in rows}:
                self._settle(db, job_id)
            return len(rows)

    def resend(self, job_id: int | None = None, dead: bool = False) -> list[int]:
        """Re-queue deliveries: of one job, or of every dead job; return the job ids. A dead job with outputs
        goes back to written with fresh deliveries; one without outputs goes back to queued."""
        with self._transaction() as db:
            if job_id is not None:
                ids = [job_id]
            else:
                ids = (
                    [row[0] for row in db.execute("SELECT id FROM jobs WHERE state = 'dead' ORDER BY id")]
                    if dead
                    else []
                )
            done = []
            for one in ids:
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (one,)).fetchone()
                if row is None or row[0] not in ("dead", "written"):
                    found = "does not exist" if row is None else f"is {row[0]}"
                    raise ValueError(f"job {one} {found}; only dead or written jobs can be re-sent")
                has_outputs = db.execute("SELECT 1 FROM outputs WHERE job_id = ?", (one,)).fetchone() is not None
                db.execute(
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ?"
                    " WHERE job_id = ?",
                    (time.time(), one),
                )
                if row[0] == "dead":
                    target = JobState.WRITTEN if has_outputs else JobState.QUEUED
                    self._move(db, one, target, "re-queued by an operator")
                done.append(one)
            return done

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """Deliveries by (destination, state)."""
        with self._read() as db:
            rows = db.execute("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state")
            return {(d, s): n for d, s, n in rows.fetchall()}

    def oldest_open_age(self, now: float) -> float:
        """Seconds since the oldest job still waiting (queued, running, inferred or written) was received."""
        with self._read() as db:
            row = db.execute(
                "SELECT MIN(received_at) FROM jobs WHERE state IN ('queued', 'running', 'inferred', 'written')"
            ).fetchone()
        return 0.0 if row[0] is None else max(0.0, now - row[0])

    def save_destination(self, state: DestinationState) -> None:
        """Record a destination's probe result and backoff."""
        with self._transaction() as db:
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
        with self._read() as db:
            rows = db.execute(
                "SELECT name, reachable, accepted, refused, error, probed_at, down_since, retry_at,"
                " failures FROM destinations"
            ).fetchall()
        return {
            r[0]: DestinationState(r[0], bool(r[1]), json.loads(r[2]), json.loads(r[3]), r[4], r[5], r[6], r[7], r[8])
            for r in rows
        }

    def delete_jobs(self, job_ids: list[int]) -> int:
        """Delete jobs and everything recorded about them; return how many jobs were deleted."""
        with self._transaction() as db:
            for table in ("job_events", "results", "outputs", "deliveries"):
                db.executemany(f"DELETE FROM {table} WHERE job_id = ?", [(i,) for i in job_ids])
            return sum(db.execute("DELETE FROM jobs WHERE id = ?", (i,)).rowcount for i in job_ids)

    def finished_before(self, cutoff: float, states: tuple[str, ...]) -> list[int]:
        """Ids of jobs in ``states`` last updated before ``cutoff``."""
        marks = ", ".join("?" * len(states))
        with self._read() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE state IN ({marks}) AND updated_at < ? ORDER BY id", (*states, cutoff)
            ).fetchall()
        return [row[0] for row in rows]

    def study_jobs(self, study_instance_uid: str) -> list[int]:
        """Ids of every job of one study."""
        with self._read() as db:
            rows = db.execute("SELECT id FROM jobs WHERE study_instance_uid = ?", (study_instance_uid,)).fetchall()
        return [row[0] for row in rows]

    def iter_reasons(self, state: JobState) -> Iterator[tuple[str, int]]:
        """Jobs in ``state`` counted by reason (for skipped-by-reason metrics)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT COALESCE(reason, ''), COUNT(*) FROM jobs WHERE state = ? GROUP BY reason", (state.value,)
            ).fetchall()
        yield from rows
