"""Model change control: candidate results in the store (both backends), the comparison's maths, the worker
running a candidate beside the configured model without letting it touch the job."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cxr_node.jobs.states import JobState
from cxr_node.results.findings import MaskVerdict, Summary
from cxr_node.training.compare import Pair, compare, kappa, report_markdown, score_shift
from cxr_node.training.outcomes import Outcomes
from cxr_node.training.pages import markdown_page
from tests.stores import BACKENDS, AnyStore, backend
from tests.unit.test_jobs import new_job
from tests.unit.test_store_states import HOLDER, NOT_ANALYSED

LIVE = ("demo", "1")
CANDIDATE = ("demo", "2")


def summary(model: tuple[str, str], probability: float | None, threshold: float = 0.5, reason: str = "") -> Summary:
    """An analysed summary of ``model`` (not analysed, with ``reason``, when ``probability`` is None)."""
    if probability is None:
        return Summary(model[0], model[1], False, (64, 64), reason=reason or "lung mask implausible (area 0.01)")
    verdict = MaskVerdict(True, "plausible", 0.3, 2)
    return Summary(model[0], model[1], True, (64, 64), probability=probability, threshold=threshold, lung_mask=verdict)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyStore]:
    """A fresh store on each backend."""
    opened = backend(request, tmp_path).open()
    yield opened
    opened.close()


def test_candidate_results_are_kept_apart_and_paired_with_the_jobs_own(store: AnyStore) -> None:
    """A candidate's result is stored beside the job's own without moving the job; a re-run replaces it; ``beside``
    pairs it with the job's own result (None before there is one); deleting the job deletes it."""
    job, _ = store.jobs.record(new_job("8.1"), JobState.QUEUED)
    store.jobs.claim(1, HOLDER, 60)
    store.results.save_candidate(job.id, summary(CANDIDATE, 0.2))
    assert store.jobs.get(job.id).state is JobState.RUNNING  # type: ignore[union-attr]
    assert [(j, c.probability, live) for j, c, live in store.results.beside("demo/2")] == [(job.id, 0.2, None)]
    store.results.save_candidate(job.id, summary(CANDIDATE, 0.7))  # the job analysed again after a crash
    store.results.save_result(job.id, NOT_ANALYSED, None)
    ((job_id, candidate, live),) = store.results.beside("demo/2")
    assert (job_id, candidate.probability, live is not None and live.model_key) == (job.id, 0.7, "demo/1")
    assert [s.model_key for s in store.results.candidate_results(job.id)] == ["demo/2"]
    assert store.results.beside("demo/3") == [] and store.results.beside("demo/2", since=2e9) == []
    assert store.jobs.delete([job.id]) == 1
    assert store.results.beside("demo/2") == [] and store.results.candidate_results(job.id) == []


def test_kappa_matches_its_definition() -> None:
    """Cohen's kappa on a worked 2x2 table: 20 agree positive, 15 agree negative, 10 + 5 disagree."""
    live = np.array([1] * 20 + [1] * 10 + [0] * 5 + [0] * 15, dtype=bool)
    candidate = np.array([1] * 20 + [0] * 10 + [1] * 5 + [0] * 15, dtype=bool)
    observed, chance = 35 / 50, (30 / 50) * (25 / 50) + (20 / 50) * (25 / 50)
    assert kappa(live, candidate) == pytest.approx((observed - chance) / (1 - chance))
    assert kappa(live, live) == pytest.approx(1.0)
    assert math.isnan(kappa(np.ones(4, bool), np.ones(4, bool)))  # chance agreement total: undefined


def test_score_shift_is_candidate_minus_live_with_limits_of_agreement() -> None:
    """Mean, median, limits (mean ± 1.96 SD), largest shift and the jobs listed largest first."""
    live = np.array([0.1, 0.2, 0.3, 0.9])
    candidate = np.array([0.1, 0.25, 0.5, 0.6])
    found = score_shift([1, 2, 3, 4], live, candidate)
    assert found is not None
    delta = candidate - live
    assert found.mean == pytest.approx(delta.mean()) and found.median == pytest.approx(np.median(delta))
    assert found.low == pytest.approx(delta.mean() - 1.96 * delta.std(ddof=1))
    assert found.largest == pytest.approx(0.3) and found.large == 2
    assert [job for job, _, _ in found.largest_jobs][:2] == [4, 3]
    assert score_shift([], np.array([]), np.array([])) is None


def pairs() -> list[Pair]:
    """Twelve images: eight analysed by both (one decision differs), one refused by each model, one by both, one
    with another model's result."""
    rows: list[Pair] = []
    scores = [(0.9, 0.8), (0.8, 0.85), (0.7, 0.4), (0.2, 0.1), (0.1, 0.2), (0.3, 0.45), (0.6, 0.7), (0.05, 0.0)]
    for i, (live, candidate) in enumerate(scores):
        rows.append(Pair(i, f"A{i}", summary(LIVE, live), summary(CANDIDATE, candidate)))
    rows.append(
        Pair(
            20,
            "A20",
            summary(LIVE, 0.9),
            summary(CANDIDATE, None, reason="outside the model's validated domain (score 9, bound 6)"),
        )
    )
    rows.append(Pair(21, "A21", summary(LIVE, None), summary(CANDIDATE, 0.6)))
    rows.append(Pair(22, "A22", summary(LIVE, None), summary(CANDIDATE, None)))
    rows.append(Pair(23, "A23", summary(("demo", "0"), 0.5), summary(CANDIDATE, 0.5)))
    return rows


def test_compare_counts_agreement_shifts_and_who_analysed_what() -> None:
    """The decision table, agreement and kappa on the images both analysed, the images only one analysed (with the
    other's reason), and the images with another model's result left out."""
    found = compare(pairs(), "demo/1", n_resamples=200)
    assert (found.images, found.other_live, found.both, found.only_live, found.only_candidate, found.neither) == (
        12, 1, 8, 1, 1, 1
    )  # fmt: skip
    assert found.table == {"both positive": 3, "live only positive": 1, "candidate only positive": 0,
                           "both negative": 4}  # fmt: skip
    assert found.agreement.value == pytest.approx(7 / 8)
    assert found.agreement.low <= found.agreement.value <= found.agreement.high
    live = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
    assert found.kappa.value == pytest.approx(kappa(live, np.array([1, 1, 0, 0, 0, 0, 1, 0], bool)))
    assert found.why_live_only == {"outside the model's validated domain": 1}
    assert found.why_candidate_only == {"lung mask implausible": 1}
    assert found.shift is not None and found.shift.largest_jobs[0][0] == 2  # 0.7 -> 0.4
    assert found.labelled is None


def test_compare_on_labelled_cases_gives_both_models_metrics_and_the_auc_difference(tmp_path: Path) -> None:
    """With outcomes, each model is measured at its own threshold on the same accessions, and the paired AUC
    difference has an interval around it; the report and its HTML page carry the tables."""
    labels = {"A0": 1, "A1": 1, "A2": 1, "A3": 0, "A4": 0, "A5": 0, "A6": 1, "A7": 0, "NOT-STORED": 1}
    outcomes = Outcomes(tmp_path / "outcomes.csv", labels, rows=len(labels))
    found = compare(pairs(), "demo/1", outcomes, n_resamples=300)
    lab = found.labelled
    assert lab is not None and (lab.cases, lab.positives, lab.unmatched) == (8, 4, 1)
    assert lab.live["sensitivity"].value == 1.0 and lab.candidate["sensitivity"].value == 0.75  # A2 missed at 0.4
    assert lab.live["auc"].value == 1.0 and lab.candidate["auc"].value == pytest.approx(15 / 16)
    assert lab.auc_difference.value == pytest.approx(-1 / 16)
    assert lab.auc_difference.low <= lab.auc_difference.value <= lab.auc_difference.high
    text = report_markdown(found, command="cxr-node compare", date="2026-12-03")
    assert "# demo/2 beside demo/1" in text and "| live demo/1 | 0.500 |" in text
    page = markdown_page(text, "compare")
    assert page.count("<table") == page.count("</table>") == 3 and '<img src="roc.png"' in page


def test_compare_refuses_nothing_to_compare() -> None:
    """No pairs, or pairs of two candidates mixed, are refused with the reason."""
    with pytest.raises(ValueError, match="no candidate results"):
        compare([], "demo/1")
    mixed = [*pairs()[:2], Pair(99, "A99", summary(LIVE, 0.5), summary(("demo", "3"), 0.5))]
    with pytest.raises(ValueError, match="several candidates"):
        compare(mixed, "demo/1")
