"""Worklist triage deliveries in the store, on both backends: a row with no output file, due in the job's order,
claimed, withheld in shadow mode, settling the job like any delivery."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr_node.jobs.states import DeliveryState, JobState
from tests.stores import BACKENDS, AnyStore, backend
from tests.unit.test_jobs import new_job
from tests.unit.test_store_states import HOLDER, NOT_ANALYSED, output


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    """A fresh store on each backend."""
    opened = backend(request, tmp_path).open()
    yield opened
    opened.close()


def written(store: AnyStore, uid: str, withheld: tuple[str, ...] = ()) -> int:
    """A written job with an SR and an SC for ``pacs`` and one ORU for ``ris``; return its id."""
    job, _ = store.jobs.record(new_job(uid), JobState.QUEUED)
    store.jobs.claim(1, HOLDER, 60)
    store.results.save_result(job.id, NOT_ANALYSED, None)
    store.results.save_outputs(job.id, [output("sr"), output("sc")], ["pacs"], None, list(withheld),
                               triage=[("ris", "oru")])  # fmt: skip
    return job.id


def test_a_triage_delivery_is_due_claimed_and_settles_the_job(store: AnyStore) -> None:
    """The ORU row is due for its destination with no file and the outputs' mode; claimed, it is not due for
    another sender; delivered with the DICOM outputs, the job ends delivered."""
    job_id = written(store, "5.1")
    (due,) = store.deliveries.due("ris", time.time(), 10)
    assert (due.job_id, due.kind, due.path, due.sop_instance_uid, due.mode) == (job_id, "oru", "", "", "live")
    assert [d.kind for d in store.deliveries.due("pacs", time.time(), 10)] == ["sr", "sc"]
    assert store.deliveries.due("ris", time.time(), 10, HOLDER, 60)
    other = type(HOLDER)("sender", "other-host", 2, 1)
    assert store.deliveries.due("ris", time.time(), 10, other, 60) == []
    for destination, kind in (("pacs", "sr"), ("pacs", "sc")):
        assert store.deliveries.record(job_id, destination, kind, DeliveryState.DELIVERED, 0, None) is None
    assert store.deliveries.record(job_id, "ris", "oru", DeliveryState.DELIVERED, 0, None) is JobState.DELIVERED


def test_a_triage_delivery_is_withheld_in_shadow_mode(store: AnyStore) -> None:
    """Withheld for its destination, the ORU is never due."""
    written(store, "5.2", withheld=("ris",))
    assert store.deliveries.due("ris", time.time(), 10) == []
    assert store.deliveries.counts()[("ris", "withheld")] == 1


def test_an_unknown_triage_kind_is_refused(store: AnyStore) -> None:
    """Only the triage kinds may have no output file."""
    job, _ = store.jobs.record(new_job("5.3"), JobState.QUEUED)
    store.jobs.claim(1, HOLDER, 60)
    store.results.save_result(job.id, NOT_ANALYSED, None)
    with pytest.raises(ValueError, match="triage kinds"):
        store.results.save_outputs(job.id, [output("sr")], ["pacs"], triage=[("ris", "seg")])
