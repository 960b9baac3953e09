"""Geometry of bool masks: downsampling, connected components, outlines as polygons, convex hulls.

Pure numpy: ``(H, W)`` bool masks in; labels, components or ``(N, 2)`` float point arrays out. The lung
segmenter judges its masks with these functions and the output writers draw them, so both see the same
components. Points returned as outlines are (column, row), DICOM SCOORD order.
"""

from __future__ import annotations

import math
import threading
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
    """Return the horizontal runs of set pixels as ``(row, start, end)`` arrays (end exclusive), row-major.

    With a clear pixel framing each row, the places where a row changes value alternate start, end, start, ... in
    row-major order, so one pass over the mask finds them all.
    """
    height, width = mask.shape
    framed = np.zeros((height, width + 2), dtype=bool)
    framed[:, 1:-1] = mask
    changes = (framed[:, 1:] != framed[:, :-1]).reshape(-1).nonzero()[0].astype(np.int64, copy=False)
    rows, columns = np.divmod(changes, width + 1)
    return rows[0::2], columns[0::2], columns[1::2]


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
    counts = np.maximum(stop - first, 0)
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
    """Return each node's root after joining every ``(left[i], right[i])`` pair, ``right[i] < left[i]``: the smallest
    node of its component.

    Every ``left`` node starts hooked under one of its ``right`` nodes; when none has two (runs that each touch at
    most one run above, as lungs' do), that already joins everything and pointer jumping finishes. Otherwise rounds
    follow: every root hooks under the smallest root it is joined to (parents only ever point to smaller nodes),
    then pointer jumping flattens the trees; each round removes at least one root.
    """
    parent = np.arange(size, dtype=np.int64)
    parent[left] = right
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
        if (grand == parent).all():
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
    check_mask(mask)
    found = []
    for rows, starts, ends in _largest_components(mask, keep):
        part = np.zeros(mask.shape, dtype=bool)
        part.reshape(-1)[_run_pixels(rows * mask.shape[1] + starts, ends - starts)] = True
        found.append(part)
    return found


def _largest_components(mask: NDArray[np.bool_], keep: int) -> list[Runs]:
    """The runs of each of :func:`components`, sized and chosen from the runs alone (no label image to fill and
    count, which costs more than the rest for a lung mask)."""
    found = runs(mask)
    labels = run_labels(found, mask.shape[1])
    rows, starts, ends = found
    sizes = np.bincount(labels, weights=ends - starts)  # whole numbers, exact: the same order and threshold
    order = np.argsort(-sizes, kind="stable")[:keep]
    minimum = MIN_COMPONENT_FRACTION * mask.size
    chosen = [labels == index for index in order.tolist() if sizes[index] >= minimum]
    return [(rows[runs_of], starts[runs_of], ends[runs_of]) for runs_of in chosen]


def _run_pixels(firsts: NDArray[np.int64], lengths: NDArray[np.int64]) -> NDArray[np.int64]:
    """The flat indices of runs given by their first pixel's flat index and their length."""
    return np.repeat(firsts, lengths) + _ramps(lengths)


def trace(component: np.ndarray) -> np.ndarray:
    """Return the outer boundary of one connected component as (row, col) pixel centres, in order (Moore tracing)."""
    padded = np.zeros((component.shape[0] + 2, component.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = component
    flat = _walk(padded, int(np.argmax(padded)))  # from the first set pixel in row-major order
    width = padded.shape[1]
    return np.column_stack([flat // width, flat % width]).astype(np.float64) - 1.0


def _trace_runs(mask: NDArray[np.bool_], found: Runs) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """:func:`trace` of the component of ``mask`` made of these runs, as (rows, columns) arrays.

    Only its bounding box is drawn (a lung covers a fraction of the grid), copied from the mask when nothing else
    reaches into the box (its pixel count is the component's), else painted from the runs.
    """
    rows, starts, ends = found
    top, left = int(rows[0]) - 1, int(starts.min()) - 1
    bottom, right = int(rows[-1]) + 2, int(ends.max()) + 1
    canvas = np.zeros((bottom - top, right - left), dtype=np.uint8)
    canvas[1:-1, 1:-1] = mask[top + 1 : bottom - 1, left + 1 : right - 1]
    width, lengths = right - left, ends - starts
    if np.count_nonzero(canvas) != int(lengths.sum()):
        canvas[...] = 0
        canvas.reshape(-1)[_run_pixels((rows - top) * width + starts - left, lengths)] = 1
    flat = _walk(canvas, width + int(starts[0]) - left)
    return flat // width + top, flat % width + left


def _walk(canvas: NDArray[np.uint8], start: int) -> NDArray[np.int64]:
    """Moore tracing on a contiguous 0/1 canvas with a clear border from ``start``, its first set pixel in row-major
    order; returns the flat indices of the boundary in order.

    Each pixel's eight neighbours are packed into one byte (:func:`_neighbour_codes`), so a step is one look-up
    in :data:`_NEXT_STEP` rather than a search around the pixel.
    """
    codes = _neighbour_codes(canvas)
    path = [start]
    if not codes[start]:
        return np.asarray(path, dtype=np.int64)  # a single pixel
    width = canvas.shape[1]
    offsets = [dr * width + dc for dr, dc in _NEIGHBOURS]
    table, append = _NEXT_STEP, path.append
    current, direction = start, 2  # entered moving east
    for _ in range(4 * canvas.size):
        direction = table[codes[current] << 3 | direction]
        current += offsets[direction]
        if current == start:
            break
        append(current)
    return np.asarray(path, dtype=np.int64)


_CODE_BIT: Final = (1, 2, 4, 7, 6, 5, 3, 0)
"""The bit of a neighbour code that holds the neighbour in each direction of :data:`_NEIGHBOURS`: the row above in
bits 0-2 (west to east), west and east in bits 3-4, the row below in bits 5-7."""


def _neighbour_codes(canvas: NDArray[np.uint8]) -> bytes:
    """Return, for each pixel of a contiguous 0/1 canvas with a clear border, its eight neighbours as a byte
    (row-major).

    Border pixels get meaningless codes (tracing never stands on them). The codes are sums over the flat canvas of
    copies doubled up to each neighbour's bit, taken at the neighbour's offset: adding bytes is cheap, shifting them
    is not.
    """
    flat = canvas.reshape(-1)
    weighted = [flat]
    for _ in range(7):
        weighted.append(weighted[-1] + weighted[-1])
    width, size = canvas.shape[1], flat.size
    codes = np.zeros(size, dtype=np.uint8)
    inner = codes[width + 1 : size - width - 1]
    for bit, (dr, dc) in zip(_CODE_BIT, _NEIGHBOURS, strict=True):
        first = width + 1 + dr * width + dc
        inner += weighted[bit][first : first + inner.size]
    return codes.tobytes()


def _next_steps() -> list[int]:
    """Return, at ``code << 3 | direction``, the direction of the step after one in ``direction``: the first one
    clockwise from where that step came from whose neighbour is set in ``code`` (-1 when none is)."""
    code = np.arange(256)[:, None, None]
    came_from = (np.arange(8)[None, :, None] + 4) % 8
    order = (came_from + 1 + np.arange(8)[None, None, :]) % 8
    present = (code >> np.asarray(_CODE_BIT)[order]) & 1 == 1
    first = np.argmax(present, axis=2)
    chosen = np.take_along_axis(order, first[..., None], axis=2)[..., 0]
    steps: list[int] = np.where(present.any(axis=2), chosen, -1).reshape(-1).tolist()
    return steps


_NEXT_STEP: Final = _next_steps()


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
    """Douglas-Peucker on exact pixel coordinates, one level of the split at a time; marks the kept points.

    ``keep`` comes in with the ends of the polyline set, or of several laid end to end (nothing lies between one's
    last point and the next one's first, so their splits never mix and one pass serves all the lungs). Each level
    measures every point against the segment between the kept points around it: for the few hundred points of an
    outline numpy costs by the call, not by the point, so that is cheaper than picking out the segments still open,
    and a level costs the same for one lung or two. Kept points are never candidates.
    """
    px, py = x[:-1], y[:-1]
    kept = keep.nonzero()[0]
    while True:
        firsts = kept[:-1]
        sizes = kept[1:] - firsts
        a, b = firsts.repeat(sizes), kept[1:].repeat(sizes)
        ax, ay = x[a], y[a]
        abx, aby = x[b] - ax, y[b] - ay
        length = np.maximum(abx * abx + aby * aby, 1.0)  # a zero segment (whole numbers: else 1 or more): t = 0
        t = ((px - ax) * abx + (py - ay) * aby) / length
        np.minimum(np.maximum(t, 0.0, out=t), 1.0, out=t)  # clamped; a zero's sign does not reach the distance
        dx, dy = px - (ax + t * abx), py - (ay + t * aby)
        distances = np.sqrt(dx * dx + dy * dy)
        distances[firsts] = -np.inf
        largest = np.maximum.reduceat(distances, firsts)
        hits = (distances == largest.repeat(sizes)).nonzero()[0]
        split = hits[hits.searchsorted(firsts)][largest > tolerance]  # the first farthest point of each
        if not split.size:
            return
        keep[split] = True
        kept = keep.nonzero()[0]


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

    The first point is repeated at the end (a closed POLYLINE, as DICOM SCOORD and GSPS expect). The lungs are
    traced from their runs (:func:`_trace_runs`) and simplified together (:func:`_split_levels`).
    """
    small, block = reduce_to_grid(mask, OUTLINE_GRID, "any")
    scale_r = target_shape[0] / mask.shape[0] * block
    scale_c = target_shape[1] / mask.shape[1] * block
    traced = [_trace_runs(small, found) for found in _largest_components(small, 2)]
    paths = [(rows, columns) for rows, columns in traced if len(rows) >= 3]
    if not paths:
        return []
    rows = np.concatenate([np.append(rows, rows[0]) for rows, _ in paths]).astype(np.float64)
    columns = np.concatenate([np.append(columns, columns[0]) for _, columns in paths]).astype(np.float64)
    lengths = np.asarray([len(path) + 1 for path, _ in paths])
    ends = np.cumsum(lengths)
    keep = np.zeros(len(rows), dtype=bool)
    keep[ends - lengths] = keep[ends - 1] = True
    _split_levels(rows, columns, 0.75, keep)
    outlines = []
    for first, last in zip((ends - lengths).tolist(), ends.tolist(), strict=True):
        kept = keep[first:last]
        row, column = rows[first:last][kept][:max_points], columns[first:last][kept][:max_points]
        points = np.column_stack([(column + 0.5) * scale_c, (row + 0.5) * scale_r])
        points = np.clip(points, 0.0, [target_shape[1] - 1.0, target_shape[0] - 1.0])
        outlines.append(np.vstack([points[:-1], points[:1]]) if not np.array_equal(points[0], points[-1]) else points)
    return outlines


OUTLINES_KEPT: Final = 4
"""Masks whose outlines :func:`cached_lung_outlines` keeps: the outputs of one image ask in turn, and a few images
may be written at once."""

_OutlinesKey = tuple[int, tuple[int, ...], tuple[int, int], int]
_kept_outlines: list[tuple[_OutlinesKey, NDArray[np.bool_], tuple[NDArray[np.float64], ...]]] = []
_kept_outlines_lock = threading.Lock()


def cached_lung_outlines(
    mask: np.ndarray, target_shape: tuple[int, int], max_points: int = 128
) -> tuple[NDArray[np.float64], ...]:
    """:func:`lung_outlines` as read-only arrays, traced once for a mask that several outputs draw (the SR's lung
    region and the GSPS of the same findings).

    The last :data:`OUTLINES_KEPT` masks are kept by identity, each with a copy of its pixels that must still equal
    the mask: one changed in place, or another array that took a freed one's ``id``, is traced afresh. Thread-safe:
    two threads asking at once may both trace, with the same result.
    """
    check_mask(mask)
    key = (id(mask), mask.shape, (int(target_shape[0]), int(target_shape[1])), max_points)
    with _kept_outlines_lock:
        candidates = [(pixels, outlines) for found, pixels, outlines in _kept_outlines if found == key]
    for pixels, outlines in candidates:
        if np.array_equal(pixels, mask):
            return outlines
    outlines = tuple(lung_outlines(mask, target_shape, max_points))
    for outline in outlines:
        outline.flags.writeable = False
    entry = (key, mask.copy(), outlines)
    with _kept_outlines_lock:
        _kept_outlines[:] = [other for other in _kept_outlines if other[0] != key]
        _kept_outlines.append(entry)
        del _kept_outlines[:-OUTLINES_KEPT]
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
