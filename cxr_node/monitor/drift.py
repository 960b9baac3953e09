"""Distribution shift between a reference sample of scores and a later one: PSI and the two-sample KS test.

Pure numpy, no I/O. Both tests compare the *distribution* of the model's probabilities, with no need for outcomes:
a shift says the inputs (patients, scanners, protocols) or the model's behaviour on them changed, not that the
model is wrong.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

DEFAULT_BINS: Final = 10
EMPTY_SHARE: Final = 1e-4
"""The share an empty bin counts as in the PSI (its logarithm would be infinite)."""


def _sample(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """``values`` as a finite 1-D float64 array; ValueError naming ``name`` otherwise."""
    found = np.asarray(values, dtype=np.float64)
    if found.ndim != 1 or not np.isfinite(found).all():
        raise ValueError(f"{name} must be a 1-D array of finite numbers; found shape {found.shape}")
    return found


def psi_of_shares(expected: ArrayLike, actual: ArrayLike) -> float:
    """The population stability index of two binned distributions: sum((a - e) * ln(a / e)).

    Parameters
    ----------
    expected, actual : array_like
        The share of the reference and of the sample in each bin (each summing to 1); a share of 0 counts as
        :data:`EMPTY_SHARE`.

    Returns
    -------
    float
        >= 0; 0 when the shares are equal. Rules of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major.
    """
    e = np.maximum(_sample(expected, "expected"), EMPTY_SHARE)
    a = np.maximum(_sample(actual, "actual"), EMPTY_SHARE)
    if e.shape != a.shape:
        raise ValueError(f"expected and actual need one shape; found {e.shape} and {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


def quantile_edges(reference: ArrayLike, bins: int = DEFAULT_BINS) -> NDArray[np.float64]:
    """The inner bin edges of ``bins`` equally filled bins of ``reference`` (its quantiles; ties merge bins)."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2; found {bins}")
    ref = _sample(reference, "reference")
    if ref.size == 0:
        raise ValueError("the reference is empty")
    inner = np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return np.asarray(np.unique(inner), dtype=np.float64)


def shares(values: ArrayLike, edges: NDArray[np.float64]) -> NDArray[np.float64]:
    """The share of ``values`` in each bin that the inner ``edges`` make (a value on an edge goes above it)."""
    found = _sample(values, "values")
    counts = np.bincount(np.searchsorted(edges, found, side="right"), minlength=edges.size + 1)
    return counts / max(found.size, 1)


def psi(reference: ArrayLike, sample: ArrayLike, bins: int = DEFAULT_BINS) -> float:
    """The PSI of ``sample`` against ``reference``, in bins holding equal shares of the reference (its quantiles).

    Returns
    -------
    float
        nan when either sample is empty. With no shift at all it is still about (bins - 1) * (1/n + 1/m) on
        average (sampling noise of n and m values): read a small sample's PSI with that in mind.
    """
    ref, found = _sample(reference, "reference"), _sample(sample, "sample")
    if ref.size == 0 or found.size == 0:
        return math.nan
    edges = quantile_edges(ref, bins)
    return psi_of_shares(shares(ref, edges), shares(found, edges))


def ks_statistic(reference: ArrayLike, sample: ArrayLike) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs (nan if empty)."""
    a = np.sort(_sample(reference, "reference"))
    b = np.sort(_sample(sample, "sample"))
    if a.size == 0 or b.size == 0:
        return math.nan
    at = np.concatenate([a, b])
    gap = np.searchsorted(a, at, side="right") / a.size - np.searchsorted(b, at, side="right") / b.size
    return float(np.max(np.abs(gap)))


def ks_pvalue(statistic: float, n: int, m: int) -> float:
    """The asymptotic p-value of a two-sample KS ``statistic`` of samples of ``n`` and ``m`` values.

    Kolmogorov's limiting distribution with Stephens' small-sample correction, Q(lambda) = 2 sum_k (-1)^(k-1)
    exp(-2 k^2 lambda^2), lambda = (sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) D, ne = n m / (n + m). nan without data.
    """
    if n < 1 or m < 1 or not math.isfinite(statistic):
        return math.nan
    root = math.sqrt(n * m / (n + m))
    lam = (root + 0.12 + 0.11 / root) * statistic
    if lam < 0.2:  # the series converges slowly here, and the answer is 1 to many decimals
        return 1.0
    k = np.arange(1, 101)
    q = 2.0 * float(np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * lam**2)))
    return min(1.0, max(0.0, q))
