"""The jobs store and spool: durable files, the state machine, concurrency and recovery."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr_node.errors import InvalidTransition
from cxr_node.jobs import spool
from cxr_node.jobs.leases import Holder
from cxr_node.jobs.records import NewJob
from cxr_node.jobs.states import TERMINAL, JobState, can_move
from cxr_node.results.findings import Findings, Provenance, Summary
from tests.stores import BACKENDS, AnyStore, Backend, backend

HOLDER = Holder("worker", "test-host", 1, 1)


def new_job(uid: str, path: str | None = "inbox/x.dcm") -> NewJob:
    """Return a NewJob for SOP Instance UID ``uid``."""
    return NewJob(
        instance_key=spool.instance_key(uid),
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        accession_number="A1",
        patient_hash="ab" * 8,
        modality="CR",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_aet="PACS",
        peer="127.0.0.1:1",
        path=path,
        size_bytes=10,
    )


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh database of each backend."""
    return backend(request, tmp_path)


@pytest.fixture
def store(database: Backend) -> Iterator[AnyStore]:
    """A fresh jobs store on each backend."""
    db = database.open()
    yield db
    db.close()


def test_record_commits_received_and_verdict(store: AnyStore) -> None:
    """A new job is recorded with its received event and its triage verdict."""
    job, created = store.jobs.record(new_job("1.2.3.4.5"), JobState.QUEUED)
    assert created
    assert job.state is JobState.QUEUED
    assert store.jobs.history(job.id) == [(None, "received", None), ("received", "queued", None)]


def test_duplicate_instance_is_not_recorded_twice(store: AnyStore) -> None:
    """The same SOP Instance UID received twice keeps one job."""
    first, _ = store.jobs.record(new_job("1.2.3.4.5"), JobState.QUEUED)
    again, created = store.jobs.record(new_job("1.2.3.4.5"), JobState.QUEUED)
    assert (again.id, created) == (first.id, False)
    assert store.jobs.counts()[JobState.QUEUED] == 1


def test_transitions_follow_the_state_machine(store: AnyStore) -> None:
    """Allowed moves are recorded one by one; a move the machine forbids raises and changes nothing."""
    job, _ = store.jobs.record(new_job("9.9"), JobState.QUEUED)
    assert store.jobs.claim(5, HOLDER, 60)[0].state is JobState.RUNNING
    store.jobs.transition(job.id, JobState.INFERRED)
    with pytest.raises(InvalidTransition, match="inferred, which does not lead to delivered"):
        store.jobs.transition(job.id, JobState.DELIVERED)
    assert store.jobs.get(job.id).state is JobState.INFERRED
    assert store.jobs.get(job.id).attempts == 1


def test_terminal_states_lead_nowhere() -> None:
    """Delivered and skipped are final; quarantined and dead can be re-queued by an operator."""
    assert JobState.DELIVERED in TERMINAL and JobState.SKIPPED in TERMINAL
    assert can_move(JobState.QUARANTINED, JobState.QUEUED)
    assert can_move(JobState.DEAD, JobState.QUEUED)
    assert not can_move(JobState.DELIVERED, JobState.QUEUED)


def test_claim_is_oldest_first_and_exclusive(database: Backend) -> None:
    """Two stores on one database (two processes) never claim the same job."""
    a, b = database.open(), database.open()
    for i in range(10):
        a.jobs.record(new_job(f"1.{i}"), JobState.QUEUED)
    first, second = a.jobs.claim(4, HOLDER, 60), b.jobs.claim(10, HOLDER, 60)
    assert [j.sop_instance_uid for j in first] == ["1.0", "1.1", "1.2", "1.3"]
    assert {j.id for j in first}.isdisjoint({j.id for j in second})
    assert len(second) == 6
    a.close()
    b.close()


def test_requeue_running_after_crash(store: AnyStore) -> None:
    """Jobs left running by a crash go back to queued with a reason."""
    for i in range(3):
        store.jobs.record(new_job(f"2.{i}"), JobState.QUEUED)
    store.jobs.claim(2, HOLDER, 60)
    assert len(store.jobs.release(None, time.time(), 3, "re-queued at start-up")) == 2
    assert store.jobs.counts()[JobState.QUEUED] == 3


def test_concurrent_records_from_threads(store: AnyStore) -> None:
    """Many threads recording at once lose nothing and duplicate nothing."""

    def worker(t: int) -> None:
        for i in range(25):
            store.jobs.record(new_job(f"3.{t}.{i}"), JobState.QUEUED)
            store.jobs.record(new_job(f"3.{t}.{i}"), JobState.QUEUED)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert store.jobs.counts()[JobState.QUEUED] == 100


def test_readonly_store_reads(database: Backend) -> None:
    """`cxr-node status` reads through a read-only connection."""
    rw = database.open()
    rw.jobs.record(new_job("4.1"), JobState.SKIPPED, "modality OT")
    ro = database.open(readonly=True)
    assert ro.jobs.counts()[JobState.SKIPPED] == 1
    rw.close()
    ro.close()


def test_instance_key_hides_hostile_uids(tmp_path: Path) -> None:
    """A UID made of path characters still names a file inside the spool area."""
    key = spool.instance_key("../../etc/passwd")
    rel = spool.relative_path(spool.INBOX, key)
    assert rel.parts[0] == "inbox" and ".." not in rel.parts and len(rel.name) == 68
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        spool.relative_path(spool.INBOX, "../../etc/passwd")


def test_write_durably_is_atomic_and_cleans_up(tmp_path: Path) -> None:
    """write_durably leaves the full file or nothing, and remove_partials sweeps crash leftovers."""
    target = tmp_path / "inbox" / "ab" / "x.dcm"
    spool.write_durably(target, b"abc")
    spool.write_durably(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]
    (target.parent / f".y.dcm.123{spool.TMP_SUFFIX}").write_bytes(b"partial")
    assert spool.remove_partials(tmp_path) == 1
    assert spool.iter_spooled(tmp_path, spool.INBOX) == [target]


PROVENANCE = Provenance("demo", "1", "demo only", ("m",), "0.1.0", "2.25.1")
NOT_ANALYSED = Findings(PROVENANCE, Summary("demo", "1", False, (64, 64), reason="pixels cannot be decoded"))


def test_result_and_transition_are_one_write(store: AnyStore) -> None:
    """Saving a result moves the job to inferred; a job that is not running keeps no result."""
    job, _ = store.jobs.record(new_job("5.1"), JobState.QUEUED)
    with pytest.raises(InvalidTransition):
        store.results.save_result(job.id, NOT_ANALYSED, None)
    assert store.results.result(job.id) is None
    store.jobs.claim(1, HOLDER, 60)
    moved = store.results.save_result(job.id, NOT_ANALYSED, b"\x00" * 8)
    assert moved.state is JobState.INFERRED
    saved = store.results.result(job.id)
    assert saved is not None
    assert (saved.summary, saved.embedding, saved.arrays) == (NOT_ANALYSED.summary, b"\x00" * 8, None)
