"""Geometry of bool masks: downsampling, connected components, outlines as polygons, convex hulls.

Pure numpy: ``(H, W)`` bool masks in; labels, components or ``(N, 2)`` float point arrays out. The lung
segmenter judges its masks with these functions and the output writers draw them, so both see the same
components. Points returned as outlines are (column, row), DICOM SCOORD order.
"""

from __future__ import annotations

import math
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

OUTLINE_GRID: Final = 256
"""Outlines are traced on the mask block-reduced to at most this many pixels a side."""
MIN_COMPONENT_FRACTION: Final = 0.005
"""Components smaller than this share of the grid are specks, not lungs."""

Rule = Literal["any", "majority"]
Runs = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]

_NEIGHBOURS: Final = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def check_mask(mask: object) -> None:
    """Raise ValueError unless ``mask`` is a non-empty 2-D bool array."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2 or mask.size == 0:
        found = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask must be a non-empty (H, W) bool array; found {found}")


def downsample(mask: NDArray[np.bool_], factor: int, rule: Rule) -> NDArray[np.bool_]:
    """Return ``mask`` reduced by ``factor`` in each direction (zero-padded to a multiple of it).

    ``rule="any"`` sets a pixel when any pixel of its block is set (outlines keep thin parts);
    ``"majority"`` when at least half of them are (component statistics ignore fringes).
    """
    check_mask(mask)
    if factor == 1:
        return mask
    height = -(-mask.shape[0] // factor) * factor
    width = -(-mask.shape[1] // factor) * factor
    padded = mask
    if (height, width) != mask.shape:
        padded = np.zeros((height, width), dtype=bool)
        padded[: mask.shape[0], : mask.shape[1]] = mask
    if rule == "any":
        return _any_blocks(padded, factor)
    blocks = padded.reshape(height // factor, factor, width // factor, factor)
    counts = padded.view(np.uint8).reshape(blocks.shape).sum(axis=(1, 3))
    return np.asarray(counts * 2 >= factor * factor)


def _any_blocks(padded: NDArray[np.bool_], factor: int) -> NDArray[np.bool_]:
    """OR over ``factor`` x ``factor`` blocks: strided ORs along the columns, then the rows (exact, and far cheaper
    than ``any`` over a 4-D view)."""
    columns = padded[:, 0::factor].copy()
    for offset in range(1, factor):
        columns |= padded[:, offset::factor]
    rows = columns[0::factor].copy()
    for offset in range(1, factor):
        rows |= columns[offset::factor]
    return rows


def reduce_to_grid(mask: NDArray[np.bool_], grid: int, rule: Rule) -> tuple[NDArray[np.bool_], int]:
    """Return the mask downsampled to at most ``grid`` pixels a side, and the block size used."""
    check_mask(mask)
    factor = max(1, -(-max(mask.shape) // grid))
    return downsample(mask, factor, rule), factor


def runs(mask: NDArray[np.bool_]) -> Runs:
    """Return the horizontal runs of set pixels as ``(row, start, end)`` arrays (end exclusive), row-major."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)
    return rows.astype(np.int64), starts.astype(np.int64), ends.astype(np.int64)


def run_labels(found: Runs, width: int) -> NDArray[np.int64]:
    """Return, for each run, a component index ``0..k-1`` (4-connectivity: runs overlapping in adjacent rows).

    Components are numbered in row-major order of their first run.
    """
    rows, starts, ends = found
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    stride = width + 1
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    above = (rows - 1) * stride
    first = np.searchsorted(end_keys, above + starts, side="right")
    stop = np.searchsorted(start_keys, above + ends, side="left")
    counts = np.clip(stop - first, 0, None)
    upper = np.repeat(first, counts) + _ramps(counts)
    lower = np.repeat(np.arange(rows.size), counts)
    roots = _union_find(rows.size, lower, upper)
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def _ramps(counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Return ``0..c-1`` for each ``c`` in ``counts``, concatenated."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - offsets


def _union_find(size: int, left: NDArray[np.int64], right: NDArray[np.int64]) -> NDArray[np.int64]:
    """Return each node's root after joining every ``(left[i], right[i])`` pair (smallest index wins)."""
    parent = list(range(size))

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return np.array([find(node) for node in range(size)], dtype=np.int64)


def label_components(mask: np.ndarray) -> tuple[NDArray[np.int32], int]:
    """Return 4-connected component labels of a ``(H, W)`` bool mask.

    Returns
    -------
    labels : numpy.ndarray
        ``(H, W)`` int32: 0 for background, ``1..count`` for the components (in row-major order of
        their first run).
    count : int
        Number of components.
    """
    check_mask(mask)
    found = runs(mask)
    rows, starts, ends = found
    roots = run_labels(found, mask.shape[1])
    labels = np.zeros(mask.shape, dtype=np.int32)
    lengths = ends - starts
    flat = np.repeat(rows * mask.shape[1] + starts, lengths) + _ramps(lengths)
    labels.reshape(-1)[flat] = np.repeat(roots + 1, lengths)
    return labels, int(roots.max() + 1) if roots.size else 0


def components(mask: np.ndarray, keep: int = 2) -> list[NDArray[np.bool_]]:
    """Return the ``keep`` largest 4-connected components of a bool mask, largest first.

    Components under :data:`MIN_COMPONENT_FRACTION` of the mask's pixels are dropped; equal sizes keep the
    row-major order of their first pixel.
    """
    labels, count = label_components(mask)
    if count == 0:
        return []
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:keep]
    minimum = MIN_COMPONENT_FRACTION * mask.size
    return [labels == index + 1 for index in order.tolist() if sizes[index] >= minimum]


def trace(component: np.ndarray) -> np.ndarray:
    """Return the outer boundary of one connected component as (row, col) pixel centres, in order (Moore tracing).

    The walk reads the padded mask as bytes by flat index (a numpy scalar look-up per step cost far more).
    """
    padded = np.pad(component, 1)
    width = padded.shape[1]
    pixels = padded.astype(np.uint8).tobytes()
    offsets = [dr * width + dc for dr, dc in _NEIGHBOURS]
    start = int(np.argmax(padded))  # the first set pixel in row-major order
    path = [start]
    current, came_from = start, 6  # entered from the west
    for _ in range(4 * padded.size):
        for step in range(8):
            direction = (came_from + 1 + step) % 8
            candidate = current + offsets[direction]
            if pixels[candidate]:
                came_from = (direction + 4) % 8
                current = candidate
                break
        else:
            break  # a single pixel
        if current == start:
            break
        path.append(current)
    flat = np.asarray(path, dtype=np.int64)
    return np.column_stack([flat // width, flat % width]).astype(np.float64) - 1.0


SMALL_SEGMENT: Final = 64
"""Segments with fewer points than this are measured in plain Python (numpy's per-call cost dominates there)."""


def simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed or open polyline of (N, 2) points.

    Short segments are measured in plain Python with the same operations, in the same order, as the numpy
    path; for the integer pixel coordinates outlines have, both give the same bits (the dot product is exact).
    """
    if len(points) < 3:
        return points
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    pairs = points.tolist()
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        if last - first < SMALL_SEGMENT:
            index, distance = _farthest(pairs, first, last)
        else:
            distances = _distance_to_segment(points[first + 1 : last], points[first], points[last])
            index = int(np.argmax(distances))
            distance = float(distances[index])
        if distance > tolerance:
            keep[first + 1 + index] = True
            stack += [(first, first + 1 + index), (first + 1 + index, last)]
    return points[keep]


def _farthest(pairs: list[list[float]], first: int, last: int) -> tuple[int, float]:
    """The index (after ``first``) and distance of the point farthest from segment ``first``-``last``."""
    ax, ay = pairs[first]
    bx, by = pairs[last]
    abx, aby = bx - ax, by - ay
    length = abx * abx + aby * aby
    best, best_index = -1.0, 0
    for index, (px, py) in enumerate(pairs[first + 1 : last]):
        if length == 0.0:
            dx, dy = px - ax, py - ay
        else:
            t = ((px - ax) * abx + (py - ay) * aby) / length
            t = 0.0 if t < 0.0 else 1.0 if t > 1.0 else t
            dx, dy = px - (ax + t * abx), py - (ay + t * aby)
        distance = math.sqrt(dx * dx + dy * dy)
        if distance > best:
            best, best_index = distance, index
    return best_index, best


def _distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    length = float(np.dot(ab, ab))
    if length == 0.0:
        offset = points - a
        return np.asarray(np.sqrt(np.add.reduce(offset * offset, axis=1)))
    t = np.clip((points - a) @ ab / length, 0.0, 1.0)
    offset = points - (a + t[:, None] * ab)
    return np.asarray(np.sqrt(np.add.reduce(offset * offset, axis=1)))


def lung_outlines(mask: np.ndarray, target_shape: tuple[int, int], max_points: int = 128) -> list[np.ndarray]:
    """Return each lung's closed outline as (column, row) points in a ``target_shape`` image, largest first.

    The first point is repeated at the end (a closed POLYLINE, as DICOM SCOORD and GSPS expect).
    """
    small, block = reduce_to_grid(mask, OUTLINE_GRID, "any")
    scale_r = target_shape[0] / mask.shape[0] * block
    scale_c = target_shape[1] / mask.shape[1] * block
    outlines = []
    for component in components(small):
        path = trace(component)
        if len(path) < 3:
            continue
        path = simplify(np.vstack([path, path[:1]]), tolerance=0.75)[:max_points]
        points = np.column_stack([(path[:, 1] + 0.5) * scale_c, (path[:, 0] + 0.5) * scale_r])
        points = np.clip(points, 0.0, [target_shape[1] - 1.0, target_shape[0] - 1.0])
        outlines.append(np.vstack([points[:-1], points[:1]]) if not np.array_equal(points[0], points[-1]) else points)
    return outlines


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Return the convex hull of (N, 2) points, counter-clockwise, closed (first point repeated)."""
    unique = np.unique(points, axis=0)
    if len(unique) < 3:
        raise ValueError(f"points must hold at least 3 distinct points, found {len(unique)}")
    lower = _half_hull(unique)
    upper = _half_hull(unique[::-1])
    hull = np.vstack([lower[:-1], upper[:-1]])
    return np.vstack([hull, hull[:1]])


def _half_hull(points: np.ndarray) -> np.ndarray:
    hull: list[np.ndarray] = []
    for p in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return np.asarray(hull)


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """Return a bool mask resized to ``shape`` by nearest neighbour (for a SEG at the source's size).

    Each output pixel takes the source pixel under its centre, computed as ``(i + 0.5) * n_in / n_out`` so a
    centre that falls exactly on a source pixel edge is mapped the same way on every platform.
    """
    check_mask(mask)
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(np.intp)
    return np.asarray(mask[np.ix_(rows, cols)])
