"""Geometry of bool masks: downsampling, connected components, outlines as polygons, convex hulls.

Pure numpy: ``(H, W)`` bool masks in; labels, components or ``(N, 2)`` float point arrays out. The lung
segmenter judges its masks with these functions and the output writers draw them, so both see the same
components. Points returned as outlines are (column, row), DICOM SCOORD order.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

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
    padded = np.ascontiguousarray(padded)
    if factor in _WORDS:
        return _word_blocks(padded, factor, rule)
    if rule == "any":
        return _any_blocks(padded, factor)
    blocks = padded.reshape(height // factor, factor, width // factor, factor)
    counts = padded.view(np.uint8).reshape(blocks.shape).sum(axis=(1, 3))
    return np.asarray(counts * 2 >= factor * factor)


_WORDS: Final[dict[int, type[np.unsignedinteger[Any]]]] = {2: np.uint16, 4: np.uint32, 8: np.uint64}
"""Unsigned integers as wide as a block row, by block size: a block row of a bool mask is then one word."""


def _word_blocks(padded: NDArray[np.bool_], factor: int, rule: Rule) -> NDArray[np.bool_]:
    """Block OR or majority for blocks ``factor`` bytes wide, reading each block row as one word.

    The ``factor`` rows of a block are added (or ORed) word by word: each byte is then a column's count, at most
    ``factor`` (no carry between bytes). Multiplying by ``0x0101...`` gathers the sum of a word's bytes into its
    top byte (at most ``factor ** 2 <= 64``, so no carry either), whatever the byte order.
    """
    words = padded.view(_WORDS[factor])
    total = words[0::factor].copy()
    for offset in range(1, factor):
        if rule == "any":
            total |= words[offset::factor]
        else:
            total += words[offset::factor]
    if rule == "any":
        return np.asarray(total != 0)
    word = _WORDS[factor]
    ones = word(int.from_bytes(b"\x01" * factor, "little"))
    counts = (total * ones) >> word(8 * (factor - 1))
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
    is_root = roots == np.arange(rows.size)
    return (np.cumsum(is_root) - 1)[roots].astype(np.int64)  # ranks of the roots: ``np.unique``'s inverse


def _ramps(counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Return ``0..c-1`` for each ``c`` in ``counts``, concatenated."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - offsets


def _union_find(size: int, left: NDArray[np.int64], right: NDArray[np.int64]) -> NDArray[np.int64]:
    """Return each node's root after joining every ``(left[i], right[i])`` pair: the smallest node of its component.

    Vectorised in rounds: every root hooks under the smallest root it is joined to (parents only ever point to
    smaller nodes), then pointer jumping flattens the trees; each round removes at least one root.
    """
    parent = np.arange(size, dtype=np.int64)
    while True:
        parent = _flatten(parent)
        root_left, root_right = parent[left], parent[right]
        apart = root_left != root_right
        if not apart.any():
            return parent
        root_left, root_right = root_left[apart], root_right[apart]
        np.minimum.at(parent, np.maximum(root_left, root_right), np.minimum(root_left, root_right))


def _flatten(parent: NDArray[np.int64]) -> NDArray[np.int64]:
    """Point every node straight at its root (pointer jumping)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


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

    Each pixel's eight neighbours are packed into one byte (:func:`_neighbour_codes`), so a step is one look-up
    in :data:`_NEXT_DIRECTION` rather than a search around the pixel.
    """
    padded = np.pad(component, 1)
    width = padded.shape[1]
    codes = _neighbour_codes(padded.astype(np.uint8))
    offsets = [dr * width + dc for dr, dc in _NEIGHBOURS]
    table = _NEXT_DIRECTION
    start = int(np.argmax(padded))  # the first set pixel in row-major order
    path = [start]
    current, came_from = start, 6  # entered from the west
    for _ in range(4 * padded.size):
        direction = table[codes[current] << 3 | came_from]
        if direction < 0:
            break  # a single pixel
        current += offsets[direction]
        came_from = (direction + 4) & 7
        if current == start:
            break
        path.append(current)
    flat = np.asarray(path, dtype=np.int64)
    return np.column_stack([flat // width, flat % width]).astype(np.float64) - 1.0


_CODE_BIT: Final = (1, 2, 4, 7, 6, 5, 3, 0)
"""The bit of a neighbour code that holds the neighbour in each direction of :data:`_NEIGHBOURS`: the row above in
bits 0-2 (west to east), west and east in bits 3-4, the row below in bits 5-7."""


def _neighbour_codes(padded: NDArray[np.uint8]) -> bytes:
    """Return, for each pixel of a 0/1 mask with a clear border, its eight neighbours as a byte (row-major).

    Border pixels get 0 (tracing never stands on them).
    """
    triple = padded[:, :-2] | padded[:, 1:-1] << 1 | padded[:, 2:] << 2
    sides = padded[1:-1, :-2] << 3 | padded[1:-1, 2:] << 4
    codes = np.zeros_like(padded)
    codes[1:-1, 1:-1] = triple[:-2] | sides | triple[2:] << 5
    return codes.tobytes()


def _next_directions() -> list[int]:
    """Return, at ``code << 3 | came_from``, the first direction clockwise after ``came_from`` whose neighbour is
    set in ``code`` (-1 when none is)."""
    code = np.arange(256)[:, None, None]
    came_from = np.arange(8)[None, :, None]
    order = (came_from + 1 + np.arange(8)[None, None, :]) % 8
    present = (code >> np.asarray(_CODE_BIT)[order]) & 1 == 1
    first = np.argmax(present, axis=2)
    chosen = np.take_along_axis(order, first[..., None], axis=2)[..., 0]
    directions: list[int] = np.where(present.any(axis=2), chosen, -1).reshape(-1).tolist()
    return directions


_NEXT_DIRECTION: Final = _next_directions()


SMALL_SEGMENT: Final = 64
"""Segments with fewer points than this are measured in plain Python (numpy's per-call cost dominates there)."""


_PYTHON_FLOATS: Final = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
"""Dtypes whose values ``tolist`` turns into Python floats exactly (so float64 numpy maths is Python's)."""


def simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed or open polyline of (N, 2) points.

    Segments of :data:`SMALL_SEGMENT` points or more are measured one by one with numpy (:func:`_distance_to_segment`);
    shorter ones the way plain Python measures them, in float64 with the same operations in the same order
    (:func:`_farthest`), all those of one level of the split together (:func:`_farthest_of_many`) when the points
    are floats. For the integer pixel coordinates outlines have, both ways give the same bits (the dot product is
    exact). Which segment is split first does not matter: each split depends on its own end points only.
    """
    if len(points) < 3:
        return points
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    if _exact_pixels(points):
        _split_levels(points[:, 0].copy(), points[:, 1].copy(), tolerance, keep)
        return points[keep]
    batched = points.dtype in _PYTHON_FLOATS and points.ndim == 2 and points.shape[1] == 2
    floats = np.asarray(points, dtype=np.float64) if batched else np.zeros((0, 2))  # what ``tolist`` makes of them
    pairs = [] if batched else points.tolist()
    stack: list[tuple[int, int]] = [(0, len(points) - 1)]
    small: list[tuple[int, int]] = []
    while stack or small:
        if not stack:
            stack, small = _split_many(floats, small, tolerance, keep), []
            continue
        first, last = stack.pop()
        if last - first < 2:
            continue
        if last - first < SMALL_SEGMENT and batched:
            small.append((first, last))
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


EXACT_LIMIT: Final = 2.0**24
"""Integer coordinates up to this size make every product and sum of the distance maths exact in float64."""


def _exact_pixels(points: np.ndarray) -> bool:
    """Whether ``points`` are float64 ``(N, 2)`` whole numbers within :data:`EXACT_LIMIT` (traced outlines are).

    For them a dot product comes out the same however it is evaluated (numpy's ``@``, fused or not, or plain
    Python), so every segment can be measured by the same elementwise maths.
    """
    if points.dtype != np.float64 or points.ndim != 2 or points.shape[1] != 2:
        return False
    return bool(np.all(np.abs(points) <= EXACT_LIMIT) and np.array_equal(points, np.floor(points)))


def _split_levels(x: NDArray[np.float64], y: NDArray[np.float64], tolerance: float, keep: NDArray[np.bool_]) -> None:
    """Douglas-Peucker on exact pixel coordinates, all segments of one level at once; marks the kept points."""
    firsts, lasts = np.zeros(1, dtype=np.int64), np.full(1, len(x) - 1, dtype=np.int64)
    while firsts.size:
        counts = lasts - firsts - 1
        wide = counts > 0
        firsts, lasts, counts = firsts[wide], lasts[wide], counts[wide]
        if not firsts.size:
            return
        starts = np.cumsum(counts) - counts
        owner = np.repeat(np.arange(firsts.size), counts)
        inner = np.arange(int(counts.sum())) + np.repeat(firsts + 1 - starts, counts)
        ax, ay = x[firsts], y[firsts]
        abx, aby = x[lasts] - ax, y[lasts] - ay
        length = abx * abx + aby * aby
        length[length == 0.0] = 1.0  # a zero segment: t = 0, so the distance is to its end point, as before
        ax, ay, abx, aby = ax[owner], ay[owner], abx[owner], aby[owner]
        px, py = x[inner], y[inner]
        t = np.clip(((px - ax) * abx + (py - ay) * aby) / length[owner], 0.0, 1.0)
        dx, dy = px - (ax + t * abx), py - (ay + t * aby)
        distances = np.sqrt(dx * dx + dy * dy)
        largest = np.maximum.reduceat(distances, starts)
        hits = np.flatnonzero(distances == largest[owner])
        split = inner[hits[np.searchsorted(hits, starts)]]  # the first farthest point of each segment
        beyond = largest > tolerance
        split, firsts, lasts = split[beyond], firsts[beyond], lasts[beyond]
        keep[split] = True
        firsts, lasts = np.concatenate([firsts, split]), np.concatenate([split, lasts])


def _split_many(
    points: NDArray[np.float64], segments: list[tuple[int, int]], tolerance: float, keep: NDArray[np.bool_]
) -> list[tuple[int, int]]:
    """Split every short segment whose farthest point lies beyond ``tolerance``; return the halves."""
    firsts, lasts = np.asarray(segments, dtype=np.int64).T
    split, distances = _farthest_of_many(points, firsts, lasts)
    beyond = distances > tolerance
    firsts, lasts, split = firsts[beyond], lasts[beyond], split[beyond]
    keep[split] = True
    return list(zip(firsts.tolist(), split.tolist(), strict=True)) + list(
        zip(split.tolist(), lasts.tolist(), strict=True)
    )


def _farthest_of_many(
    points: NDArray[np.float64], firsts: NDArray[np.int64], lasts: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """:func:`_farthest` of many segments at once: the index (into ``points``) and distance of each one's farthest
    inner point, with the same float64 operations, the same clamping and the same ties (the first) and NaNs (never
    farthest; -1.0 when all are) as the plain Python loop."""
    counts = lasts - firsts - 1
    owner = np.repeat(np.arange(len(firsts)), counts)
    inner = points[np.repeat(firsts + 1, counts) + _ramps(counts)]
    a, b = points[firsts][owner], points[lasts][owner]
    abx, aby = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    length = abx * abx + aby * aby
    ox, oy = inner[:, 0] - a[:, 0], inner[:, 1] - a[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (ox * abx + oy * aby) / length
    t = np.where(t < 0.0, 0.0, np.where(t > 1.0, 1.0, t))
    point = length == 0.0
    dx = np.where(point, ox, inner[:, 0] - (a[:, 0] + t * abx))
    dy = np.where(point, oy, inner[:, 1] - (a[:, 1] + t * aby))
    with np.errstate(invalid="ignore"):
        distances = np.sqrt(dx * dx + dy * dy)
    distances[np.isnan(distances)] = -1.0
    starts = np.cumsum(counts) - counts
    largest = np.maximum.reduceat(distances, starts)
    hits = np.flatnonzero(distances == largest[owner])
    firsts_hit = hits[np.r_[True, owner[hits[1:]] != owner[hits[:-1]]]]
    return firsts + 1 + (firsts_hit - starts), largest


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
    """One chain of Andrew's monotone chain over sorted points (collinear points dropped).

    float64 points are walked as Python floats (the same IEEE operations as numpy float64 scalars, far cheaper);
    other dtypes keep numpy scalar arithmetic, whose rounding and overflow are theirs.
    """
    if points.dtype != np.float64 or points.ndim != 2 or points.shape[1] != 2:
        return _half_hull_numpy(points)
    xy = points.tolist()
    hull: list[int] = []
    for index, (bx, by) in enumerate(xy):
        while len(hull) >= 2:
            ox, oy = xy[hull[-2]]
            ax, ay = xy[hull[-1]]
            if not (ax - ox) * (by - oy) - (ay - oy) * (bx - ox) <= 0:  # not ``> 0``: a NaN turn keeps the point
                break
            hull.pop()
        hull.append(index)
    return points[hull]


def _half_hull_numpy(points: np.ndarray) -> np.ndarray:
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
