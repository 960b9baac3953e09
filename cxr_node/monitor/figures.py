"""Every figure of a period: metrics with bootstrap intervals, drift, out-of-domain and not-analysed rates, volume
and turnaround, over the whole period and per ISO week, per modality and per sending system (calling AE title).

Pure numpy on a :class:`~cxr_node.monitor.cases.Period`, no I/O (the reference window is read by
:func:`read_reference`). Metrics are per study, on the studies with a positive or negative outcome, at the
operating point each image was analysed with (the live one): sensitivity, specificity, PPV and NPV of the
decisions, and the AUC of the study scores, each with a seeded percentile bootstrap 95% interval (the same
resamples for every metric). Rates, volume, turnaround and drift are per image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.config import MonitoringSettings
from cxr_node.jobs.interfaces import Store
from cxr_node.jobs.records import PeriodRow
from cxr_node.monitor import drift
from cxr_node.monitor.cases import (
    DAY_S,
    Period,
    Study,
    day_start,
    day_text,
    first_received,
    iso_week,
    probability,
    reference_scores,
    weeks_between,
)
from cxr_node.training.metrics import Confusion, Interval, calibration_bins, roc_auc

METRICS: Final = ("sensitivity", "specificity", "ppv", "npv", "auc")
"""The metrics of a period, in the report's column order."""
QUANTILES: Final = (0.5, 0.95)
"""The turnaround quantiles reported."""
HISTOGRAM_BINS: Final = 10
CONFIDENCE: Final = 0.95
NAN: Final = math.nan


@dataclass(frozen=True)
class Performance:
    """The metrics of the labelled studies of a group: counts, confusion matrix and intervals by metric name."""

    studies: int
    positives: int
    confusion: Confusion
    intervals: dict[str, Interval]


@dataclass(frozen=True)
class Operations:
    """What happened to a group's images: how many, how many analysed, refused or flagged by the out-of-domain gate,
    and the turnaround quantiles (seconds from receipt) to the result (``inferred``) and to the SR's delivery."""

    images: int
    studies: int
    analysed: int
    refused: int
    flagged: int
    turnaround: dict[str, tuple[float, ...]]

    @property
    def not_analysed(self) -> int:
        """Images with a result that says "not analysed" (the gate's refusals among them)."""
        return self.images - self.analysed

    @property
    def out_of_domain_rate(self) -> float:
        """(refused + flagged) / images; nan without images."""
        return (self.refused + self.flagged) / self.images if self.images else NAN

    @property
    def not_analysed_rate(self) -> float:
        """not analysed / images; nan without images."""
        return self.not_analysed / self.images if self.images else NAN


@dataclass(frozen=True)
class Drift:
    """The group's analysed images' probabilities against the reference: PSI, KS statistic and its p-value."""

    images: int
    reference_images: int
    psi: float = NAN
    ks: float = NAN
    p_value: float = NAN


@dataclass(frozen=True)
class Group:
    """The figures of one group of images (the whole period, a week, a modality, a sending system)."""

    name: str
    operations: Operations
    performance: Performance
    drift: Drift


@dataclass(frozen=True)
class Reference:
    """The reference distribution of the scores: where it comes from and the probabilities."""

    since: float
    until: float
    source: str
    scores: NDArray[np.float64] = field(repr=False)

    @property
    def text(self) -> str:
        """E.g. ``412 analysed images received 2026-01-05 to 2026-02-01 (the first 28 days of the data)``."""
        return (f"{self.scores.size} analysed images received {day_text(self.since)} to {day_text(self.until - 1)} "
                f"({self.source})")  # fmt: skip


@dataclass(frozen=True)
class Figures:
    """Everything ``cxr-node report`` shows about a period."""

    period: Period
    overall: Group
    weeks: tuple[Group, ...]
    modalities: tuple[Group, ...]
    senders: tuple[Group, ...]
    reference: Reference | None
    calibration: list[dict[str, float]]
    histogram: dict[str, list[float]]
    thresholds: list[float]
    resamples: int
    seed: int
    bins: int
    min_reference_images: int


# ------------------------------------------------------------------------------------------------ metrics


def _ratios(num: NDArray[np.int64], den: NDArray[np.int64]) -> NDArray[np.float64]:
    """num / den elementwise, nan where den is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def rates(y: NDArray[np.int64], d: NDArray[np.int64]) -> dict[str, NDArray[np.float64]]:
    """Sensitivity, specificity, PPV and NPV of decisions ``d`` against labels ``y``, along the last axis."""
    tp, fp = np.sum(y & d, axis=-1), np.sum((1 - y) & d, axis=-1)
    fn, tn = np.sum(y & (1 - d), axis=-1), np.sum((1 - y) & (1 - d), axis=-1)
    return {"sensitivity": _ratios(tp, tp + fn), "specificity": _ratios(tn, tn + fp), "ppv": _ratios(tp, tp + fp),
            "npv": _ratios(tn, tn + fn)}  # fmt: skip


def _interval(value: float, draws: NDArray[np.float64]) -> Interval:
    finite = draws[np.isfinite(draws)]
    if not math.isfinite(value) or finite.size == 0:
        return Interval(float(value), NAN, NAN)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def performance(studies: Sequence[Study], *, resamples: int, seed: int) -> Performance:
    """The metrics of the labelled ``studies`` with seeded percentile bootstrap intervals (shared resamples).

    Parameters
    ----------
    studies : sequence of Study
        Those without a positive or negative outcome are left out.
    resamples : int
        Bootstrap resamples, >= 1.
    seed : int
        The same seed gives the same intervals.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; found {resamples}")
    labelled = [s for s in studies if s.label is not None]
    y = np.array([s.label for s in labelled], dtype=np.int64)
    d = np.array([int(s.positive) for s in labelled], dtype=np.int64)
    scores = np.array([s.score for s in labelled], dtype=np.float64)
    point = {name: float(values) for name, values in rates(y, d).items()}
    point["auc"] = roc_auc(y, scores)
    tp, fp = int(np.sum(y & d)), int(np.sum((1 - y) & d))
    confusion = Confusion(tp=tp, fp=fp, tn=int(np.sum(1 - y)) - fp, fn=int(y.sum()) - tp)
    if y.size == 0:
        return Performance(0, 0, confusion, {name: Interval(NAN, NAN, NAN) for name in METRICS})
    draws = np.random.default_rng(seed).integers(0, y.size, size=(resamples, y.size))
    sampled = rates(y[draws], d[draws])
    sampled["auc"] = np.array([roc_auc(y[i], scores[i]) for i in draws], dtype=np.float64)
    intervals = {name: _interval(point[name], sampled[name]) for name in METRICS}
    return Performance(int(y.size), int(y.sum()), confusion, intervals)


# --------------------------------------------------------------------------------------------- operations


def _quantiles(values: Sequence[float]) -> tuple[float, ...]:
    if not values:
        return tuple(NAN for _ in QUANTILES)
    return tuple(float(q) for q in np.quantile(np.asarray(values, dtype=np.float64), QUANTILES))


def operations(images: Sequence[PeriodRow], studies: int) -> Operations:
    """Counts, gate outcomes and turnaround of ``images`` (rows with a result of the model judged)."""
    summaries = [row.summary for row in images if row.summary is not None]
    inferred = [row.inferred_at - row.received_at for row in images if row.inferred_at is not None]
    delivered = [row.sr_delivered_at - row.received_at for row in images if row.sr_delivered_at is not None]
    return Operations(
        images=len(images), studies=studies, analysed=sum(1 for s in summaries if s.analysed),
        refused=sum(1 for s in summaries if not s.analysed and s.outside_domain),
        flagged=sum(1 for s in summaries if s.analysed and s.outside_domain),
        turnaround={"inferred": _quantiles(inferred), "sr": _quantiles(delivered)},
    )  # fmt: skip


def _scores(images: Sequence[PeriodRow]) -> NDArray[np.float64]:
    return np.array([p for p in map(probability, images) if p is not None], dtype=np.float64)


def measure_drift(scores: NDArray[np.float64], reference: Reference | None, *, bins: int, minimum: int) -> Drift:
    """PSI and KS of ``scores`` against the reference; nan without scores or with fewer than ``minimum`` reference
    scores."""
    if reference is None or reference.scores.size < minimum:
        return Drift(int(scores.size), 0 if reference is None else int(reference.scores.size))
    ref = reference.scores
    if scores.size == 0:
        return Drift(0, int(ref.size))
    ks = drift.ks_statistic(ref, scores)
    return Drift(int(scores.size), int(ref.size), drift.psi(ref, scores, bins), ks,
                 drift.ks_pvalue(ks, int(ref.size), int(scores.size)))  # fmt: skip


# ------------------------------------------------------------------------------------------------- groups


def group(name: str, images: Sequence[PeriodRow], studies: Sequence[Study], reference: Reference | None, *,
          resamples: int, seed: int, bins: int, minimum: int) -> Group:  # fmt: skip
    """The figures of one group of images and its studies."""
    return Group(name, operations(images, len(studies)), performance(studies, resamples=resamples, seed=seed),
                 measure_drift(_scores(images), reference, bins=bins, minimum=minimum))  # fmt: skip


def _grouped(period: Period, names: Sequence[str], image_key: Callable[[PeriodRow], str],
             study_key: Callable[[Study], str], reference: Reference | None,
             **options: int) -> tuple[Group, ...]:  # fmt: skip
    return tuple(
        group(name, [row for row in period.images if image_key(row) == name],
              [s for s in period.studies if study_key(s) == name], reference, **options)
        for name in names
    )  # fmt: skip


def compute(period: Period, reference: Reference | None, *, resamples: int = 1000, seed: int = 0,
            bins: int = drift.DEFAULT_BINS, min_reference_images: int = 100) -> Figures:  # fmt: skip
    """Every figure of ``period`` (see the module docstring); drift against ``reference`` (None: no drift)."""
    options = {"resamples": resamples, "seed": seed, "bins": bins, "minimum": min_reference_images}
    overall = group("all", period.images, period.studies, reference, **options)
    weeks = _grouped(period, weeks_between(period.since, period.until), lambda r: iso_week(r.received_at),
                     lambda s: s.week, reference, **options)  # fmt: skip
    modalities = sorted({row.modality or "unknown" for row in period.images})
    senders = sorted({row.calling_aet or "unknown" for row in period.images})
    by_modality = _grouped(period, modalities, lambda r: r.modality or "unknown", lambda s: s.modality, reference,
                           **options)  # fmt: skip
    by_sender = _grouped(period, senders, lambda r: r.calling_aet or "unknown", lambda s: s.calling_aet, reference,
                         **options)  # fmt: skip
    labelled = [s for s in period.studies if s.label is not None]
    labels = np.array([s.label for s in labelled], dtype=np.int64)
    calibration = calibration_bins(labels, [s.score for s in labelled]) if labelled else []
    thresholds = sorted({round(row.summary.threshold, 6) for row in period.images
                         if row.summary is not None and row.summary.threshold is not None})  # fmt: skip
    return Figures(period, overall, weeks, by_modality, by_sender, reference, calibration,
                   histogram(_scores(period.images), reference), thresholds, resamples, seed, bins,
                   min_reference_images)  # fmt: skip


def histogram(scores: NDArray[np.float64], reference: Reference | None) -> dict[str, list[float]]:
    """The share of the period's and the reference's scores in :data:`HISTOGRAM_BINS` equal bins of [0, 1]."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)

    def share(values: NDArray[np.float64]) -> list[float]:
        counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=edges)
        return [float(c) / max(values.size, 1) for c in counts]

    found = {"edges": edges.tolist(), "period": share(scores)}
    if reference is not None:
        found["reference"] = share(reference.scores)
    return found


# ---------------------------------------------------------------------------------------------- reference


def reference_window(settings: MonitoringSettings, store: Store,
                     given: tuple[date, date] | None = None) -> tuple[float, float, str] | None:  # fmt: skip
    """The window of the reference distribution and where it comes from: ``given`` (the command's flags), else
    ``monitoring.baseline_since``/``baseline_until``, else the first ``monitoring.baseline_days`` days of the data in
    the store (from the day its first job was received); None when the store has no job."""
    if given is not None:
        return _epoch(given[0]), _epoch(given[1]), "--baseline-since/--baseline-until"
    if settings.baseline_since is not None and settings.baseline_until is not None:
        return (_epoch(settings.baseline_since), _epoch(settings.baseline_until),
                "monitoring.baseline_since/baseline_until")  # fmt: skip
    first = first_received(store)
    if first is None:
        return None
    start = day_start(first)
    end = min(start + settings.baseline_days * DAY_S, day_start(time.time()) + DAY_S)  # not past today
    return start, end, f"the first {settings.baseline_days:g} days of the data"


def read_reference(settings: MonitoringSettings, store: Store, model: str,
                   given: tuple[date, date] | None = None) -> Reference | None:  # fmt: skip
    """The reference distribution of ``model``'s scores (see :func:`reference_window`)."""
    window = reference_window(settings, store, given)
    if window is None:
        return None
    since, until, source = window
    scores = np.asarray(reference_scores(store, since, until, model), dtype=np.float64)
    return Reference(since, until, source, scores)


def _epoch(day: date) -> float:
    """00:00 UTC of ``day`` as epoch seconds."""
    return float((day - date(1970, 1, 1)).days * DAY_S)
