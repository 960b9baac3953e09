"""Wake-up calls: a commit that queues a job or writes outputs wakes the waiting consumer at once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from cxr_node.jobs.leases import Holder
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from cxr_node.jobs.wakeup import SLOTS, Wakeup
from tests.unit.test_jobs import new_job

HOLDER = Holder("worker", "test-host", 1, 1)


def test_notify_wakes_a_listener_and_is_consumed(tmp_path: Path) -> None:
    wakeup = Wakeup(tmp_path)
    listener = wakeup.listen("queued")
    try:
        assert listener.active
        assert not listener.wait(0)
        wakeup.notify("queued")
        wakeup.notify("queued")
        assert listener.wait(5)
        assert not listener.wait(0), "both calls are consumed by one wait"
    finally:
        listener.close()


def test_topics_and_roots_are_separate(tmp_path: Path) -> None:
    mine, other = Wakeup(tmp_path / "a"), Wakeup(tmp_path / "b")
    queued, deliveries = mine.listen("queued"), mine.listen("deliveries")
    try:
        other.notify("queued")
        mine.notify("deliveries")
        assert not queued.wait(0.05), "another node's call, or another topic, does not wake"
        assert deliveries.wait(1)
    finally:
        queued.close()
        deliveries.close()


def test_every_listener_of_a_topic_wakes_and_extra_ones_fall_back_to_polling(tmp_path: Path) -> None:
    wakeup = Wakeup(tmp_path)
    listeners = [wakeup.listen("queued") for _ in range(SLOTS + 1)]
    try:
        assert [x.active for x in listeners] == [True] * SLOTS + [False]
        wakeup.notify("queued")
        assert all(x.wait(1) for x in listeners[:SLOTS])
        started = time.monotonic()
        assert not listeners[-1].wait(0.05)
        assert time.monotonic() - started >= 0.04, "a listener without a slot still waits its timeout"
    finally:
        for x in listeners:
            x.close()


def _queue_one(root: str) -> None:
    store = SqliteStore(Path(root) / "jobs.db", wakeup=Wakeup(Path(root)))
    store.jobs.record(new_job("1.2.3.99"), JobState.QUEUED)
    store.close()


def test_a_job_queued_in_another_process_wakes_the_worker(tmp_path: Path) -> None:
    listener = Wakeup(tmp_path).listen("queued")
    try:
        child = multiprocessing.get_context("spawn").Process(target=_queue_one, args=(str(tmp_path),))
        child.start()
        assert listener.wait(60), "the commit in the other process woke this one"
        child.join(60)
        store = SqliteStore(tmp_path / "jobs.db")
        assert [job.sop_instance_uid for job in store.jobs.query(JobState.QUEUED)] == ["1.2.3.99"]
        store.close()
    finally:
        listener.close()


def wake_then_fail(store: SqliteStore) -> None:
    """A transaction that asks for a wake-up call, then fails: it is rolled back."""
    with store.db.transaction():
        store.db.wake("queued")
        raise RuntimeError("rolled back")


@pytest.mark.parametrize("commits", [True, False])
def test_store_calls_only_after_commit(tmp_path: Path, commits: bool) -> None:
    wakeup = Wakeup(tmp_path)
    store = SqliteStore(tmp_path / "jobs.db", wakeup=wakeup)
    queued, deliveries = wakeup.listen("queued"), wakeup.listen("deliveries")
    try:
        if commits:
            store.jobs.record(new_job("1.2.3.1"), JobState.QUEUED)
            assert queued.wait(1) and not deliveries.wait(0)
            store.jobs.claim(1, HOLDER, 60)
            assert not queued.wait(0), "a claim queues nothing"
            store.jobs.release(None, time.time(), 3, "worker gone")
            assert queued.wait(1), "a job given back is queued again"
        else:
            with pytest.raises(RuntimeError, match="rolled back"):
                wake_then_fail(store)
            assert not queued.wait(0.05), "a rolled-back change wakes nobody"
    finally:
        queued.close()
        deliveries.close()
        store.close()
