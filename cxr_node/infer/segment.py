"""Lung segmentation: the U-Net behind a numpy interface, and a plausibility check of its masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from cxr_node.imaging.masks import check_mask, reduce_to_grid, run_labels, runs
from cxr_node.infer.registry import Manifest, StateDict, load_into, load_weights
from cxr_node.infer.unet import UNet

MIN_AREA_FRACTION: Final = 0.08
"""Below this fraction of the image the mask misses most of the lungs."""

MAX_AREA_FRACTION: Final = 0.60
"""Above this fraction the mask has spilled over the mediastinum, abdomen or background."""

SIZEABLE_FRACTION: Final = 0.02
"""A component counts as a lung only from this fraction of the image (specks do not)."""

MIN_LUNG_SHARE: Final = 0.8
"""The two largest components must hold at least this share of the mask (a noisy mask does not)."""

CENTRAL_BOX: Final = ((0.25, 0.75), (0.2, 0.8))
"""``((x_min, x_max), (y_min, y_max))`` as fractions of the width and height: where the centroid of a
plausible lung mask lies (inside the thorax of a frontal chest image)."""

LABEL_GRID: Final = 128
"""Connected components are found on a mask block-downsampled to at most this many pixels a side."""


@dataclass(frozen=True)
class MaskQuality:
    """Whether a lung mask is anatomically plausible, and why not.

    Attributes
    ----------
    ok : bool
        True when every check passed.
    reason : str
        ``"plausible"``, or the first check that failed, in one line.
    area_fraction : float
        Mask pixels over image pixels.
    components : int
        Number of sizeable (lung-sized) 4-connected components.
    """

    ok: bool
    reason: str
    area_fraction: float
    components: int


@dataclass(frozen=True)
class _Components:
    """Sizes and centroids of connected components, largest first, in full-resolution pixels."""

    areas: NDArray[np.float64]
    cx: NDArray[np.float64]
    cy: NDArray[np.float64]


class LungSegmenter:
    """The lung U-Net on a device, with its input size and mask threshold.

    Parameters
    ----------
    module : torch.nn.Module
        Maps ``(N, 1, S, S)`` images in [0, 1] to ``(N, 1, S, S)`` logits; put in eval mode, frozen.
    input_size : int
        ``S``, the side of the square images it takes.
    threshold : float
        Probability (sigmoid of the logit) above which a pixel is lung; in (0, 1).
    device : torch.device or str
        Where it runs (see :func:`cxr_node.infer.device.resolve_device`).
    """

    def __init__(
        self, module: nn.Module, *, input_size: int, threshold: float = 0.5, device: torch.device | str = "cpu"
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1); found {threshold}")
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1; found {input_size}")
        self.device = torch.device(device)
        self.module = module.eval().requires_grad_(False).to(self.device)
        self.input_size = input_size
        self.threshold = threshold

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, device: torch.device | str = "cpu", state: StateDict | None = None
    ) -> LungSegmenter:
        """Build the manifest's U-Net and load its checksummed weights (or ``state``, if given)."""
        spec = manifest.segmentation
        path = manifest.resolve(spec.weights)
        weights = load_weights(path, spec.sha256) if state is None else state
        module = load_into(UNet(spec.base_channels, spec.depth, spec.upsample), weights, path)
        return cls(module, input_size=spec.input_size, threshold=spec.mask_threshold, device=device)

    def probabilities(self, batch: np.ndarray) -> NDArray[np.float32]:
        """Return the per-pixel lung probability ``(N, S, S)`` float32 of ``batch`` ``(N, S, S)``."""
        _check_images(batch, self.input_size)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)[:, None]
            return torch.sigmoid(self.module(x).float())[:, 0].cpu().numpy()

    def __call__(self, batch: np.ndarray) -> NDArray[np.bool_]:
        """Return the lung masks ``(N, S, S)`` bool of ``batch`` ``(N, S, S)`` float32 in [0, 1]."""
        return self.probabilities(batch) > self.threshold


def _check_images(batch: object, size: int) -> None:
    """Raise ValueError unless ``batch`` is a float32 ``(N, size, size)`` array with values in [0, 1]."""
    if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
        found = batch.dtype if isinstance(batch, np.ndarray) else type(batch).__name__
        raise ValueError(f"batch must be a float32 numpy array; found {found}")
    if batch.ndim != 3 or batch.shape[0] < 1 or batch.shape[1:] != (size, size):
        raise ValueError(f"batch must have shape (N, {size}, {size}) with N >= 1; found {batch.shape}")
    if not np.isfinite(batch).all() or batch.min() < 0.0 or batch.max() > 1.0:
        raise ValueError(f"batch values must be finite and in [0, 1]; found {batch.min()}..{batch.max()}")


def mask_quality(mask: np.ndarray) -> MaskQuality:
    """Judge whether a lung mask is plausible for a frontal chest image.

    The checks, in order: total area between :data:`MIN_AREA_FRACTION` and :data:`MAX_AREA_FRACTION`
    of the image; centroid inside :data:`CENTRAL_BOX`; at least two sizeable components
    (:data:`SIZEABLE_FRACTION`) holding :data:`MIN_LUNG_SHARE` of the mask between them; the two
    largest on opposite sides of the vertical midline.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W)`` bool.

    Returns
    -------
    MaskQuality
        The verdict; ``reason`` names the first failed check.
    """
    check_mask(mask)
    height, width = mask.shape
    total = int(np.count_nonzero(mask))
    area = total / mask.size  # what mask.mean() gives (a sum of ones is exact), without a float pass over the mask
    parts = _components(mask)
    sizeable = parts.areas >= SIZEABLE_FRACTION * height * width
    count = int(sizeable.sum())
    reason = _area_problem(area) or _centroid_problem(mask, total) or _lungs_problem(parts, count, width)
    return MaskQuality(ok=reason is None, reason=reason or "plausible", area_fraction=area, components=count)


def _area_problem(area: float) -> str | None:
    """Return why the lung area fraction is implausible, or None."""
    if area < MIN_AREA_FRACTION:
        return f"lung area {area:.1%} of the image is below {MIN_AREA_FRACTION:.0%}"
    if area > MAX_AREA_FRACTION:
        return f"lung area {area:.1%} of the image is above {MAX_AREA_FRACTION:.0%}"
    return None


def _centroid_problem(mask: NDArray[np.bool_], total: int) -> str | None:
    """Return why the mask's centroid lies outside the thorax (``total`` pixels set), or None."""
    ones = mask.view(np.uint8)  # the counts per column and per row as sums of bytes: a third of count_nonzero's cost
    columns = np.add.reduce(ones, axis=0, dtype=np.intp)
    rows = np.add.reduce(ones, axis=1, dtype=np.intp)
    x = (columns @ np.arange(mask.shape[1]) / total + 0.5) / mask.shape[1]
    y = (rows @ np.arange(mask.shape[0]) / total + 0.5) / mask.shape[0]
    (x_min, x_max), (y_min, y_max) = CENTRAL_BOX
    if x_min <= x <= x_max and y_min <= y <= y_max:
        return None
    return f"mask centroid ({x:.2f}, {y:.2f}) of the width and height is outside the central region"


def _lungs_problem(parts: _Components, count: int, width: int) -> str | None:
    """Return why the components do not look like a left and a right lung, or None."""
    if count < 2:
        return f"{count} sizeable lung region(s) found; expected 2"
    share = float(parts.areas[:2].sum() / parts.areas.sum())
    if share < MIN_LUNG_SHARE:
        return f"mask is fragmented: the two largest regions hold {share:.0%} of it, below {MIN_LUNG_SHARE:.0%}"
    midline = width / 2
    if (parts.cx[0] - midline) * (parts.cx[1] - midline) >= 0:
        return "the two largest lung regions are on the same side of the image"
    return None


def _components(mask: NDArray[np.bool_]) -> _Components:
    """Return the 4-connected components of ``mask`` (found on a downsampled copy), largest first."""
    small, factor = reduce_to_grid(mask, LABEL_GRID, "majority")
    found = runs(small)
    rows, starts, ends = found
    roots = run_labels(found, small.shape[1])
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
