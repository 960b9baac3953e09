"""Resampling of 2-D arrays, one axis at a time, in numpy.

An area average when a side shrinks (each output pixel is the exact mean of the source area it covers),
bilinear interpolation with pixel centres aligned when it grows, or nearest neighbour for labels and masks.
Arrays are checked on entry (``ValueError`` naming the argument, the expected and the found dtype, ndim or shape).
"""

from __future__ import annotations

import functools
import math
from typing import Final, Literal

import numpy as np

Order = Literal["linear", "nearest"]

REAL: Final = "iuf"
"""dtype kinds of real numbers: signed and unsigned integers, floats."""
FLOAT: Final = "f"


HEATMAP_SIDE: Final = 256
"""Heatmaps are carried from the engine to the Secondary Capture on the image's grid reduced to at most this many
pixels a side (:func:`scaled_shape`), and resampled to the image's grid only where the picture shows them:
Grad-CAM's own resolution is far coarser (7 x 7 to 32 x 32 cells), and a full-size float map cost three
whole-image resamplings per image."""

Window = tuple[slice, slice]
"""(rows, cols) slices of a resampled array, each with step 1."""


def resize(
    img: np.ndarray, shape: tuple[int, int], order: Order = "linear", window: Window | None = None
) -> np.ndarray:
    """Resample ``img`` to ``shape``, one axis at a time.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W); float for ``order="linear"``, any real or bool dtype for ``"nearest"``.
    shape : tuple[int, int]
        (rows, cols) wanted, each >= 1.
    order : {"linear", "nearest"}
        ``"linear"``: area average along a shrinking axis, bilinear (pixel centres aligned) along a growing one.
    window : tuple[slice, slice] or None
        Only this part of the result, ``resize(img, shape)[window]``, element for element the same values at the
        cost of the part alone (what a picture needs where only a region shows the map).

    Returns
    -------
    numpy.ndarray
        ``shape`` (or the window's shape); float32 for ``"linear"``, the dtype of ``img`` for ``"nearest"``.
    """
    check_order(order)
    kinds, expected = (FLOAT, "a float32 or float64 array") if order == "linear" else (REAL + "b", "a real array")
    check_array("img", img, kinds, expected)
    _check_shape(shape)
    keep = (slice(None), slice(None)) if window is None else _check_window(window, shape)
    first = _first_axis(img.shape, shape)
    out = _resample_axis(img, int(shape[first]), first, order, keep[first])
    out = _resample_axis(out, int(shape[1 - first]), 1 - first, order, keep[1 - first])
    return out.astype(np.float32, copy=False) if order == "linear" else out


def resize_each(img: np.ndarray, shapes: tuple[tuple[int, int], ...]) -> list[np.ndarray]:
    """``[resize(img, shape) for shape in shapes]``, element for element, with a first pass shared where it is equal.

    Reductions of one image to several small grids (a network's input, a statistics grid) usually start with the
    same pass along the same axis to the same length: the costly one, over the whole image. It is made once.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W) float32 or float64.
    shapes : tuple of (int, int)
        The (rows, cols) wanted, each side >= 1.

    Returns
    -------
    list of numpy.ndarray
        float32, one per shape, in order.
    """
    check_array("img", img, FLOAT, "a float32 or float64 array")
    passes: dict[tuple[int, int], np.ndarray] = {}
    out = []
    for shape in shapes:
        _check_shape(shape)
        first = _first_axis(img.shape, shape)
        key = (first, int(shape[first]))
        if key not in passes:
            passes[key] = _resample_axis(img, key[1], first, "linear")
        second = _resample_axis(passes[key], int(shape[1 - first]), 1 - first, "linear")
        out.append(second.astype(np.float32, copy=False))
    return out


def _check_shape(shape: object) -> None:
    """Raise ValueError unless ``shape`` is two ints >= 1."""
    if not (isinstance(shape, tuple | list) and len(shape) == 2) or not all(
        isinstance(n, int | np.integer) and n >= 1 for n in shape
    ):
        raise ValueError(f"shape must be two positive ints (rows, cols); found {shape!r}")


def _first_axis(source: tuple[int, ...], shape: tuple[int, int]) -> int:
    """The axis :func:`resize` resamples first: the one that shrinks most (the second pass then works on less)."""
    return 0 if shape[0] / source[0] <= shape[1] / source[1] else 1


SAFE_MARGIN: Final = 1e-5
"""Relative margin that decides a grown value against a threshold from its two taps alone: a bilinear value is a
convex combination of them with float32 weights, off by a few float32 roundings (about 2e-7 relative) at most."""


def resize_above(img: np.ndarray, shape: tuple[int, int], threshold: float) -> np.ndarray:
    """``resize(img, shape) > threshold``, the same bool for every pixel, computing values only near the threshold.

    When both sides grow (a network's probability map brought back to the image) each value of the second pass
    lies between its two taps; where both taps are clearly above (or below) the threshold the answer is known
    without the value, so only the pixels along the map's level line are computed, as :func:`resize` computes
    them. Otherwise (a side shrinks, a threshold <= 0, negative values) it is ``resize(img, shape) > threshold``.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W) float32 or float64, finite.
    shape : tuple[int, int]
        (rows, cols) wanted, each >= 1.
    threshold : float
        Compared as ``resize`` output ``> threshold`` is (against float32 values).

    Returns
    -------
    numpy.ndarray
        ``shape`` bool.
    """
    check_array("img", img, FLOAT, "a float32 or float64 array")
    _check_shape(shape)
    if min(shape[0] / img.shape[0], shape[1] / img.shape[1]) <= 1.0 or not threshold > 0.0 or float(img.min()) < 0.0:
        return resize(img, shape) > threshold
    first = _first_axis(img.shape, shape)  # as resize: the second pass is the one to the full size
    grown = _resample_axis(img, int(shape[first]), first, "linear")
    if first == 1:  # the last pass is along the rows: work on rows
        return _linear_above(grown, int(shape[0]), threshold)
    return np.ascontiguousarray(_linear_above(np.ascontiguousarray(grown.T), int(shape[1]), threshold).T)


def _linear_above(arr: np.ndarray, n_out: int, threshold: float) -> np.ndarray:
    """``_resample_axis(arr, n_out, 0, "linear") > threshold`` for a growing axis, deciding row pairs at once."""
    n_in = arr.shape[0]
    index, weight = _linear_taps(n_in, n_out)
    following = arr[np.minimum(np.arange(n_in) + 1, n_in - 1)]  # an output row's taps are rows (below, this)
    low, high = np.minimum(arr, following), np.maximum(arr, following)
    decided = np.full(arr.shape, 2, dtype=np.uint8)  # 2: the value itself is needed
    decided[low > threshold * (1.0 + SAFE_MARGIN)] = 1
    decided[high < threshold * (1.0 - SAFE_MARGIN)] = 0
    out = decided[index[0]]
    pairs, cols = np.divmod(np.flatnonzero(decided == 2), arr.shape[1])  # on the small array, flat: a full-size
    # or 2-D nonzero costs more than the values
    if pairs.size:
        first = np.searchsorted(index[0], pairs, side="left")  # the output rows whose lower tap is that row
        count = np.searchsorted(index[0], pairs, side="right") - first
        start = np.repeat(first - np.cumsum(count) + count, count)
        rows = start + np.arange(int(count.sum()))
        cols = np.repeat(cols, count)
        below, above = index[0, rows], index[1, rows]
        value = arr[below, cols] * weight[0, rows].astype(arr.dtype, copy=False)
        value += arr[above, cols] * weight[1, rows].astype(arr.dtype, copy=False)
        out[rows, cols] = value.astype(np.float32, copy=False) > threshold
    above_threshold: np.ndarray = out.view(np.bool_)
    return above_threshold


def scaled_shape(shape: tuple[int, int], longest: int) -> tuple[int, int]:
    """``shape`` reduced, keeping its aspect, so that its longer side is at most ``longest`` (unchanged if it is)."""
    scale = min(1.0, longest / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _check_window(window: object, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Return ``window`` as two slices of ``range(n)`` for each side n of ``shape``, or raise ValueError."""
    if not (isinstance(window, tuple) and len(window) == 2 and all(isinstance(s, slice) for s in window)):
        raise ValueError(f"window must be two slices (rows, cols); found {window!r}")
    found = []
    for part, n in zip(window, shape, strict=True):
        start, stop, step = part.indices(n)
        if step != 1 or stop <= start:
            raise ValueError(f"window must be two non-empty slices with step 1 within {shape}; found {window!r}")
        found.append(slice(start, stop))
    return found[0], found[1]


_ALL: Final = slice(None)

BAND_ELEMENTS: Final = 1 << 16
"""Output elements resampled at once: the gathered taps and their sum (256 KiB each in float32) stay in a core's
cache instead of streaming whole-image temporaries through memory (1.4-2x faster when growing to 1024 x 1024)."""


def _resample_axis(arr: np.ndarray, n_out: int, axis: int, order: Order, keep: slice = _ALL) -> np.ndarray:
    """Resample ``arr`` to ``n_out`` along ``axis`` as a weighted sum of a few gathered rows or columns.

    Only the outputs ``keep`` (a step-1 slice of ``range(n_out)``) are made. The output is made in bands of
    about :data:`BAND_ELEMENTS`; each element is the same sum of the same products, in the same order, as when
    the whole array is done at once.
    """
    n_in = arr.shape[axis]
    if n_out == n_in:
        return arr[keep] if axis == 0 else arr[:, keep]
    if order == "nearest":
        return np.take(arr, _nearest_index(n_in, n_out)[keep], axis=axis)
    index, weight = _area_taps(n_in, n_out) if n_out < n_in else _linear_taps(n_in, n_out)
    index, weight = index[:, keep], weight[:, keep]
    n_out = index.shape[1]
    shape = (n_out, arr.shape[1]) if axis == 0 else (arr.shape[0], n_out)
    out = np.empty(shape, dtype=np.result_type(arr.dtype, weight.dtype))
    rows = max(1, BAND_ELEMENTS // shape[1])
    for start in range(0, shape[0], rows):
        band = slice(start, start + rows)
        if axis == 0:  # output rows [band] gather their own taps from all of arr
            out[band] = _weighted_taps(arr, index[:, band], weight[:, band, None], 0)
        else:  # output rows [band] are the same rows of arr, resampled along them
            out[band] = _weighted_taps(arr[band], index, weight[:, None, :], 1)
    return out


def _weighted_taps(arr: np.ndarray, index: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """Sum over the taps of ``arr`` gathered at ``index[k]`` along ``axis`` times ``weight[k]``."""
    total: np.ndarray | None = None
    for taps, weights in zip(index, weight, strict=True):
        term = np.take(arr, taps, axis=axis)
        term *= weights
        total = term if total is None else np.add(total, term, out=total)
    assert total is not None  # at least one tap
    return total


TAP_CACHE: Final = 64
"""Tap tables kept per (n_in, n_out): an image's resamplings recur from image to image of one modality, and a
table costs about 0.1 ms to make (a dozen per image)."""


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays made read-only: a cached table is shared by every later call."""
    for array in arrays:
        array.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=TAP_CACHE)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (taps, n_out) source indices and weights: each output averages the span ``[i s, (i + 1) s)``."""
    step = n_in / n_out
    starts = np.arange(n_out) * step
    ends = np.minimum(starts + step, n_in)
    index = np.floor(starts).astype(np.intp)[None, :] + np.arange(math.ceil(step) + 1)[:, None]
    overlap = np.clip(np.minimum(index + 1, ends) - np.maximum(index, starts), 0.0, None)
    weight = overlap / overlap.sum(axis=0, keepdims=True)
    index, weight = _frozen(np.minimum(index, n_in - 1), weight.astype(np.float32))
    return index, weight


@functools.lru_cache(maxsize=TAP_CACHE)
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (2, n_out) source indices and weights of bilinear interpolation with aligned pixel centres."""
    position = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    below = np.floor(position).astype(np.intp)
    frac = (position - below).astype(np.float32)
    index, weight = _frozen(np.stack([below, np.minimum(below + 1, n_in - 1)]), np.stack([1.0 - frac, frac]))
    return index, weight


@functools.lru_cache(maxsize=TAP_CACHE)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Return the source index whose pixel contains each output pixel's centre."""
    (index,) = _frozen(np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1))
    return index


def check_array(name: str, arr: object, kinds: str, expected: str, shape: tuple[int, ...] | None = None) -> None:
    """Raise unless ``arr`` is a non-empty 2-D array of one of the dtype ``kinds`` (and ``shape`` when given)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray; found {type(arr).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W); found ndim {arr.ndim}, shape {arr.shape}")
    if arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must be {expected}; found dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty; found shape {arr.shape}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; found {arr.shape}")


def check_finite(name: str, arr: np.ndarray) -> None:
    """Raise ValueError if a float ``arr`` holds NaN or infinity (one float64 sum; exact check only if it fails)."""
    if arr.dtype.kind == "f" and not math.isfinite(arr.sum(dtype=np.float64)) and not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; found {np.count_nonzero(~np.isfinite(arr))} NaN or infinite pixels")


def check_order(order: object) -> None:
    """Raise ValueError unless ``order`` is "linear" or "nearest"."""
    if order not in ("linear", "nearest"):
        raise ValueError(f"order must be 'linear' or 'nearest'; found {order!r}")
