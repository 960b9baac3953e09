"""Leases in the store: claims under a holder, renewals, taking jobs back from gone holders, the attempt limit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cxr_node.jobs import spool
from cxr_node.jobs.leases import Holder, is_dead, recover_jobs, this_process
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from tests.unit.test_jobs import new_job

GONE = Holder("worker", "other-host", 4242, 1)


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    """A fresh store with five queued jobs."""
    db = SqliteStore(tmp_path / spool.DB_NAME)
    for i in range(5):
        db.jobs.record(new_job(f"7.{i}"), JobState.QUEUED)
    yield db
    db.close()


def test_claims_carry_the_holder_and_a_lease(store: SqliteStore) -> None:
    """A claimed job names its holder and a lease that renew() extends."""
    me = this_process("worker")
    [job] = store.jobs.claim(1, me, 30)
    assert job.holder == me.id and job.lease_until is not None and job.lease_until > time.time() + 25
    assert store.jobs.renew(me, 300) == 1
    renewed = store.jobs.get(job.id)
    assert renewed is not None and renewed.lease_until is not None and renewed.lease_until > time.time() + 250
    assert [h.id for h in store.jobs.holders()] == [me.id]


def test_a_retried_job_is_claimed_alone_and_never_fills_a_batch(store: SqliteStore) -> None:
    """After a job came back from a dead holder, it is claimed by itself, and batch filling skips it."""
    store.jobs.claim(5, GONE, 30)
    store.jobs.release([GONE.id], time.time(), 3, "its worker stopped while it ran")
    me = this_process("worker")
    assert [job.sop_instance_uid for job in store.jobs.claim(5, me, 30)] == ["7.0"]
    assert store.jobs.claim(5, me, 30, retries=False) == []


def test_expired_leases_come_back_and_the_last_attempt_ends_dead(store: SqliteStore) -> None:
    """A lease that ran out is taken back (from any host); a job out of attempts ends dead with the reason."""
    store.jobs.claim(2, GONE, 0.01)
    time.sleep(0.05)
    moved = store.jobs.release([], time.time(), 3, "lease ran out")
    assert {job.state for job in moved} == {JobState.QUEUED} and len(moved) == 2
    for _ in range(2):
        store.jobs.claim(1, GONE, 0.01)
        time.sleep(0.05)
        store.jobs.release([], time.time(), 3, "lease ran out")
    first = store.jobs.get(moved[0].id)
    assert first is not None and first.state is JobState.DEAD and first.attempts == 3
    assert first.reason == "gave up after 3 attempts: lease ran out"


def test_recovery_takes_back_only_dead_local_holders(store: SqliteStore) -> None:
    """recover_jobs() releases the jobs of a holder whose process is gone, never those of a live one."""
    me = this_process("worker")
    dead = Holder("worker", me.host, me.pid, me.started + 1)  # this pid, but another process: it is gone
    assert is_dead(dead) and not is_dead(me) and not is_dead(GONE)
    store.jobs.claim(1, me, 60)
    store.jobs.claim(1, dead, 60)
    moved = recover_jobs(store.jobs, "worker", 3, time.time())
    assert [job.sop_instance_uid for job in moved] == ["7.1"]
    assert store.jobs.counts()[JobState.RUNNING] == 1
