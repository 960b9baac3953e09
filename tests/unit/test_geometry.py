"""Outline geometry of lung masks: components, boundary tracing, simplification, hulls, resizing."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from cxr_node.imaging.masks import components, convex_hull, lung_outlines, resize_nearest, simplify, trace
from cxr_node.training.phantoms import make_phantom


def reference_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components by breadth-first search, largest first (the slow, obvious way)."""
    labels, found = np.zeros(mask.shape, int), []
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        labels[start] = len(found) + 1
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = labels[start]
                    queue.append((nr, nc))
        found.append(labels == labels[start])
    return sorted(found, key=lambda c: -int(c.sum()))


@pytest.mark.parametrize("seed", range(20))
def test_components_match_breadth_first_search(seed: int) -> None:
    """The run-based labelling finds the same largest components as a BFS on random masks."""
    rng = np.random.default_rng(seed)
    mask = rng.random((40, 50)) < rng.uniform(0.3, 0.7)
    ours = components(mask, keep=3)
    sizes = [int(c.sum()) for c in reference_components(mask)[:3] if c.sum() >= 0.005 * mask.size]
    assert [int(c.sum()) for c in ours] == sizes
    for component in ours:
        assert (component <= mask).all()


def test_trace_walks_the_boundary_of_a_square() -> None:
    """A filled square's traced outline visits exactly its border pixels."""
    mask = np.zeros((10, 10), bool)
    mask[2:7, 3:8] = True
    path = trace(mask)
    border = {(r, c) for r in range(2, 7) for c in range(3, 8) if r in (2, 6) or c in (3, 7)}
    assert {tuple(map(int, p)) for p in path} == border


def test_simplify_keeps_corners_and_drops_collinear_points() -> None:
    """Douglas-Peucker keeps the corners of an L and drops the points between them."""
    points = np.array([[0, 0], [0, 1], [0, 2], [0, 3], [1, 3], [2, 3]], float)
    assert simplify(points, 0.1).tolist() == [[0, 0], [0, 3], [2, 3]]


def test_convex_hull_contains_every_point() -> None:
    """Every input point lies inside or on the closed, counter-clockwise hull."""
    points = np.random.default_rng(1).random((200, 2)) * 100
    hull = convex_hull(points)
    assert (hull[0] == hull[-1]).all()
    edges = np.diff(hull, axis=0)
    for p in points:
        cross = edges[:, 0] * (p[1] - hull[:-1, 1]) - edges[:, 1] * (p[0] - hull[:-1, 0])
        assert (cross >= -1e-9).all()
    with pytest.raises(ValueError, match="3 distinct points"):
        convex_hull(np.zeros((5, 2)))


def test_lung_outlines_of_a_phantom_are_two_closed_polygons_inside_the_image() -> None:
    """A phantom's two lungs give two closed outlines scaled to the target image and inside it."""
    mask = make_phantom(3, 1, 512).lung_mask.astype(bool)
    outlines = lung_outlines(mask, (1955, 1841))
    assert len(outlines) == 2
    for outline in outlines:
        assert (outline[0] == outline[-1]).all() and len(outline) >= 8
        assert (outline[:, 0] <= 1840).all() and (outline[:, 1] <= 1954).all() and (outline >= 0).all()


def test_resize_nearest_and_bad_masks() -> None:
    """Nearest-neighbour resizing keeps the values; a non-bool mask is refused naming the argument."""
    mask = np.array([[True, False], [False, True]])
    assert resize_nearest(mask, (4, 4)).tolist()[0] == [True, True, False, False]
    with pytest.raises(ValueError, match="mask must be a non-empty"):
        components(np.zeros((4, 4), np.uint8))
