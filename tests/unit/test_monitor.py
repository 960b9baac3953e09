"""Performance over time, pure parts: PSI and KS, ISO weeks, the join of results to outcomes, metrics, verdicts."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from cxr_node.app import build_dispatcher, open_store
from cxr_node.config import MonitoringSettings, Settings
from cxr_node.jobs.records import Outcome, PeriodRow
from cxr_node.jobs.states import JobState
from cxr_node.monitor import drift
from cxr_node.monitor.cases import build_period, iso_week, last_outcomes, pick_model, weeks_between
from cxr_node.monitor.figures import Drift, Group, Operations, Performance, performance
from cxr_node.monitor.watch import judge
from cxr_node.results.findings import MaskVerdict, Summary
from cxr_node.scheduler import MONITOR_JOB, Housekeeper, timetable
from cxr_node.training.metrics import Confusion, Interval

MASK = MaskVerdict(True, "plausible", 0.3, 2)


def at(day: str, hour: int = 12) -> float:
    """Epoch seconds of ``day`` (YYYY-MM-DD) at ``hour`` UTC."""
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC).timestamp()


def summary(p: float | None, model: str = "m/1", threshold: float = 0.5, domain: float | None = None) -> Summary:
    """An analysed result of probability ``p`` (None: not analysed) by ``model``."""
    name, version = model.split("/")
    bound = None if domain is None else 1.0
    if p is None:
        return Summary(name, version, False, (8, 8), reason="refused", domain_score=domain, domain_bound=bound)
    return Summary(name, version, True, (8, 8), probability=p, threshold=threshold, lung_mask=MASK,
                   domain_score=domain, domain_bound=bound)  # fmt: skip


def row(job: int, accession: str, when: float, result: Summary | None, modality: str = "CR",
        aet: str = "PACS") -> PeriodRow:  # fmt: skip
    """One period row."""
    return PeriodRow(job, accession, f"1.2.{job}", modality, aet, JobState.DELIVERED, when, result,
                     None if result is None else when + 10, None if result is None else when + 60)  # fmt: skip


def outcome(row_id: int, accession: str, label: str) -> Outcome:
    """A stored outcome."""
    return Outcome("csv", f"line{row_id}", accession, label, id=row_id)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- PSI and KS


def test_psi_of_known_shares() -> None:
    """PSI of (0.5, 0.5) against (0.25, 0.75) is 0.25 ln 2 + 0.25 ln 1.5; equal shares give 0."""
    assert drift.psi_of_shares([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert drift.psi_of_shares([0.2] * 5, [0.2] * 5) == 0.0
    one_empty = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2)
    assert drift.psi_of_shares([0.5, 0.5], [0.0, 1.0]) == pytest.approx(one_empty)


def test_psi_bins_on_reference_quantiles() -> None:
    """Deciles of the reference hold 10% each: the reference against itself is 0; a sample all in the top
    decile gives the known value; an empty sample gives nan."""
    reference = np.arange(100) / 100
    assert drift.psi(reference, reference) == pytest.approx(0.0)
    top = np.full(50, 0.995)
    expected = 9 * (1e-4 - 0.1) * math.log(1e-4 / 0.1) + (1 - 0.1) * math.log(1 / 0.1)
    assert drift.psi(reference, top) == pytest.approx(expected)
    assert math.isnan(drift.psi(reference, []))


def test_psi_grows_with_the_shift() -> None:
    """A larger shift of a normal sample gives a larger PSI, beyond 0.25 at one standard deviation."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 5000)
    values = [drift.psi(reference, rng.normal(shift, 1, 5000)) for shift in (0.0, 0.3, 1.0)]
    assert values[0] < 0.01 < values[1] < 0.25 < values[2]


def test_ks_statistic_of_known_samples() -> None:
    """Disjoint samples give 1, equal ones 0, a half overlap 0.5; an empty sample nan."""
    assert drift.ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0
    assert drift.ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert drift.ks_statistic([0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6]) == pytest.approx(0.5)
    assert drift.ks_statistic([0.0, 1.0], [0.5]) == pytest.approx(0.5)
    assert math.isnan(drift.ks_statistic([], [1.0]))


def test_ks_pvalue_matches_the_kolmogorov_distribution() -> None:
    """lambda = 1.36 is the 5% point of the Kolmogorov distribution, 1.63 the 1% point; no gap gives 1."""
    n = 10_000  # large samples: the correction terms vanish
    root = math.sqrt(n * n / (2 * n))
    assert drift.ks_pvalue(1.36 / root, n, n) == pytest.approx(0.05, abs=0.002)
    assert drift.ks_pvalue(1.63 / root, n, n) == pytest.approx(0.01, abs=0.001)
    assert drift.ks_pvalue(0.0, 5, 5) == 1.0
    assert math.isnan(drift.ks_pvalue(0.3, 0, 5))


def test_drift_refuses_bad_input() -> None:
    """Non-finite values, mismatched shares and too few bins are refused with the argument named."""
    with pytest.raises(ValueError, match="reference"):
        drift.psi([0.1, math.nan], [0.2])
    with pytest.raises(ValueError, match="one shape"):
        drift.psi_of_shares([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="bins"):
        drift.quantile_edges([0.1, 0.2], bins=1)


# ----------------------------------------------------------------------------------------------------- weeks


def test_iso_weeks_in_utc() -> None:
    """A Sunday late and the Monday after fall in consecutive ISO weeks; the turn of the year follows ISO."""
    assert iso_week(at("2026-01-11", 23)) == "2026-W02"
    assert iso_week(at("2026-01-12", 0)) == "2026-W03"
    assert iso_week(at("2027-01-01")) == "2026-W53"


def test_weeks_between_lists_every_week_touched() -> None:
    """A period from a Wednesday to the Tuesday three weeks later touches four weeks, empty ones included."""
    weeks = weeks_between(at("2026-01-07", 0), at("2026-01-28", 0))
    assert weeks == ["2026-W02", "2026-W03", "2026-W04", "2026-W05"]
    assert weeks_between(at("2026-01-05", 0), at("2026-01-12", 0)) == ["2026-W02"]
    assert weeks_between(5.0, 5.0) == []


# ------------------------------------------------------------------------------------------------------ join


def test_a_study_is_scored_by_its_highest_analysed_probability() -> None:
    """Two images of one accession make one study: the highest probability, positive when any image is, the week
    and source of the first image; a not-analysed image counts as an image, not a score."""
    rows = [row(1, "A", at("2026-01-11"), summary(0.3), aet="FIRST"), row(2, "A", at("2026-01-12"), summary(0.7)),
            row(3, "A", at("2026-01-12"), summary(None)), row(4, "B", at("2026-01-12"), summary(0.2))]  # fmt: skip
    period = build_period(rows, [], at("2026-01-05"), at("2026-01-19"))
    a, b = sorted(period.studies, key=lambda s: s.key)
    assert (a.score, a.positive, a.week, a.calling_aet) == (0.7, True, "2026-W02", "FIRST")
    assert (b.score, b.positive, b.label) == (0.2, False, None)
    assert len(period.images) == 4 and period.scores() == [0.3, 0.7, 0.2]


def test_the_last_recorded_outcome_supersedes_and_not_assessable_is_counted_not_scored() -> None:
    """Outcomes are joined by accession: the highest row id wins; not assessable gives no label."""
    labels = last_outcomes([outcome(5, "A", "negative"), outcome(2, "A", "positive"), outcome(3, "B", "not_assessable"),
                            outcome(4, "C", "positive")])  # fmt: skip
    assert labels == {"A": "negative", "B": "not_assessable", "C": "positive"}
    rows = [row(1, "A", at("2026-01-12"), summary(0.9)), row(2, "B", at("2026-01-12"), summary(0.1)),
            row(3, "D", at("2026-01-12"), summary(0.4))]  # fmt: skip
    period = build_period(rows, [outcome(5, "A", "negative"), outcome(2, "A", "positive"),
                                 outcome(3, "B", "not_assessable")], at("2026-01-05"), at("2026-01-19"))  # fmt: skip
    assert {s.key: s.label for s in period.studies} == {"A": 0, "B": None, "D": None}
    assert period.outcome_counts() == {"positive": 0, "negative": 1, "not_assessable": 1, "none": 1}


def test_the_model_judged_is_the_most_frequent_or_the_one_named() -> None:
    """Other models' images are counted apart; naming a model without results says which models there are."""
    rows = [row(1, "A", 1.0, summary(0.9, "m/1")), row(2, "B", 1.0, summary(0.9, "m/1")),
            row(3, "C", 1.0, summary(0.9, "m/2")), row(4, "D", 1.0, None)]  # fmt: skip
    assert pick_model(rows) == "m/1"
    period = build_period(rows, [], 0.0, 10.0, "m/2")
    assert (period.model, len(period.images), period.other_models, period.without_result) == ("m/2", 1, {"m/1": 2}, 1)
    with pytest.raises(ValueError, match=r"found: m/1 \(2\), m/2 \(1\)"):
        pick_model(rows, "x/9")
    with pytest.raises(ValueError, match="no image"):
        pick_model([row(4, "D", 1.0, None)])


# --------------------------------------------------------------------------------------------------- metrics


def test_metrics_with_intervals_on_known_counts() -> None:
    """8 of 10 positives found and 9 of 10 negatives cleared: the point values are exact and inside their intervals;
    the same seed gives the same intervals."""
    rows = [row(i, f"P{i}", 1.0, summary(0.9 if i < 8 else 0.1)) for i in range(10)]
    rows += [row(10 + i, f"N{i}", 1.0, summary(0.8 if i < 1 else 0.2)) for i in range(10)]
    outcomes = [outcome(i, f"P{i}", "positive") for i in range(10)] + [
        outcome(10 + i, f"N{i}", "negative") for i in range(10)]  # fmt: skip
    studies = build_period(rows, outcomes, 0.0, 10.0).studies
    found = performance(studies, resamples=200, seed=1)
    assert found.confusion == Confusion(tp=8, fp=1, tn=9, fn=2)
    assert found.intervals["sensitivity"].value == pytest.approx(0.8)
    assert found.intervals["ppv"].value == pytest.approx(8 / 9)
    for interval in found.intervals.values():
        assert interval.low <= interval.value <= interval.high
    assert performance(studies, resamples=200, seed=1) == found
    assert math.isnan(performance([], resamples=10, seed=0).intervals["auc"].value)


def window(sensitivity_high: float, psi: float, labelled: int = 100, images: int = 500) -> Group:
    """A window's figures with the given upper sensitivity bound and PSI."""
    intervals = {m: Interval(0.9, 0.85, 0.95) for m in ("sensitivity", "specificity", "ppv", "npv", "auc")}
    intervals["sensitivity"] = Interval(sensitivity_high - 0.1, sensitivity_high - 0.2, sensitivity_high)
    perf = Performance(labelled, labelled // 3, Confusion(1, 1, 1, 1), intervals)
    ops = Operations(images, images, images - 10, 5, 5, {"inferred": (1.0, 2.0), "sr": (3.0, 4.0)})
    return Group("window", ops, perf, Drift(images, 300, psi, 0.05, 0.5))


def test_verdicts_follow_the_bounds_and_the_minimum_counts() -> None:
    """A PSI above psi_max and a sensitivity CI wholly below min_sensitivity are alarms; with too few labelled
    studies the metric cannot be judged; a bound of 0 turns a metric check off."""
    settings = MonitoringSettings(min_sensitivity=0.8, psi_max=0.25, min_labelled_cases=30, min_images=50)
    found = judge(window(0.7, 0.4), settings)
    assert (found["psi"].alarm, found["sensitivity"].alarm, found["ks"].alarm) == (True, True, False)
    assert found["sensitivity"].value == pytest.approx(0.7) and found["sensitivity"].bound == 0.8
    assert found["out_of_domain_rate"].alarm is False and found["specificity"].alarm is False
    assert judge(window(0.7, 0.1, labelled=10), settings)["sensitivity"].alarm is None
    assert judge(window(0.7, 0.4, images=10), settings)["psi"].alarm is None
    off = MonitoringSettings(min_sensitivity=0.0)
    assert judge(window(0.7, 0.1), off)["sensitivity"].alarm is None


def test_the_sender_timetable_runs_the_monitor_when_enabled(tmp_path: Path) -> None:
    """The monitoring job is in the sender's timetable at monitoring.interval_minutes, and absent when disabled."""
    for enabled in (True, False):
        overrides = {"storage.root": str(tmp_path / str(enabled)), "monitoring.enabled": enabled,
                     "monitoring.interval_minutes": 15}  # fmt: skip
        settings = Settings().with_overrides(overrides)
        store = open_store(settings)
        try:
            scheduler = timetable(settings, build_dispatcher(settings, store), Housekeeper(settings, store))
            job = scheduler.get_job(MONITOR_JOB)
            assert (job is not None) == enabled
            if job is not None:
                assert job.trigger.interval.total_seconds() == 15 * 60
        finally:
            store.close()
