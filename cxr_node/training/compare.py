"""``cxr-node compare``: a candidate model beside the model in use, on the site's own images.

The worker runs each candidate of ``models.candidates`` on the images the configured model analyses and records
its results apart (:mod:`cxr_node.work.candidates`). This module pairs each candidate result with the job's own
result and reports, before anyone switches: how often the two decide alike (agreement and Cohen's kappa, with
seeded percentile bootstrap intervals), how the probabilities move (mean and median shift, Bland-Altman limits of
agreement, correlation, the largest shifts), which images one model analysed and the other did not (the
out-of-domain gate, an implausible lung mask), and, when the site gives outcomes (the ``calibrate`` CSV), both
models' metrics at their own operating points on the same cases with the paired difference in AUC. Each model is
judged at the operating point its results were recorded with (its site calibration, else its manifest's).
Pure numpy for the maths; a report folder with ``compare.md``, ``compare.html``, ``compare.json`` and PNG plots.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.jobs.interfaces import Store
from cxr_node.results.findings import Summary
from cxr_node.training.metrics import METRICS, Interval, metrics_with_ci, roc_auc, roc_curve
from cxr_node.training.outcomes import Outcomes
from cxr_node.training.pages import interval_cell, interval_json, json_number, markdown_page
from cxr_node.training.plots import line_plot

LARGE_SHIFT: Final = 0.10
"""A probability that moves by more than this between the two models is counted (and listed) as a large shift."""
LISTED: Final = 10
"""The largest shifts listed by job in the report."""
SHOWN: Final = ("sensitivity", "specificity", "ppv", "npv", "auc", "accuracy")


@dataclass(frozen=True)
class Pair:
    """One image both models were asked about: the job, its accession, the job's own result (None: it has none of
    the model in use) and the candidate's."""

    job_id: int
    accession: str
    live: Summary | None
    candidate: Summary


@dataclass(frozen=True)
class Shift:
    """How the candidate's probability differs from the live model's on the images both analysed (candidate minus
    live): mean, median, standard deviation, the 95% limits of agreement (mean ± 1.96 SD), the largest, the share
    beyond :data:`LARGE_SHIFT` and Pearson's correlation."""

    mean: float
    median: float
    sd: float
    low: float
    high: float
    largest: float
    large: int
    correlation: float
    largest_jobs: tuple[tuple[int, float, float], ...] = ()


@dataclass(frozen=True)
class Labelled:
    """Both models on the labelled cases both analysed (one case per accession, scored by its highest
    probability): metrics at each model's operating point, and the paired difference in AUC (candidate - live)."""

    cases: int
    positives: int
    live_threshold: float
    candidate_threshold: float
    live: dict[str, Interval]
    candidate: dict[str, Interval]
    auc_difference: Interval
    unmatched: int
    labels: NDArray[np.int64] = field(repr=False)
    live_scores: NDArray[np.float64] = field(repr=False)
    candidate_scores: NDArray[np.float64] = field(repr=False)


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found (see the module docstring)."""

    live_key: str
    candidate_key: str
    images: int
    other_live: int
    both: int
    only_live: int
    only_candidate: int
    neither: int
    table: dict[str, int]
    agreement: Interval
    kappa: Interval
    shift: Shift | None
    labelled: Labelled | None
    why_live_only: dict[str, int]
    why_candidate_only: dict[str, int]
    thresholds: dict[str, list[float]]
    resamples: int
    seed: int
    live_scores: NDArray[np.float64] = field(repr=False)
    candidate_scores: NDArray[np.float64] = field(repr=False)


def load_pairs(store: Store, candidate_key: str, since: float = 0.0) -> list[Pair]:
    """Every image candidate ``candidate_key`` ran on since ``since`` (epoch seconds), with the job's own result."""
    pairs: list[Pair] = []
    for job_id, candidate, live in store.results.beside(candidate_key, since):
        job = store.jobs.get(job_id)
        pairs.append(Pair(job_id, "" if job is None else job.accession_number.strip(), live, candidate))
    return pairs


def kappa(live: NDArray[np.bool_], candidate: NDArray[np.bool_]) -> float:
    """Cohen's kappa of two sets of yes/no decisions on the same cases (nan when chance agreement is total)."""
    if live.size == 0:
        return math.nan
    observed = float(np.mean(live == candidate))
    p_live, p_candidate = float(np.mean(live)), float(np.mean(candidate))
    chance = p_live * p_candidate + (1 - p_live) * (1 - p_candidate)
    return math.nan if chance >= 1 else (observed - chance) / (1 - chance)


def _bootstrap(statistic: Any, n: int, *, n_resamples: int, seed: int, confidence: float = 0.95) -> Interval:
    """``statistic(indices)`` on all ``n`` cases and its percentile bootstrap interval (nan draws left out)."""
    value = float(statistic(np.arange(n)))
    if n == 0:
        return Interval(value, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(idx) for idx in rng.integers(0, n, size=(n_resamples, n))], dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Interval(value, math.nan, math.nan)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def score_shift(job_ids: Sequence[int], live: NDArray[np.float64], candidate: NDArray[np.float64]) -> Shift | None:
    """The :class:`Shift` of ``candidate`` against ``live`` (aligned with ``job_ids``); None without cases."""
    if live.size == 0:
        return None
    delta = candidate - live
    sd = float(delta.std(ddof=1)) if delta.size > 1 else 0.0
    mean = float(delta.mean())
    spread = float(live.std()) * float(candidate.std())
    correlation = float(np.mean((live - live.mean()) * (candidate - candidate.mean())) / spread) if spread else math.nan
    order = np.argsort(-np.abs(delta), kind="stable")[:LISTED]
    largest = tuple((int(job_ids[i]), float(live[i]), float(candidate[i])) for i in order)
    return Shift(mean=mean, median=float(np.median(delta)), sd=sd, low=mean - 1.96 * sd, high=mean + 1.96 * sd,
                 largest=float(np.abs(delta).max()), large=int(np.sum(np.abs(delta) > LARGE_SHIFT)),
                 correlation=correlation, largest_jobs=largest)  # fmt: skip


def _reason(summary: Summary) -> str:
    return (summary.reason or "not analysed").split(" (")[0][:80]


def compare(pairs: Sequence[Pair], live_key: str, outcomes: Outcomes | None = None, *, n_resamples: int = 1000,
            seed: int = 0) -> Comparison:  # fmt: skip
    """Compare the candidate of ``pairs`` with the model ``live_key`` (see the module docstring).

    Raises
    ------
    ValueError
        When ``pairs`` is empty, holds several candidates, or ``n_resamples`` < 1.
    """
    if not pairs:
        raise ValueError("no candidate results to compare")
    keys = {pair.candidate.model_key for pair in pairs}
    if len(keys) != 1:
        raise ValueError(f"pairs of several candidates: {sorted(keys)}")
    if n_resamples < 1:
        raise ValueError(f"--resamples must be >= 1; found {n_resamples}")
    mine = [pair for pair in pairs if pair.live is not None and pair.live.model_key == live_key]
    both = [p for p in mine if p.live is not None and p.live.analysed and p.candidate.analysed]
    only_live = [p for p in mine if p.live is not None and p.live.analysed and not p.candidate.analysed]
    only_candidate = [p for p in mine if p.live is not None and not p.live.analysed and p.candidate.analysed]
    live_p = np.array([p.live.probability for p in both if p.live is not None], dtype=np.float64)
    cand_p = np.array([p.candidate.probability for p in both], dtype=np.float64)
    live_d = np.array([bool(p.live.positive) for p in both if p.live is not None], dtype=bool)
    cand_d = np.array([bool(p.candidate.positive) for p in both], dtype=bool)
    table = {
        "both positive": int(np.sum(live_d & cand_d)),
        "live only positive": int(np.sum(live_d & ~cand_d)),
        "candidate only positive": int(np.sum(~live_d & cand_d)),
        "both negative": int(np.sum(~live_d & ~cand_d)),
    }
    n = live_d.size
    agreement = _bootstrap(lambda i: float(np.mean(live_d[i] == cand_d[i])) if i.size else math.nan, n,
                           n_resamples=n_resamples, seed=seed)  # fmt: skip
    kappa_ci = _bootstrap(lambda i: kappa(live_d[i], cand_d[i]), n, n_resamples=n_resamples, seed=seed)
    thresholds = {
        "live": sorted({round(float(p.live.threshold), 6) for p in both if p.live is not None and p.live.threshold}),
        "candidate": sorted({round(float(p.candidate.threshold), 6) for p in both if p.candidate.threshold}),
    }
    labelled = _labelled(both, outcomes, n_resamples=n_resamples, seed=seed) if outcomes is not None else None
    return Comparison(
        live_key=live_key, candidate_key=next(iter(keys)), images=len(pairs), other_live=len(pairs) - len(mine),
        both=len(both), only_live=len(only_live), only_candidate=len(only_candidate),
        neither=len(mine) - len(both) - len(only_live) - len(only_candidate), table=table, agreement=agreement,
        kappa=kappa_ci, shift=score_shift([p.job_id for p in both], live_p, cand_p), labelled=labelled,
        why_live_only=dict(Counter(_reason(p.candidate) for p in only_live).most_common()),
        why_candidate_only=dict(Counter(_reason(p.live) for p in only_candidate if p.live).most_common()),
        thresholds=thresholds, resamples=n_resamples, seed=seed, live_scores=live_p, candidate_scores=cand_p,
    )  # fmt: skip


def _labelled(both: Sequence[Pair], outcomes: Outcomes, *, n_resamples: int, seed: int) -> Labelled | None:
    """Both models on the labelled accessions both analysed; None when no accession of ``both`` is labelled."""
    by_accession: dict[str, tuple[float, float]] = {}
    last: dict[str, Pair] = {}
    for pair in both:
        if pair.accession not in outcomes.labels or pair.live is None:
            continue
        live, candidate = float(pair.live.probability or 0.0), float(pair.candidate.probability or 0.0)
        seen = by_accession.get(pair.accession, (0.0, 0.0))
        by_accession[pair.accession] = (max(seen[0], live), max(seen[1], candidate))
        last[pair.accession] = pair
    if not by_accession:
        return None
    accessions = sorted(by_accession)
    y = np.array([outcomes.labels[a] for a in accessions], dtype=np.int64)
    live_s = np.array([by_accession[a][0] for a in accessions], dtype=np.float64)
    cand_s = np.array([by_accession[a][1] for a in accessions], dtype=np.float64)
    newest = max(last.values(), key=lambda pair: pair.job_id)
    live_t = float(newest.live.threshold or 0.0) if newest.live is not None else 0.0
    cand_t = float(newest.candidate.threshold or 0.0)

    def difference(i: NDArray[np.int64]) -> float:
        return roc_auc(y[i], cand_s[i]) - roc_auc(y[i], live_s[i])

    return Labelled(
        cases=int(y.size), positives=int(y.sum()), live_threshold=live_t, candidate_threshold=cand_t,
        live=metrics_with_ci(y, live_s, live_t, n_resamples=n_resamples, seed=seed),
        candidate=metrics_with_ci(y, cand_s, cand_t, n_resamples=n_resamples, seed=seed),
        auc_difference=_bootstrap(difference, int(y.size), n_resamples=n_resamples, seed=seed),
        unmatched=len(set(outcomes.labels) - set(by_accession)), labels=y, live_scores=live_s,
        candidate_scores=cand_s,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- report


def describe(found: Comparison) -> list[str]:
    """The command's summary lines."""
    lines = [
        f"{found.candidate_key} beside {found.live_key}: {found.images} images, {found.both} analysed by both"
        + (f", {found.other_live} with another model's result (left out)" if found.other_live else ""),
        f"  only {found.live_key} analysed {found.only_live}; only {found.candidate_key} {found.only_candidate}; "
        f"neither {found.neither}",
        f"  decisions agree {interval_cell(found.agreement)}; Cohen's kappa {interval_cell(found.kappa)}",
    ]
    if found.shift is not None:
        s = found.shift
        lines.append(f"  probability shift (candidate - live): mean {s.mean:+.3f}, median {s.median:+.3f}, 95% limits "
                     f"{s.low:+.3f} to {s.high:+.3f}; |shift| > {LARGE_SHIFT:.2f} on {s.large} images")  # fmt: skip
    if found.labelled is not None:
        lab = found.labelled
        lines.append(f"  on {lab.cases} labelled cases ({lab.positives} positive):")
        for name in ("sensitivity", "specificity", "auc"):
            lines.append(f"    {name:<11} live {interval_cell(lab.live[name])}   candidate "
                         f"{interval_cell(lab.candidate[name])}")  # fmt: skip
        lines.append(f"    AUC difference (candidate - live) {interval_cell(lab.auc_difference)}")
    return lines


def report_markdown(found: Comparison, command: str = "", date: str | None = None) -> str:
    """The report: what was compared on what, agreement, shifts, metrics on labelled cases, the plots."""
    day = date or datetime.now(UTC).date().isoformat()
    t = found.table
    lines = [
        f"# {found.candidate_key} beside {found.live_key}", "",
        f"{day}. {found.images} images the candidate ran on; {found.both} analysed by both models"
        + (f"; {found.other_live} had a result of another model in use and are left out" if found.other_live else "")
        + f". Each model is judged at the operating point its results were recorded with (live "
        f"{_thresholds(found.thresholds['live'])}, candidate {_thresholds(found.thresholds['candidate'])}). "
        f"{found.resamples} bootstrap resamples, seed {found.seed}, 95% percentile intervals.", "",
        "## Decisions", "",
        "| | candidate positive | candidate negative |", "|---|---:|---:|",
        f"| live positive | {t['both positive']} | {t['live only positive']} |",
        f"| live negative | {t['candidate only positive']} | {t['both negative']} |", "",
        f"Agreement **{interval_cell(found.agreement)}**; Cohen's kappa **{interval_cell(found.kappa)}**.", "",
        f"Analysed by the live model only: {found.only_live}{_why(found.why_live_only)}; by the candidate only: "
        f"{found.only_candidate}{_why(found.why_candidate_only)}; by neither: {found.neither}.", "",
    ]  # fmt: skip
    if found.shift is not None:
        s = found.shift
        lines += [
            "## Probability shift (candidate - live)", "",
            f"Mean {s.mean:+.3f}, median {s.median:+.3f}, SD {s.sd:.3f}; 95% limits of agreement {s.low:+.3f} to "
            f"{s.high:+.3f}; largest |shift| {s.largest:.3f}; |shift| > {LARGE_SHIFT:.2f} on {s.large} of "
            f"{found.both} images; correlation {s.correlation:.3f}.", "",
            "| job | live | candidate |", "|---:|---:|---:|",
            *(f"| {job} | {live:.3f} | {cand:.3f} |" for job, live, cand in s.largest_jobs), "",
            "![Scatter](scatter.png)", "",
        ]  # fmt: skip
    if found.labelled is not None:
        lab = found.labelled
        names = [name for name in SHOWN if name in METRICS]
        lines += [
            "## On the site's labelled cases", "",
            f"{lab.cases} accessions analysed by both ({lab.positives} positive); {lab.unmatched} labelled accessions "
            "had no image analysed by both. A case is scored by its highest probability.", "",
            "| model | threshold | " + " | ".join(n.upper() if len(n) == 3 else n for n in names) + " |",
            "|---|---:|" + "---:|" * len(names),
            f"| live {found.live_key} | {lab.live_threshold:.3f} | "
            + " | ".join(interval_cell(lab.live[n]) for n in names) + " |",
            f"| candidate {found.candidate_key} | {lab.candidate_threshold:.3f} | "
            + " | ".join(interval_cell(lab.candidate[n]) for n in names) + " |", "",
            f"AUC difference (candidate - live, paired bootstrap): **{interval_cell(lab.auc_difference)}**.", "",
            "![ROC](roc.png)", "",
        ]  # fmt: skip
    if command:
        lines.append(f"Command: `{command}`")
    return "\n".join(lines).rstrip() + "\n"


def _thresholds(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return ", ".join(f"{v:.3f}" for v in values) + (" (changed during the period)" if len(values) > 1 else "")


def _why(reasons: dict[str, int]) -> str:
    return f" ({'; '.join(f'{r} {n}' for r, n in reasons.items())})" if reasons else ""


def write_report(found: Comparison, out: Path, command: str = "") -> dict[str, Path]:
    """Write ``compare.md``, ``compare.html``, ``compare.json``, ``scatter.png`` (and ``roc.png`` with outcomes)."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if found.shift is not None:
        files["scatter"] = line_plot(
            {f"{found.both} images": (found.live_scores.tolist(), found.candidate_scores.tolist())},
            out / "scatter.png", title="Probability: live against candidate", xlabel=f"live {found.live_key}",
            ylabel=f"candidate {found.candidate_key}", markers=True, lines=False,
        )  # fmt: skip
    if found.labelled is not None:
        lab = found.labelled
        series = {}
        for name, scores, metrics in (("live", lab.live_scores, lab.live), ("candidate", lab.candidate_scores,
                                                                             lab.candidate)):  # fmt: skip
            fpr, tpr, _ = roc_curve(lab.labels, scores)
            series[f"{name} (AUC {metrics['auc'].value:.3f})"] = (fpr.tolist(), tpr.tolist())
        files["roc"] = line_plot(series, out / "roc.png", title="ROC on the site's labelled cases",
                                 xlabel="1 - specificity", ylabel="sensitivity")  # fmt: skip
    text = report_markdown(found, command)
    files["markdown"] = out / "compare.md"
    files["markdown"].write_text(text, encoding="utf-8")
    files["html"] = out / "compare.html"
    files["html"].write_text(markdown_page(text, f"{found.candidate_key} beside {found.live_key}"), encoding="utf-8")
    files["json"] = out / "compare.json"
    files["json"].write_text(json.dumps(as_json(found), indent=2, allow_nan=False), encoding="utf-8")
    return files


def as_json(found: Comparison) -> dict[str, Any]:
    """The comparison as JSON-ready data (non-finite numbers as null)."""
    shift = None
    if found.shift is not None:
        shift = {k: (json_number(v) if isinstance(v, float) else v) for k, v in asdict(found.shift).items()
                 if k != "largest_jobs"}  # fmt: skip
        shift["largest_jobs"] = [{"job": j, "live": json_number(a), "candidate": json_number(b)}
                                 for j, a, b in found.shift.largest_jobs]  # fmt: skip
    labelled = None
    if found.labelled is not None:
        lab = found.labelled
        labelled = {"cases": lab.cases, "positives": lab.positives, "unmatched": lab.unmatched,
                    "live_threshold": lab.live_threshold, "candidate_threshold": lab.candidate_threshold,
                    "live": {k: interval_json(v) for k, v in lab.live.items()},
                    "candidate": {k: interval_json(v) for k, v in lab.candidate.items()},
                    "auc_difference": interval_json(lab.auc_difference)}  # fmt: skip
    return {
        "live": found.live_key, "candidate": found.candidate_key, "images": found.images,
        "other_live": found.other_live, "both": found.both, "only_live": found.only_live,
        "only_candidate": found.only_candidate, "neither": found.neither, "decisions": found.table,
        "agreement": interval_json(found.agreement), "kappa": interval_json(found.kappa), "shift": shift,
        "labelled": labelled, "why_live_only": found.why_live_only, "why_candidate_only": found.why_candidate_only,
        "thresholds": found.thresholds, "bootstrap": {"resamples": found.resamples, "seed": found.seed},
    }  # fmt: skip
