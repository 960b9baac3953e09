"""The overlay picture of the Secondary Capture: grey image, lung contour, heatmap and a result banner.

Pure numpy in, numpy out: no I/O, no logging; Pillow only rasterises text (its embedded, scalable
FreeType font, so no font file is read). The same inputs give the same bytes.

Design
------
Banner placement
    The banner is **appended below** the image (output height ``H + banner height``, same width) rather
    than drawn over it: COVID-19 pneumonia sits in the peripheral lower zones and the costophrenic
    angles, exactly where a bottom band would hide it, and the top edge is under OHIF's cine bar. The
    band has a dark blue-grey background, a thin rule along its top (amber when the finding is positive,
    grey otherwise), the title large and emboldened (stroke), then the lines. Lines too wide for the
    image are word-wrapped (continuation lines indented; a word wider than the band is broken between
    characters), so no text is ever cut off. A small "AI" tag sits in the image's top-left corner.
Font scaling
    Sizes follow the image height ``H``, since a viewer scales the picture to its viewport: the body
    font is :data:`FONT_FRACTION` of ``H`` (never below :data:`MIN_FONT_PX`), a cap height of about 2.1%
    of ``H``; with the usual four or five body rows the band adds about 27% to the height, so the cap
    height stays at 1.6% or more of the whole output (13 px when it is shown 800 px tall). The title
    is :data:`TITLE_SCALE` times larger and emboldened with a stroke.
Colours
    Heat uses an inferno-like perceptual ramp (a 256-entry LUT interpolated from the upper part of
    inferno: plum through red and orange to light gold, lightness rising throughout, no cyan or green
    in it; the near-black start is left out, as blending it would only darken the lungs), with opacity
    ``ALPHA_MAX * heat`` and only inside the lung mask, so cool areas leave the radiograph untouched. The
    contour is pure cyan, which neither the ramp nor the grey image nor the banner can produce, with a
    thickness of about 2.5 px at an 800 px display height (6 px at 2048).

Timing (2-core development machine, best of 7, under a load average near 3): 2048 x 2048 with lung
mask and heatmap 0.07 s (0.06 s without heatmap, 0.05 s not analysed); 3000 x 3000 with heat across a
large mask 0.16 s. The heat blend is one look-up per pixel in a precomputed (heat level, grey level)
table, gathered as 3-byte items straight into the output, and only inside the lungs' bounding box (outside it
the picture is the grey image, copied a channel at a time), a band of rows at a time (:data:`BAND_PIXELS`), so the
band's heat and levels are still in the cache when it is looked up; the contour is computed in that box and painted as
3-byte items; the band is filled a row at a time; fonts are loaded once per thread and size, text widths, ink
boxes and each banner row's rendered ink are remembered (the title, model and intended-use rows recur on every
overlay), and a line that fits the width is measured once, not word by word. An overlay at the analysed size
(1024 px) costs about 8 ms (11 ms with two new rows of text). ``tests/unit/test_render.py`` keeps the pixels
equal to the plain per-pixel composition and 2048 x 2048 under 1 s.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxr_node.imaging.resample import resize

RGB = tuple[int, int, int]

MIN_SIDE: Final = 64
"""Smallest image side :func:`render_overlay` accepts (the banner needs room for a few characters)."""
ALPHA_MAX: Final = 0.45
"""Heat opacity at heat 1; it falls linearly to 0 at heat 0."""
CONTOUR_RGB: Final[RGB] = (0, 255, 255)
ALERT_RGB: Final[RGB] = (255, 179, 0)
TITLE_RGB: Final[RGB] = (245, 245, 245)
TEXT_RGB: Final[RGB] = (214, 217, 222)
BANNER_RGB: Final[RGB] = (20, 22, 27)
RULE_RGB: Final[RGB] = (96, 100, 108)
TAG_RGB: Final[RGB] = (22, 22, 22)  # neutral, so the image area stays grey outside the lungs
FONT_FRACTION: Final = 0.031
"""Body font size (pixels per em) as a fraction of the image height; the cap height is 0.7 of it."""
TITLE_SCALE: Final = 1.45
MIN_FONT_PX: Final = 10
CONTOUR_PX_AT_800: Final = 2.5
"""Contour thickness, in screen pixels, when the image is shown 800 px tall."""

_INFERNO_ANCHORS: Final = (
    (120, 28, 109),
    (159, 42, 99),
    (212, 72, 66),
    (245, 125, 21),
    (250, 193, 39),
    (252, 236, 112),
)
_TOKEN: Final = re.compile(r"\S+\s*")


def _make_lut() -> np.ndarray:
    """Interpolate the anchors into a (256, 3) float32 colour table."""
    anchors = np.asarray(_INFERNO_ANCHORS, dtype=np.float64)
    at = np.linspace(0.0, 1.0, len(anchors))
    x = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(x, at, anchors[:, c]) for c in range(3)], axis=1).astype(np.float32)
    lut.flags.writeable = False
    return lut


HEAT_LUT: Final = _make_lut()
"""(256, 3) float32 RGB of the heat ramp, index ``round(255 * heat)``."""


def _make_blend() -> np.ndarray:
    """Every blend of a heat level over a grey level, rounded: (256 * 256, 3) uint8, row ``level * 256 + grey``."""
    alpha = ALPHA_MAX * np.arange(256, dtype=np.float32)[:, None, None] / np.float32(255)
    grey = np.arange(256, dtype=np.float32)[None, :, None]
    table = np.rint(grey + alpha * (HEAT_LUT[:, None, :] - grey)).astype(np.uint8).reshape(-1, 3)
    table.flags.writeable = False
    return table


_BLEND: Final = _make_blend()
_BLEND_RGB: Final = _BLEND.view("V3").reshape(-1)
""":data:`_BLEND` with each RGB triple as one 3-byte item: a 1-D gather of those is cheaper than of rows."""

_FONTS = threading.local()


@dataclass(frozen=True)
class Banner:
    """The text of the result banner.

    Attributes
    ----------
    title : str
        Short heading, e.g. ``"AI RESULT"``; drawn large and emboldened.
    lines : tuple[str, ...]
        Body lines (finding and score, model, similar cases, disclaimer); each is wrapped to the width.
    alert : bool
        True when the decision is positive: the title and the banner's top rule are drawn in amber.
    """

    title: str
    lines: tuple[str, ...]
    alert: bool

    def __post_init__(self) -> None:
        if not isinstance(self.title, str) or not self.title.strip():
            raise ValueError(f"title: expected a non-empty str, found {self.title!r}")
        if not isinstance(self.lines, tuple) or not all(isinstance(line, str) for line in self.lines):
            raise ValueError(f"lines: expected a tuple of str, found {self.lines!r}")
        if not isinstance(self.alert, bool):
            raise ValueError(f"alert: expected a bool, found {self.alert!r}")


@dataclass(frozen=True)
class TextRow:
    """One laid-out row of banner text: its string, top-left position in the band, font size, and weight."""

    text: str
    x: int
    y: int
    font_px: int
    bold: bool


@dataclass(frozen=True)
class BannerLayout:
    """Where the banner's text goes for a given image size (see :func:`layout_banner`).

    Attributes
    ----------
    font_px, title_px : int
        Body and title font sizes (pixels per em).
    cap_px : int
        Cap height of the body font, in pixels.
    margin : int
        Left and right margin of the text, in pixels; no text reaches into it.
    height : int
        Height of the band, in pixels.
    rule_px : int
        Height of the coloured rule along the top of the band.
    rows : tuple[TextRow, ...]
        Title rows, then body rows, top to bottom.
    """

    font_px: int
    title_px: int
    cap_px: int
    margin: int
    height: int
    rule_px: int
    rows: tuple[TextRow, ...]


# ------------------------------------------------------------------------------------------ public API


def window_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map a display-ready float image to 8 bits.

    Parameters
    ----------
    pixels : numpy.ndarray
        (H, W) float32, finite, in [0, 1] in the MONOCHROME2 sense (1 is white); values outside are clipped.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8, ``round(255 * clip(pixels, 0, 1))``.
    """
    _check_2d("pixels", pixels, np.float32)
    _check_finite("pixels", pixels)
    result = np.empty(pixels.shape, dtype=np.uint8)
    for rows, _ in _bands((slice(0, pixels.shape[0]), slice(0, pixels.shape[1]))):  # no full-size float temporary
        part = np.clip(pixels[rows], 0.0, 1.0)
        part *= np.float32(255.0)
        result[rows] = np.rint(part, out=part)  # integral values in [0, 255]: the same bytes as astype(np.uint8)
    return result


def lung_contour(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Return the boundary pixels of a mask, thickened.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool. Pixels beyond the image edge count as outside, so a mask cut by the edge is closed there.
    thickness : int
        >= 1. The boundary (mask pixels with a 4-neighbour outside the mask) is dilated by a
        ``thickness`` x ``thickness`` square, so the line straddles the edge of the mask.

    Returns
    -------
    numpy.ndarray
        (H, W) bool; equal to the boundary when ``thickness`` is 1.
    """
    _check_2d("mask", mask, np.bool_)
    if isinstance(thickness, bool) or not isinstance(thickness, int | np.integer) or thickness < 1:
        raise ValueError(f"thickness: expected an int >= 1, found {thickness!r}")
    return _dilate(_boundary(mask), int(thickness))


def contour_thickness(height: int) -> int:
    """Contour thickness in image pixels for an image ``height`` tall (about 2.5 px at 800 px on screen)."""
    return max(1, round(CONTOUR_PX_AT_800 * height / 800))


def layout_banner(banner: Banner, width: int, height: int) -> BannerLayout:
    """Lay out the banner under an image ``height`` x ``width``: font sizes, wrapping and band height.

    The body font is :data:`FONT_FRACTION` of the image height (at least :data:`MIN_FONT_PX`), whatever
    the text: its cap height is then about 2.1% of the image height, and at least 1.6% of the output
    height while the band holds up to about five body rows. A longer text makes the band taller rather
    than the letters smaller.
    """
    return _layout_at(banner, width, max(MIN_FONT_PX, math.ceil(FONT_FRACTION * height)))


def render_overlay(
    image: np.ndarray, lung_mask: np.ndarray | None, heatmap: np.ndarray | None, banner: Banner
) -> np.ndarray:
    """Draw the Secondary Capture picture: the radiograph, heatmap and lung contour, an AI tag and the banner.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) uint8 grey, MONOCHROME2; both sides >= :data:`MIN_SIDE`.
    lung_mask : numpy.ndarray or None
        (H, W) bool lungs; None when the image was not analysed (then no contour and no heatmap).
    heatmap : numpy.ndarray or None
        float32 in [0, 1], (H, W) or a coarser grid over the same picture (no side longer than the image's; the
        engine's is at most 256 a side), resampled to (H, W) only inside the lungs' box; blended only inside
        ``lung_mask``. Must be None when ``lung_mask`` is.
    banner : Banner
        The text appended below the image.

    Returns
    -------
    numpy.ndarray
        (H + band height, W, 3) uint8 RGB, C-contiguous; rows ``:H`` are the annotated image.

    Raises
    ------
    ValueError
        If an array has the wrong dtype or shape, the shapes differ, or a heatmap is given without a mask.
    TypeError
        If an array argument is not a numpy array, or ``banner`` is not a :class:`Banner`.
    """
    _check_render_inputs(image, lung_mask, heatmap, banner)
    height, width = image.shape
    layout = layout_banner(banner, width, height)
    out = np.empty((height + layout.height, width, 3), dtype=np.uint8)
    picture = out[:height]
    box = None if lung_mask is None else _mask_box(lung_mask)
    if box is None or heatmap is None or lung_mask is None:
        _grey_to_rgb(image, picture)
    else:  # heat only inside the lungs: outside their bounding box the picture is the grey image
        _grey_around(image, picture, box)
        for band in _bands(box):  # a band's heat, levels and picture stay in the cache between the steps
            heat = heatmap[band] if heatmap.shape == image.shape else resize(heatmap, image.shape, window=band)
            _heat_composite(image[band], heat, lung_mask[band], picture[band])
    if box is not None and lung_mask is not None:
        thickness = contour_thickness(height)
        near = _widened(box, thickness, image.shape)  # every contour pixel lies within thickness of the box
        _paint(picture[near], lung_contour(lung_mask[near], thickness), CONTOUR_RGB)
    _draw_tag(picture)
    out[height:] = _draw_banner(banner, layout, width)
    return out


# ------------------------------------------------------------------------------------------ validation


def _check_2d(name: str, arr: object, dtype: type, shape: tuple[int, ...] | None = None) -> None:
    """Raise unless ``arr`` is a non-empty 2-D array of ``dtype`` (and ``shape`` when given)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, found {type(arr).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (H, W) array, found ndim {arr.ndim}, shape {arr.shape}")
    if arr.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, found {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, found shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (the image's), found {arr.shape}")


def _check_finite(name: str, arr: np.ndarray) -> tuple[float, float]:
    """Raise unless every value is finite; return the smallest and the largest (NaN would propagate into the
    minimum, infinities would be one of the two, so two reductions check it without a full-size temporary)."""
    low, high = float(arr.min()), float(arr.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name}: expected finite values, found NaN or infinity")
    return low, high


def _check_render_inputs(
    image: np.ndarray, lung_mask: np.ndarray | None, heatmap: np.ndarray | None, banner: Banner
) -> None:
    """Raise ValueError (TypeError for a non-array) for any input :func:`render_overlay` cannot draw."""
    _check_2d("image", image, np.uint8)
    if min(image.shape) < MIN_SIDE:
        raise ValueError(f"image: expected both sides >= {MIN_SIDE}, found shape {image.shape}")
    if lung_mask is not None:
        _check_2d("lung_mask", lung_mask, np.bool_, image.shape)
    if heatmap is not None:
        if lung_mask is None:
            raise ValueError("heatmap: expected None when lung_mask is None (heat is shown inside the lungs only)")
        _check_2d("heatmap", heatmap, np.float32)
        if heatmap.shape[0] > image.shape[0] or heatmap.shape[1] > image.shape[1]:
            raise ValueError(f"heatmap: expected no side longer than the image's {image.shape}, found {heatmap.shape}")
        low, high = _check_finite("heatmap", heatmap)
        if low < 0.0 or high > 1.0:
            raise ValueError(f"heatmap: expected values in [0, 1], found [{low:.4g}, {high:.4g}]")
    if not isinstance(banner, Banner):
        raise TypeError(f"banner: expected a Banner, found {type(banner).__name__}")


# ------------------------------------------------------------------------------------------ image layers


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with at least one 4-neighbour outside the mask (or outside the image)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    result: np.ndarray = mask & ~interior
    return result


def _dilate(a: np.ndarray, size: int) -> np.ndarray:
    """Dilate a bool array by a ``size`` x ``size`` square (separably: rows, then columns)."""
    return _dilate_axis(_dilate_axis(a, size, 0), size, 1)


def _dilate_axis(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """OR of ``a`` shifted by ``-(size - 1) // 2 .. size // 2`` along ``axis`` (zero fill)."""
    out = a.copy()
    view, src = np.moveaxis(out, axis, 0), np.moveaxis(a, axis, 0)
    for shift in range(-((size - 1) // 2), size // 2 + 1):
        if shift > 0:
            view[:-shift] |= src[shift:]
        elif shift < 0:
            view[-shift:] |= src[:shift]
    return out


Box = tuple[slice, slice]


def _mask_box(mask: np.ndarray) -> Box | None:
    """The rows and columns of the smallest box holding every pixel of ``mask``; None when it has none."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


def _widened(box: Box, margin: int, shape: tuple[int, ...]) -> Box:
    """``box`` grown by ``margin`` pixels on every side, within an image of ``shape``."""
    rows, columns = box
    return (
        slice(max(0, rows.start - margin), min(shape[0], rows.stop + margin)),
        slice(max(0, columns.start - margin), min(shape[1], columns.stop + margin)),
    )


BAND_PIXELS: Final = 1 << 17
"""Pixels of the lungs' box blended at once: the band's heat (float32), levels and picture stay in a core's cache
between the resampling and the look-up (a whole 1024 px box's temporaries, about 8 MB, do not: 1.4x slower)."""


def _bands(box: Box) -> list[Box]:
    """``box`` cut into bands of whole rows of about :data:`BAND_PIXELS` pixels, top to bottom."""
    rows, columns = box
    step = max(1, BAND_PIXELS // max(1, columns.stop - columns.start))
    return [(slice(top, min(top + step, rows.stop)), columns) for top in range(rows.start, rows.stop, step)]


def _grey_to_rgb(image: np.ndarray, out: np.ndarray) -> None:
    """Write the grey ``image`` into each channel of ``out`` ((H, W, 3) uint8, may be a view): a copy per
    channel runs along whole rows, several times faster than broadcasting each pixel to three bytes."""
    for channel in range(3):
        out[..., channel] = image


def _grey_around(image: np.ndarray, out: np.ndarray, box: Box) -> None:
    """Write the grey ``image`` as RGB into ``out`` everywhere outside ``box``."""
    rows, columns = box
    everything = slice(None)
    for around in (
        (slice(None, rows.start), everything),
        (slice(rows.stop, None), everything),
        (rows, slice(None, columns.start)),
        (rows, slice(columns.stop, None)),
    ):
        _grey_to_rgb(image[around], out[around])


def _paint(picture: np.ndarray, where: np.ndarray, rgb: RGB) -> None:
    """Set the pixels of ``picture`` ((H, W, 3) uint8, its last axis contiguous) where ``where`` is True to ``rgb``,
    each pixel written as one 3-byte item (several times faster than assigning three channels per pixel)."""
    colour = np.asarray(rgb, dtype=np.uint8).view(_BLEND_RGB.dtype)[0]
    picture.view(_BLEND_RGB.dtype)[..., 0][where] = colour


def _heat_composite(image: np.ndarray, heatmap: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    """Write into ``out`` ((H, W, 3) uint8, its last axis contiguous; a view of a larger picture is fine) the RGB
    of the grey ``image`` with heat blended inside ``mask``: one :data:`_BLEND` look-up per pixel."""
    level = np.rint(heatmap * np.float32(255)).astype(np.uint16)
    level *= mask
    level <<= 8
    level |= image
    np.take(_BLEND_RGB, level, out=out.view(_BLEND_RGB.dtype)[..., 0], mode="clip")  # levels are all < 2**16


def _draw_tag(picture: np.ndarray) -> None:
    """Stamp a small "AI" label on a dark box in the top-left corner (box 3.5% of the height, >= 16 px)."""
    height = picture.shape[0]
    box_h = max(16, round(0.035 * height))
    size = round(box_h * 0.62)
    font = _font(size)
    stroke = _stroke(size)
    left, top, right, bottom = font.getbbox("AI", stroke_width=stroke, anchor="lt")
    inset = max(2, round(0.015 * height))
    box_w = right - left + box_h // 2 * 2
    box = np.empty((box_h, box_w, 3), dtype=np.uint8)
    box[...] = TAG_RGB
    canvas = Image.fromarray(box)
    xy = ((box_w - (right - left)) // 2 - left, (box_h - (bottom - top)) // 2 - top)
    ImageDraw.Draw(canvas).text(
        xy, "AI", fill=TITLE_RGB, font=font, anchor="lt", stroke_width=stroke, stroke_fill=TITLE_RGB
    )
    target = picture[inset : inset + box_h, inset : inset + box_w]
    target[...] = np.asarray(canvas)[: target.shape[0], : target.shape[1]]


# ------------------------------------------------------------------------------------------ banner


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's embedded scalable font at ``size`` px, loaded once per thread and size (loading decodes the
    embedded font each time; a FreeType face is not shared between threads)."""
    fonts: dict[int, ImageFont.FreeTypeFont] = _FONTS.__dict__.setdefault("by_size", {})
    font = fonts.get(size)
    if font is None:
        loaded = ImageFont.load_default(size=size)
        if not isinstance(loaded, ImageFont.FreeTypeFont):
            raise RuntimeError("Pillow was built without FreeType; the overlay banner needs a scalable font")
        font = fonts[size] = loaded
    return font


def _stroke(size: int) -> int:
    """Stroke width that makes text at ``size`` px look bold (none below 16 px, where it would fill counters)."""
    return 0 if size < 16 else max(1, round(size * 0.035))


def _layout_at(banner: Banner, width: int, size: int) -> BannerLayout:
    """Lay out the banner with body font ``size``: wrap every line to the width and stack the rows."""
    title_px = round(size * TITLE_SCALE)
    margin, rule = round(0.8 * size), max(2, round(0.12 * size))
    indent = size
    y = rule + round(0.55 * size)
    rows: list[TextRow] = []
    title_font, body_font = _font(title_px), _font(size)
    for text, x in _wrap(banner.title, title_font, _stroke(title_px), width - 2 * margin, indent):
        rows.append(TextRow(text, margin + x, y, title_px, bold=True))
        y += _advance(title_font, 1.05)
    y += round(0.2 * size)
    for line in banner.lines:
        for text, x in _wrap(line, body_font, 0, width - 2 * margin, indent):
            rows.append(TextRow(text, margin + x, y, size, bold=False))
            y += _advance(body_font, 1.12)
    cap = body_font.getbbox("H", anchor="ls")
    return BannerLayout(size, title_px, -int(cap[1]), margin, y + round(0.45 * size), rule, tuple(rows))


def _advance(font: ImageFont.FreeTypeFont, spacing: float) -> int:
    """Line advance of ``font``: (ascent + descent) times ``spacing``."""
    ascent, descent = font.getmetrics()
    return round((ascent + descent) * spacing)


def _wrap(text: str, font: ImageFont.FreeTypeFont, stroke: int, width: int, indent: int) -> list[tuple[str, int]]:
    """Word-wrap ``text`` into rows no wider than ``width``: (row text, x offset) pairs.

    Explicit newlines start new paragraphs; rows after the first of a paragraph are indented by ``indent``.
    """

    def fits(row: str, first: bool) -> bool:
        return _ink_right(font, row, stroke) <= width - (0 if first else indent)

    rows: list[tuple[str, int]] = []
    for paragraph in text.splitlines() or [""]:
        wrapped = _wrap_paragraph(paragraph.strip(), fits)
        rows.extend((row, 0 if i == 0 else indent) for i, row in enumerate(wrapped))
    return rows


def _wrap_paragraph(paragraph: str, fits: Callable[[str, bool], bool]) -> list[str]:
    """Greedy wrap at spaces; a word wider than a whole row is broken between characters, never cut off.

    A paragraph that fits whole is its own single row, measured once: text added on the right only widens the
    ink, so every shorter prefix the greedy loop would try fits too.
    """
    if fits(paragraph, True):
        return [paragraph]
    rows: list[str] = []
    current = ""
    for token in _TOKEN.findall(paragraph):
        if fits((current + token).rstrip(), not rows):
            current += token
        elif current and fits(token.rstrip(), False):
            rows.append(current.rstrip())
            current = token
        else:
            for char in token:
                if current.strip() and not fits((current + char).rstrip(), not rows):
                    rows.append(current.rstrip())
                    current = ""
                current += char if current or not char.isspace() else ""
    rows.append(current.rstrip())
    return rows


def _ink_right(font: ImageFont.FreeTypeFont, text: str, stroke: int) -> int:
    """Right edge of the ink of ``text`` drawn from x = 0 (remembered: wrapping measures the same rows often)."""
    if not text:
        return 0
    return _measured_right(int(font.size), text, stroke)


@functools.lru_cache(maxsize=4096)
def _measured_right(size: int, text: str, stroke: int) -> int:
    return int(_font(size).getbbox(text, stroke_width=stroke, anchor="ls")[2])


def _draw_banner(banner: Banner, layout: BannerLayout, width: int) -> np.ndarray:
    """Rasterise the band: background, top rule, then each row of text.

    Each row is drawn on the plain background and pasted where its ink goes; a row drawn before (the title,
    the model line, the intended use recur on every overlay) is reused. Rows whose ink would touch the rule or
    another row's ink are drawn in place instead, so the pixels are the same either way.
    """
    band = np.empty((layout.height, width, 3), dtype=np.uint8)
    band[layout.rule_px :] = _pixel_row(BANNER_RGB, width)
    band[: layout.rule_px] = _pixel_row(ALERT_RGB if banner.alert else RULE_RGB, width)
    title_rgb = ALERT_RGB if banner.alert else TITLE_RGB
    styled = [(row, title_rgb if row.bold else TEXT_RGB) for row in layout.rows]
    boxes = [_ink_box(row) for row, _ in styled]
    if not _apart(boxes, layout.rule_px, layout.height, width):
        return _draw_rows_in_place(band, styled)
    for (row, fill), (left, top, right, bottom) in zip(styled, boxes, strict=True):
        if right > left and bottom > top:
            band[top:bottom, left:right] = _row_ink(row.text, row.font_px, row.bold, fill)
    return band


def _pixel_row(rgb: RGB, width: int) -> np.ndarray:
    """One (width, 3) row of ``rgb``: assigned to a block of rows, it is copied row by row, not pixel by pixel."""
    row = np.empty((width, 3), dtype=np.uint8)
    row[...] = rgb
    return row


def _ink_box(row: TextRow) -> tuple[int, int, int, int]:
    """Where the ink of ``row`` falls in the band: (left, top, right, bottom), ends exclusive."""
    left, top, right, bottom = _ink_extent(row.text, row.font_px, row.bold)
    return (row.x + left, row.y + top, row.x + right, row.y + bottom)


@functools.lru_cache(maxsize=256)
def _ink_extent(text: str, font_px: int, bold: bool) -> tuple[int, int, int, int]:
    """The ink box of ``text`` drawn at (0, 0), anchor "la" (remembered: most rows recur on every overlay)."""
    stroke = _stroke(font_px) if bold else 0
    left, top, right, bottom = _font(font_px).getbbox(text, stroke_width=stroke, anchor="la")
    return (int(left), int(top), int(right), int(bottom))


def _apart(boxes: list[tuple[int, int, int, int]], rule_px: int, height: int, width: int) -> bool:
    """Whether every box lies inside the band below the rule and no two boxes share a pixel row."""
    spans = sorted((top, bottom) for left, top, right, bottom in boxes if right > left and bottom > top)
    inside = all(rule_px <= top and bottom <= height for top, bottom in spans) and all(
        left >= 0 and right <= width for left, _, right, _ in boxes
    )
    return inside and all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


def _draw_rows_in_place(band: np.ndarray, styled: list[tuple[TextRow, RGB]]) -> np.ndarray:
    canvas = Image.fromarray(band)
    draw = ImageDraw.Draw(canvas)
    for row, fill in styled:
        stroke = _stroke(row.font_px) if row.bold else 0
        draw.text((row.x, row.y), row.text, fill=fill, font=_font(row.font_px), stroke_width=stroke, stroke_fill=fill)
    return np.asarray(canvas)


@functools.lru_cache(maxsize=64)
def _row_ink(text: str, font_px: int, bold: bool, fill: RGB) -> np.ndarray:
    """The pixels of one row's ink box, drawn on the band's background (read-only; shared by later overlays)."""
    stroke = _stroke(font_px) if bold else 0
    font = _font(font_px)
    left, top, right, bottom = (int(v) for v in font.getbbox(text, stroke_width=stroke, anchor="la"))
    box = np.empty((bottom - top, right - left, 3), dtype=np.uint8)
    box[...] = BANNER_RGB
    canvas = Image.fromarray(box)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=fill, font=font, stroke_width=stroke, stroke_fill=fill)
    ink = np.asarray(canvas).copy()
    ink.flags.writeable = False
    return ink
