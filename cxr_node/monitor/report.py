"""``cxr-node report``: a period's figures (:mod:`cxr_node.monitor.figures`) as a report folder and summary lines.

The folder holds ``report.md``, ``report.html`` (the same page), ``report.json`` (every number; non-finite ones as
null) and PNG plots: each metric per week with its 95% interval, drift (PSI, KS) per week, out-of-domain and
not-analysed rates, volume, turnaround, the score distribution against the reference, and the reliability plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

from cxr_node.config import MonitoringSettings
from cxr_node.jobs.interfaces import Store
from cxr_node.monitor.cases import day_text, read_period
from cxr_node.monitor.figures import METRICS, Figures, Group, compute, read_reference
from cxr_node.training.pages import interval_cell, interval_json, json_number, markdown_page
from cxr_node.training.plots import band_plot, line_plot

TITLES: Final = {"sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV", "npv": "NPV",
                 "auc": "AUC"}  # fmt: skip
NAN: Final = math.nan


@dataclass(frozen=True)
class ReportRun:
    """What :func:`run_report` found and wrote."""

    figures: Figures
    files: dict[str, Path]


def run_report(store: Store, settings: MonitoringSettings, since: date, until: date, out: Path, *,
               model: str | None = None, baseline: tuple[date, date] | None = None, resamples: int = 1000,
               seed: int = 0, command: str = "") -> ReportRun:  # fmt: skip
    """Read [since, until] (whole UTC days, ``until`` included) from ``store``, compute and write the report.

    Raises
    ------
    ValueError
        One line: ``until`` before ``since``, no image in the period, no result of ``model``.
    """
    if until < since:
        raise ValueError(f"--until {until} is before --since {since}")
    if resamples < 1:
        raise ValueError(f"--resamples must be >= 1; found {resamples}")
    start = datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp()
    end = datetime(until.year, until.month, until.day, tzinfo=UTC).timestamp() + 86400.0
    period = read_period(store, start, end, model)
    reference = read_reference(settings, store, period.model, baseline)
    found = compute(period, reference, resamples=resamples, seed=seed, bins=settings.bins,
                    min_reference_images=settings.min_reference_images)  # fmt: skip
    return ReportRun(found, write_report(found, out, settings, command))


# ---------------------------------------------------------------------------------------------------- cells


def _pct(value: float) -> str:
    return f"{value:.1%}" if math.isfinite(value) else "n/a"


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min" if value < 7200 else f"{value / 3600:.1f} h"


def _flag(value: float, bound: float) -> str:
    return " (!)" if math.isfinite(value) and value > bound else ""


# ------------------------------------------------------------------------------------------------- markdown


def metrics_table(groups: Sequence[Group], heading: str) -> list[str]:
    """The table of each group's labelled studies and metrics with their intervals."""
    lines = [f"| {heading} | labelled (positive) | " + " | ".join(TITLES[m] for m in METRICS) + " |",
             "|---|---:|" + "---:|" * len(METRICS)]  # fmt: skip
    for g in groups:
        p = g.performance
        cells = " | ".join(interval_cell(p.intervals[m]) for m in METRICS)
        lines.append(f"| {g.name} | {p.studies} ({p.positives}) | {cells} |")
    return lines


def operations_table(groups: Sequence[Group], heading: str, settings: MonitoringSettings) -> list[str]:
    """The table of each group's volume, gate, drift and turnaround."""
    lines = [f"| {heading} | images | studies | out of domain | not analysed | PSI | KS | to result p50/p95 | "
             "to SR p50/p95 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for g in groups:
        o, d = g.operations, g.drift
        inferred, sr = o.turnaround["inferred"], o.turnaround["sr"]
        lines.append(
            f"| {g.name} | {o.images} | {o.studies} | {_pct(o.out_of_domain_rate)} ({o.refused} refused, {o.flagged} "
            f"flagged) | {_pct(o.not_analysed_rate)} | {_num(d.psi)}{_flag(d.psi, settings.psi_max)} | "
            f"{_num(d.ks)}{_flag(d.ks, settings.ks_max)} | {_seconds(inferred[0])} / {_seconds(inferred[1])} | "
            f"{_seconds(sr[0])} / {_seconds(sr[1])} |"
        )
    return lines


def confusion_table(found: Figures) -> list[str]:
    """The confusion matrix of the labelled studies at the live operating point."""
    c = found.overall.performance.confusion
    return ["| | outcome positive | outcome negative |", "|---|---:|---:|",
            f"| model positive | {c.tp} (TP) | {c.fp} (FP) |",
            f"| model negative | {c.fn} (FN) | {c.tn} (TN) |"]  # fmt: skip


def reference_text(found: Figures) -> str:
    """Where the reference distribution comes from, or why there is no drift figure."""
    ref = found.reference
    if ref is None:
        return "No reference distribution (the store has no job): no drift figure."
    text = f"Reference: {ref.text}."
    if ref.scores.size < found.min_reference_images:
        text += f" Fewer than monitoring.min_reference_images ({found.min_reference_images}): no drift figure."
    return text


def report_markdown(found: Figures, settings: MonitoringSettings, command: str = "") -> str:
    """The report page (see the module docstring)."""
    p, o = found.period, found.overall
    counts = p.outcome_counts()
    ops = o.operations
    lines = [
        f"# Performance of {p.model}, {day_text(p.since)} to {day_text(p.until - 1)}", "",
        f"{ops.images} images with a result of {p.model} in {ops.studies} studies"
        + (f"; {sum(p.other_models.values())} images of other models left out "
           f"({', '.join(f'{k} {n}' for k, n in p.other_models.items())})" if p.other_models else "")
        + f"; {p.without_result} images received without a result (skipped, quarantined, waiting). Outcomes: "
        f"{counts['positive']} positive, {counts['negative']} negative, {counts['not_assessable']} not assessable "
        f"(not scored), {counts['none']} studies without one. Operating point(s) of the period: "
        f"{', '.join(f'{t:.3f}' for t in found.thresholds) or 'n/a'}"
        + (" (changed during the period)" if len(found.thresholds) > 1 else "") + ". "
        f"95% percentile bootstrap intervals, {found.resamples} resamples, seed {found.seed}. Times in UTC; weeks are "
        "ISO weeks.", "",
        "## The whole period", "",
        *metrics_table([o], "period"), "",
        "Confusion matrix of the labelled studies at the live operating point:", "",
        *confusion_table(found), "",
        *operations_table([o], "period", settings), "",
        "## Per week", "",
        *metrics_table(found.weeks, "week"), "",
        *operations_table(found.weeks, "week", settings), "",
        "![Sensitivity](sensitivity.png) ![Specificity](specificity.png)", "",
        "![PPV](ppv.png) ![NPV](npv.png)", "",
        "![AUC](auc.png) ![Drift](drift.png)", "",
        "![Out of domain and not analysed](rates.png) ![Volume](volume.png)", "",
        "![Turnaround](turnaround.png)", "",
        "## Per modality", "",
        *metrics_table(found.modalities, "modality"), "",
        *operations_table(found.modalities, "modality", settings), "",
        "## Per sending system (calling AE title)", "",
        "The store records no site or device; the calling AE title of the association that sent an image is the "
        "closest thing to one (a PACS, a modality sending directly, a router).", "",
        *metrics_table(found.senders, "calling AE"), "",
        *operations_table(found.senders, "calling AE", settings), "",
        "## Score distribution and drift", "",
        reference_text(found) + f" PSI over {found.bins} bins holding equal shares of the reference; (!) marks a PSI "
        f"above monitoring.psi_max ({settings.psi_max:g}) or a KS statistic above monitoring.ks_max "
        f"({settings.ks_max:g}). Period: PSI {_num(o.drift.psi)}, KS {_num(o.drift.ks)} (p = "
        f"{_num(o.drift.p_value, 4)}) on {o.drift.images} analysed images.", "",
        "![Score distribution](scores.png) ![Calibration](calibration.png)", "",
    ]  # fmt: skip
    if command:
        lines.append(f"Command: `{command}`")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------------ plots


def _band(groups: Sequence[Group], metric: str) -> tuple[list[float], list[float], list[float]]:
    intervals = [g.performance.intervals[metric] for g in groups]
    return [i.value for i in intervals], [i.low for i in intervals], [i.high for i in intervals]


def write_plots(found: Figures, out: Path, settings: MonitoringSettings) -> dict[str, Path]:
    """Write every PNG of the report under ``out``."""
    weeks = [g.name for g in found.weeks]
    files = {m: band_plot(weeks, {TITLES[m]: _band(found.weeks, m)}, out / f"{m}.png",
                          title=f"{TITLES[m]} per week (95% CI)", ylabel=TITLES[m], limits=(0.0, 1.0))
             for m in METRICS}  # fmt: skip
    psi = [g.drift.psi for g in found.weeks]
    ks = [g.drift.ks for g in found.weeks]
    files["drift"] = band_plot(weeks, {"PSI": (psi, None, None), "KS": (ks, None, None),
                                       "psi_max": ([settings.psi_max] * len(weeks), None, None),
                                       "ks_max": ([settings.ks_max] * len(weeks), None, None)},
                               out / "drift.png", title="Score drift per week against the reference",
                               ylabel="PSI, KS")  # fmt: skip
    ood = [g.operations.out_of_domain_rate for g in found.weeks]
    na = [g.operations.not_analysed_rate for g in found.weeks]
    files["rates"] = band_plot(weeks, {"out of domain": (ood, None, None), "not analysed": (na, None, None)},
                               out / "rates.png", title="Out-of-domain and not-analysed rates per week",
                               ylabel="share of images")  # fmt: skip
    files["volume"] = band_plot(weeks, {"images": ([float(g.operations.images) for g in found.weeks], None, None),
                                        "studies": ([float(g.operations.studies) for g in found.weeks], None, None),
                                        "labelled": ([float(g.performance.studies) for g in found.weeks], None,
                                                     None)},
                                out / "volume.png", title="Volume per week", ylabel="count")  # fmt: skip
    turnaround = {f"to {to} p{int(q * 100)}": ([g.operations.turnaround[key][k] for g in found.weeks], None, None)
                  for key, to in (("inferred", "result"), ("sr", "SR")) for k, q in enumerate((0.5, 0.95))}  # fmt: skip
    files["turnaround"] = band_plot(weeks, turnaround, out / "turnaround.png", title="Turnaround from receipt per week",
                                    ylabel="seconds")  # fmt: skip
    h = found.histogram
    bins = [f"{e:.1f}" for e in h["edges"][:-1]]
    shares = {"period": (h["period"], None, None)}
    if "reference" in h:
        shares["reference"] = (h["reference"], None, None)
    files["scores"] = band_plot(bins, shares, out / "scores.png", title="Score distribution (share per 0.1 bin)",
                                ylabel="share of images")  # fmt: skip
    cal = found.calibration
    files["calibration"] = line_plot({"studies": ([b["predicted"] for b in cal], [b["observed"] for b in cal])},
                                     out / "calibration.png", title="Calibration (reliability) of the period",
                                     xlabel="highest probability of the study", ylabel="observed share positive",
                                     markers=True)  # fmt: skip
    return files


# ------------------------------------------------------------------------------------------------------- JSON


def group_json(g: Group) -> dict[str, Any]:
    """One group's figures as JSON-ready data."""
    o, d, p = g.operations, g.drift, g.performance
    return {
        "name": g.name, "images": o.images, "studies": o.studies, "analysed": o.analysed, "refused": o.refused,
        "flagged": o.flagged, "out_of_domain_rate": json_number(o.out_of_domain_rate),
        "not_analysed_rate": json_number(o.not_analysed_rate),
        "turnaround_s": {key: dict(zip(("p50", "p95"), map(json_number, values), strict=True))
                         for key, values in o.turnaround.items()},
        "labelled": p.studies, "positives": p.positives, "confusion": p.confusion.as_dict(),
        "metrics": {name: interval_json(i) for name, i in p.intervals.items()},
        "drift": {"images": d.images, "reference_images": d.reference_images, "psi": json_number(d.psi),
                  "ks": json_number(d.ks), "ks_p_value": json_number(d.p_value)},
    }  # fmt: skip


def as_json(found: Figures) -> dict[str, Any]:
    """The whole report as JSON-ready data."""
    p, ref = found.period, found.reference
    return {
        "model": p.model, "since": day_text(p.since), "until": day_text(p.until - 1), "other_models": p.other_models,
        "without_result": p.without_result, "outcomes": p.outcome_counts(), "thresholds": found.thresholds,
        "bootstrap": {"resamples": found.resamples, "seed": found.seed, "confidence": 0.95},
        "reference": None if ref is None else {"since": day_text(ref.since), "until": day_text(ref.until - 1),
                                               "source": ref.source, "images": int(ref.scores.size)},
        "overall": group_json(found.overall), "weeks": [group_json(g) for g in found.weeks],
        "modalities": [group_json(g) for g in found.modalities], "senders": [group_json(g) for g in found.senders],
        "calibration": found.calibration, "histogram": found.histogram,
    }  # fmt: skip


def write_report(found: Figures, out: Path, settings: MonitoringSettings, command: str = "") -> dict[str, Path]:
    """Write the report folder: the plots, ``report.md``, ``report.html`` and ``report.json``."""
    out.mkdir(parents=True, exist_ok=True)
    files = write_plots(found, out, settings)
    text = report_markdown(found, settings, command)
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(text, encoding="utf-8")
    files["html"] = out / "report.html"
    files["html"].write_text(markdown_page(text, f"Performance of {found.period.model}"), encoding="utf-8")
    files["json"] = out / "report.json"
    files["json"].write_text(json.dumps(as_json(found), indent=2, allow_nan=False), encoding="utf-8")
    return files


def describe(found: Figures, settings: MonitoringSettings) -> list[str]:
    """The command's summary lines."""
    o, p = found.overall, found.period
    ops, perf, d = o.operations, o.performance, o.drift
    counts = p.outcome_counts()
    lines = [
        f"{p.model}, {day_text(p.since)} to {day_text(p.until - 1)}: {ops.images} images, {ops.studies} studies; "
        f"{perf.studies} labelled ({perf.positives} positive), {counts['not_assessable']} not assessable",
        "  " + "  ".join(f"{m} {interval_cell(perf.intervals[m])}" for m in ("sensitivity", "specificity", "auc")),
        f"  drift: PSI {_num(d.psi)}, KS {_num(d.ks)} against {reference_text(found)[len('Reference: '):]}",
        f"  out of domain {_pct(ops.out_of_domain_rate)}, not analysed {_pct(ops.not_analysed_rate)}; to SR p50 "
        f"{_seconds(ops.turnaround['sr'][0])}, p95 {_seconds(ops.turnaround['sr'][1])}",
    ]  # fmt: skip
    drifting = [g.name for g in found.weeks if (math.isfinite(g.drift.psi) and g.drift.psi > settings.psi_max)
                or (math.isfinite(g.drift.ks) and g.drift.ks > settings.ks_max)]  # fmt: skip
    if drifting:
        lines.append(f"  weeks drifting beyond psi_max/ks_max: {', '.join(drifting)}")
    return lines
