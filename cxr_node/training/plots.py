"""ROC and calibration plots as PNG: matplotlib when it is installed, else simple Pillow drawings.

matplotlib is not a dependency; the Pillow fallback draws axes, a 0.2-step grid, the diagonal, one
coloured polyline per series and a legend, which is all these two plots need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
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


Band = tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]
"""One series of :func:`band_plot`: values, and their lower and upper bounds (None: no whiskers)."""
_WIDE: Final = (760, 400)


def band_plot(labels: Sequence[str], series: Mapping[str, Band], out: Path, *, title: str, ylabel: str,
              limits: tuple[float, float] | None = None) -> Path:  # fmt: skip
    """Write a line plot of ``series`` (name to values, lows, highs) over the categories ``labels`` (e.g. ISO
    weeks), each value with its interval as a whisker, to ``out`` (PNG). nan values are gaps. ``limits`` is the
    y range (else 0 to a little above the largest value)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    low, high = limits if limits is not None else _range(series)
    try:
        import matplotlib  # optional: not a dependency

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        _pillow_bands(labels, series, out, title, ylabel, (low, high))
        return out
    fig, ax = plt.subplots(figsize=(_WIDE[0] / 100, _WIDE[1] / 100), dpi=100)
    x = np.arange(len(labels))
    for k, (name, (values, lows, highs)) in enumerate(series.items()):
        y = np.asarray(values, dtype=float)
        ax.plot(x + 0.06 * k, y, marker="o", markersize=3, label=name, linewidth=1.5)
        if lows is not None and highs is not None:
            err = np.abs(np.vstack([y - np.asarray(lows, float), np.asarray(highs, float) - y]))
            ax.errorbar(x + 0.06 * k, y, yerr=err, fmt="none", capsize=2, linewidth=1, color=ax.lines[-1].get_color())
    ax.set(ylim=(low, high), title=title, ylabel=ylabel)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _range(series: Mapping[str, Band]) -> tuple[float, float]:
    """0 to 5% above the largest finite value or bound (1 when there is none)."""
    found = [float(v) for values, lows, highs in series.values() for part in (values, lows or (), highs or ())
             for v in part if np.isfinite(v)]  # fmt: skip
    top = max(found, default=1.0)
    return 0.0, top * 1.05 if top > 0 else 1.0


def _pillow_bands(labels: Sequence[str], series: Mapping[str, Band], out: Path, title: str, ylabel: str,
                  limits: tuple[float, float]) -> None:  # fmt: skip
    """Draw :func:`band_plot` with Pillow."""
    width, height = _WIDE
    left, top, right, bottom = 70, 30, 20, 70
    image = Image.new("RGB", _WIDE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    low, high = limits
    span = (high - low) or 1.0
    step = (width - left - right) / max(len(labels), 1)

    def at(i: float, v: float) -> tuple[float, float]:
        share = (float(np.clip(v, low, high)) - low) / span
        return left + (i + 0.5) * step, top + (1 - share) * (height - top - bottom)

    for tick in np.linspace(low, high, 6):
        y = at(0, tick)[1]
        draw.line([(left, y), (width - right, y)], fill=(235, 235, 235))
        draw.text((5, y - 6), f"{tick:.3g}", fill="black", font=font)
    every = max(1, int(np.ceil(len(labels) * 60 / (width - left - right))))
    for i, label in enumerate(labels):
        if i % every == 0:
            x = at(i, low)[0]
            draw.text((x - 3 * len(label), height - bottom + 8 + 12 * (i // every % 2)), label, fill="black", font=font)
    draw.rectangle([(left, top), (width - right, height - bottom)], outline="black")
    for k, (name, (values, lows, highs)) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        _pillow_series(draw, at, values, lows, highs, colour, 2 * k)
        draw.line([(width - right - 170, top + 8 + 14 * k), (width - right - 150, top + 8 + 14 * k)], fill=colour,
                  width=3)  # fmt: skip
        draw.text((width - right - 145, top + 2 + 14 * k), name, fill="black", font=font)
    draw.text((width / 2 - 3 * len(title), 8), title, fill="black", font=font)
    draw.text((5, height - 18), ylabel, fill="black", font=font)
    image.save(out)


def _pillow_series(draw: ImageDraw.ImageDraw, at: Callable[[float, float], tuple[float, float]],
                   values: Sequence[float], lows: Sequence[float] | None, highs: Sequence[float] | None,
                   colour: tuple[int, int, int], shift: int) -> None:  # fmt: skip
    """Draw one series: its segments between finite neighbours, a dot per value, whiskers where bounds are given."""
    points = [at(i, v) if np.isfinite(v) else None for i, v in enumerate(np.asarray(values, float))]
    for a, b in pairwise(points):
        if a is not None and b is not None:
            draw.line([(a[0] + shift, a[1]), (b[0] + shift, b[1])], fill=colour, width=2)
    for i, p in enumerate(points):
        if p is None:
            continue
        x = p[0] + shift
        draw.ellipse([x - 3, p[1] - 3, x + 3, p[1] + 3], fill=colour)
        if lows is not None and highs is not None and np.isfinite(lows[i]) and np.isfinite(highs[i]):
            (_, y0), (_, y1) = at(i, float(lows[i])), at(i, float(highs[i]))
            draw.line([(x, y0), (x, y1)], fill=colour, width=1)
            draw.line([(x - 3, y0), (x + 3, y0)], fill=colour)
            draw.line([(x - 3, y1), (x + 3, y1)], fill=colour)
