"""Outlines of a lung mask as polygons: what the SR region, the presentation state and the SEG are drawn from.

Pure numpy: bool masks in, ``(N, 2)`` float arrays of (column, row) points out, in the pixel
coordinates of the image the mask was scaled to (DICOM SCOORD order: column first).
"""

from __future__ import annotations

from typing import Final

import numpy as np

GRID: Final = 256
"""Outlines are traced on the mask block-reduced to at most this many pixels a side."""
MIN_COMPONENT_FRACTION: Final = 0.005
"""Components smaller than this share of the grid are specks, not lungs."""

_NEIGHBOURS: Final = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def reduce_mask(mask: np.ndarray, grid: int = GRID) -> tuple[np.ndarray, int]:
    """Return the mask block-reduced (any pixel set) to at most ``grid`` a side, and the block size."""
    _check_mask(mask)
    block = max(1, -(-max(mask.shape) // grid))
    rows, cols = (-(-n // block) * block for n in mask.shape)
    padded = np.zeros((rows, cols), dtype=bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(rows // block, block, cols // block, block).any(axis=(1, 3)), block


def components(mask: np.ndarray, keep: int = 2) -> list[np.ndarray]:
    """Return the ``keep`` largest 4-connected components of a bool mask, largest first.

    Run-based labelling: each row's runs of set pixels are found with numpy, runs overlapping a run of the
    row above are joined (union-find over runs, a few hundred for a lung mask), then painted back.
    """
    _check_mask(mask)
    runs = _runs(mask)
    if not runs:
        return []
    parent = list(range(len(runs)))
    by_row: dict[int, list[int]] = {}
    for index, (row, _, _) in enumerate(runs):
        by_row.setdefault(row, []).append(index)
    for index, (row, start, end) in enumerate(runs):
        for other in by_row.get(row - 1, ()):
            _, other_start, other_end = runs[other]
            if other_start < end and start < other_end:
                _union(parent, index, other)
    groups: dict[int, list[int]] = {}
    for index in range(len(runs)):
        groups.setdefault(_find(parent, index), []).append(index)
    sizes = sorted(groups.values(), key=lambda group: -sum(runs[i][2] - runs[i][1] for i in group))
    minimum = MIN_COMPONENT_FRACTION * mask.size
    found = []
    for group in sizes[:keep]:
        component = np.zeros(mask.shape, dtype=bool)
        for i in group:
            row, start, end = runs[i]
            component[row, start:end] = True
        if component.sum() >= minimum:
            found.append(component)
    return found


def _runs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, start, end) of every horizontal run of set pixels, row by row."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    starts_r, starts_c = np.nonzero(edges == 1)
    _, ends_c = np.nonzero(edges == -1)
    return list(zip(starts_r.tolist(), starts_c.tolist(), ends_c.tolist(), strict=True))


def _find(parent: list[int], index: int) -> int:
    while parent[index] != index:
        parent[index] = parent[parent[index]]
        index = parent[index]
    return index


def _union(parent: list[int], a: int, b: int) -> None:
    root_a, root_b = _find(parent, a), _find(parent, b)
    if root_a != root_b:
        parent[max(root_a, root_b)] = min(root_a, root_b)


def trace(component: np.ndarray) -> np.ndarray:
    """Return the outer boundary of one connected component as (row, col) pixel centres, in order (Moore tracing)."""
    padded = np.pad(component, 1)
    rows, cols = np.nonzero(padded)
    start = (int(rows[0]), int(cols[0]))
    path = [start]
    current, came_from = start, 6  # entered from the west
    for _ in range(4 * padded.size):
        for step in range(8):
            direction = (came_from + 1 + step) % 8
            dr, dc = _NEIGHBOURS[direction]
            candidate = (current[0] + dr, current[1] + dc)
            if padded[candidate]:
                came_from = (direction + 4) % 8
                current = candidate
                break
        else:
            break  # a single pixel
        if current == start:
            break
        path.append(current)
    return np.asarray(path, dtype=np.float64) - 1.0


def simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed or open polyline of (N, 2) points."""
    if len(points) < 3:
        return points
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        distances = _distance_to_segment(points[first + 1 : last], points[first], points[last])
        index = int(np.argmax(distances))
        if distances[index] > tolerance:
            keep[first + 1 + index] = True
            stack += [(first, first + 1 + index), (first + 1 + index, last)]
    return points[keep]


def _distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    length = float(np.dot(ab, ab))
    if length == 0.0:
        return np.linalg.norm(points - a, axis=1)
    t = np.clip((points - a) @ ab / length, 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def lung_outlines(mask: np.ndarray, target_shape: tuple[int, int], max_points: int = 128) -> list[np.ndarray]:
    """Return each lung's closed outline as (column, row) points in a ``target_shape`` image, largest first.

    The first point is repeated at the end (a closed POLYLINE, as DICOM SCOORD and GSPS expect).
    """
    small, block = reduce_mask(mask)
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


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return a bool mask resized to ``shape`` by nearest neighbour (for a SEG at the source's size)."""
    _check_mask(mask)
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(np.intp)
    return mask[np.ix_(rows, cols)]


def _check_mask(mask: np.ndarray) -> None:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.bool_:
        found = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask must be a bool (H, W) array, found {found}")
