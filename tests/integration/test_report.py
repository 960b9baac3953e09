"""Performance over time end to end: a synthetic stream of results and outcomes written through the real store over
eight weeks, with drift injected half way (scores shifted, more false negatives) or without; ``cxr-node report``
and the sender's monitoring job read it back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final

import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from cxr_node.app import open_store
from cxr_node.cli import main
from cxr_node.config import Settings
from cxr_node.jobs import spool
from cxr_node.jobs.leases import Holder
from cxr_node.jobs.records import NewJob, NewOutcome, Output
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import DeliveryState, JobState
from cxr_node.monitor.figures import Figures
from cxr_node.monitor.report import run_report
from cxr_node.monitor.watch import Monitor
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, Summary

START: Final = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday: ISO week 2026-W02
WEEKS: Final = 8
PER_WEEK: Final = 150
DRIFT_WEEK: Final = 4
"""The first drifted week (0-based): weeks 0-3 are as validated, 4-7 drifted."""
HOLDER: Final = Holder("worker", "test-host", 1, 1)
PROVENANCE: Final = Provenance("synthetic", "1", "tests only", ("m",), "0.1.0", "2.25.1")
MASK: Final = MaskVerdict(True, "plausible", 0.3, 2)
IMAGE: Final = np.zeros((8, 8), np.float32)
LUNGS: Final = np.ones((8, 8), bool)
END_OF_DATA: Final = (START + timedelta(weeks=WEEKS)).timestamp()
BEFORE_DRIFT: Final = (START + timedelta(weeks=DRIFT_WEEK)).timestamp()
MONITORING: Final = {"monitoring.baseline_days": 14, "monitoring.window_days": 21, "monitoring.resamples": 200,
                     "monitoring.min_sensitivity": 0.8}  # fmt: skip


@dataclass(frozen=True)
class Node:
    """A store holding a synthetic stream, and the settings and config file that open it."""

    settings: Settings
    config: Path
    store: SqliteStore


def result(rng: np.random.Generator, positive: bool, drifted: bool) -> Findings:
    """One image's findings: 2% refused by the gate, 2% flagged, the rest in the domain; probabilities from Beta
    distributions that separate the classes well, and badly once drifted (positives scored low, negatives higher)."""
    u = rng.random()
    if u < 0.02:
        reason = "outside the model's validated domain (score 9.00, bound 5.00)"
        return Findings(PROVENANCE, Summary("synthetic", "1", False, (8, 8), reason=reason, domain_score=9.0,
                                            domain_bound=5.0))  # fmt: skip
    a, b = ((3, 4) if drifted else (8, 2)) if positive else ((3, 5) if drifted else (2, 8))
    summary = Summary("synthetic", "1", True, (8, 8), probability=float(rng.beta(a, b)), threshold=0.5,
                      lung_mask=MASK, domain_score=7.0 if u < 0.04 else 2.0, domain_bound=5.0)  # fmt: skip
    return Findings(PROVENANCE, summary, IMAGE, LUNGS)


def new_job(n: int, accession: str, rng: np.random.Generator) -> NewJob:
    """Image ``n`` of study ``accession``, from one of two sending systems, CR or DX."""
    uid = f"2.25.{n + 1}"
    return NewJob(instance_key=spool.instance_key(uid), sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                  study_instance_uid=f"2.25.9{accession[3:]}", series_instance_uid=f"2.25.8{n}",
                  accession_number=accession, patient_hash="ab" * 8, modality="CR" if rng.random() < 0.7 else "DX",
                  transfer_syntax="1.2.840.10008.1.2.1", calling_aet="PACS_A" if rng.random() < 0.5 else "PACS_B",
                  peer="127.0.0.1:1", path=None, size_bytes=10)  # fmt: skip


def write_stream(store: SqliteStore, drift: bool, seed: int = 7) -> None:
    """Eight weeks of images through the store (recorded, claimed, analysed, SR written and delivered) and their
    outcomes; then the times the store stamped are moved to the stream's own (received, inferred 5-30 s later, SR
    delivered 1-10 min later)."""
    rng = np.random.default_rng(seed)
    times: list[tuple[int, float, float, float]] = []
    study, label = 0, False
    for n in range(WEEKS * PER_WEEK):
        week = n // PER_WEEK
        if n % 10 != 9:  # every tenth image is a second image of the study before it
            study, label = study + 1, bool(rng.random() < 0.3)
            record_outcome(store, f"ACC{study}", label, rng)
        job, _ = store.jobs.record(new_job(n, f"ACC{study}", rng), JobState.QUEUED)
        store.jobs.claim(1, HOLDER, 60)
        store.results.save_result(job.id, result(rng, label, drift and week >= DRIFT_WEEK), None)
        store.results.save_outputs(job.id, [Output("sr", "1.2.840.10008.5.1.4.1.1.88.22", f"2.25.7{n}", "o.dcm", 1)],
                                   ["pacs"])  # fmt: skip
        store.deliveries.record(job.id, "pacs", "sr", DeliveryState.DELIVERED, 0, None)
        received = START.timestamp() + week * 7 * 86400 + (n % PER_WEEK + rng.random()) * 7 * 86400 / PER_WEEK
        times.append((job.id, received, received + rng.uniform(5, 30), received + rng.uniform(60, 600)))
    with store.db.transaction() as db:
        db.executemany("UPDATE jobs SET received_at = ? WHERE id = ?", [(r, j) for j, r, _, _ in times])
        db.executemany("UPDATE results SET created_at = ? WHERE job_id = ?", [(i, j) for j, _, i, _ in times])
        db.executemany("UPDATE deliveries SET updated_at = ? WHERE job_id = ?", [(s, j) for j, _, _, s in times])


def record_outcome(store: SqliteStore, accession: str, positive: bool, rng: np.random.Generator) -> None:
    """The site's finding: 4% not assessable; one in twenty first recorded wrong, then corrected."""
    label = "positive" if positive else "negative"
    if rng.random() < 0.04:
        label = "not_assessable"
    elif rng.random() < 0.05:
        store.outcomes.record(NewOutcome("csv", f"{accession}/0", accession, "negative" if positive else "positive"))
    store.outcomes.record(NewOutcome("csv", f"{accession}/1", accession, label))  # type: ignore[arg-type]


def make_node(folder: Path, drift: bool) -> Node:
    """A node's store on ``folder`` holding the stream (with or without drift), and its config file."""
    settings = Settings().with_overrides({"storage.root": str(folder), "storage.fsync": False, **MONITORING})
    store = open_store(settings)
    assert isinstance(store, SqliteStore)
    write_stream(store, drift)
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(folder)}, "monitoring": {
        key.split(".")[1]: value for key, value in MONITORING.items()}}))  # fmt: skip
    return Node(settings, config, store)


@pytest.fixture(scope="module")
def drifting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The stream with drift from week 4."""
    node = make_node(tmp_path_factory.mktemp("drifting"), drift=True)
    yield node
    node.store.close()


@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The same stream without drift."""
    node = make_node(tmp_path_factory.mktemp("steady"), drift=False)
    yield node
    node.store.close()


def report(node: Node, out: Path) -> Figures:
    """The report of the eight weeks."""
    return run_report(node.store, node.settings.monitoring, date(2026, 1, 5), date(2026, 3, 1), out,
                      resamples=200).figures  # fmt: skip


# ----------------------------------------------------------------------------------------------------- report


def test_the_report_shows_the_drift_in_the_later_weeks(drifting: Node, tmp_path: Path) -> None:
    """PSI and KS stay below their bounds before the drift and rise above them after; the sensitivity's interval
    falls below the early weeks'; the counts, rates and turnaround are those of the stream."""
    found = report(drifting, tmp_path)
    limits = drifting.settings.monitoring
    assert [g.name for g in found.weeks] == [f"2026-W{w:02d}" for w in range(2, 10)]
    assert found.overall.operations.images == WEEKS * PER_WEEK
    assert found.reference is not None and found.reference.source == "the first 14 days of the data"
    early, late = found.weeks[:DRIFT_WEEK], found.weeks[DRIFT_WEEK:]
    assert all(g.drift.psi < limits.psi_max and g.drift.ks < limits.ks_max for g in early)
    assert all(g.drift.psi > limits.psi_max and g.drift.ks > limits.ks_max for g in late)
    early_low = min(g.performance.intervals["sensitivity"].low for g in early)
    assert all(g.performance.intervals["sensitivity"].high < early_low for g in late)
    assert all(g.performance.intervals["sensitivity"].high < limits.min_sensitivity for g in late)
    ops = found.overall.operations
    assert 0.02 < ops.out_of_domain_rate < 0.07 and 0.005 < ops.not_analysed_rate < 0.04
    assert ops.refused == ops.not_analysed and ops.flagged > 0
    assert 5 <= ops.turnaround["inferred"][0] <= 30 and 60 <= ops.turnaround["sr"][0] <= ops.turnaround["sr"][1] <= 600
    assert {g.name for g in found.modalities} == {"CR", "DX"}
    assert {g.name for g in found.senders} == {"PACS_A", "PACS_B"}
    counts = found.period.outcome_counts()
    assert counts["not_assessable"] > 0 and counts["none"] == 0
    assert found.overall.performance.studies == counts["positive"] + counts["negative"]


def test_the_report_without_drift_shows_none(steady: Node, tmp_path: Path) -> None:
    """The steady stream stays below the drift bounds every week and keeps its sensitivity."""
    found = report(steady, tmp_path)
    limits = steady.settings.monitoring
    assert all(g.drift.psi < limits.psi_max and g.drift.ks < limits.ks_max for g in found.weeks)
    assert found.overall.performance.intervals["sensitivity"].low > 0.85


def test_a_superseded_outcome_is_not_scored(drifting: Node) -> None:
    """A study first recorded with the wrong label is scored with the correction recorded after it."""
    corrected = {o.accession_number for o in drifting.store.outcomes.query() if o.source_id.endswith("/0")}
    assert corrected
    accession = sorted(corrected)[0]
    last = drifting.store.outcomes.for_accession(accession)[-1].label
    figures = run_report(drifting.store, drifting.settings.monitoring, date(2026, 1, 5), date(2026, 3, 1),
                         Path(drifting.config.parent / "r"), resamples=10).figures  # fmt: skip
    [study] = [s for s in figures.period.studies if s.key == accession]
    assert study.outcome == last


# ---------------------------------------------------------------------------------------------------- monitor


def gauge(name: str, **labels: str) -> float | None:
    """The value of a monitoring gauge in this process."""
    return REGISTRY.get_sample_value(f"cxr_node_monitor_{name}", labels)


def test_the_monitor_raises_and_clears_the_alarm(drifting: Node) -> None:
    """Over the last three (drifted) weeks the monitor raises drift and sensitivity alarms (event and gauge); over
    the three weeks before the drift it clears them."""
    monitor = Monitor(drifting.settings.monitoring, drifting.store)
    with capture_logs() as logs:
        watch = monitor.run(now=END_OF_DATA)
    raised = {e["check"]: e for e in logs if e["event"] == "monitor.alarm"}
    assert {"psi", "ks", "sensitivity"} <= set(raised)
    assert raised["psi"]["value"] > raised["psi"]["bound"] == 0.25
    assert raised["sensitivity"]["value"] < raised["sensitivity"]["bound"] == 0.8
    assert "out_of_domain_rate" not in raised and watch.model == "synthetic/1"
    assert gauge("alarm", check="psi") == 1.0 and gauge("alarm", check="sensitivity") == 1.0
    assert gauge("alarm", check="out_of_domain_rate") == 0.0
    assert gauge("psi") == pytest.approx(watch.window.drift.psi if watch.window else None)
    assert gauge("sensitivity", bound="high") < 0.8  # type: ignore[operator]
    assert gauge("volume") == 3 * PER_WEEK and gauge("labelled_cases") > 100  # type: ignore[operator]
    assert gauge("reference_images") > 250  # type: ignore[operator]
    with capture_logs() as logs:
        monitor.run(now=BEFORE_DRIFT)
    cleared = {e["check"] for e in logs if e["event"] == "monitor.cleared"}
    assert {"psi", "ks", "sensitivity"} <= cleared
    assert not [e for e in logs if e["event"] == "monitor.alarm"]
    assert gauge("alarm", check="psi") == 0.0 and gauge("alarm", check="sensitivity") == 0.0


def test_the_monitor_raises_nothing_without_drift(steady: Node) -> None:
    """Over the steady stream's last three weeks no check is in alarm."""
    monitor = Monitor(steady.settings.monitoring, steady.store)
    with capture_logs() as logs:
        watch = monitor.run(now=END_OF_DATA)
    assert not [e for e in logs if e["event"] == "monitor.alarm"]
    assert not any(v.alarm for v in watch.verdicts.values())
    assert all(gauge("alarm", check=c) == 0.0 for c in watch.verdicts)


# -------------------------------------------------------------------------------------------------------- CLI


def test_cxr_node_report_writes_the_report(drifting: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command writes the HTML, Markdown and JSON report with its plots and prints the summary lines."""
    out = tmp_path / "report"
    argv = ["report", "--config", str(drifting.config), "--since", "2026-01-05", "--until", "2026-03-01", "--out",
            str(out), "--resamples", "100"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "synthetic/1, 2026-01-05 to 2026-03-01: 1200 images" in printed
    assert "weeks drifting beyond psi_max/ks_max: 2026-W06" in printed and f"report: {out}" in printed
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "report.md", "report.json", "sensitivity.png", "auc.png", "drift.png", "scores.png",
            "calibration.png", "volume.png", "turnaround.png", "rates.png"} <= names  # fmt: skip
    document = json.loads((out / "report.json").read_text())
    assert document["model"] == "synthetic/1" and len(document["weeks"]) == WEEKS
    assert document["weeks"][-1]["drift"]["psi"] > 0.25
    html = (out / "report.html").read_text()
    assert "<table" in html and 'src="sensitivity.png"' in html and "calling AE" in html
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["images"] == WEEKS * PER_WEEK


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--since", "2026-13-01", "--until", "2026-03-01"], "--since '2026-13-01': not a date (expected YYYY-MM-DD"),
        (["--since", "2026-03-01", "--until", "2026-01-05"], "--until 2026-01-05 is before --since 2026-03-01"),
        (["--since", "2025-01-01", "--until", "2025-01-31"], "no image received between 2025-01-01 and 2025-01-31"),
        (["--since", "2026-01-05", "--until", "2026-03-01", "--model", "x/9"], "--model x/9: no result of it"),
        (["--since", "2026-01-05", "--until", "2026-03-01", "--baseline-since", "2026-01-05"], "together"),
    ],
)
def test_cxr_node_report_errors_in_one_line(drifting: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            flags: list[str], message: str) -> None:  # fmt: skip
    """Bad dates, an empty period or an unknown model give one line on stderr and a non-zero exit."""
    code = main(["report", "--config", str(drifting.config), "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert code != 0 and message in err and err.count("\n") == 1
