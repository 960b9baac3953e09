"""The cheaper outline pipeline equals the implementation it replaced, bit for bit, and its cache never mixes masks up.

The ``before_*`` functions below are the previous implementations, copied verbatim (runs from an int8 ``diff``,
union-find rounds from unhooked nodes, components through a label image, tracing on the whole padded component with
shifted neighbour codes, level-batched Douglas-Peucker over the open segments, one lung at a time). Runs, labels,
components, traced paths, kept points and outlines must keep their dtype, shape and bytes on lungs, noisy, fragmented,
holey and edge-touching masks, 1 x N and N x 1 masks, large block factors, and targets of any size.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np
import pytest
from numpy.typing import NDArray

from cxr_node.imaging import masks
from cxr_node.imaging.masks import MIN_COMPONENT_FRACTION, OUTLINE_GRID, OUTLINES_KEPT, Runs, check_mask
from tests.unit.test_masks_equivalence import integer_path, masks_under_test, random_mask, same

# ---- the previous implementations (reference) ----


def before_runs(mask: NDArray[np.bool_]) -> Runs:
    """Return the horizontal runs of set pixels as ``(row, start, end)`` arrays (end exclusive), row-major."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)
    return rows.astype(np.int64), starts.astype(np.int64), ends.astype(np.int64)


def before_run_labels(found: Runs, width: int) -> NDArray[np.int64]:
    """Return, for each run, a component index ``0..k-1`` (4-connectivity: runs overlapping in adjacent rows)."""
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
    upper = np.repeat(first, counts) + masks._ramps(counts)
    lower = np.repeat(np.arange(rows.size), counts)
    roots = before_union_find(rows.size, lower, upper)
    is_root = roots == np.arange(rows.size)
    return (np.cumsum(is_root) - 1)[roots].astype(np.int64)


def before_union_find(size: int, left: NDArray[np.int64], right: NDArray[np.int64]) -> NDArray[np.int64]:
    """Each node's root after joining every pair (rounds of hooking roots, then pointer jumping)."""
    parent = np.arange(size, dtype=np.int64)
    while True:
        parent = before_flatten(parent)
        root_left, root_right = parent[left], parent[right]
        apart = root_left != root_right
        if not apart.any():
            return parent
        root_left, root_right = root_left[apart], root_right[apart]
        np.minimum.at(parent, np.maximum(root_left, root_right), np.minimum(root_left, root_right))


def before_flatten(parent: NDArray[np.int64]) -> NDArray[np.int64]:
    """Point every node straight at its root (pointer jumping)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def before_label_components(mask: np.ndarray) -> tuple[NDArray[np.int32], int]:
    """4-connected component labels of a bool mask, and their count."""
    check_mask(mask)
    found = before_runs(mask)
    rows, starts, ends = found
    roots = before_run_labels(found, mask.shape[1])
    labels = np.zeros(mask.shape, dtype=np.int32)
    lengths = ends - starts
    flat = np.repeat(rows * mask.shape[1] + starts, lengths) + masks._ramps(lengths)
    labels.reshape(-1)[flat] = np.repeat(roots + 1, lengths)
    return labels, int(roots.max() + 1) if roots.size else 0


def before_components(mask: np.ndarray, keep: int = 2) -> list[NDArray[np.bool_]]:
    """The ``keep`` largest 4-connected components of a bool mask, largest first."""
    labels, count = before_label_components(mask)
    if count == 0:
        return []
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:keep]
    minimum = MIN_COMPONENT_FRACTION * mask.size
    return [labels == index + 1 for index in order.tolist() if sizes[index] >= minimum]


def before_trace(component: np.ndarray) -> np.ndarray:
    """The outer boundary of one connected component as (row, col) pixel centres, in order (Moore tracing)."""
    padded = np.pad(component, 1)
    width = padded.shape[1]
    codes = before_neighbour_codes(padded.astype(np.uint8))
    offsets = [dr * width + dc for dr, dc in masks._NEIGHBOURS]
    table = BEFORE_NEXT_DIRECTION
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


def before_neighbour_codes(padded: NDArray[np.uint8]) -> bytes:
    """For each pixel of a 0/1 mask with a clear border, its eight neighbours as a byte (row-major)."""
    triple = padded[:, :-2] | padded[:, 1:-1] << 1 | padded[:, 2:] << 2
    sides = padded[1:-1, :-2] << 3 | padded[1:-1, 2:] << 4
    codes = np.zeros_like(padded)
    codes[1:-1, 1:-1] = triple[:-2] | sides | triple[2:] << 5
    return codes.tobytes()


def before_next_directions() -> list[int]:
    """At ``code << 3 | came_from``, the first direction clockwise after ``came_from`` set in ``code`` (or -1)."""
    code = np.arange(256)[:, None, None]
    came_from = np.arange(8)[None, :, None]
    order = (came_from + 1 + np.arange(8)[None, None, :]) % 8
    present = (code >> np.asarray(masks._CODE_BIT)[order]) & 1 == 1
    first = np.argmax(present, axis=2)
    chosen = np.take_along_axis(order, first[..., None], axis=2)[..., 0]
    directions: list[int] = np.where(present.any(axis=2), chosen, -1).reshape(-1).tolist()
    return directions


BEFORE_NEXT_DIRECTION: Final = before_next_directions()


def before_simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker of (N, 2) points, exact pixel paths one level of open segments at a time."""
    if len(points) < 3:
        return points
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    if masks._exact_pixels(points):
        before_split_levels(points[:, 0].copy(), points[:, 1].copy(), tolerance, keep)
        return points[keep]
    return masks.simplify(points, tolerance)  # the other inputs' path is unchanged


def before_split_levels(
    x: NDArray[np.float64], y: NDArray[np.float64], tolerance: float, keep: NDArray[np.bool_]
) -> None:
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


def before_lung_outlines(mask: np.ndarray, target_shape: tuple[int, int], max_points: int = 128) -> list[np.ndarray]:
    """Each lung's closed outline as (column, row) points in a ``target_shape`` image, largest first."""
    small, block = masks.reduce_to_grid(mask, OUTLINE_GRID, "any")
    scale_r = target_shape[0] / mask.shape[0] * block
    scale_c = target_shape[1] / mask.shape[1] * block
    outlines = []
    for component in before_components(small):
        path = before_trace(component)
        if len(path) < 3:
            continue
        path = before_simplify(np.vstack([path, path[:1]]), tolerance=0.75)[:max_points]
        points = np.column_stack([(path[:, 1] + 0.5) * scale_c, (path[:, 0] + 0.5) * scale_r])
        points = np.clip(points, 0.0, [target_shape[1] - 1.0, target_shape[0] - 1.0])
        outlines.append(np.vstack([points[:-1], points[:1]]) if not np.array_equal(points[0], points[-1]) else points)
    return outlines


# ---- inputs ----


def ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> NDArray[np.bool_]:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.asarray(((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 < 1)


def lungs(shape: tuple[int, int] = (978, 921)) -> NDArray[np.bool_]:
    """Two ellipses where a worker's lungs lie."""
    height, width = shape
    return ellipse(shape, (0.49 * height, 0.27 * width), (0.34 * height, 0.16 * width)) | ellipse(
        shape, (0.48 * height, 0.73 * width), (0.35 * height, 0.17 * width)
    )


def lung_like(rng: np.random.Generator) -> Iterator[NDArray[np.bool_]]:
    """Lungs as the segmenter may leave them: clean, ragged, fragmented, holey (islands in the holes), cut by an
    edge, one lung only, joined, touching only diagonally, with specks in the other lung's box."""
    height, width = (int(v) for v in rng.integers(200, 1300, 2))
    clean = lungs((height, width))
    yield clean
    yield clean ^ (rng.random(clean.shape) < 0.02)  # specks and pinholes
    ragged = clean.copy()
    ragged[rng.random(clean.shape) < 0.3] = False  # many breaks at the grid's size too
    yield ragged
    holey = clean.copy()
    for _ in range(6):
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        hole = ellipse(clean.shape, (cy, cx), (height / 12, width / 12))
        holey &= ~hole
        holey |= ellipse(clean.shape, (cy, cx), (height / 40, width / 40))  # an island in the hole
    yield holey
    shift = int(rng.integers(1, width // 3))
    yield np.roll(clean, shift, axis=1)  # one lung cut by the edges, wrapped round
    yield clean[:, : width // 2].copy()  # one lung
    yield clean[: height // 2].copy()  # cut off at the bottom edge
    yield clean | ellipse(clean.shape, (0.5 * height, 0.5 * width), (0.05 * height, 0.3 * width))  # joined
    corner = np.zeros(clean.shape, dtype=bool)
    corner[: height // 2, : width // 2] = True
    corner[height // 2 :, width // 2 :] = True  # two blocks meeting at one corner only
    yield corner
    yield ~clean  # the background: touches every edge, with two holes


def shapes_and_factors() -> Iterator[NDArray[np.bool_]]:
    """1 x N, N x 1 and tiny masks, and masks reduced by large and odd block factors."""
    rng = np.random.default_rng(7)
    for shape in ((1, 1), (1, 2), (1, 300), (300, 1), (2, 2), (3, 1000), (1000, 3), (1, 4000), (5, 5)):
        yield np.ones(shape, dtype=bool)
        yield rng.random(shape) < 0.5
    for shape in ((2600, 700), (3001, 2999), (700, 5000), (257, 257), (513, 1025)):
        yield lungs(shape)
        yield random_mask(rng, 60).repeat(shape[0] // 50, axis=0).repeat(shape[1] // 50, axis=1)


TARGETS: Final = ((512, 512), (1955, 1841), (300, 700), (1, 1), (1, 4000), (4000, 1), (3, 5), (7000, 6000))


def outlines_equal(mask: NDArray[np.bool_], targets: tuple[tuple[int, int], ...] = TARGETS) -> None:
    for target in targets:
        for max_points in (128, 5):
            found = masks.lung_outlines(mask, target, max_points)
            expected = before_lung_outlines(mask, target, max_points)
            assert len(found) == len(expected), (mask.shape, target)
            assert all(map(same, found, expected)), (mask.shape, target)


# ---- the comparisons ----


@pytest.mark.parametrize("seed", range(6))
def test_runs_labels_and_components_equal_the_previous_ones(seed: int) -> None:
    """Runs (values and dtype), run labels, label images and the kept components in their order are the previous."""
    rng = np.random.default_rng(seed)
    for mask in [*masks_under_test(seed, 30), *lung_like(rng)]:
        found, expected = masks.runs(mask), before_runs(mask)
        assert all(map(same, (np.ascontiguousarray(part) for part in found), expected))
        assert same(masks.run_labels(found, mask.shape[1]), before_run_labels(expected, mask.shape[1]))
        labels, count = masks.label_components(mask)
        before_labels, before_count = before_label_components(mask)
        assert same(labels, before_labels) and count == before_count
        for keep in (1, 2, 5):
            parts, before_parts = masks.components(mask, keep), before_components(mask, keep)
            assert len(parts) == len(before_parts) and all(map(same, parts, before_parts))


@pytest.mark.parametrize("seed", range(6))
def test_tracing_equals_the_whole_component_trace(seed: int) -> None:
    """Whole masks (several components at once), each component, and each component traced from its runs on the
    grid (cropped, or painted when another component reaches into its box) give the previous path."""
    rng = np.random.default_rng(seed)
    for mask in [*masks_under_test(seed, 30), *lung_like(rng)]:
        if not mask.any():
            continue
        small, _ = masks.reduce_to_grid(mask, OUTLINE_GRID, "any")
        assert same(masks.trace(mask), before_trace(mask))
        for found, component in zip(masks._largest_components(small, 4), before_components(small, keep=4), strict=True):
            assert same(masks.trace(component), before_trace(component))
            rows, columns = masks._trace_runs(small, found)
            assert same(np.column_stack([rows, columns]).astype(np.float64), before_trace(component))


@pytest.mark.parametrize("seed", range(6))
def test_simplification_equals_the_open_segment_levels(seed: int) -> None:
    """Pixel paths, open and closed, at any tolerance (negative, infinite and NaN included) keep the same points."""
    rng = np.random.default_rng(seed)
    for _ in range(12):
        path = integer_path(rng)
        for points in (path, np.vstack([path, path[:1]]), path[:3], np.repeat(path[:5], 3, axis=0)):
            for tolerance in (-1.0, -np.inf, 0.0, 0.5, 0.75, 1.0, 3.0, 50.0, np.inf, np.nan):
                assert same(masks.simplify(points, tolerance), before_simplify(points, tolerance))


def test_paths_laid_end_to_end_simplify_as_each_alone() -> None:
    """Several closed paths simplified in one pass keep what each keeps alone (what ``lung_outlines`` relies on)."""
    rng = np.random.default_rng(3)
    paths = [integer_path(rng) for _ in range(5)]
    closed = [np.vstack([path, path[:1]]) for path in paths if len(path) >= 3]
    lengths = np.asarray([len(path) for path in closed])
    keep = np.zeros(int(lengths.sum()), dtype=bool)
    keep[np.cumsum(lengths) - lengths] = keep[np.cumsum(lengths) - 1] = True
    both = np.vstack(closed)
    masks._split_levels(both[:, 0].copy(), both[:, 1].copy(), 0.75, keep)
    found = np.split(both[keep], np.cumsum([part.sum() for part in np.split(keep, np.cumsum(lengths)[:-1])])[:-1])
    assert all(map(same, found, (before_simplify(path, 0.75) for path in closed)))


@pytest.mark.parametrize("seed", range(4))
def test_outlines_equal_the_previous_pipeline_on_lungs(seed: int) -> None:
    """Clean, ragged, fragmented, holey and edge-touching lungs, at targets from 1 x 1 up, truncated or not."""
    for mask in lung_like(np.random.default_rng(seed)):
        outlines_equal(mask)


@pytest.mark.parametrize("seed", range(3))
def test_outlines_equal_the_previous_pipeline_on_random_masks(seed: int) -> None:
    """Random speckle and blobs, empty, full, single pixels, diagonal-only contact, rings, combs and spirals."""
    for mask in masks_under_test(100 + seed, 25):
        outlines_equal(mask, TARGETS[:4])


def test_outlines_equal_the_previous_pipeline_on_thin_tiny_and_large_masks() -> None:
    for mask in shapes_and_factors():
        outlines_equal(mask, TARGETS[:3])


# ---- the cache ----


def test_the_cache_returns_the_outlines_of_the_mask_asked_about() -> None:
    """The same mask again: the same read-only outlines; another mask (same shape), another target, a mask changed
    in place, or more masks than are kept: outlines traced afresh, each equal to ``lung_outlines``."""
    target = (1955, 1841)
    first, second = lungs(), lungs()[::-1].copy()
    outlines = masks.cached_lung_outlines(first, target)
    assert masks.cached_lung_outlines(first, target) is outlines
    assert all(not outline.flags.writeable for outline in outlines)
    assert all(map(same, outlines, masks.lung_outlines(first, target)))
    assert all(map(same, masks.cached_lung_outlines(second, target), masks.lung_outlines(second, target)))
    assert all(map(same, masks.cached_lung_outlines(first, (512, 512)), masks.lung_outlines(first, (512, 512))))
    assert all(map(same, masks.cached_lung_outlines(first, target, 5), masks.lung_outlines(first, target, 5)))
    assert masks.cached_lung_outlines(first, target) is outlines
    first[:, : first.shape[1] // 2] = False  # one lung left
    changed = masks.cached_lung_outlines(first, target)
    assert len(changed) == 1 and all(map(same, changed, masks.lung_outlines(first, target)))
    assert masks.cached_lung_outlines(first, target) is changed
    first[:] = False
    assert masks.cached_lung_outlines(first, target) == ()
    many = [lungs((400 + 10 * index, 500)) for index in range(OUTLINES_KEPT + 2)]
    for mask in [*many, *many]:
        assert all(map(same, masks.cached_lung_outlines(mask, target), masks.lung_outlines(mask, target)))


def test_a_freed_masks_id_taken_by_another_mask_is_not_trusted() -> None:
    """New arrays, often at a freed mask's address (same id, same shape), each get their own outlines."""
    for index in range(20):
        mask = lungs((300, 300)) if index % 2 else np.roll(lungs((300, 300)), 40, axis=0)
        assert all(map(same, masks.cached_lung_outlines(mask, (512, 512)), masks.lung_outlines(mask, (512, 512))))
        del mask


def test_the_cache_is_thread_safe() -> None:
    """Threads asking about different masks and the same masks at once each get their own mask's outlines."""
    target = (1000, 1000)
    shapes = [(300 + 37 * index, 280 + 23 * index) for index in range(OUTLINES_KEPT * 2)]
    asked = [lungs(shape) for shape in shapes] + [np.roll(lungs(shape), 30, axis=1) for shape in shapes]
    expected = [masks.lung_outlines(mask, target) for mask in asked]
    start = threading.Barrier(8)

    def ask(offset: int) -> bool:
        start.wait()
        answers = []
        for step in range(3 * len(asked)):
            index = (offset + 5 * step) % len(asked)
            answers.append(all(map(same, masks.cached_lung_outlines(asked[index], target), expected[index])))
        return all(answers)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(ask, range(8)))


def test_the_cache_refuses_what_lung_outlines_refuses() -> None:
    with pytest.raises(ValueError, match="bool"):
        masks.cached_lung_outlines(np.ones((5, 5), dtype=np.uint8), (5, 5))
    with pytest.raises(ValueError, match="non-empty"):
        masks.cached_lung_outlines(np.zeros((0, 5), dtype=bool), (5, 5))
