"""The overlay renderer: contour, heat inside the lungs only, a legible banner that never loses text, checks."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from cxr_node.imaging.resample import resize
from cxr_node.results import render
from cxr_node.results.render import (
    ALERT_RGB,
    BANNER_RGB,
    CONTOUR_RGB,
    HEAT_LUT,
    TAG_RGB,
    Banner,
    contour_thickness,
    layout_banner,
    lung_contour,
    render_overlay,
    window_to_uint8,
)

RNG = np.random.default_rng(20240607)
LINES = (
    "COVID-19 pneumonia: SUGGESTED  p=0.87 (threshold 0.50)",
    "model cxr-demo 1.0.0",
    "similar: ACC123 0.93 covid; ACC456 0.91 non-covid",
    "demo: synthetic training data, not for clinical use",
)
BANNER = Banner("AI RESULT", LINES, alert=True)
LONG_LINES = (
    "similar: " + "; ".join(f"ACC{i:06d} 0.{90 - i} {'covid' if i % 2 else 'non-covid'}" for i in range(12)),
    "source 1.2.826.0.1.3680043.8.498." + "1234567890" * 12,
    "two\nparagraphs",
)
SHAPES = [(256, 256), (512, 384), (384, 512), (700, 300)]
"""Square minimum, tall, wide and narrow images (real sizes are timed separately)."""


def ellipses(shape: tuple[int, int]) -> np.ndarray:
    """Return two lung-like ellipses as a bool mask."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    h, w = shape
    left = ((rows - 0.5 * h) / (0.3 * h)) ** 2 + ((cols - 0.3 * w) / (0.15 * w)) ** 2 <= 1
    right = ((rows - 0.5 * h) / (0.3 * h)) ** 2 + ((cols - 0.7 * w) / (0.15 * w)) ** 2 <= 1
    return left | right


def grey(shape: tuple[int, int]) -> np.ndarray:
    """Return seeded uint8 noise as a stand-in radiograph."""
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask or the image, by explicit loops."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    for r, c in zip(*np.nonzero(mask), strict=True):
        around = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
        out[r, c] = any(not (0 <= y < h and 0 <= x < w) or not mask[y, x] for y, x in around)
    return out


def chebyshev_to(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Chebyshev distance from every pixel of ``shape`` to the nearest True pixel of ``points``."""
    rows, cols = np.nonzero(points)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.maximum(np.abs(yy[..., None] - rows), np.abs(xx[..., None] - cols))
    return d.min(axis=-1)


def ink_runs(band: np.ndarray, skip: int) -> list[tuple[int, int]]:
    """(first row, height) of each run of rows of ``band`` below ``skip`` holding non-background pixels."""
    ink = (band[skip:] != np.asarray(BANNER_RGB, np.uint8)).any(axis=(1, 2))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ink.astype(np.int8), [0]])))
    return [(int(a) + skip, int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def is_grey(rgb: np.ndarray) -> np.ndarray:
    """True where a pixel's three channels are equal."""
    return (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])


# ------------------------------------------------------------------------------------------ window


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (256, 300), (978, 921), (3, 140_000)])
def test_window_maps_unit_range_to_bytes(shape: tuple[int, int]) -> None:
    """window_to_uint8 rounds [0, 1] onto 0..255, clips outside and keeps the shape."""
    pixels = RNG.uniform(-0.2, 1.2, size=shape).astype(np.float32)
    out = window_to_uint8(pixels)
    assert out.dtype == np.uint8
    assert out.shape == shape
    np.testing.assert_array_equal(out, np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def test_window_fixed_points() -> None:
    """Black, mid-grey and white land on 0, 128 and 255."""
    out = window_to_uint8(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert out.tolist() == [[0, 128, 255]]


# ------------------------------------------------------------------------------------------ contour


@pytest.mark.parametrize("shape", [(40, 50), (33, 17), (5, 5)])
def test_thin_contour_is_exactly_the_boundary(shape: tuple[int, int]) -> None:
    """With thickness 1 the contour is the mask pixels that touch the outside (image edge included)."""
    masks = [ellipses(shape), np.ones(shape, bool), RNG.random(shape) > 0.5]
    for mask in masks:
        np.testing.assert_array_equal(lung_contour(mask, 1), brute_boundary(mask))


@pytest.mark.parametrize("thickness", [2, 3, 5, 8])
def test_thick_contour_stays_on_the_boundary(thickness: int) -> None:
    """A thick contour covers the boundary and nothing farther from it than half the thickness."""
    mask = ellipses((60, 80))
    contour = lung_contour(mask, thickness)
    distance = chebyshev_to(brute_boundary(mask), mask.shape)
    assert contour[distance == 0].all()
    assert not contour[distance > thickness // 2].any()
    assert contour[distance <= (thickness - 1) // 2].all()


@pytest.mark.parametrize("thickness", [1, 2, 4, 7])
def test_contour_band_is_thickness_wide(thickness: int) -> None:
    """Across a straight edge the drawn band is exactly ``thickness`` pixels wide."""
    mask = np.zeros((60, 90), bool)
    mask[20:40, 30:70] = True
    row = lung_contour(mask, thickness)[30]
    assert row[:50].sum() == thickness
    assert row[50:].sum() == thickness


def test_contour_thickness_scales_with_height() -> None:
    """The contour is about 2.5 px on an 800 px display: 1 px at 256, 6 px at 2048."""
    assert [contour_thickness(h) for h in (256, 800, 2048, 3000)] == [1, 2, 6, 9]


# ------------------------------------------------------------------------------------------ overlay


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("analysed", [True, False])
def test_output_shape_and_dtype(shape: tuple[int, int], analysed: bool) -> None:
    """The output is C-contiguous uint8 RGB, as wide as the image, with the banner appended below."""
    mask = ellipses(shape) if analysed else None
    heat = RNG.random(shape, dtype=np.float32) if analysed else None
    out = render_overlay(grey(shape), mask, heat, BANNER)
    assert out.dtype == np.uint8
    assert out.ndim == 3
    assert out.shape[1:] == (shape[1], 3)
    assert out.shape[0] == shape[0] + layout_banner(BANNER, shape[1], shape[0]).height
    assert out.flags.c_contiguous


@pytest.mark.parametrize("shape", SHAPES)
def test_heat_colours_only_inside_the_lungs(shape: tuple[int, int]) -> None:
    """Outside the lungs and their contour the image stays grey and untouched; inside, hot pixels are coloured."""
    image, mask = grey(shape), ellipses(shape)
    heat = np.ones(shape, np.float32)
    picture = render_overlay(image, mask, heat, BANNER)[: shape[0]]
    contour = lung_contour(mask, contour_thickness(shape[0]))
    outside = ~mask & ~contour
    outside[:40, :60] = False  # the "AI" tag: grey, but not the image's grey
    assert is_grey(picture[outside]).all()
    np.testing.assert_array_equal(picture[outside][:, 0], image[outside])
    inside = mask & ~contour
    assert not is_grey(picture[inside]).any()


def test_zero_heat_leaves_the_lungs_untouched() -> None:
    """A heatmap of zeros draws nothing: inside the contour the pixels are the image's grey."""
    shape = (256, 256)
    image, mask = grey(shape), ellipses(shape)
    picture = render_overlay(image, mask, np.zeros(shape, np.float32), BANNER)[:256]
    inside = mask & ~lung_contour(mask, contour_thickness(256))
    np.testing.assert_array_equal(picture[inside][:, 1], image[inside])
    assert is_grey(picture[inside]).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_contour_colour_is_drawn_on_the_contour(shape: tuple[int, int]) -> None:
    """The contour colour appears exactly on the thickened lung boundary."""
    mask = ellipses(shape)
    picture = render_overlay(grey(shape), mask, None, BANNER)[: shape[0]]
    drawn = (picture == np.asarray(CONTOUR_RGB, np.uint8)).all(axis=-1)
    np.testing.assert_array_equal(drawn, lung_contour(mask, contour_thickness(shape[0])))


@pytest.mark.parametrize("shape", SHAPES)
def test_not_analysed_has_no_contour_colour(shape: tuple[int, int]) -> None:
    """Without a lung mask nothing in the output has the contour colour and the image stays grey."""
    out = render_overlay(grey(shape), None, None, BANNER)
    assert not (out == np.asarray(CONTOUR_RGB, np.uint8)).all(axis=-1).any()
    assert is_grey(out[: shape[0]]).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_ai_tag_sits_small_in_the_top_left(shape: tuple[int, int]) -> None:
    """A dark "AI" tag with light letters is drawn top-left within 8% of the height, nothing else changes."""
    picture = render_overlay(np.full(shape, 128, np.uint8), None, None, BANNER)[: shape[0]]
    changed = (picture != 128).any(axis=-1)
    rows, cols = np.nonzero(changed)
    assert rows.max() < 0.08 * shape[0]
    assert cols.max() < 0.5 * shape[1]
    assert (picture[changed] == np.asarray(TAG_RGB, np.uint8)).all(axis=-1).any()
    assert (picture[changed] > 200).all(axis=-1).any()


def test_heat_ramp_gets_lighter() -> None:
    """The heat colour table brightens monotonically (perceptual ordering) and holds no cyan."""
    luma = HEAT_LUT @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    assert (np.diff(luma) > 0).all()
    assert (HEAT_LUT[:, 0] >= HEAT_LUT[:, 2]).all()


# ------------------------------------------------------------------------------------------ banner


@pytest.mark.parametrize("alert", [True, False])
def test_banner_text_is_rendered(alert: bool) -> None:
    """The band holds a title row then one ink row per line; the title is amber only for a positive."""
    banner = Banner("AI RESULT", LINES, alert)
    out = render_overlay(grey((512, 512)), None, None, banner)
    layout = layout_banner(banner, 512, 512)
    band = out[512:]
    assert len(ink_runs(band, layout.rule_px)) == 1 + len(LINES)
    amber = (band[layout.rule_px :] == np.asarray(ALERT_RGB, np.uint8)).all(axis=-1).any()
    assert amber == alert


@pytest.mark.parametrize(("small", "large"), [(256, 1024), (512, 2048), (400, 800)])
def test_bigger_image_has_bigger_text(small: int, large: int) -> None:
    """Text height grows in proportion to the image height."""
    heights = []
    for side in (small, large):
        band = render_overlay(grey((side, side)), None, None, BANNER)[side:]
        heights.append(ink_runs(band, layout_banner(BANNER, side, side).rule_px)[1][1])
    assert heights[1] / heights[0] == pytest.approx(large / small, rel=0.25)


@pytest.mark.parametrize("shape", [(256, 256), (512, 512), (1955, 1841), (1841, 1955), (2048, 2048), (3000, 3000)])
def test_cap_height_is_legible_when_shown_whole(shape: tuple[int, int]) -> None:
    """Capitals are at least 1.6% of the whole output's height (13 px when it is shown 800 px tall)."""
    banner = Banner("AI RESULT", (*LINES[:-1], "HHHH HHHH"), alert=False)
    layout = layout_banner(banner, shape[1], shape[0])
    band = render_overlay(np.zeros(shape, np.uint8), None, None, banner)[shape[0] :]
    cap = ink_runs(band, layout.rule_px)[-1][1]
    assert cap >= 0.016 * (shape[0] + layout.height)
    assert layout.cap_px >= 0.016 * (shape[0] + layout.height)


@pytest.mark.parametrize("width", [256, 333, 1000, 2048])
def test_long_lines_wrap_inside_the_width(width: int) -> None:
    """Lines wider than the image are wrapped into the margins, keeping every character."""
    banner = Banner("AI RESULT: a very long heading that cannot fit a narrow image", LONG_LINES, alert=True)
    layout = layout_banner(banner, width, 512)
    kept = "".join(row.text for row in layout.rows)
    assert re.sub(r"\s", "", kept) == re.sub(r"\s", "", banner.title + "".join(banner.lines))
    assert len(layout.rows) > 1 + len(LONG_LINES)
    band = render_overlay(grey((512, width)), None, None, banner)[512 + layout.rule_px :]
    background = band == np.asarray(BANNER_RGB, np.uint8)
    assert background[:, width - layout.margin + 1 :].all()
    assert background[:, : layout.margin - 1].all()


def test_explicit_newline_starts_a_row() -> None:
    """A newline inside a line starts a new row rather than being drawn."""
    rows = layout_banner(Banner("T", ("two\nparagraphs",), alert=False), 1000, 1000).rows
    assert [row.text for row in rows] == ["T", "two", "paragraphs"]


@pytest.mark.parametrize("shape", [(256, 256), (700, 300)])
def test_rendering_is_deterministic(shape: tuple[int, int]) -> None:
    """The same inputs give identical bytes."""
    image, mask = grey(shape), ellipses(shape)
    heat = RNG.random(shape, dtype=np.float32)
    first = render_overlay(image, mask, heat, BANNER)
    second = render_overlay(image.copy(), mask.copy(), heat.copy(), Banner("AI RESULT", LINES, alert=True))
    assert first.tobytes() == second.tobytes()


@pytest.mark.parametrize(
    ("shape", "coarse"), [((978, 921), (256, 241)), ((700, 300), (7, 3)), ((256, 256), (256, 256))]
)
def test_a_coarse_heatmap_is_drawn_as_if_resampled_to_the_image(
    shape: tuple[int, int], coarse: tuple[int, int]
) -> None:
    """A heatmap on a coarser grid (the engine's, at most 256 a side) draws the same bytes as that heatmap resampled
    to the image's grid first: only the lungs' box of it is resampled, to the same values."""
    image, mask = grey(shape), ellipses(shape)
    heat = RNG.random(coarse, dtype=np.float32)
    full = resize(heat, shape)
    assert render_overlay(image, mask, heat, BANNER).tobytes() == render_overlay(image, mask, full, BANNER).tobytes()


# ------------------------------------------------------------------------------------------ bad inputs

S = (96, 96)
GOOD: dict[str, Any] = {
    "image": np.zeros(S, np.uint8),
    "lung_mask": np.zeros(S, bool),
    "heatmap": np.zeros(S, np.float32),
    "banner": BANNER,
}
BAD_RENDER = [
    ({"image": np.zeros(S, np.float32)}, r"image: expected dtype uint8, found float32"),
    ({"image": np.zeros((*S, 3), np.uint8)}, r"image: expected a 2-D \(H, W\) array, found ndim 3"),
    ({"image": np.zeros((32, 96), np.uint8)}, r"image: expected both sides >= 64, found shape \(32, 96\)"),
    ({"lung_mask": np.zeros(S, np.uint8)}, r"lung_mask: expected dtype bool, found uint8"),
    (
        {"lung_mask": np.zeros((96, 97), bool)},
        r"lung_mask: expected shape \(96, 96\) \(the image's\), found \(96, 97\)",
    ),
    ({"heatmap": np.zeros(S, np.float64)}, r"heatmap: expected dtype float32, found float64"),
    (
        {"heatmap": np.zeros((97, 96), np.float32)},
        r"heatmap: expected no side longer than the image's \(96, 96\), found \(97, 96\)",
    ),
    ({"heatmap": np.full(S, 1.5, np.float32)}, r"heatmap: expected values in \[0, 1\], found \[1.5, 1.5\]"),
    ({"heatmap": np.full(S, np.nan, np.float32)}, r"heatmap: expected finite values"),
    ({"lung_mask": None}, r"heatmap: expected None when lung_mask is None"),
]


@pytest.mark.parametrize(("change", "message"), BAD_RENDER)
def test_render_rejects_bad_inputs(change: dict[str, Any], message: str) -> None:
    """render_overlay raises ValueError naming the argument, what it expected and what it found."""
    with pytest.raises(ValueError, match=message):
        render_overlay(**{**GOOD, **change})


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: window_to_uint8(np.zeros(S, np.uint8)), r"pixels: expected dtype float32, found uint8"),
        (lambda: window_to_uint8(np.zeros(9, np.float32)), r"pixels: expected a 2-D \(H, W\) array, found ndim 1"),
        (lambda: window_to_uint8(np.full(S, np.inf, np.float32)), r"pixels: expected finite values"),
        (lambda: window_to_uint8(np.zeros((0, 4), np.float32)), r"pixels: expected a non-empty array"),
        (lambda: lung_contour(np.zeros(S, np.uint8), 2), r"mask: expected dtype bool, found uint8"),
        (lambda: lung_contour(np.zeros(S, bool), 0), r"thickness: expected an int >= 1, found 0"),
        (lambda: lung_contour(np.zeros(S, bool), True), r"thickness: expected an int >= 1, found True"),
        (lambda: lung_contour(np.zeros(S, bool), 2.0), r"thickness: expected an int >= 1, found 2.0"),
        (lambda: Banner(" ", LINES, alert=True), r"title: expected a non-empty str"),
        (lambda: Banner("AI", list(LINES), alert=True), r"lines: expected a tuple of str"),
        (lambda: Banner("AI", (1,), alert=True), r"lines: expected a tuple of str"),
        (lambda: Banner("AI", LINES, alert=1), r"alert: expected a bool, found 1"),
    ],
)
def test_helpers_reject_bad_inputs(call: Any, message: str) -> None:
    """The helpers and Banner raise ValueError naming the argument, what they expected and what they found."""
    with pytest.raises(ValueError, match=message):
        call()


def test_non_array_is_a_type_error() -> None:
    """A list instead of an array is a TypeError naming the argument."""
    with pytest.raises(TypeError, match=r"image: expected a numpy.ndarray, found list"):
        render_overlay([[0]], None, None, BANNER)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lines", [LINES, LONG_LINES])
@pytest.mark.parametrize("alert", [True, False])
def test_banner_rows_reused_equal_rows_drawn_in_place(
    shape: tuple[int, int], lines: tuple[str, ...], alert: bool
) -> None:
    """The band assembled from each row's ink, drawn afresh or reused, equals the band drawn row by row in place."""
    banner = Banner("AI RESULT", lines, alert=alert)
    layout = layout_banner(banner, shape[1], shape[0])
    title = ALERT_RGB if alert else render.TITLE_RGB
    styled = [(row, title if row.bold else render.TEXT_RGB) for row in layout.rows]
    plain = np.empty((layout.height, shape[1], 3), dtype=np.uint8)
    plain[...] = BANNER_RGB
    plain[: layout.rule_px] = ALERT_RGB if alert else render.RULE_RGB
    expected = render._draw_rows_in_place(plain, styled)
    assert np.array_equal(render._draw_banner(banner, layout, shape[1]), expected)
    assert np.array_equal(render._draw_banner(banner, layout, shape[1]), expected)  # now from the reused rows


def test_rows_whose_ink_meets_are_drawn_in_place() -> None:
    """Ink boxes that share a pixel row, touch the rule or leave the band rule out reusing rows."""
    assert render._apart([(5, 10, 50, 20), (5, 20, 50, 30)], rule_px=3, height=40, width=60)
    assert not render._apart([(5, 10, 50, 21), (5, 20, 50, 30)], rule_px=3, height=40, width=60)
    assert not render._apart([(5, 2, 50, 9)], rule_px=3, height=40, width=60)
    assert not render._apart([(5, 30, 50, 41)], rule_px=3, height=40, width=60)
    assert not render._apart([(5, 10, 61, 20)], rule_px=3, height=40, width=60)


def test_heat_blend_is_the_table_look_up_per_pixel() -> None:
    """Each lung pixel gets the blend of its rounded heat level over its grey level; other pixels stay grey."""
    shape = (97, 131)
    image, mask = grey(shape), ellipses(shape)
    heat = RNG.random(shape, dtype=np.float32)
    out = np.empty((*shape, 3), dtype=np.uint8)
    render._heat_composite(image, heat, mask, out)
    level = np.where(mask, np.rint(heat * np.float32(255)).astype(np.int64), 0)
    assert np.array_equal(out, render._BLEND[level * 256 + image])


# ------------------------------------------------------------------------------------------ same pixels, less work


def plain_overlay(image: np.ndarray, mask: np.ndarray | None, heat: np.ndarray | None, banner: Banner) -> np.ndarray:
    """The overlay composed the straightforward way: every pixel blended or greyed, the contour of the whole
    mask, the band drawn row by row in place (what the faster paths of :func:`render_overlay` must equal)."""
    height, width = image.shape
    layout = layout_banner(banner, width, height)
    picture = np.repeat(image[:, :, None], 3, axis=2)
    if mask is not None and heat is not None:
        level = np.where(mask, np.rint(heat * np.float32(255)).astype(np.int64), 0)
        picture = render._BLEND[level * 256 + image]
    if mask is not None:
        picture[lung_contour(mask, contour_thickness(height))] = CONTOUR_RGB
    render._draw_tag(picture)
    band = np.empty((layout.height, width, 3), dtype=np.uint8)
    band[...] = BANNER_RGB
    band[: layout.rule_px] = ALERT_RGB if banner.alert else render.RULE_RGB
    title = ALERT_RGB if banner.alert else render.TITLE_RGB
    styled = [(row, title if row.bold else render.TEXT_RGB) for row in layout.rows]
    return np.concatenate([picture, render._draw_rows_in_place(band, styled)])


def _masks(shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Lungs, lungs cut by each edge, one pixel, a corner, all and nothing, and noise."""
    lungs = ellipses(shape)
    single, corner = np.zeros(shape, bool), np.zeros(shape, bool)
    single[shape[0] // 2, shape[1] // 3] = True
    corner[-5:, -3:] = True
    return {
        "lungs": lungs,
        "cut at the top": np.roll(lungs, -shape[0] // 3, axis=0) & (np.arange(shape[0]) < shape[0] // 2)[:, None],
        "cut at the left and right": np.roll(lungs, shape[1] // 4, axis=1) | np.roll(lungs, -shape[1] // 4, axis=1),
        "one pixel": single,
        "bottom-right corner": corner,
        "everything": np.ones(shape, bool),
        "nothing": np.zeros(shape, bool),
        "noise": RNG.random(shape) > 0.6,
    }


@pytest.mark.parametrize("shape", [*SHAPES, (64, 64), (1100, 1000)])
@pytest.mark.parametrize("heated", [True, False])
def test_render_equals_the_plain_composition(shape: tuple[int, int], heated: bool) -> None:
    """Blending only inside the lungs' box, the contour of that box and the band filled by rows give the same
    bytes as composing every pixel of the whole picture, for masks anywhere in the image."""
    image = grey(shape)
    heat = RNG.random(shape, dtype=np.float32) if heated else None
    for name, mask in _masks(shape).items():
        for banner in (BANNER, Banner("AI RESULT", LONG_LINES, alert=False)):
            expected = plain_overlay(image, mask, heat, banner)
            assert np.array_equal(render_overlay(image, mask, heat, banner), expected), name
    assert np.array_equal(render_overlay(image, None, None, BANNER), plain_overlay(image, None, None, BANNER))


WORDS = ("p", "=", "0.87", "COVID-19", "similar", "cases:", "C0000041", "non-covid;", "WWW", "iii", "(operating", "f.")


@pytest.mark.parametrize("width", [80, 200, 420, 900])
def test_a_paragraph_that_fits_whole_wraps_as_the_greedy_loop_would(width: int) -> None:
    """Measuring a paragraph once when it fits gives the rows the word-by-word greedy loop gives (the ink of a
    row only widens as text is added on its right), for many random paragraphs and fonts."""
    for size, stroke in ((10, 0), (31, 0), (45, render._stroke(45))):
        font = render._font(size)

        def fits(row: str, first: bool, font: Any = font, stroke: int = stroke, indent: int = size) -> bool:
            return render._ink_right(font, row, stroke) <= width - (0 if first else indent)

        for _ in range(60):
            words = RNG.choice(WORDS, size=int(RNG.integers(1, 9)))
            paragraph = "".join(f"{word}{' ' * int(RNG.integers(1, 4))}" for word in words).strip()
            refused: list[str] = []

            def greedy(row: str, first: bool, fits: Any = fits, refused: list[str] = refused) -> bool:
                if not refused:  # refuse the whole paragraph once, so the word-by-word loop runs
                    refused.append(row)
                    return False
                return bool(fits(row, first))

            assert render._wrap_paragraph(paragraph, fits) == render._wrap_paragraph(paragraph, greedy), paragraph


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_and_heat_are_refused(bad: float) -> None:
    """A NaN or an infinity anywhere in the image to window or in the heatmap is refused, naming the array."""
    pixels = np.zeros(S, np.float32)
    pixels[5, 7] = bad
    with pytest.raises(ValueError, match="pixels: expected finite values"):
        window_to_uint8(pixels)
    with pytest.raises(ValueError, match="heatmap: expected finite values"):
        render_overlay(GOOD["image"], GOOD["lung_mask"], pixels, BANNER)
