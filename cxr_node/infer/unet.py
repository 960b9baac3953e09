"""A small, standard U-Net for lung segmentation: one grey channel in, one logit channel out."""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Upsample = Literal["bilinear", "transpose"]


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch normalisation and ReLU; the spatial size is kept."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample the coarser map to the skip connection's size, concatenate, then :class:`DoubleConv`.

    Parameters
    ----------
    in_channels : int
        Channels of the coarser map.
    skip_channels : int
        Channels of the skip connection; also the output channels.
    mode : {"bilinear", "transpose"}
        Bilinear interpolation (no weights) or a learnt 2x2 transposed convolution that halves the
        channels.
    """

    def __init__(self, in_channels: int, skip_channels: int, mode: Upsample) -> None:
        super().__init__()
        self.mode = mode
        up_channels = in_channels
        if mode == "transpose":
            up_channels = in_channels // 2
            self.transpose = nn.ConvTranspose2d(in_channels, up_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(up_channels + skip_channels, skip_channels)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Return the fused map at the skip connection's resolution."""
        size = skip.shape[-2:]
        if self.mode == "transpose":
            coarse = self.transpose(coarse)
            if coarse.shape[-2:] != size:  # odd sizes: the pooled map lost a row or column
                coarse = F.interpolate(coarse, size=size, mode="nearest")
        else:
            coarse = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        out: torch.Tensor = self.conv(torch.cat([skip, coarse], dim=1))
        return out


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with batch normalisation, sized for small demo and site models.

    Parameters
    ----------
    base_channels : int
        Channels at full resolution; each level below doubles them.
    depth : int
        Number of resolution levels (``depth - 1`` max-poolings); 4 levels see 1/8 of the input at
        the bottom. Any input size of at least ``2 ** (depth - 1)`` works: the decoder upsamples to
        each skip connection's exact size.
    upsample : {"bilinear", "transpose"}
        How the decoder upsamples.

    Notes
    -----
    Input ``(N, 1, H, W)`` float, output ``(N, 1, H, W)`` logits (apply a sigmoid for probabilities).
    ``UNet(16, 4)`` has about 0.48 M parameters (< 2 MB of float32 weights).
    """

    def __init__(self, base_channels: int = 16, depth: int = 4, upsample: Upsample = "bilinear") -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1; found {base_channels}")
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (at least one pooling); found {depth}")
        channels = [base_channels * 2**level for level in range(depth)]
        self.encoder = nn.ModuleList([DoubleConv(1, channels[0])] + [DoubleConv(a, b) for a, b in pairwise(channels)])
        self.decoder = nn.ModuleList(
            [Up(channels[level + 1], channels[level], upsample) for level in reversed(range(depth - 1))]
        )
        self.head = nn.Conv2d(channels[0], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the per-pixel lung logits ``(N, 1, H, W)`` of ``x`` ``(N, 1, H, W)``."""
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, kernel_size=2))
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        logits: torch.Tensor = self.head(x)
        return logits


def parameter_bytes(module: nn.Module) -> int:
    """Return the size in bytes of ``module``'s parameters and buffers as stored (its state dict)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
