"""The SQLite store's state machines (jobs and deliveries), send order, and its schema migration."""

from __future__ import annotations

import itertools
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Final

import pytest

from cxr_node.errors import InvalidTransition, StorageError
from cxr_node.jobs import spool
from cxr_node.jobs.leases import Holder
from cxr_node.jobs.records import NewJob, Output
from cxr_node.jobs.sqlite import SCHEMA_VERSION, SqliteStore
from cxr_node.jobs.states import DeliveryState, JobState
from cxr_node.results.findings import Findings, Provenance, Summary
from tests.unit.test_jobs import new_job

PROVENANCE: Final = Provenance("demo", "1", "demo only", ("m",), "0.1.0", "2.25.1")
NOT_ANALYSED: Final = Findings(PROVENANCE, Summary("demo", "1", False, (64, 64), reason="pixels cannot be decoded"))
SEND_ORDER: Final = {"sr": 0, "sc": 1, "seg": 2, "pr": 3}
"""Kinds and their send order; alphabetical order (pr, sc, seg, sr) is different on purpose."""

V3_SCHEMA: Final = """
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
"""The schema of version 3 (``git show HEAD~3:cxr_node/jobs/store.py`` and ``deliveries.py``): no send_order."""


HOLDER = Holder("worker", "test-host", 1, 1)




def output(kind: str) -> Output:
    """Return the Output of ``kind`` with its send order from :data:`SEND_ORDER`."""
    order = SEND_ORDER[kind]
    return Output(kind, "1.2.840.10008.5.1.4.1.1.88.22", f"2.25.{order}", f"outbox/{kind}.dcm", 100, order)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A fresh jobs store in a temporary folder."""
    db = SqliteStore(tmp_path / spool.DB_NAME)
    yield db
    db.close()


def written_job(store: SqliteStore, uid: str, kinds: list[str], destinations: tuple[str, ...] = ("pacs",)) -> int:
    """Take a new job through claim, result and outputs of ``kinds`` to written; return its id."""
    job, _ = store.jobs.record(new_job(uid), JobState.QUEUED)
    store.jobs.claim(1, HOLDER, 60)
    store.results.save_result(job.id, NOT_ANALYSED, None)
    store.results.save_outputs(job.id, [output(kind) for kind in kinds], destinations)
    return job.id


def delivery_rows(store: SqliteStore, job_id: int) -> dict[str, tuple[str, int, int | None]]:
    """Return a job's deliveries to ``pacs`` by kind: (state, attempts, last status)."""
    with store.db.read() as db:
        rows = db.execute(
            "SELECT kind, state, attempts, last_status FROM deliveries WHERE job_id = ? AND destination = 'pacs'",
            (job_id,),
        ).fetchall()
    return {kind: (state, attempts, status) for kind, state, attempts, status in rows}


# --- job states -------------------------------------------------------------------------------------


def test_claim_counts_an_attempt_and_records_the_event(store: SqliteStore) -> None:
    """Claiming a queued job moves it to running, adds one attempt and appends a queued→running event."""
    job, _ = store.jobs.record(new_job("1.1"), JobState.QUEUED)
    assert job.attempts == 0
    [claimed] = store.jobs.claim(5, HOLDER, 60)
    assert (claimed.id, claimed.state, claimed.attempts) == (job.id, JobState.RUNNING, 1)
    assert store.jobs.history(job.id)[-1] == ("queued", "running", None)


def test_requeue_running_records_the_reason(store: SqliteStore) -> None:
    """Re-queueing running jobs appends a running→queued event with the reason, and the next claim counts again."""
    job, _ = store.jobs.record(new_job("1.2"), JobState.QUEUED)
    store.jobs.claim(1, HOLDER, 60)
    assert len(store.jobs.release(None, time.time(), 3, "re-queued at start-up")) == 1
    assert store.jobs.history(job.id)[-2:] == [
        ("queued", "running", None),
        ("running", "queued", "re-queued at start-up"),
    ]
    queued = store.jobs.get(job.id)
    assert queued is not None and (queued.state, queued.reason, queued.attempts) == (
        JobState.QUEUED,
        "re-queued at start-up",
        1,
    )
    assert store.jobs.claim(1, HOLDER, 60)[0].attempts == 2


def test_every_state_change_is_an_event_row(store: SqliteStore) -> None:
    """A job's history from received to delivered is one unbroken chain of events ending at its state."""
    job_id = written_job(store, "1.3", ["sr"])
    assert store.deliveries.record(job_id, "pacs", "sr", DeliveryState.DELIVERED, 0, None) is JobState.DELIVERED
    history = store.jobs.history(job_id)
    assert [to for _, to, _ in history] == ["received", "queued", "running", "inferred", "written", "delivered"]
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(history))
    job = store.jobs.get(job_id)
    assert job is not None and job.state is JobState.DELIVERED


# --- delivery states --------------------------------------------------------------------------------


def test_delivery_move_the_machine_forbids_raises_and_changes_nothing(store: SqliteStore) -> None:
    """After a delivery is delivered, recording it failed raises InvalidTransition and leaves row and job alone."""
    job_id = written_job(store, "2.1", ["sr", "sc"])
    assert store.deliveries.record(job_id, "pacs", "sr", DeliveryState.DELIVERED, 0, None) is None
    before = (delivery_rows(store, job_id), store.jobs.history(job_id))
    with pytest.raises(InvalidTransition, match=f"delivery of job {job_id} sr to pacs cannot become failed"):
        store.deliveries.record(job_id, "pacs", "sr", DeliveryState.FAILED, 0xA700, "out of resources")
    assert (delivery_rows(store, job_id), store.jobs.history(job_id)) == before
    assert delivery_rows(store, job_id)["sr"] == ("delivered", 1, 0)
    job = store.jobs.get(job_id)
    assert job is not None and job.state is JobState.WRITTEN
    assert [due.kind for due in store.deliveries.due("pacs", now=1e12, max_jobs=10)] == ["sc"]


def test_delivery_of_an_unknown_output_raises(store: SqliteStore) -> None:
    """Recording a delivery that does not exist raises InvalidTransition."""
    job_id = written_job(store, "2.2", ["sr"])
    with pytest.raises(InvalidTransition):
        store.deliveries.record(job_id, "elsewhere", "sr", DeliveryState.DELIVERED, 0, None)


def test_resend_returns_finished_deliveries_and_a_dead_job(store: SqliteStore) -> None:
    """resend() makes delivered, refused and dead deliveries pending with no attempts, and the dead job written."""
    job_id = written_job(store, "2.3", ["sr", "sc", "seg"])
    store.deliveries.record(job_id, "pacs", "sr", DeliveryState.DELIVERED, 0, None)
    store.deliveries.record(job_id, "pacs", "sc", DeliveryState.REFUSED, 0x0122, "SOP class not supported")
    assert store.deliveries.record(job_id, "pacs", "seg", DeliveryState.DEAD, 0xA700, "full") is JobState.DEAD
    assert {state for state, _, _ in delivery_rows(store, job_id).values()} == {"delivered", "refused", "dead"}
    assert store.deliveries.resend(dead=True) == [job_id]
    assert {kind: row[:2] for kind, row in delivery_rows(store, job_id).items()} == {
        "sr": ("pending", 0),
        "sc": ("pending", 0),
        "seg": ("pending", 0),
    }
    job = store.jobs.get(job_id)
    assert job is not None and job.state is JobState.WRITTEN
    assert store.jobs.history(job_id)[-1] == ("dead", "written", "re-queued by an operator")
    assert [due.kind for due in store.deliveries.due("pacs", now=1e12, max_jobs=10)] == ["sr", "sc", "seg"]


def test_resend_refuses_a_job_still_in_flight(store: SqliteStore) -> None:
    """Only dead or written jobs can be re-sent; a queued one is a ValueError naming its state."""
    job, _ = store.jobs.record(new_job("2.4"), JobState.QUEUED)
    with pytest.raises(ValueError, match=f"job {job.id} is queued; only dead or written jobs can be re-sent"):
        store.deliveries.resend(job.id)


# --- send order -------------------------------------------------------------------------------------


@pytest.mark.parametrize("inserted", [["pr", "seg", "sc", "sr"], ["sc", "pr", "sr", "seg"]])
def test_outputs_and_due_follow_send_order(store: SqliteStore, inserted: list[str]) -> None:
    """Outputs come back, and are due, in send order whatever order they were recorded in."""
    job_id = written_job(store, "3.1", inserted)
    assert [o.kind for o in store.results.outputs(job_id)] == ["sr", "sc", "seg", "pr"]
    assert [o.send_order for o in store.results.outputs(job_id)] == [0, 1, 2, 3]
    assert [due.kind for due in store.deliveries.due("pacs", now=1e12, max_jobs=10)] == ["sr", "sc", "seg", "pr"]


# --- migration --------------------------------------------------------------------------------------


def write_v3_database(path: Path) -> None:
    """Write a version-3 database by hand: one written job with outputs pr, seg, sc, sr and their deliveries."""
    db = sqlite3.connect(path)
    try:
        db.executescript(V3_SCHEMA)
        job = new_job("9.1")
        db.execute(
            "INSERT INTO jobs (id, instance_key, sop_instance_uid, sop_class_uid, study_instance_uid,"
            " series_instance_uid, accession_number, patient_hash, modality, transfer_syntax, calling_aet, peer,"
            " path, size_bytes, state, reason, attempts, received_at, updated_at)"
            " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'written', NULL, 1, 1.0, 2.0)",
            tuple(getattr(job, f.name) for f in fields(NewJob)),
        )
        for kind in ("pr", "seg", "sc", "sr"):
            db.execute(
                "INSERT INTO outputs VALUES (1, ?, '1.2.840.10008.5.1.4.1.1.7', ?, ?, 100, 2.0)",
                (kind, f"2.25.{len(kind)}{kind.encode().hex()}", f"outbox/{kind}.dcm"),
            )
            db.execute(
                "INSERT INTO deliveries (job_id, destination, kind, state, next_attempt_at, updated_at)"
                " VALUES (1, 'pacs', ?, 'pending', 0, 2.0)",
                (kind,),
            )
        db.execute("PRAGMA user_version = 3")
        db.commit()
    finally:
        db.close()


def user_version(path: Path) -> int:
    """Return the database's PRAGMA user_version."""
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_version_3_database_is_migrated_with_the_old_send_order(tmp_path: Path) -> None:
    """A version-3 database opens at the current version, its outputs sent SR, SC, SEG, then GSPS as before."""
    path = tmp_path / spool.DB_NAME
    write_v3_database(path)
    store = SqliteStore(path)
    try:
        assert user_version(path) == SCHEMA_VERSION == 5
        assert [(o.kind, o.send_order) for o in store.results.outputs(1)] == [
            ("sr", 0),
            ("sc", 1),
            ("seg", 2),
            ("pr", 3),
        ]
        assert [due.kind for due in store.deliveries.due("pacs", now=1e12, max_jobs=10)] == ["sr", "sc", "seg", "pr"]
        job = store.jobs.get(1)
        assert job is not None and (job.state, job.attempts) == (JobState.WRITTEN, 1)
    finally:
        store.close()
    reopened = SqliteStore(path)
    try:
        assert [o.kind for o in reopened.results.outputs(1)] == ["sr", "sc", "seg", "pr"]
    finally:
        reopened.close()


def test_database_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database written by a newer cxr-node (user_version 99) is refused with a StorageError naming the path."""
    path = tmp_path / spool.DB_NAME
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StorageError, match=re.escape(f"{path}: jobs database schema 99 is newer than this cxr-node")):
        SqliteStore(path)
    assert user_version(path) == 99
