"""Training-time augmentation in the spirit of Keidar et al. 2021, and a preview grid to check it by eye.

Small in-plane rotations, scalings and translations, brightness, contrast and gamma jitter, and a little
blur and noise; never a vertical flip (a chest radiograph is never upside down) and no horizontal flip
unless asked (the heart is on the left). Geometric transforms are applied with one sampling grid to an
image and its mask, so they stay aligned. Everything is drawn from a :class:`torch.Generator`: the same
seed gives the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr_node.training.datasets import LabelledSet
from cxr_node.training.inputs import fitted_images, segmentation_inputs

_BLUR_TAPS = 7


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (each drawn uniformly, per image).

    Attributes
    ----------
    rotation_deg : float
        Largest in-plane rotation either way.
    scale : tuple of float
        (smallest, largest) zoom.
    translation : float
        Largest shift either way, as a fraction of the side.
    brightness : float
        Largest additive shift of the grey values.
    contrast : tuple of float
        (smallest, largest) factor around the image mean.
    gamma : tuple of float
        (smallest, largest) exponent of the grey values.
    blur_sigma : float
        Largest Gaussian blur, in pixels (0 for none).
    noise_std : float
        Largest standard deviation of added Gaussian noise (0 for none).
    hflip : bool
        Flip left-right with probability one half (off by default: it moves the heart).
    """

    rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translation: float = 0.05
    brightness: float = 0.05
    contrast: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_sigma: float = 1.0
    noise_std: float = 0.02
    hflip: bool = False

    def __post_init__(self) -> None:
        for name in ("scale", "contrast", "gamma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name}: expected 0 < low <= high; found {(low, high)}")
        for name in ("rotation_deg", "translation", "brightness", "blur_sigma", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative number; found {getattr(self, name)}")


NO_AUGMENTATION = AugmentConfig(
    rotation_deg=0.0, scale=(1.0, 1.0), translation=0.0, brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0),
    blur_sigma=0.0, noise_std=0.0,
)  # fmt: skip
"""The identity: every range collapsed."""


def augment(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    generator: torch.Generator,
    config: AugmentConfig = AugmentConfig(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return randomly transformed copies of a batch of images (and their masks, identically moved).

    Parameters
    ----------
    images : torch.Tensor
        ``(N, 1, S, S)`` float in [0, 1]; pixels at exactly 0 (padding, masked-out areas) stay 0.
    masks : torch.Tensor or None
        ``(N, 1, S, S)`` float in [0, 1] (soft masks allowed), or None.
    generator : torch.Generator
        Source of every random draw (on the CPU).
    config : AugmentConfig
        The ranges.

    Returns
    -------
    images, masks : torch.Tensor
        Same shapes; masks are only moved, never jittered.
    """
    _check_batch("images", images)
    if masks is not None:
        _check_batch("masks", masks, images.shape)
    out = _intensity(images, generator, config)
    grid = _grid(images.shape[0], images.shape[-2:], generator, config).to(images.device)
    out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = (
        None
        if masks is None
        else F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    )
    return out.clamp_(0.0, 1.0), moved


def _check_batch(name: str, batch: object, shape: torch.Size | None = None) -> None:
    """Raise ValueError unless ``batch`` is a float ``(N, 1, S, S)`` tensor (of ``shape`` when given)."""
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point() or batch.ndim != 4 or batch.shape[1] != 1:
        found = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"{name} must be a float (N, 1, S, S) tensor; found {found}")
    if shape is not None and batch.shape != shape:
        raise ValueError(f"{name} must have the images' shape {tuple(shape)}; found {tuple(batch.shape)}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """Return ``(n,)`` float32 draws from U(low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def _grid(n: int, size: torch.Size, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """Return ``(n, S, S, 2)`` sampling grids of random rotations, zooms, shifts (and left-right flips)."""
    angle = _uniform(n, -config.rotation_deg, config.rotation_deg, generator) * (math.pi / 180)
    zoom = _uniform(n, *config.scale, generator)
    shift = _uniform(2 * n, -config.translation, config.translation, generator).view(n, 2) * 2
    flip = torch.ones(n)
    if config.hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], dim=1), torch.stack([sin * flip, cos, shift[:, 1]], dim=1)], dim=1
    )
    return F.affine_grid(theta, [n, 1, int(size[0]), int(size[1])], align_corners=False)


def _intensity(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """Return the images with gamma, contrast, brightness, blur and noise jitter inside their content."""
    n = images.shape[0]
    content = images > 0
    gamma = _uniform(n, *config.gamma, generator).view(n, 1, 1, 1).to(images.device)
    out = images.clamp(0.0, 1.0) ** gamma
    mean = (out * content).sum(dim=(2, 3), keepdim=True) / content.sum(dim=(2, 3), keepdim=True).clamp(min=1)
    contrast = _uniform(n, *config.contrast, generator).view(n, 1, 1, 1).to(images.device)
    brightness = _uniform(n, -config.brightness, config.brightness, generator).view(n, 1, 1, 1).to(images.device)
    out = (out - mean) * contrast + mean + brightness
    if config.blur_sigma > 0:
        out = _blur(out, _uniform(n, 0.0, config.blur_sigma, generator))
    if config.noise_std > 0:
        scale = _uniform(n, 0.0, config.noise_std, generator).view(n, 1, 1, 1)
        out = out + (torch.randn(images.shape, generator=generator) * scale).to(images.device)
    return out.clamp(0.0, 1.0) * content


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Return each image blurred by a separable Gaussian of its own ``sigma`` (0: unchanged)."""
    n = images.shape[0]
    offsets = torch.arange(_BLUR_TAPS, dtype=torch.float32) - _BLUR_TAPS // 2
    safe = sigma.clamp(min=1e-3).view(n, 1)
    taps = torch.exp(-0.5 * (offsets.view(1, -1) / safe) ** 2)
    taps = (taps / taps.sum(dim=1, keepdim=True)).to(images.device, images.dtype)
    x = images.transpose(0, 1)  # (1, N, S, S): one group per image
    pad = _BLUR_TAPS // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), taps.view(n, 1, 1, -1), groups=n)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), taps.view(n, 1, -1, 1), groups=n)
    return x.transpose(0, 1)


# ------------------------------------------------------------------------------------------ preview


def preview(
    dataset: LabelledSet,
    out_png: Path,
    n: int = 16,
    *,
    size: int = 128,
    config: AugmentConfig = AugmentConfig(),
    seed: int = 0,
) -> Path:
    """Write a PNG grid of ``n`` augmented images of ``dataset``, lung mask outlines in red when it has masks.

    Parameters
    ----------
    dataset : LabelledSet
        Its first ``n`` images are shown, fitted to ``size`` as the U-Net sees them.
    out_png : pathlib.Path
        The file to write (folders created).
    n : int
        Number of tiles, >= 1.
    size : int
        Tile side in pixels.
    config : AugmentConfig
        The augmentation to show.
    seed : int
        Seed of the draws.

    Returns
    -------
    pathlib.Path
        ``out_png``.
    """
    count = min(n, len(dataset))
    subset = dataset.subset(range(count))
    images, masks = segmentation_inputs(subset, size) if subset.has_masks else (fitted_images(subset, size), None)
    generator = torch.Generator().manual_seed(seed)
    moved, moved_masks = augment(
        torch.from_numpy(images)[:, None],
        None if masks is None else torch.from_numpy(masks)[:, None],
        generator,
        config,
    )
    tiles = [
        _tile(moved[i, 0].numpy(), None if moved_masks is None else moved_masks[i, 0].numpy() > 0.5)
        for i in range(count)
    ]
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _grid_image(tiles, size).save(out_png)
    return out_png


def _tile(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Return an ``(S, S, 3)`` uint8 tile: the grey image with the mask's outline in red."""
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mask is not None:
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        rgb[mask & ~inner] = (255, 0, 0)
    return rgb


def _grid_image(tiles: list[np.ndarray], size: int) -> Image.Image:
    """Return the tiles laid out in a near-square grid with 2-pixel gaps."""
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    gap = 2
    canvas = np.zeros((rows * (size + gap) + gap, columns * (size + gap) + gap, 3), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        top, left = gap + (k // columns) * (size + gap), gap + (k % columns) * (size + gap)
        canvas[top : top + size, left : left + size] = tile
    return Image.fromarray(canvas)
