"""ROC and calibration plots as PNG: matplotlib when it is installed, else simple Pillow drawings.

matplotlib is not a dependency; the Pillow fallback draws axes, a 0.2-step grid, the diagonal, one
coloured polyline per series and a legend, which is all these two plots need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]

_SIZE: Final = 520
_MARGIN: Final = (60, 30, 30, 55)  # left, top, right, bottom
_COLOURS: Final = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def line_plot(series: Series, out: Path, *, title: str, xlabel: str, ylabel: str, markers: bool = False,
              lines: bool = True) -> Path:  # fmt: skip
    """Write a unit-square line plot of ``series`` (name to (x, y)) with the diagonal, to ``out`` (PNG); with
    ``lines=False`` and ``markers``, a scatter plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # optional: not a dependency

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        _pillow_plot(series, out, title, xlabel, ylabel, markers, lines)
        return out
    fig, ax = plt.subplots(figsize=(5.2, 5.2), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o" if markers else None, label=name, linewidth=1.5, linestyle="-" if lines else "")
    ax.set(xlim=(0, 1), ylim=(0, 1), title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _pillow_plot(series: Series, out: Path, title: str, xlabel: str, ylabel: str, markers: bool,
                 lines: bool = True) -> None:  # fmt: skip
    """Draw the plot with Pillow."""
    image = Image.new("RGB", (_SIZE, _SIZE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _axes(draw, font, title, xlabel, ylabel)
    draw.line([_point(0, 0), _point(1, 1)], fill=(180, 180, 180), width=1)
    for k, (name, (x, y)) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        points = [_point(a, b) for a, b in zip(np.asarray(x, float), np.asarray(y, float), strict=True)
                  if np.isfinite(a) and np.isfinite(b)]  # fmt: skip
        if lines and len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if markers:
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline=colour, width=2)
        _legend(draw, font, k, name, colour)
    image.save(out)


def _point(x: float, y: float) -> tuple[float, float]:
    """Return the pixel of data point (x, y) in the unit square."""
    left, top, right, bottom = _MARGIN
    width, height = _SIZE - left - right, _SIZE - top - bottom
    return left + float(np.clip(x, 0, 1)) * width, top + (1 - float(np.clip(y, 0, 1))) * height


def _axes(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, title: str, xlabel: str,
          ylabel: str) -> None:  # fmt: skip
    """Draw the frame, grid, tick labels, axis labels and title."""
    for tick in np.linspace(0, 1, 6):
        draw.line([_point(tick, 0), _point(tick, 1)], fill=(235, 235, 235))
        draw.line([_point(0, tick), _point(1, tick)], fill=(235, 235, 235))
        x, y = _point(tick, 0)
        draw.text((x - 8, y + 6), f"{tick:.1f}", fill="black", font=font)
        x, y = _point(0, tick)
        draw.text((x - 30, y - 6), f"{tick:.1f}", fill="black", font=font)
    draw.rectangle([_point(0, 1), _point(1, 0)], outline="black")
    draw.text((_SIZE / 2 - 3 * len(xlabel), _SIZE - 25), xlabel, fill="black", font=font)
    draw.text((5, _MARGIN[1] - 22), ylabel, fill="black", font=font)
    draw.text((_SIZE / 2 - 3 * len(title), 5), title, fill="black", font=font)


def _legend(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, k: int, name: str,
            colour: tuple[int, int, int]) -> None:  # fmt: skip
    """Draw legend entry ``k`` in the lower right corner of the plot."""
    x, y = _point(0.55, 0.05)
    y -= 16 * k
    draw.line([(x, y + 6), (x + 20, y + 6)], fill=colour, width=3)
    draw.text((x + 26, y), name, fill="black", font=font)
