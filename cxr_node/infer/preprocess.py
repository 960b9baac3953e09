"""Pure image maths around a network: robust normalisation, fitting to a square input and back, lung crops.

Every function takes and returns numpy arrays, checks them on entry (``ValueError`` naming the argument, the
expected and the found dtype, ndim or shape) and does no I/O and no logging. Resampling is
:func:`cxr_node.imaging.resample.resize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from cxr_node.imaging.resample import (
    FLOAT,
    REAL,
    Order,
    check_array,
    check_finite,
    check_order,
    resize,
    resize_above,
    resize_each,
)

__all__ = [
    "Box",
    "Fit",
    "Order",
    "crop_to_mask",
    "fit",
    "fit_and_reduce",
    "mask_outside",
    "normalise",
    "resize",
    "unfit",
    "unfit_above",
    "unfit_onto",
]

SAMPLE_PIXELS: Final = 1 << 18
"""Percentiles are computed on a regular subsample of about this many pixels (exact below it)."""
_SELECT_MIN_PIXELS: Final = 1 << 12
"""Below this many sample pixels :func:`numpy.percentile` is used as it is (its cost is then negligible)."""


@dataclass(frozen=True)
class Fit:
    """How :func:`fit` placed an image on a ``size`` x ``size`` canvas, so :func:`unfit` can undo it.

    Attributes
    ----------
    source_shape : tuple[int, int]
        (H, W) of the image given to :func:`fit`.
    size : int
        Side of the square canvas.
    scale : float
        ``size / max(H, W)``: canvas pixels per source pixel (per-axis scales differ from it by rounding only).
    resized_shape : tuple[int, int]
        (h, w) of the resized image on the canvas; ``max(h, w) == size``.
    top, left : int
        Offsets of the resized image on the canvas; the rest of the canvas is zero padding.
    """

    source_shape: tuple[int, int]
    size: int
    scale: float
    resized_shape: tuple[int, int]
    top: int
    left: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """The (rows, cols) slices of the canvas that hold the image."""
        height, width = self.resized_shape
        return slice(self.top, self.top + height), slice(self.left, self.left + width)


@dataclass(frozen=True)
class Box:
    """A crop of an image: rows ``row0:row1`` and columns ``col0:col1`` (half-open) of ``source_shape``."""

    row0: int
    row1: int
    col0: int
    col1: int
    source_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the crop."""
        return self.row1 - self.row0, self.col1 - self.col0

    @property
    def slices(self) -> tuple[slice, slice]:
        """The (rows, cols) slices of the source image that make the crop."""
        return slice(self.row0, self.row1), slice(self.col0, self.col1)

    def paste(self, arr: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Place a map computed on the crop back onto the source image's grid.

        Parameters
        ----------
        arr : numpy.ndarray
            (rows, cols) of :attr:`shape`, any real or bool dtype.
        fill : float
            Value outside the box.

        Returns
        -------
        numpy.ndarray
            :attr:`source_shape`, dtype of ``arr``.
        """
        check_array("arr", arr, REAL + "b", "a real or bool array", shape=self.shape)
        out = np.full(self.source_shape, fill, dtype=arr.dtype)
        out[self.slices] = arr
        return out


def normalise(img: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles of ``img`` onto 0 and 1, clipping outside.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W) finite real numbers, any integer or float dtype.
    low, high : float
        Percentiles, ``0 <= low < high <= 100``, estimated on a regular subsample of about
        :data:`SAMPLE_PIXELS` pixels.

    Returns
    -------
    numpy.ndarray
        (H, W) float32 in ``[0, 1]``; all zeros when the two percentiles are equal (a constant image).
    """
    check_array("img", img, REAL, "a real (integer or float) array")
    check_finite("img", img)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"low and high must satisfy 0 <= low < high <= 100; found low={low!r}, high={high!r}")
    lo, hi = _percentiles(_subsample(img), low, high)
    if not hi > lo:
        return np.zeros(img.shape, dtype=np.float32)
    out = np.asarray(img, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def fit(img: np.ndarray, size: int) -> tuple[np.ndarray, Fit]:
    """Resize ``img`` keeping its aspect so its longer side is ``size``, centred on a zero ``size`` x ``size`` canvas.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W) finite float32 or float64.
    size : int
        Side of the square network input, >= 1.

    Returns
    -------
    canvas : numpy.ndarray
        (size, size) float32: the resized image (area average when shrinking, bilinear when growing) with
        zero padding around it.
    placement : Fit
        What :func:`unfit` needs to map a canvas-sized map back to (H, W).
    """
    check_array("img", img, FLOAT, "a float32 or float64 array")
    check_finite("img", img)
    placement = _placement(img.shape, size)
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[placement.slices] = resize(img, placement.resized_shape)
    return canvas, placement


def fit_and_reduce(img: np.ndarray, size: int, shape: tuple[int, int]) -> tuple[np.ndarray, Fit, np.ndarray]:
    """``fit(img, size)`` and ``resize(img, shape)`` at once, element for element, sharing their first pass.

    The segmentation's input and the image statistics' grid are both reductions of the whole normalised image; their
    first pass (along the axis that shrinks most, to about the same length) is the one that reads all of it.

    Returns
    -------
    canvas, placement
        As :func:`fit` returns them.
    reduced : numpy.ndarray
        ``shape`` float32: ``resize(img, shape)``.
    """
    check_array("img", img, FLOAT, "a float32 or float64 array")
    check_finite("img", img)
    placement = _placement(img.shape, size)
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[placement.slices], reduced = resize_each(img, (placement.resized_shape, shape))
    return canvas, placement, reduced


def _placement(shape: tuple[int, ...], size: int) -> Fit:
    """Where :func:`fit` puts an image of ``shape`` on its ``size`` x ``size`` canvas."""
    _check_size(size)
    rows, cols = int(shape[0]), int(shape[1])
    scale = size / max(rows, cols)
    resized_shape = (min(size, max(1, round(rows * scale))), min(size, max(1, round(cols * scale))))
    return Fit(
        source_shape=(rows, cols),
        size=size,
        scale=scale,
        resized_shape=resized_shape,
        top=(size - resized_shape[0]) // 2,
        left=(size - resized_shape[1]) // 2,
    )


def unfit(arr: np.ndarray, fit: Fit, order: Order = "linear") -> np.ndarray:
    """Map a canvas-sized map (mask, heatmap) back onto the grid of the image given to :func:`fit`.

    Parameters
    ----------
    arr : numpy.ndarray
        (fit.size, fit.size). Float32/float64 for ``order="linear"``; any real or bool dtype for ``"nearest"``.
    fit : Fit
        The placement :func:`fit` returned.
    order : {"linear", "nearest"}
        ``"linear"``: bilinear where the map grows, area average where it shrinks; ``"nearest"`` keeps labels.

    Returns
    -------
    numpy.ndarray
        ``fit.source_shape``; float32 for ``"linear"``, the dtype of ``arr`` for ``"nearest"``. The padding is
        dropped.
    """
    if not isinstance(fit, Fit):
        raise TypeError(f"fit must be a Fit; found {type(fit).__name__}")
    check_order(order)
    square = (fit.size, fit.size)
    if order == "linear":
        check_array("arr", arr, FLOAT, "a float32 or float64 array for order='linear'", shape=square)
        check_finite("arr", arr)
    else:
        check_array("arr", arr, REAL + "b", "a real or bool array", shape=square)
    return resize(arr[fit.slices], fit.source_shape, order)


def unfit_above(arr: np.ndarray, fit: Fit, threshold: float) -> np.ndarray:
    """``unfit(arr, fit) > threshold``, the same bool for every pixel, at a fraction of the cost when the map grows.

    A lung mask is a probability map brought back to the image and thresholded; away from the lungs' edges the
    answer is known from the map's own pixels (:func:`~cxr_node.imaging.resample.resize_above`).

    Parameters
    ----------
    arr : numpy.ndarray
        (fit.size, fit.size) float32 or float64, finite.
    fit : Fit
        The placement :func:`fit` returned.
    threshold : float
        The values above it are True.

    Returns
    -------
    numpy.ndarray
        ``fit.source_shape`` bool.
    """
    if not isinstance(fit, Fit):
        raise TypeError(f"fit must be a Fit; found {type(fit).__name__}")
    check_array("arr", arr, FLOAT, "a float32 or float64 array", shape=(fit.size, fit.size))
    check_finite("arr", arr)
    return resize_above(arr[fit.slices], fit.source_shape, threshold)


def unfit_onto(arr: np.ndarray, fit: Fit, box: Box, grid: tuple[int, int]) -> np.ndarray:
    """Map a canvas-sized map of a crop back onto its whole image's grid reduced to ``grid``, zero around the crop.

    What ``box.paste(unfit(arr, fit))`` gives, resampled once to ``grid`` instead of to the full image and then
    down again: the crop's edges land on the nearest pixel of ``grid``. With ``grid == box.source_shape`` it is
    exactly ``box.paste(unfit(arr, fit))``.

    Parameters
    ----------
    arr : numpy.ndarray
        (fit.size, fit.size) float32 or float64, finite: a map of the canvas :func:`fit` made of the crop.
    fit : Fit
        The placement :func:`fit` returned for the crop.
    box : Box
        Where the crop came from (:func:`crop_to_mask`).
    grid : tuple[int, int]
        (rows, cols) of the output, each between 1 and the side of ``box.source_shape``.

    Returns
    -------
    numpy.ndarray
        ``grid`` float32.
    """
    if not isinstance(box, Box):
        raise TypeError(f"box must be a Box; found {type(box).__name__}")
    rows, cols = box.source_shape
    if len(grid) != 2 or not (1 <= grid[0] <= rows and 1 <= grid[1] <= cols):
        raise ValueError(f"grid must be (rows, cols) within the image's {box.source_shape}; found {grid!r}")
    top, bottom = _scaled_span(box.row0, box.row1, grid[0] / rows, grid[0])
    left, right = _scaled_span(box.col0, box.col1, grid[1] / cols, grid[1])
    out = np.zeros(grid, dtype=np.float32)
    out[top:bottom, left:right] = unfit(arr, replace(fit, source_shape=(bottom - top, right - left)))
    return out


def _scaled_span(start: int, stop: int, scale: float, n: int) -> tuple[int, int]:
    """``[start, stop)`` scaled and rounded onto ``range(n)``, never empty."""
    first = min(round(start * scale), n - 1)
    return first, max(first + 1, min(round(stop * scale), n))


def crop_to_mask(img: np.ndarray, mask: np.ndarray, margin: float = 0.05) -> tuple[np.ndarray, Box]:
    """Crop ``img`` to the bounding box of ``mask``, widened on each side by ``margin`` of the box's size.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W), any real or bool dtype.
    mask : numpy.ndarray
        (H, W) bool with at least one True pixel.
    margin : float
        Fraction of the box's height (for rows) and width (for columns) added on each side, clipped to the
        image; ``0 <= margin <= 1``.

    Returns
    -------
    crop : numpy.ndarray
        A view of ``img``, (box rows, box cols), dtype of ``img``.
    box : Box
        Where the crop lies; :meth:`Box.paste` puts a map on the crop back on the (H, W) grid.
    """
    check_array("img", img, REAL + "b", "a real or bool array")
    check_array("mask", mask, "b", "a bool array", shape=img.shape)
    if not (isinstance(margin, int | float) and 0.0 <= margin <= 1.0):
        raise ValueError(f"margin must be a number in [0, 1]; found {margin!r}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask must have at least one True pixel; found none")
    row0, row1 = _widen(int(rows[0]), int(rows[-1]) + 1, margin, img.shape[0])
    col0, col1 = _widen(int(cols[0]), int(cols[-1]) + 1, margin, img.shape[1])
    box = Box(row0, row1, col0, col1, source_shape=(img.shape[0], img.shape[1]))
    return img[box.slices], box


def mask_outside(img: np.ndarray, mask: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Return a copy of ``img`` with every pixel outside ``mask`` set to ``fill``.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W), any real dtype.
    mask : numpy.ndarray
        (H, W) bool; True keeps the pixel.
    fill : float
        Value written outside the mask, cast to ``img``'s dtype.

    Returns
    -------
    numpy.ndarray
        (H, W), dtype of ``img``.
    """
    check_array("img", img, REAL, "a real (integer or float) array")
    check_array("mask", mask, "b", "a bool array", shape=img.shape)
    if not math.isfinite(fill):
        raise ValueError(f"fill must be a finite number; found {fill!r}")
    out = np.empty(img.shape, dtype=img.dtype)  # C order, as img.copy() gave
    out[...] = fill  # the scalar cast to img's dtype as an assignment casts it
    np.copyto(out, img, where=mask)
    return out


def _subsample(img: np.ndarray) -> np.ndarray:
    """Return a regular grid subsample of at most :data:`SAMPLE_PIXELS` pixels (``img`` itself when smaller).

    The stride is rounded up: a 1955 x 1841 radiograph reduced to 978 x 921 is sampled every other pixel
    (225,000 values), not whole (900,000: the percentile's partition then cost 15 ms of the node's time).
    """
    stride = max(1, math.ceil(math.sqrt(img.size / SAMPLE_PIXELS)))
    return img[::stride, ::stride]


def _percentiles(sample: np.ndarray, low: float, high: float) -> tuple[np.floating, np.floating]:
    """Return ``np.percentile(sample, [low, high])`` (method "linear"), bit for bit, selecting ranks one at a time.

    numpy partitions at six ranks at once (the minimum, the maximum and each percentile's two neighbours), and
    its multi-rank select costs 2.2 ms on a 225,000-pixel sample; selecting the upper rank, then the lower rank
    among what lies below it (each neighbour is the minimum of what lies above its rank) costs 0.8 ms. The
    interpolation is numpy's, on the same values. Small samples, close or end percentiles and a selected zero
    where the sample holds -0.0 go to :func:`numpy.percentile` itself.
    """
    count = sample.size
    virtual = (count - 1) * np.true_divide([low, high], 100)
    below = np.floor(virtual).astype(np.intp)
    k_lo, k_hi = int(below[0]), int(below[1])
    if count >= _SELECT_MIN_PIXELS and 0 <= k_lo < k_hi < count - 1:
        selected = _select(sample, k_lo, k_hi)
        if selected is not None:
            lo, hi = _lerp(*selected, virtual - below)
            return lo, hi
    lo, hi = np.percentile(sample, [low, high])
    return lo, hi


def _select(sample: np.ndarray, k_lo: int, k_hi: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The values of ranks (``k_lo``, ``k_hi``) and of the ranks just above, of a copy of ``sample`` flattened.

    None when a selected value is zero and the sample holds -0.0: the zeros compare equal, so which one a select
    returns is not fixed.
    """
    work = sample.flatten()
    work.partition(k_hi)
    upper = (work[k_hi], work[k_hi + 1 :].min())
    work[:k_hi].partition(k_lo)  # the k_hi smallest values, in place
    lower = (work[k_lo], work[k_lo + 1 : k_hi + 1].min())
    if work.dtype.kind == "f" and 0 in (*lower, *upper) and np.signbit(work[work == 0]).any():
        return None
    return np.array([lower[0], upper[0]], dtype=work.dtype), np.array([lower[1], upper[1]], dtype=work.dtype)


def _lerp(before: np.ndarray, after: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """numpy's percentile interpolation (``numpy.lib._function_base_impl._lerp``), the same operations in order."""
    diff = after - before
    out: np.ndarray = np.add(before, diff * gamma)
    np.subtract(after, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe", dtype=type(out.dtype))
    return out


def _widen(start: int, stop: int, margin: float, limit: int) -> tuple[int, int]:
    """Return ``[start, stop)`` widened by ``margin`` of its length on each side, clipped to ``[0, limit)``."""
    pad = round(margin * (stop - start))
    return max(0, start - pad), min(limit, stop + pad)


def _check_size(size: object) -> None:
    """Raise ValueError unless ``size`` is an int >= 1."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be an int >= 1; found {size!r}")
