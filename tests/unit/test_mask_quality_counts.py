"""The mask check's counts (area, centroid) taken as sums of bytes give exactly what the earlier float mean and
count_nonzero gave, so every verdict and reason string is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_node.infer import segment


def earlier_centroid(mask: np.ndarray) -> tuple[float, float]:
    """The centroid as the check computed it before (count_nonzero per column and row)."""
    total = np.count_nonzero(mask)
    x = (np.count_nonzero(mask, axis=0) @ np.arange(mask.shape[1]) / total + 0.5) / mask.shape[1]
    y = (np.count_nonzero(mask, axis=1) @ np.arange(mask.shape[0]) / total + 0.5) / mask.shape[0]
    return float(x), float(y)


def masks() -> list[np.ndarray]:
    rng = np.random.default_rng(14)
    found = []
    for _ in range(40):
        rows, cols = int(rng.integers(16, 700)), int(rng.integers(16, 700))
        mask = rng.random((rows, cols)) < rng.uniform(0.0, 1.0)
        found.append(mask if rng.random() < 0.7 else np.asfortranarray(mask)[:, ::-1])  # and not C-contiguous
    lungs = np.zeros((978, 921), dtype=bool)
    lungs[120:760, 90:420] = lungs[130:770, 500:840] = True
    return [*found, lungs, lungs[:, :460], np.zeros((50, 60), dtype=bool)]


@pytest.mark.parametrize("mask", masks())
def test_verdict_area_and_centroid_are_the_earlier_ones(mask: np.ndarray) -> None:
    quality = segment.mask_quality(mask)
    assert quality.area_fraction == float(mask.mean())
    if np.count_nonzero(mask):
        x, y = earlier_centroid(mask)
        reason = segment._centroid_problem(mask, int(np.count_nonzero(mask)))
        (x_min, x_max), (y_min, y_max) = segment.CENTRAL_BOX
        assert (reason is None) == (x_min <= x <= x_max and y_min <= y <= y_max)
        if reason is not None:
            assert f"({x:.2f}, {y:.2f})" in reason
