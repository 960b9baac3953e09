"""The fast mask geometry (block reduction, boundary tracing, Douglas-Peucker) equals the plain versions, bit for bit.

The references below are the straightforward implementations the node used before: a numpy ``any`` over a 4-D
block view, Moore tracing with numpy look-ups, and Douglas-Peucker measured with numpy on every segment. Outputs
(the SR's lung region, the GSPS outlines) must stay byte for byte what they were, so the fast versions must agree
to the bit on masks and integer paths like the ones outlines are made of.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxr_node.imaging.masks import OUTLINE_GRID, components, downsample, lung_outlines, simplify, trace
from cxr_node.training.phantoms import make_phantom

_NEIGHBOURS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def reference_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """Block OR through a 4-D view."""
    height, width = -(-mask.shape[0] // factor) * factor, -(-mask.shape[1] // factor) * factor
    padded = np.zeros((height, width), dtype=bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return np.asarray(padded.reshape(height // factor, factor, width // factor, factor).any(axis=(1, 3)))


def reference_trace(component: np.ndarray) -> np.ndarray:
    """Moore tracing with numpy look-ups."""
    padded = np.pad(component, 1)
    rows, cols = np.nonzero(padded)
    start = (int(rows[0]), int(cols[0]))
    path, current, came_from = [start], start, 6
    for _ in range(4 * padded.size):
        for step in range(8):
            direction = (came_from + 1 + step) % 8
            candidate = (current[0] + _NEIGHBOURS[direction][0], current[1] + _NEIGHBOURS[direction][1])
            if padded[candidate]:
                came_from, current = (direction + 4) % 8, candidate
                break
        else:
            break
        if current == start:
            break
        path.append(current)
    return np.asarray(path, dtype=np.float64) - 1.0


def reference_simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker with numpy distances on every segment."""
    if len(points) < 3:
        return points
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        inner, a, b = points[first + 1 : last], points[first], points[last]
        ab = b - a
        length = float(np.dot(ab, ab))
        if length == 0.0:
            distances = np.linalg.norm(inner - a, axis=1)
        else:
            t = np.clip((inner - a) @ ab / length, 0.0, 1.0)
            distances = np.linalg.norm(inner - (a + t[:, None] * ab), axis=1)
        index = int(np.argmax(distances))
        if distances[index] > tolerance:
            keep[first + 1 + index] = True
            stack += [(first, first + 1 + index), (first + 1 + index, last)]
    return points[keep]


def blobs(seed: int) -> np.ndarray:
    """A mask of a few noisy ellipses (holes, islands and ragged edges included)."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(40, 700, 2))
    yy, xx = np.ogrid[:height, :width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(3, max(4, height // 2)), rng.integers(3, max(4, width // 2))
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + rng.normal(0, 0.08, (height, width)) < 1
    return mask


@pytest.mark.parametrize("seed", range(12))
def test_block_reduction_matches_a_4d_any(seed: int) -> None:
    """Any-rule downsampling by every factor equals the OR over each block."""
    mask = blobs(seed)
    for factor in (1, 2, 3, 4, 7, 8):
        assert np.array_equal(downsample(mask, factor, "any"), reference_any(mask, factor))


@pytest.mark.parametrize("seed", range(12))
def test_tracing_matches_moore_tracing_with_numpy(seed: int) -> None:
    """The byte-walk tracer visits the same pixels in the same order, single pixels and thin lines included."""
    mask = blobs(seed)
    component = mask & (np.cumsum(mask.reshape(-1)).reshape(mask.shape) > 0)
    first = np.argwhere(component)
    if len(first):
        assert np.array_equal(trace(component), reference_trace(component))
    dot = np.zeros((5, 5), dtype=bool)
    dot[2, 2] = True
    line = np.zeros((3, 9), dtype=bool)
    line[1, 1:8] = True
    for shape in (dot, line):
        assert np.array_equal(trace(shape), reference_trace(shape))


@pytest.mark.parametrize("seed", range(20))
def test_simplification_matches_numpy_douglas_peucker(seed: int) -> None:
    """On integer paths (what traced outlines are), short and long segments, closed or not, the kept points agree."""
    rng = np.random.default_rng(seed)
    for tolerance in (0.5, 0.75, 1.0, 3.0):
        steps = rng.integers(-3, 4, (int(rng.integers(3, 1200)), 2))
        path = np.cumsum(steps, axis=0).astype(np.float64)
        closed = np.vstack([path, path[:1]])
        for points in (path, closed):
            assert np.array_equal(simplify(points, tolerance), reference_simplify(points, tolerance))


def reference_outlines(mask: np.ndarray, target: tuple[int, int], max_points: int = 128) -> list[np.ndarray]:
    """``lung_outlines`` assembled from the reference steps."""
    block = max(1, -(-max(mask.shape) // OUTLINE_GRID))
    small = reference_any(mask, block)
    scale_r, scale_c = target[0] / mask.shape[0] * block, target[1] / mask.shape[1] * block
    outlines = []
    for component in components(small):
        path = reference_trace(component)
        if len(path) < 3:
            continue
        path = reference_simplify(np.vstack([path, path[:1]]), tolerance=0.75)[:max_points]
        points = np.column_stack([(path[:, 1] + 0.5) * scale_c, (path[:, 0] + 0.5) * scale_r])
        points = np.clip(points, 0.0, [target[1] - 1.0, target[0] - 1.0])
        outlines.append(np.vstack([points[:-1], points[:1]]) if not np.array_equal(points[0], points[-1]) else points)
    return outlines


@pytest.mark.parametrize("seed", range(8))
def test_lung_outlines_are_those_of_the_reference_steps(seed: int) -> None:
    """Outlines of phantom lungs and of ragged masks, at several target sizes, equal the reference pipeline's."""
    masks = (make_phantom(seed, 1, 200 + 100 * seed).lung_mask.astype(bool), blobs(100 + seed))
    for mask in masks:
        for shape in ((512, 512), (1955, 1841), (300, 700)):
            found, expected = lung_outlines(mask, shape), reference_outlines(mask, shape)
            assert len(found) == len(expected)
            assert all(np.array_equal(a, b) for a, b in zip(found, expected, strict=True))
