"""The loop back from the sites' reports to the neighbour index: outcomes become confirmed case labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cxr_node.jobs.records import NewOutcome
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from cxr_node.neighbours import ReplicaIndex
from cxr_node.results.findings import SimilarCase
from cxr_node.work.feedback import EVERY_S, Feedback
from tests.unit.test_jobs import new_job
from tests.unit.test_neighbours import new_case

VERSION = "1"


@pytest.fixture
def site(tmp_path: Path) -> tuple[SqliteStore, ReplicaIndex]:
    """A jobs store with two studies' jobs (accessions A1, A2) and an index holding both studies' images."""
    store = SqliteStore(tmp_path / "jobs.db")
    index = ReplicaIndex(tmp_path / "index")
    rng = np.random.default_rng(0)
    for row in (1, 2):
        case = new_case(row)
        job = replace(new_job(f"7.{row}"), study_instance_uid=case.study_instance_uid, accession_number=f"A{row}")
        store.jobs.record(job, JobState.QUEUED)
        vector = rng.standard_normal(8).astype(np.float32)
        index.add(VERSION, vector / np.linalg.norm(vector), case)
    return store, index


def labels(index: ReplicaIndex) -> dict[str, str | None]:
    """Each indexed case's label, by accession number."""
    query = np.ones(8, np.float32) / np.sqrt(8)
    found = index.query(VERSION, query, k=5, patient_hash=None, study_instance_uid=None)
    return {n.case.accession_number: n.case.label for n in found}


def test_outcomes_label_their_studies_in_order_and_a_correction_supersedes(
    site: tuple[SqliteStore, ReplicaIndex],
) -> None:
    """A positive outcome labels its study's cases covid, a later corrected report relabels them, a not assessable
    one clears the label; an outcome naming its study UID needs no job; one for an unknown accession labels
    nothing; a second pass applies nothing new."""
    store, index = site
    feedback = Feedback(store.outcomes, index)
    store.outcomes.record(NewOutcome("hl7", "m1/1", "A1", "positive"))
    store.outcomes.record(NewOutcome("csv", "f:2", "A2", "negative"))
    store.outcomes.record(NewOutcome("csv", "f:3", "UNKNOWN", "positive"))
    assert feedback.apply() == 2
    assert labels(index) == {"A1": "covid", "A2": "non-covid"}
    store.outcomes.record(NewOutcome("hl7", "m2/1", "A1", "negative"))  # the corrected report
    store.outcomes.record(
        NewOutcome("fhir", "r/1", "other", "not_assessable", study_instance_uid=new_case(2).study_instance_uid)
    )
    assert feedback.apply() == 2
    assert labels(index) == {"A1": "non-covid", "A2": None}
    assert feedback.apply() == 0
    restarted = Feedback(store.outcomes, index)  # a restarted worker applies everything again, to the same end
    restarted.apply()
    assert labels(index) == {"A1": "non-covid", "A2": None}


def test_a_turn_is_throttled_and_a_failure_is_retried(site: tuple[SqliteStore, ReplicaIndex]) -> None:
    """``turn`` looks at most every EVERY_S seconds; a store failure is logged and the outcome applied later."""
    store, index = site
    feedback = Feedback(store.outcomes, index)
    store.outcomes.record(NewOutcome("hl7", "m1/1", "A1", "positive"))
    store.close()
    assert feedback.turn(now=0.0) == 0  # the store is closed: logged, nothing applied
    reopened = SqliteStore(store.path)
    feedback.outcomes = reopened.outcomes
    assert feedback.turn(now=1.0) == 0  # too soon
    assert feedback.turn(now=EVERY_S + 1) == 1
    assert labels(index)["A1"] == "covid"


def test_outputs_say_a_label_is_confirmed() -> None:
    """A similar case with a known outcome is shown as confirmed; one without says nothing."""
    assert SimilarCase(1, 0.9, "C1", label="covid").label_text == "confirmed covid"
    assert SimilarCase(1, 0.9, "C1").label_text == ""
