"""``cxr-node calibrate``: a site's operating point for the model in use, from its own outcomes.

A model's threshold is chosen on its developer's validation set; at a site with other scanners, patients and
prevalence, the same threshold may give another sensitivity (a newer version of a product was seen less accurate
than the old one at the old threshold until it was recalibrated on site). This module joins the site's outcomes
(:mod:`cxr_node.training.outcomes`) to the node's stored ensemble probabilities, chooses the threshold that meets
a target sensitivity (or specificity), estimates it and the metrics at it with seeded percentile bootstrap
confidence intervals, and writes the site calibration file (:mod:`cxr_node.infer.calibration`) and a report
folder (ROC and reliability plots, ``report.md``, ``report.html``, ``report.json``). Pure numpy for the maths.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.infer.calibration import (
    CalibratedModel,
    SiteCalibration,
    Target,
    TargetMetric,
    save_calibration,
    weights_checksums,
)
from cxr_node.infer.registry import Manifest
from cxr_node.jobs.interfaces import Store
from cxr_node.training.metrics import (
    METRICS,
    Interval,
    as_scores,
    calibration_bins,
    confusion,
    metrics_with_ci,
    roc_curve,
)
from cxr_node.training.outcomes import Joined, Outcomes, join_results
from cxr_node.training.pages import interval_cell, interval_json, markdown_page
from cxr_node.training.plots import line_plot

TARGET_NAMES: Final[dict[str, TargetMetric]] = {
    "sensitivity": "sensitivity", "sens": "sensitivity", "se": "sensitivity", "tpr": "sensitivity",
    "recall": "sensitivity", "specificity": "specificity", "spec": "specificity", "sp": "specificity",
    "tnr": "specificity",
}  # fmt: skip
SHOWN: Final = ("threshold", "sensitivity", "specificity", "ppv", "npv", "auc", "accuracy", "f1")
MIN_PER_CLASS: Final = 5
"""Fewer positives or negatives than this cannot give an operating point worth the name."""
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` found: the threshold and the metrics at it, each with its bootstrap interval, and the
    metrics the site would get at the manifest's threshold."""

    target: Target
    threshold: Interval
    metrics: dict[str, Interval]
    at_manifest: dict[str, Interval]
    manifest_threshold: float
    cases: int
    positives: int
    resamples: int
    seed: int
    confidence: float = 0.95


def parse_target(text: str) -> Target:
    """``sensitivity=0.90`` (also ``sens=0.9``, ``specificity:95%``, ``spec=0.95``) as a :class:`Target`.

    Raises
    ------
    ValueError
        When the metric or the value cannot be read, or the value is not in (0, 1].
    """
    name, sep, value = text.replace(":", "=").partition("=")
    metric = TARGET_NAMES.get(name.strip().lower())
    if not sep or metric is None:
        raise ValueError(f"--target {text!r}: expected sensitivity=VALUE or specificity=VALUE, e.g. sensitivity=0.90")
    raw = value.strip()
    try:
        number = float(raw.rstrip("%")) / (100 if raw.endswith("%") else 1)
    except ValueError:
        raise ValueError(f"--target {text!r}: {raw!r} is not a number") from None
    if not 0 < number <= 1:
        raise ValueError(f"--target {text!r}: the value must be in (0, 1] (or a percentage); found {raw}")
    return Target(metric=metric, value=number)


def threshold_for(y: NDArray[np.int64], scores: NDArray[np.float64], target: Target) -> float:
    """The operating threshold (positive when ``score >= threshold``) that meets ``target`` on ``(y, scores)``.

    For a sensitivity: of the cuts whose sensitivity is at least the target, the one with the best specificity, and
    of those the most sensitive (a site asking for 0.90 never loses sensitivity for no specificity in return). For a
    specificity: the best sensitivity, and of those the most specific. Midway between the deciding score and the
    next lower distinct one, so the set is classified the same with a margin on both sides.

    Raises
    ------
    ValueError
        When ``y`` lacks a class.
    """
    fpr, tpr, thresholds = roc_curve(y, scores)
    if not (np.isfinite(fpr).all() and np.isfinite(tpr).all()):
        raise ValueError("an operating point needs positives and negatives")
    if target.metric == "sensitivity":
        meets = np.flatnonzero(tpr >= target.value - 1e-12)
        best = meets[fpr[meets] <= fpr[meets].min() + 1e-12]
        k = int(best.max())
    else:
        meets = np.flatnonzero(fpr <= 1 - target.value + 1e-12)
        best = meets[tpr[meets] >= tpr[meets].max() - 1e-12]
        k = int(best.min())
    if k == 0:  # nothing may be called positive: just above the highest score
        return float(min(1.0, np.nextafter(thresholds[1], np.inf)))
    lower = thresholds[k + 1] if k + 1 < thresholds.size else thresholds[k]
    return float((thresholds[k] + lower) / 2)


def bootstrap_threshold(y: NDArray[np.int64], scores: NDArray[np.float64], target: Target, *, n_resamples: int,
                        seed: int, confidence: float = 0.95) -> Interval:  # fmt: skip
    """The threshold for ``target`` and its percentile bootstrap interval (resamples lacking a class skipped)."""
    value = threshold_for(y, scores, target)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, y.size, size=(n_resamples, y.size))
    found = [threshold_for(y[idx], scores[idx], target) for idx in draws if 0 < y[idx].sum() < idx.size]
    if not found:
        return Interval(value, math.nan, math.nan)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.asarray(found), [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def calibrate(joined: Joined, target: Target, manifest_threshold: float, *, n_resamples: int = 1000,
              seed: int = 0) -> Calibration:  # fmt: skip
    """Choose the operating point for ``target`` on the joined cases, with bootstrap intervals.

    The metrics at the chosen threshold are estimated on the same cases it was chosen on (their intervals resample
    the cases at that fixed threshold); the threshold's own interval resamples the choice. Both are seeded.

    Raises
    ------
    ValueError
        When there are fewer than :data:`MIN_PER_CLASS` positives or negatives, or ``n_resamples`` < 1.
    """
    y, s = joined.labels, as_scores(joined.scores, joined.labels.size)
    positives = int(y.sum())
    if min(positives, y.size - positives) < MIN_PER_CLASS:
        raise ValueError(f"{y.size} cases with a result, {positives} positive: need at least {MIN_PER_CLASS} "
                         "positives and negatives to choose an operating point")  # fmt: skip
    if n_resamples < 1:
        raise ValueError(f"--resamples must be >= 1; found {n_resamples}")
    threshold = bootstrap_threshold(y, s, target, n_resamples=n_resamples, seed=seed)
    return Calibration(
        target=target, threshold=threshold,
        metrics=metrics_with_ci(y, s, threshold.value, n_resamples=n_resamples, seed=seed),
        at_manifest=metrics_with_ci(y, s, manifest_threshold, n_resamples=n_resamples, seed=seed),
        manifest_threshold=manifest_threshold, cases=int(y.size), positives=positives, resamples=n_resamples,
        seed=seed,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- files


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intervals(found: dict[str, Interval]) -> dict[str, dict[str, float | None]]:
    return {name: interval_json(interval) for name, interval in found.items()}


def site_calibration(found: Calibration, manifest: Manifest, outcomes: Outcomes, joined: Joined, *, by: str,
                     command: str, date: str | None = None) -> SiteCalibration:  # fmt: skip
    """The calibration file's content: the model it applies to, the threshold, target, metrics and provenance."""
    return SiteCalibration(
        model=CalibratedModel(name=manifest.name, version=manifest.version, weights_sha256=weights_checksums(manifest)),
        threshold=round(found.threshold.value, 6), target=found.target,
        date=date or datetime.now(UTC).date().isoformat(), calibrated_by=by,
        cases=found.cases, positives=found.positives, manifest_threshold=found.manifest_threshold,
        metrics=_intervals({"threshold": found.threshold, **found.metrics}),
        labels={"file": outcomes.path.name, "sha256": sha256_of(outcomes.path)},
        bootstrap={"resamples": found.resamples, "seed": found.seed, "confidence": found.confidence},
        left_out={**joined.left_out(), "conflicting_labels": len(outcomes.conflicting),
                  "repeated_label_rows": outcomes.repeated},
        command=command,
    )  # fmt: skip


def write_report(found: Calibration, joined: Joined, calibration: SiteCalibration, out: Path) -> dict[str, Path]:
    """Write ``roc.png``, ``calibration.png``, ``report.md``, ``report.html`` and ``report.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"roc": _roc_plot(joined, found, out / "roc.png"),
             "calibration": _reliability_plot(joined, out / "calibration.png")}  # fmt: skip
    text = report_markdown(found, joined, calibration)
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(text, encoding="utf-8")
    files["html"] = out / "report.html"
    files["html"].write_text(markdown_page(text, "Site calibration"), encoding="utf-8")
    files["json"] = out / "report.json"
    pairs = zip(joined.labels, joined.scores, strict=True)
    cases = [{"label": int(y), "probability": round(float(p), 6)} for y, p in pairs]
    document = {"calibration": calibration.model_dump(mode="json"),
                "at_manifest_threshold": _intervals(found.at_manifest), "cases": cases}  # fmt: skip
    files["json"].write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
    return files


def _roc_plot(joined: Joined, found: Calibration, path: Path) -> Path:
    fpr, tpr, _ = roc_curve(joined.labels, joined.scores)
    c = confusion(joined.labels, joined.scores, found.threshold.value)
    x, y = c.fp / max(1, c.fp + c.tn), c.tp / max(1, c.tp + c.fn)
    d = 0.03
    cross = ([x - d, x + d, x, x, x], [y, y, y, y - d, y + d])
    series = {f"ensemble (AUC {found.metrics['auc'].value:.3f})": (fpr.tolist(), tpr.tolist()),
              f"site operating point {found.threshold.value:.3f}": cross}  # fmt: skip
    return line_plot(series, path, title="ROC at the site", xlabel="1 - specificity", ylabel="sensitivity")


def _reliability_plot(joined: Joined, path: Path) -> Path:
    bins = calibration_bins(joined.labels, joined.scores)
    series = {"ensemble": ([b["predicted"] for b in bins], [b["observed"] for b in bins])}
    return line_plot(series, path, title="Calibration (reliability) at the site", xlabel="predicted probability",
                     ylabel="observed share positive", markers=True)  # fmt: skip


def metrics_table(found: Calibration) -> str:
    """The Markdown table of the metrics at the site's threshold and at the manifest's, with their intervals."""
    names = [name for name in SHOWN if name != "threshold" and name in METRICS]
    header = "| operating point | threshold | " + " | ".join(n.upper() if len(n) == 3 else n for n in names) + " |"
    rule = "|---|---:|" + "---:|" * len(names)
    site = f"| site ({found.target.text}) | {interval_cell(found.threshold)} | " + " | ".join(
        interval_cell(found.metrics[n]) for n in names) + " |"  # fmt: skip
    manifest = f"| model manifest | {found.manifest_threshold:.3f} | " + " | ".join(
        interval_cell(found.at_manifest[n]) for n in names) + " |"  # fmt: skip
    return "\n".join((header, rule, site, manifest))


def report_markdown(found: Calibration, joined: Joined, calibration: SiteCalibration) -> str:
    """The short report: what was calibrated on what, the table, what was left out, the plots."""
    left = joined.left_out()
    lines = [
        f"# Site calibration of {calibration.model.name} {calibration.model.version}", "",
        f"{calibration.date}, by {calibration.calibrated_by or 'unknown'}; labels `{calibration.labels['file']}` "
        f"(sha256 `{calibration.labels['sha256'][:16]}…`).", "",
        f"Target: **{found.target.text}**. Operating threshold **{found.threshold.value:.3f}** "
        f"(manifest's: {found.manifest_threshold:.3f}), on {found.cases} cases ({found.positives} positive). "
        f"{int(found.confidence * 100)}% percentile bootstrap intervals, {found.resamples} resamples, seed "
        f"{found.seed}; the metrics at the site's threshold are measured on the cases it was chosen on.", "",
        metrics_table(found), "",
        "Labelled accessions left out: " + ", ".join(f"{n.replace('_', ' ')} {v}" for n, v in left.items()
                                                      if n != "stored_without_label")
        + f", conflicting labels {calibration.left_out.get('conflicting_labels', 0)}"
        + (f" (not analysed: {_reasons(joined)})" if joined.why_not_analysed else "")
        + f"; {left['stored_without_label']} stored images had no label.", "",
        "![ROC](roc.png) ![Calibration](calibration.png)", "",
        f"Command: `{calibration.command}`" if calibration.command else "",
    ]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def _reasons(joined: Joined) -> str:
    return "; ".join(f"{reason} {count}" for reason, count in joined.why_not_analysed.items())


def describe(found: Calibration) -> list[str]:
    """The command's summary lines: the threshold and each metric with its interval."""
    threshold = interval_cell(found.threshold)
    lines = [f"threshold {threshold} for {found.target.text} (manifest's {found.manifest_threshold:.3f})"]
    lines += [f"  {name:<11} {interval_cell(found.metrics[name])}   at the manifest's threshold: "
              f"{interval_cell(found.at_manifest[name])}"
              for name in ("sensitivity", "specificity", "ppv", "npv")]  # fmt: skip
    lines.append(f"  {'auc':<11} {interval_cell(found.metrics['auc'])}")
    return lines


@dataclass(frozen=True)
class CalibrationRun:
    """What :func:`run_calibration` read, found and wrote."""

    outcomes: Outcomes
    joined: Joined
    found: Calibration
    file: Path
    report: dict[str, Path]


def run_calibration(store: Store, manifest: Manifest, outcomes: Outcomes, target: Target, out: Path, *,
                    report: Path | None = None, n_resamples: int = 1000, seed: int = 0, by: str = "",
                    command: str = "", progress: Progress | None = None) -> CalibrationRun:  # fmt: skip
    """Join the outcomes (:func:`~cxr_node.training.outcomes.read_outcomes`) to the stored results of
    ``manifest``'s model, calibrate, write the calibration file (and the report folder when ``report`` is given).

    Raises
    ------
    ValueError
        One line: too few cases with a result, or too few of a class.
    """
    say = progress or (lambda _: None)
    say(f"{outcomes.path}: {outcomes.rows} rows, {len(outcomes.labels)} accessions labelled "
        f"({sum(outcomes.labels.values())} positive)")  # fmt: skip
    joined = join_results(store, outcomes, (manifest.name, manifest.version))
    say(f"{joined.labels.size} with a result of {manifest.name} {manifest.version}; "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in joined.left_out().items()))  # fmt: skip
    if joined.why_not_analysed:
        say(f"not analysed: {_reasons(joined)}")
    found = calibrate(joined, target, manifest.classifier.threshold, n_resamples=n_resamples, seed=seed)
    content = site_calibration(found, manifest, outcomes, joined, by=by, command=command)
    file = save_calibration(content, out)
    files = write_report(found, joined, content, report) if report is not None else {}
    return CalibrationRun(outcomes, joined, found, file, files)
