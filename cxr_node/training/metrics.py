"""Binary classification metrics, bootstrap confidence intervals, operating points and retrieval precision.

Pure numpy, no I/O. Labels are 0/1 arrays, scores are real arrays of the same length (higher means more
likely positive); a prediction is positive when ``score >= threshold``. A metric whose denominator is zero
(sensitivity without positives, AUC with one class) is ``nan``, never an exception, so that a bootstrap
resample that happens to miss a class is skipped rather than fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Metric = Callable[[NDArray[np.int64], NDArray[np.float64]], float]
ThresholdMethod = Literal["youden", "sensitivity"]

METRICS: Final = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc")
"""The metrics the paper reports, in its column order."""
DEFAULT_RESAMPLES: Final = 1000


@dataclass(frozen=True)
class Confusion:
    """Counts of a 2x2 confusion matrix at one threshold."""

    tp: int
    fp: int
    tn: int
    fn: int

    def as_dict(self) -> dict[str, int]:
        """Return the four counts by name."""
        return asdict(self)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval (``nan`` bounds when it cannot be had)."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        """Return value, low and high by name."""
        return asdict(self)


# ------------------------------------------------------------------------------------------ checks


def as_labels(y_true: ArrayLike) -> NDArray[np.int64]:
    """Return ``y_true`` as a 1-D int64 array of 0/1; ValueError otherwise."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D; found shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 and 1; found {sorted(set(np.unique(y).tolist()))[:5]}")
    return y.astype(np.int64)


def as_scores(scores: ArrayLike, n: int) -> NDArray[np.float64]:
    """Return ``scores`` as a finite 1-D float64 array of length ``n``; ValueError otherwise."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) like y_true; found {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite; found NaN or infinity")
    return s


def _pair(y_true: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Return checked labels and scores."""
    y = as_labels(y_true)
    return y, as_scores(scores, y.size)


def _ratio(num: float, den: float) -> float:
    """Return ``num / den``, or nan when ``den`` is zero."""
    return float(num / den) if den else float("nan")


# ------------------------------------------------------------------------------- threshold metrics


def confusion(y_true: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> Confusion:
    """Return the confusion matrix of ``scores >= threshold`` against ``y_true``."""
    y, s = _pair(y_true, scores)
    predicted = s >= threshold
    positive = y == 1
    return Confusion(
        tp=int(np.sum(predicted & positive)),
        fp=int(np.sum(predicted & ~positive)),
        tn=int(np.sum(~predicted & ~positive)),
        fn=int(np.sum(~predicted & positive)),
    )


def accuracy(c: Confusion) -> float:
    """Return (TP + TN) / all."""
    return _ratio(c.tp + c.tn, c.tp + c.tn + c.fp + c.fn)


def sensitivity(c: Confusion) -> float:
    """Return TP / (TP + FN), the recall of positives."""
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Confusion) -> float:
    """Return TN / (TN + FP)."""
    return _ratio(c.tn, c.tn + c.fp)


def ppv(c: Confusion) -> float:
    """Return TP / (TP + FP), the positive predictive value (precision)."""
    return _ratio(c.tp, c.tp + c.fp)


def npv(c: Confusion) -> float:
    """Return TN / (TN + FN), the negative predictive value."""
    return _ratio(c.tn, c.tn + c.fn)


def f1(c: Confusion) -> float:
    """Return 2 TP / (2 TP + FP + FN)."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)


_AT_THRESHOLD: Final = {
    "accuracy": accuracy,
    "sensitivity": sensitivity,
    "specificity": specificity,
    "ppv": ppv,
    "npv": npv,
    "f1": f1,
}


# ------------------------------------------------------------------------------------------- ranks


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Return the area under the ROC curve from ranks (Mann-Whitney U); tied scores count one half.

    Returns
    -------
    float
        The probability that a random positive scores above a random negative (ties 0.5); nan when
        ``y_true`` holds only one class.
    """
    y, s = _pair(y_true, scores)
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = average_ranks(s)
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Return the 1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_curve(
    y_true: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Return the ROC curve: false and true positive rates at each distinct score used as threshold.

    Returns
    -------
    fpr, tpr : numpy.ndarray
        From (0, 0) (threshold above every score) to (1, 1); nan rates when a class is absent.
    thresholds : numpy.ndarray
        ``inf`` first, then the distinct scores in decreasing order.
    """
    y, s = _pair(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = np.cumsum(1 - y_sorted)[last_of_tie]
    positives, negatives = y.sum(), y.size - y.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0, tp] / positives
        fpr = np.r_[0, fp] / negatives
    return fpr.astype(np.float64), tpr.astype(np.float64), np.r_[np.inf, s_sorted[last_of_tie]]


# ----------------------------------------------------------------------------------- all at once


def binary_metrics(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Return every metric of :data:`METRICS` for ``scores`` at ``threshold``."""
    y, s = _pair(y_true, scores)
    c = confusion(y, s, threshold)
    found = {name: fn(c) for name, fn in _AT_THRESHOLD.items()}
    found["auc"] = roc_auc(y, s)
    return found


def metric_function(name: str, threshold: float) -> Metric:
    """Return ``f(y, scores) -> float`` computing metric ``name`` (one of :data:`METRICS`) at ``threshold``."""
    if name == "auc":
        return roc_auc
    if name not in _AT_THRESHOLD:
        raise ValueError(f"metric must be one of {METRICS}; found {name!r}")
    at = _AT_THRESHOLD[name]
    return lambda y, s: at(confusion(y, s, threshold))


def bootstrap_ci(
    metric: Metric,
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Return ``metric`` on the sample and its percentile bootstrap confidence interval.

    Parameters
    ----------
    metric : callable
        ``f(y, scores) -> float``, e.g. :func:`roc_auc` or :func:`metric_function`.
    y_true, scores : array_like
        The sample; resampled together, with replacement, ``n_resamples`` times.
    n_resamples : int
        Number of bootstrap resamples, >= 1.
    confidence : float
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the resampling; the same seed gives the same interval.

    Returns
    -------
    Interval
        Resamples where the metric is nan (a class missing) are left out; bounds are nan if all are.
    """
    y, s = _pair(y_true, scores)
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1; found {n_resamples}, {confidence}")
    value = float(metric(y, s))
    if y.size == 0:
        return Interval(value, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, y.size, size=(n_resamples, y.size))
    values = np.array([metric(y[idx], s[idx]) for idx in draws], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(value, float("nan"), float("nan"))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def metrics_with_ci(
    y_true: ArrayLike, scores: ArrayLike, threshold: float, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, Interval]:
    """Return every metric of :data:`METRICS` at ``threshold`` with its bootstrap 95% CI."""
    return {
        name: bootstrap_ci(metric_function(name, threshold), y_true, scores, n_resamples=n_resamples, seed=seed)
        for name in METRICS
    }


# ---------------------------------------------------------------------------------- operating point


def pick_threshold(
    y_true: ArrayLike, scores: ArrayLike, method: ThresholdMethod = "youden", target: float = 0.9
) -> float:
    """Choose an operating threshold (positive when ``score >= threshold``) on a validation set.

    Parameters
    ----------
    y_true, scores : array_like
        Validation labels (both classes present) and scores.
    method : {"youden", "sensitivity"}
        ``"youden"``: maximise Youden's J = sensitivity + specificity - 1 (ties: the highest threshold).
        ``"sensitivity"``: the highest threshold whose sensitivity is at least ``target``, i.e. the best
        specificity that meets it.
    target : float
        Sensitivity wanted by ``"sensitivity"``, in (0, 1].

    Returns
    -------
    float
        Midway between the chosen score and the next lower distinct score (so the set is classified the
        same way, with a margin on both sides); the chosen score itself when it is the lowest.
    """
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    if not (np.isfinite(tpr).all() and np.isfinite(fpr).all()):
        raise ValueError("pick_threshold needs both classes in y_true")
    if method == "youden":
        youden = tpr - fpr
        k = int(np.flatnonzero(youden >= youden.max() - 1e-12)[0])  # ties (to rounding): the highest cut
    elif method == "sensitivity":
        if not 0 < target <= 1:
            raise ValueError(f"target must be in (0, 1]; found {target}")
        k = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    else:
        raise ValueError(f"method must be 'youden' or 'sensitivity'; found {method!r}")
    k = max(k, 1)  # index 0 is "above every score": predicts nothing positive
    lower = thresholds[k + 1] if k + 1 < thresholds.size else thresholds[k]
    return float((thresholds[k] + lower) / 2)


# -------------------------------------------------------------------------------------- calibration


def calibration_bins(y_true: ArrayLike, probabilities: ArrayLike, bins: int = 10) -> list[dict[str, float]]:
    """Return, for each non-empty equal-width probability bin, its mean prediction, observed rate and count."""
    y, p = _pair(y_true, probabilities)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append({"predicted": float(p[inside].mean()), "observed": float(y[inside].mean()),
                        "count": float(inside.sum())})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------- retrieval


def precision_at_k(embeddings: ArrayLike, labels: ArrayLike, groups: ArrayLike | None = None, k: int = 5) -> float:
    """Return the mean share of each item's ``k`` nearest neighbours that carry its label.

    Neighbours are ranked by cosine similarity, leaving the item itself out and, when ``groups`` (e.g.
    patient IDs) are given, every item of its own group, so that a second image of the same patient
    cannot count as a hit. Items with fewer than ``k`` eligible neighbours use those they have; items
    with none are skipped.

    Parameters
    ----------
    embeddings : array_like
        ``(N, D)`` real vectors (normalised here).
    labels : array_like
        ``(N,)`` labels of any hashable kind.
    groups : array_like, optional
        ``(N,)`` group of each item.
    k : int
        Neighbours per item, >= 1.

    Returns
    -------
    float
        In [0, 1]; nan when no item has a neighbour.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    lab = np.asarray(labels)
    if x.ndim != 2 or lab.shape != (x.shape[0],) or k < 1:
        raise ValueError(f"need (N, D) embeddings, (N,) labels and k >= 1; found {x.shape}, {lab.shape}, k={k}")
    grp = np.arange(x.shape[0]) if groups is None else np.asarray(groups)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    similarity = x @ x.T
    similarity[grp[:, None] == grp[None, :]] = -np.inf  # self and same group
    shares = []
    for i in range(x.shape[0]):
        eligible = int(np.isfinite(similarity[i]).sum())
        if eligible == 0:
            continue
        nearest = np.argsort(-similarity[i], kind="mergesort")[: min(k, eligible)]
        shares.append(float(np.mean(lab[nearest] == lab[i])))
    return float(np.mean(shares)) if shares else float("nan")


def summarise(intervals: Mapping[str, Interval]) -> dict[str, dict[str, float]]:
    """Return ``intervals`` as plain nested dicts (for JSON and YAML)."""
    return {name: interval.as_dict() for name, interval in intervals.items()}
