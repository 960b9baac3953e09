"""The fast mask geometry equals the implementation it replaced, bit for bit, on random and hand-made masks.

The ``old_*`` functions below are the previous implementations, copied verbatim (Python union-find over runs, Moore
tracing with a search around each pixel, Douglas-Peucker with a plain-Python loop for short segments, the monotone
chain on numpy scalars, block reduction through strided ORs and a 4-D sum). Every output (labels, component masks
and their order, traced paths, kept points, hulls, outlines, component areas and centroids) must keep its dtype,
shape and bytes, for any input the old code accepted: holes, several components, edges, single pixels, empty
masks, diagonal-only contact, equal distances and collinear points included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from numpy.typing import NDArray

from cxr_node.imaging import masks
from cxr_node.imaging.masks import MIN_COMPONENT_FRACTION, OUTLINE_GRID, SMALL_SEGMENT, Rule, Runs, check_mask, runs
from cxr_node.infer import segment
from cxr_node.infer.segment import LABEL_GRID, _Components

_NEIGHBOURS = masks._NEIGHBOURS

# ---- the previous implementations (reference) ----


def old_reduce_to_grid(mask: NDArray[np.bool_], grid: int, rule: Rule) -> tuple[NDArray[np.bool_], int]:
    """Return the mask downsampled to at most ``grid`` pixels a side, and the block size used."""
    check_mask(mask)
    factor = max(1, -(-max(mask.shape) // grid))
    return old_downsample(mask, factor, rule), factor


def old_downsample(mask: NDArray[np.bool_], factor: int, rule: Rule) -> NDArray[np.bool_]:
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
        return old_any_blocks(padded, factor)
    blocks = padded.reshape(height // factor, factor, width // factor, factor)
    counts = padded.view(np.uint8).reshape(blocks.shape).sum(axis=(1, 3))
    return np.asarray(counts * 2 >= factor * factor)


def old_any_blocks(padded: NDArray[np.bool_], factor: int) -> NDArray[np.bool_]:
    """OR over ``factor`` x ``factor`` blocks: strided ORs along the columns, then the rows (exact, and far cheaper
    than ``any`` over a 4-D view)."""
    columns = padded[:, 0::factor].copy()
    for offset in range(1, factor):
        columns |= padded[:, offset::factor]
    rows = columns[0::factor].copy()
    for offset in range(1, factor):
        rows |= columns[offset::factor]
    return rows


def old_run_labels(found: Runs, width: int) -> NDArray[np.int64]:
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
    upper = np.repeat(first, counts) + old_ramps(counts)
    lower = np.repeat(np.arange(rows.size), counts)
    roots = old_union_find(rows.size, lower, upper)
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def old_ramps(counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Return ``0..c-1`` for each ``c`` in ``counts``, concatenated."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - offsets


def old_union_find(size: int, left: NDArray[np.int64], right: NDArray[np.int64]) -> NDArray[np.int64]:
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


def old_label_components(mask: np.ndarray) -> tuple[NDArray[np.int32], int]:
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
    roots = old_run_labels(found, mask.shape[1])
    labels = np.zeros(mask.shape, dtype=np.int32)
    lengths = ends - starts
    flat = np.repeat(rows * mask.shape[1] + starts, lengths) + old_ramps(lengths)
    labels.reshape(-1)[flat] = np.repeat(roots + 1, lengths)
    return labels, int(roots.max() + 1) if roots.size else 0


def old_components(mask: np.ndarray, keep: int = 2) -> list[NDArray[np.bool_]]:
    """Return the ``keep`` largest 4-connected components of a bool mask, largest first.

    Components under :data:`MIN_COMPONENT_FRACTION` of the mask's pixels are dropped; equal sizes keep the
    row-major order of their first pixel.
    """
    labels, count = old_label_components(mask)
    if count == 0:
        return []
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:keep]
    minimum = MIN_COMPONENT_FRACTION * mask.size
    return [labels == index + 1 for index in order.tolist() if sizes[index] >= minimum]


def old_trace(component: np.ndarray) -> np.ndarray:
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


def old_simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
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
            index, distance = old_farthest(pairs, first, last)
        else:
            distances = old_distance_to_segment(points[first + 1 : last], points[first], points[last])
            index = int(np.argmax(distances))
            distance = float(distances[index])
        if distance > tolerance:
            keep[first + 1 + index] = True
            stack += [(first, first + 1 + index), (first + 1 + index, last)]
    return points[keep]


def old_farthest(pairs: list[list[float]], first: int, last: int) -> tuple[int, float]:
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


def old_distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    length = float(np.dot(ab, ab))
    if length == 0.0:
        offset = points - a
        return np.asarray(np.sqrt(np.add.reduce(offset * offset, axis=1)))
    t = np.clip((points - a) @ ab / length, 0.0, 1.0)
    offset = points - (a + t[:, None] * ab)
    return np.asarray(np.sqrt(np.add.reduce(offset * offset, axis=1)))


def old_lung_outlines(mask: np.ndarray, target_shape: tuple[int, int], max_points: int = 128) -> list[np.ndarray]:
    """Return each lung's closed outline as (column, row) points in a ``target_shape`` image, largest first.

    The first point is repeated at the end (a closed POLYLINE, as DICOM SCOORD and GSPS expect).
    """
    small, block = old_reduce_to_grid(mask, OUTLINE_GRID, "any")
    scale_r = target_shape[0] / mask.shape[0] * block
    scale_c = target_shape[1] / mask.shape[1] * block
    outlines = []
    for component in old_components(small):
        path = old_trace(component)
        if len(path) < 3:
            continue
        path = old_simplify(np.vstack([path, path[:1]]), tolerance=0.75)[:max_points]
        points = np.column_stack([(path[:, 1] + 0.5) * scale_c, (path[:, 0] + 0.5) * scale_r])
        points = np.clip(points, 0.0, [target_shape[1] - 1.0, target_shape[0] - 1.0])
        outlines.append(np.vstack([points[:-1], points[:1]]) if not np.array_equal(points[0], points[-1]) else points)
    return outlines


def old_convex_hull(points: np.ndarray) -> np.ndarray:
    """Return the convex hull of (N, 2) points, counter-clockwise, closed (first point repeated)."""
    unique = np.unique(points, axis=0)
    if len(unique) < 3:
        raise ValueError(f"points must hold at least 3 distinct points, found {len(unique)}")
    lower = old_half_hull(unique)
    upper = old_half_hull(unique[::-1])
    hull = np.vstack([lower[:-1], upper[:-1]])
    return np.vstack([hull, hull[:1]])


def old_half_hull(points: np.ndarray) -> np.ndarray:
    hull: list[np.ndarray] = []
    for p in points:
        while len(hull) >= 2 and old_cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return np.asarray(hull)


def old_cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def old_mask_components(mask: NDArray[np.bool_]) -> _Components:
    """Return the 4-connected components of ``mask`` (found on a downsampled copy), largest first."""
    small, factor = old_reduce_to_grid(mask, LABEL_GRID, "majority")
    found = runs(small)
    rows, starts, ends = found
    roots = old_run_labels(found, small.shape[1])
    lengths = (ends - starts).astype(np.float64)
    areas = np.bincount(roots, weights=lengths).astype(np.float64)
    sum_x = np.bincount(roots, weights=(starts + ends - 1) * lengths / 2)
    sum_y = np.bincount(roots, weights=rows * lengths)
    order = np.argsort(-areas, kind="stable")
    areas = areas[order]
    scale = factor * factor
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (sum_x[order] / areas + 0.5) * factor
        cy = (sum_y[order] / areas + 0.5) * factor
    return _Components(areas=areas * scale, cx=cx, cy=cy)


# ---- inputs ----


def same(found: np.ndarray, expected: np.ndarray) -> bool:
    """Equal dtype, shape and bytes."""
    return found.dtype == expected.dtype and found.shape == expected.shape and found.tobytes() == expected.tobytes()


def random_mask(rng: np.random.Generator, largest: int = 60) -> NDArray[np.bool_]:
    """A random mask: speckle of random density, blobs, or both, of random size (1 x 1 upwards)."""
    height, width = (int(v) for v in rng.integers(1, largest, 2))
    kind = int(rng.integers(0, 3))
    speckle = rng.random((height, width)) < rng.random()
    if kind == 0:
        return speckle
    yy, xx = np.ogrid[:height, :width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx, ry, rx = (
            rng.integers(0, height),
            rng.integers(0, width),
            rng.integers(1, height + 1),
            rng.integers(1, width + 1),
        )
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + rng.normal(0, 0.1, (height, width)) < 1
    return mask ^ speckle if kind == 2 else mask


def hand_made() -> Iterator[NDArray[np.bool_]]:
    """Edge cases: empty, full, single pixels, diagonal-only contact, holes, rings, lines, edges, spirals."""
    yield np.zeros((5, 7), dtype=bool)
    yield np.ones((1, 1), dtype=bool)
    yield np.zeros((1, 1), dtype=bool)
    yield np.ones((9, 4), dtype=bool)
    yield np.eye(8, dtype=bool)
    yield np.eye(8, dtype=bool)[::-1].copy()
    yield np.indices((9, 9)).sum(axis=0) % 2 == 0  # a checkerboard: every pixel alone, diagonal contacts only
    ring = np.ones((9, 9), dtype=bool)
    ring[2:7, 2:7] = False
    ring[4, 4] = True  # an island in the hole
    yield ring
    line = np.zeros((3, 9), dtype=bool)
    line[1, 1:8] = True
    yield line
    yield line.T.copy()
    comb = np.zeros((12, 15), dtype=bool)
    comb[0, :] = True
    comb[:, ::2] = True  # many runs joined late (a U-turn per tooth)
    yield comb
    yield comb[::-1].copy()
    spiral = np.zeros((21, 21), dtype=bool)
    top, left, bottom, right = 0, 0, 20, 20
    while top <= bottom and left <= right:
        spiral[top, left : right + 1] = True
        spiral[top : bottom + 1, right] = True
        spiral[bottom, left : right + 1] = True
        spiral[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    yield spiral
    yy, xx = np.ogrid[:978, :921]
    yield (((yy - 480) / 330) ** 2 + ((xx - 250) / 150) ** 2 < 1) | (
        ((yy - 470) / 340) ** 2 + ((xx - 670) / 160) ** 2 < 1
    )


def masks_under_test(seed: int, count: int = 40) -> Iterator[NDArray[np.bool_]]:
    """Random masks of one seed, then the hand-made ones."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield random_mask(rng)
    yield from hand_made()


def integer_path(rng: np.random.Generator) -> NDArray[np.float64]:
    """A random walk on the pixel grid (what traced outlines are), with repeats and straight stretches."""
    steps = rng.integers(-int(rng.integers(0, 4)), int(rng.integers(1, 4)), (int(rng.integers(1, 900)), 2))
    return np.cumsum(steps, axis=0).astype(np.float64)


# ---- the comparisons ----


@pytest.mark.parametrize("seed", range(6))
def test_labels_and_components_equal_the_union_find(seed: int) -> None:
    """Run labels, label images, counts, and the kept components and their order match the Python union-find."""
    for mask in masks_under_test(seed):
        found = runs(mask)
        assert same(masks.run_labels(found, mask.shape[1]), old_run_labels(found, mask.shape[1]))
        labels, count = masks.label_components(mask)
        old_labels, old_count = old_label_components(mask)
        assert same(labels, old_labels) and count == old_count
        for keep in (1, 2, 5):
            parts, old_parts = masks.components(mask, keep), old_components(mask, keep)
            assert len(parts) == len(old_parts) and all(map(same, parts, old_parts))


@pytest.mark.parametrize("seed", range(4))
def test_block_reduction_equals_the_strided_or_and_the_4d_sum(seed: int) -> None:
    """Both rules, every block size from 1 to 11, equal the previous reduction (views and padding included)."""
    for mask in masks_under_test(seed, 15):
        for factor in range(1, 12):
            for rule in ("any", "majority"):
                assert same(masks.downsample(mask, factor, rule), old_downsample(mask, factor, rule))
        if mask.shape[0] > 2 and mask.shape[1] > 3:
            view = mask[1:, 1:-1]  # not contiguous
            assert same(masks.downsample(view, 4, "majority"), old_downsample(view, 4, "majority"))
            assert same(masks.downsample(view, 2, "any"), old_downsample(view, 2, "any"))


@pytest.mark.parametrize("seed", range(6))
def test_tracing_equals_the_search_around_each_pixel(seed: int) -> None:
    """Every component of every mask (and whole masks, several components at once) is traced to the same path."""
    for mask in masks_under_test(seed):
        if not mask.any():
            continue
        for component in [mask, *old_components(mask, keep=4)]:
            assert same(masks.trace(component), old_trace(component))


@pytest.mark.parametrize("seed", range(8))
def test_simplification_equals_the_mixed_python_and_numpy_loop(seed: int) -> None:
    """Pixel paths, open and closed, and non-integer, float32, NaN-holding and integer points keep the same points."""
    rng = np.random.default_rng(seed)
    for _ in range(12):
        path = integer_path(rng)
        noisy = path + rng.normal(0, 0.3, path.shape)
        holed = path.copy()
        holed[rng.random(len(path)) < 0.05] = np.nan
        far = path * 2.0**30  # beyond the exact range: the mixed loop's maths
        for points in (
            path,
            np.vstack([path, path[:1]]),
            noisy,
            noisy.astype(np.float32),
            holed,
            path.astype(np.int64),
            far,
        ):
            for tolerance in (0.0, 0.5, 0.75, 1.0, 3.0):
                assert same(masks.simplify(points, tolerance), old_simplify(points, tolerance))


def test_simplification_breaks_ties_like_before() -> None:
    """Equal distances (symmetric zigzags, repeated points, zero-length segments) pick the same, first, point."""
    zigzag = np.array([[x, (x % 2) * 2.0] for x in range(200)], dtype=np.float64)
    square = np.array([[0, 0], [0, 4], [4, 4], [4, 0], [0, 0]] * 30, dtype=np.float64)
    repeated = np.repeat(np.array([[0.0, 0.0], [3.0, 1.0], [0.0, 0.0]]), 40, axis=0)
    arc = np.array([[10 * math.cos(a), 10 * math.sin(a)] for a in np.linspace(0, math.pi, 2 * SMALL_SEGMENT + 1)])
    for points in (zigzag, square, repeated, np.round(arc), arc):
        for tolerance in (0.0, 0.5, 1.0, 1.5):
            assert same(masks.simplify(points, tolerance), old_simplify(points, tolerance))


@pytest.mark.parametrize("seed", range(6))
def test_hull_equals_the_numpy_scalar_chain(seed: int) -> None:
    """Grid points (many collinear), random floats, float32, integers and NaNs give the same hull or the same error."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        count = int(rng.integers(1, 300))
        grid = rng.integers(0, int(rng.integers(1, 6)), (count, 2)).astype(np.float64)
        holed = grid * 0.1
        holed[rng.random(count) < 0.1] = np.nan
        for points in (grid, rng.normal(0, 1, (count, 2)), grid.astype(np.float32), grid.astype(np.int64), holed):
            assert _hull_or_error(masks.convex_hull, points) == _hull_or_error(old_convex_hull, points)


def _hull_or_error(hull: Callable[[np.ndarray], np.ndarray], points: np.ndarray) -> tuple[str, bytes, tuple[int, ...]]:
    """The hull's dtype, bytes and shape, or the error message."""
    try:
        found = hull(points)
    except ValueError as error:
        return str(error), b"", ()
    return str(found.dtype), found.tobytes(), found.shape


@pytest.mark.parametrize("seed", range(4))
def test_outlines_and_their_hull_equal_the_previous_pipeline(seed: int) -> None:
    """``lung_outlines`` and the SR's hull of them are the previous ones at several target sizes."""
    for mask in masks_under_test(seed, 12):
        for shape in ((512, 512), (1955, 1841), (300, 700)):
            found, expected = masks.lung_outlines(mask, shape), old_lung_outlines(mask, shape)
            assert len(found) == len(expected) and all(map(same, found, expected))
            if found and len(np.unique(np.vstack(found), axis=0)) >= 3:
                assert same(masks.convex_hull(np.vstack(found)), old_convex_hull(np.vstack(expected)))


@pytest.mark.parametrize("seed", range(4))
def test_mask_quality_components_equal_the_previous_statistics(seed: int) -> None:
    """Areas and centroids of the mask check's components are the previous ones (order, NaN and all)."""
    rng = np.random.default_rng(seed)
    for mask in [*masks_under_test(seed, 12), *(random_mask(rng, 1200) for _ in range(3))]:
        found, expected = segment._components(mask), old_mask_components(mask)
        assert same(found.areas, expected.areas) and same(found.cx, expected.cx) and same(found.cy, expected.cy)
