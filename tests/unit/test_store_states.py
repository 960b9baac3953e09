"""The SQLite store's state machines (jobs and deliveries), send order, and its schema migration."""

from __future__ import annotations

import itertools
import re
import sqlite3
import threading
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
from tests.postgres import PostgresServer
from tests.stores import BACKENDS, AnyStore, Backend, backend
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


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    """A fresh jobs store on each backend."""
    db = backend(request, tmp_path).open()
    yield db
    db.close()


def written_job(store: AnyStore, uid: str, kinds: list[str], destinations: tuple[str, ...] = ("pacs",)) -> int:
    """Take a new job through claim, result and outputs of ``kinds`` to written; return its id."""
    job, _ = store.jobs.record(new_job(uid), JobState.QUEUED)
    store.jobs.claim(1, HOLDER, 60)
    store.results.save_result(job.id, NOT_ANALYSED, None)
    store.results.save_outputs(job.id, [output(kind) for kind in kinds], destinations)
    return job.id


def delivery_rows(store: AnyStore, job_id: int) -> dict[str, tuple[str, int, int | None]]:
    """Return a job's deliveries to ``pacs`` by kind: (state, attempts, last status)."""
    with store.db.read() as db:
        rows = db.execute(
            "SELECT kind, state, attempts, last_status FROM deliveries WHERE job_id = ? AND destination = 'pacs'",
            (job_id,),
        ).fetchall()
    return {kind: (state, attempts, status) for kind, state, attempts, status in rows}


# --- job states -------------------------------------------------------------------------------------


def test_claim_counts_an_attempt_and_records_the_event(store: AnyStore) -> None:
    """Claiming a queued job moves it to running, adds one attempt and appends a queued→running event."""
    job, _ = store.jobs.record(new_job("1.1"), JobState.QUEUED)
    assert job.attempts == 0
    [claimed] = store.jobs.claim(5, HOLDER, 60)
    assert (claimed.id, claimed.state, claimed.attempts) == (job.id, JobState.RUNNING, 1)
    assert store.jobs.history(job.id)[-1] == ("queued", "running", None)


def test_requeue_running_records_the_reason(store: AnyStore) -> None:
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


def test_release_with_no_gone_holder_takes_back_only_expired_leases(store: AnyStore) -> None:
    """No holder known dead (another host's cannot be known): only jobs whose lease ran out go back."""
    for i in range(2):
        store.jobs.record(new_job(f"1.3.{i}"), JobState.QUEUED)
    short, long_ = Holder("worker", "host-a", 1, 1), Holder("worker", "host-b", 2, 1)
    [expiring] = store.jobs.claim(1, short, 0.01)
    store.jobs.claim(1, long_, 600)
    time.sleep(0.05)
    moved = store.jobs.release([], time.time(), 3, "its worker stopped while it ran")
    assert [job.id for job in moved] == [expiring.id]
    assert store.jobs.held() == {long_.id: (1, pytest.approx(time.time() + 600, abs=30))}


def test_every_state_change_is_an_event_row(store: AnyStore) -> None:
    """A job's history from received to delivered is one unbroken chain of events ending at its state."""
    job_id = written_job(store, "1.3", ["sr"])
    assert store.deliveries.record(job_id, "pacs", "sr", DeliveryState.DELIVERED, 0, None) is JobState.DELIVERED
    history = store.jobs.history(job_id)
    assert [to for _, to, _ in history] == ["received", "queued", "running", "inferred", "written", "delivered"]
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(history))
    job = store.jobs.get(job_id)
    assert job is not None and job.state is JobState.DELIVERED


# --- delivery states --------------------------------------------------------------------------------


def test_delivery_move_the_machine_forbids_raises_and_changes_nothing(store: AnyStore) -> None:
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


def test_delivery_of_an_unknown_output_raises(store: AnyStore) -> None:
    """Recording a delivery that does not exist raises InvalidTransition."""
    job_id = written_job(store, "2.2", ["sr"])
    with pytest.raises(InvalidTransition):
        store.deliveries.record(job_id, "elsewhere", "sr", DeliveryState.DELIVERED, 0, None)


def test_resend_returns_finished_deliveries_and_a_dead_job(store: AnyStore) -> None:
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


def test_resend_refuses_a_job_still_in_flight(store: AnyStore) -> None:
    """Only dead or written jobs can be re-sent; a queued one is a ValueError naming its state."""
    job, _ = store.jobs.record(new_job("2.4"), JobState.QUEUED)
    with pytest.raises(ValueError, match=f"job {job.id} is queued; only dead or written jobs can be re-sent"):
        store.deliveries.resend(job.id)


# --- send order -------------------------------------------------------------------------------------


@pytest.mark.parametrize("inserted", [["pr", "seg", "sc", "sr"], ["sc", "pr", "sr", "seg"]])
def test_outputs_and_due_follow_send_order(store: AnyStore, inserted: list[str]) -> None:
    """Outputs come back, and are due, in send order whatever order they were recorded in."""
    job_id = written_job(store, "3.1", inserted)
    assert [o.kind for o in store.results.outputs(job_id)] == ["sr", "sc", "seg", "pr"]
    assert [o.send_order for o in store.results.outputs(job_id)] == [0, 1, 2, 3]
    assert [due.kind for due in store.deliveries.due("pacs", now=1e12, max_jobs=10)] == ["sr", "sc", "seg", "pr"]


# --- many senders, many workers (scale-out) --------------------------------------------------------

SENDER_A, SENDER_B = Holder("sender", "host-a", 10, 1), Holder("sender", "host-b", 20, 1)


def test_senders_claim_disjoint_jobs_and_take_over_an_expired_lease(store: AnyStore) -> None:
    """Two senders share one destination's work: each claims whole jobs the other does not hold; when one stops
    renewing (its host died mid-delivery), the other takes its jobs once the lease has passed; an outcome frees
    the delivery it records."""
    ids = [written_job(store, f"6.{i}", ["sr", "sc"]) for i in range(4)]
    now = time.time()
    first = store.deliveries.due("pacs", now, 2, SENDER_A, 60)
    second = store.deliveries.due("pacs", now, 10, SENDER_B, 60)
    assert [(d.job_id, d.kind) for d in first] == [(ids[0], "sr"), (ids[0], "sc"), (ids[1], "sr"), (ids[1], "sc")]
    assert {d.job_id for d in second} == {ids[2], ids[3]}
    assert store.deliveries.due("pacs", now, 10, SENDER_B, 60) == second  # its own claim is still its own
    assert store.deliveries.due("pacs", now + 61, 1, SENDER_B, 60)[0].job_id == ids[0]  # A's lease ran out
    store.deliveries.record(ids[2], "pacs", "sr", DeliveryState.DELIVERED, 0, None)
    rows = delivery_rows(store, ids[2])
    assert rows["sr"][0] == "delivered" and rows["sc"][0] == "pending"


def test_an_inferred_job_stays_with_its_writer_until_it_is_gone(store: AnyStore) -> None:
    """A job inferred by worker A is A's to write: worker B finds nothing to finish until A's lease runs out or A
    is known gone; then B takes it."""
    worker_a, worker_b = Holder("worker", "host-a", 1, 1), Holder("worker", "host-b", 2, 1)
    job, _ = store.jobs.record(new_job("6.8"), JobState.QUEUED)
    store.jobs.claim(1, worker_a, 600)
    inferred = store.results.save_result(job.id, NOT_ANALYSED, None)
    assert (inferred.state, inferred.holder) == (JobState.INFERRED, worker_a.id)
    assert store.jobs.renew(worker_a, 600) == 1  # its lease is renewed while it writes
    assert store.jobs.claim_inferred(10, worker_b, 60) == []
    store.jobs.release([worker_a.id], time.time(), 3, "its worker stopped while it ran")
    [taken] = store.jobs.claim_inferred(10, worker_b, 60)
    assert (taken.id, taken.state, taken.holder) == (job.id, JobState.INFERRED, worker_b.id)
    store.results.save_outputs(job.id, [output("sr")], ("pacs",))
    assert store.jobs.get(job.id).holder is None
    assert store.jobs.throughput(0.0) == {worker_a.id: 1}


def test_deliveries_of_a_gone_sender_are_freed_at_once(store: AnyStore) -> None:
    """A sender restarting on the same host frees what its dead predecessor held, without waiting the lease."""
    job_id = written_job(store, "6.9", ["sr"])
    store.jobs.renew(SENDER_A, 60)
    assert store.deliveries.due("pacs", time.time(), 10, SENDER_A, 600)
    assert store.deliveries.due("pacs", time.time(), 10, SENDER_B, 600) == []
    assert store.deliveries.release([SENDER_A.id]) == 1
    assert [d.job_id for d in store.deliveries.due("pacs", time.time(), 10, SENDER_B, 600)] == [job_id]
    assert SENDER_A.id not in {h.id for h in store.jobs.holders()}


def test_a_sender_on_a_long_round_keeps_its_claim(store: AnyStore) -> None:
    """Renewing extends the claim on what is still open: another sender does not take it after the first lease."""
    job_id = written_job(store, "6.6", ["sr", "sc"])
    now = time.time()
    assert store.deliveries.due("pacs", now, 10, SENDER_A, 1)
    assert store.deliveries.renew(SENDER_A, 600) == 2
    assert store.deliveries.due("pacs", now + 5, 10, SENDER_B, 60) == []
    store.deliveries.record(job_id, "pacs", "sr", DeliveryState.DELIVERED, 0, None)
    assert store.deliveries.renew(SENDER_A, 600) == 1  # what it recorded is no longer its


def test_two_senders_finishing_one_job_together_deliver_it(store: AnyStore) -> None:
    """The last two deliveries of a job recorded at the same moment from two threads: the job ends delivered."""
    for round_ in range(5):
        job_id = written_job(store, f"6.5.{round_}", ["sr", "sc"])
        barrier = threading.Barrier(2)

        def deliver(kind: str, job_id: int = job_id, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(5)
            store.deliveries.record(job_id, "pacs", kind, DeliveryState.DELIVERED, 0, None)

        threads = [threading.Thread(target=deliver, args=(kind,)) for kind in ("sr", "sc")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert store.jobs.get(job_id).state is JobState.DELIVERED


def test_many_workers_claim_every_job_exactly_once(store: AnyStore) -> None:
    """Eight claimers at once (threads on one store's pool; SKIP LOCKED on PostgreSQL): every job is claimed
    once, none twice, none left queued."""
    for i in range(80):
        store.jobs.record(new_job(f"6.7.{i}"), JobState.QUEUED)
    claimed: list[list[int]] = [[] for _ in range(8)]

    def work(n: int) -> None:
        holder = Holder("worker", f"host-{n}", n, 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = store.jobs.claim(3, holder, 60)
            if not jobs:
                return
            claimed[n] += [job.id for job in jobs]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    every = [job_id for ids in claimed for job_id in ids]
    assert len(every) == len(set(every)) == 80
    assert store.jobs.counts()[JobState.QUEUED] == 0


def test_many_senders_send_every_output_exactly_once(store: AnyStore) -> None:
    """Eight senders claiming and recording at once on one destination: each output is claimed and recorded by
    one sender only, nothing deadlocks, and every job ends delivered."""
    ids = [written_job(store, f"6.9.{i}", ["sr", "sc"]) for i in range(40)]
    sent: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def send(n: int) -> None:
        holder = Holder("sender", f"host-{n}", n, 1)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                due = store.deliveries.due("pacs", time.time(), 1, holder, 60)
                if not due:
                    return
                for item in due:
                    store.deliveries.record(item.job_id, "pacs", item.kind, DeliveryState.DELIVERED, 0, None)
                    sent.append((item.job_id, item.kind))
        except BaseException as exc:  # a double claim shows as InvalidTransition, a deadlock as StorageError
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert errors == []
    assert sorted(sent) == sorted((job_id, kind) for job_id in ids for kind in ("sr", "sc"))
    assert store.jobs.counts()[JobState.DELIVERED] == 40


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
    """A version-3 database opens at the current version, its outputs sent SR, SC, SEG, then GSPS as before, and
    recorded as written live (as every output was before go-live modes)."""
    path = tmp_path / spool.DB_NAME
    write_v3_database(path)
    store = SqliteStore(path)
    try:
        assert user_version(path) == SCHEMA_VERSION == 7
        assert {o.mode for o in store.results.outputs(1)} == {"live"}  # written before go-live modes: live
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


def test_a_claim_never_waits_for_a_delivery_row_another_sender_holds(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    """A sender that has locked one output of a job (mid-claim, on another host) costs the others that job only:
    they claim the next whole job at once instead of waiting for its lock. Waiting was how two senders that had
    each locked part of one job deadlocked (PostgreSQL's "deadlock detected", seen under load)."""
    import psycopg

    db = Backend("postgresql", tmp_path / spool.DB_NAME, postgres_url, postgres_server.password)
    store = db.open()
    try:
        first, second = (written_job(store, f"8.9.{i}", ["sr", "sc", "seg", "pr"]) for i in range(2))
        with psycopg.connect(db.url, password=db.password, autocommit=False) as other:
            other.execute(
                "SELECT job_id FROM deliveries WHERE job_id = %s AND kind = 'sc' FOR UPDATE", (first,)
            ).fetchall()
            found: list[list[tuple[int, str]]] = []
            claim = threading.Thread(
                target=lambda: found.append(
                    [(d.job_id, d.kind) for d in store.deliveries.due("pacs", time.time(), 1, HOLDER, 60)]
                )
            )
            claim.start()
            claim.join(10)
            waited = claim.is_alive()
            other.rollback()
            claim.join(10)
        assert not waited, "the claim waited for a row lock another sender holds"
        assert found == [[(second, kind) for kind in ("sr", "sc", "seg", "pr")]]
        assert {kind: row[0] for kind, row in delivery_rows(store, first).items()} == dict.fromkeys(
            ("sr", "sc", "seg", "pr"), DeliveryState.PENDING.value
        )
    finally:
        store.close()
