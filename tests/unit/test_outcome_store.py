"""The outcomes table (ground truth from the sites' reports) and the period query of monitoring, on both backends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr_node.jobs.records import NewOutcome
from cxr_node.jobs.states import JobState
from tests.stores import BACKENDS, AnyStore, backend
from tests.unit.test_jobs import new_job
from tests.unit.test_store_states import HOLDER, NOT_ANALYSED


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    """A fresh store on each backend."""
    opened = backend(request, tmp_path).open()
    yield opened
    opened.close()


def test_an_outcome_is_recorded_once_per_source_and_id(store: AnyStore) -> None:
    """The same message twice is one row; another source with the same id is another; the accession is trimmed."""
    first, created = store.outcomes.record(NewOutcome("hl7", "MSG1/1", " ACC1 ", "positive", code="RID5350"))
    again, created_again = store.outcomes.record(NewOutcome("hl7", "MSG1/1", "ACC1", "negative"))
    other, other_created = store.outcomes.record(NewOutcome("fhir", "MSG1/1", "ACC1", "negative", reported_at=5.0))
    assert (created, created_again, other_created) == (True, False, True)
    assert again == first and first.label == "positive" and first.accession_number == "ACC1"
    assert first.received_at > 0 and first.id != other.id
    assert [o.label for o in store.outcomes.for_accession("ACC1")] == ["positive", "negative"]
    assert store.outcomes.for_accession("ACC2") == []


def test_outcomes_are_queried_by_when_they_were_reported(store: AnyStore) -> None:
    """``query`` uses the reported time when there is one, else the received time; the range is half-open."""
    store.outcomes.record(NewOutcome("csv", "a", "A", "positive", reported_at=100.0))
    store.outcomes.record(NewOutcome("csv", "b", "B", "not_assessable", reported_at=200.0))
    store.outcomes.record(NewOutcome("csv", "c", "C", "negative"))  # received now
    assert [o.accession_number for o in store.outcomes.query(0, 200.0)] == ["A"]
    assert [o.accession_number for o in store.outcomes.query(150.0)] == ["B", "C"]
    assert len(store.outcomes.query()) == 3


def test_a_bad_outcome_is_refused(store: AnyStore) -> None:
    """An unknown label or an empty accession is refused before anything is written."""
    with pytest.raises(ValueError, match="label"):
        store.outcomes.record(NewOutcome("csv", "x", "A", "maybe"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accession"):
        store.outcomes.record(NewOutcome("csv", "y", "  ", "positive"))
    assert store.outcomes.query() == []


def test_a_period_lists_its_jobs_with_their_results(store: AnyStore) -> None:
    """``results.period`` gives every job received in the range, its summary once inferred, and no SR delivery
    time before one is delivered."""
    waiting, _ = store.jobs.record(new_job("9.1"), JobState.QUEUED)
    analysed, _ = store.jobs.record(new_job("9.2"), JobState.QUEUED)
    store.jobs.claim(2, HOLDER, 60)
    store.results.save_result(analysed.id, NOT_ANALYSED, None)
    rows = {row.job_id: row for row in store.results.period(0, time.time() + 1)}
    assert set(rows) == {waiting.id, analysed.id}
    assert rows[waiting.id].summary is None and rows[waiting.id].inferred_at is None
    found = rows[analysed.id]
    assert found.summary == NOT_ANALYSED.summary and found.state is JobState.INFERRED
    assert found.inferred_at is not None and found.sr_delivered_at is None
    assert store.results.period(time.time() + 10, time.time() + 20) == []


def test_outcomes_are_found_by_accession_whenever_reported(store: AnyStore) -> None:
    """``for_accessions`` finds every outcome of the accessions asked, in the order recorded, old reports too."""
    store.outcomes.record(NewOutcome("csv", "a", "A", "positive", reported_at=1.0))
    store.outcomes.record(NewOutcome("hl7", "b", "B", "negative"))
    store.outcomes.record(NewOutcome("hl7", "c", "A", "negative"))
    store.outcomes.record(NewOutcome("hl7", "d", "C", "negative"))
    found = store.outcomes.for_accessions(["A", " B", "Z", ""])
    assert [(o.accession_number, o.label) for o in found] == [("A", "positive"), ("B", "negative"), ("A", "negative")]
    assert store.outcomes.for_accessions([]) == []
