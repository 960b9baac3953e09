"""Pure preprocessing: percentile normalisation, fitting to a square input and back, lung crops and masks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from cxr_node.dicom.pixels import decode
from cxr_node.infer import preprocess
from cxr_node.infer.preprocess import Box, Fit, crop_to_mask, fit, mask_outside, normalise, resize, unfit
from tests import previous_numerics as previous

RNG = np.random.default_rng(20240601)
SHAPES = [(2048, 2048), (1955, 1841), (1841, 1955), (2500, 1000), (301, 97), (97, 301), (225, 223), (7, 5), (1, 1)]
"""Square, real chest, tall, wide, odd and tiny sources."""
SIZES = [224, 256, 33, 1]


def noise(shape: tuple[int, int], dtype: Any = np.float32) -> np.ndarray:
    """Return seeded uniform noise in [0, 1) of ``shape`` and ``dtype``."""
    return RNG.random(shape).astype(dtype)


def ellipse(shape: tuple[int, int], centre: tuple[float, float] = (0.5, 0.5), radii=(0.3, 0.25)) -> np.ndarray:
    """Return a bool mask of an ellipse given in fractions of the height and width."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    dy = (rows + 0.5 - centre[0] * shape[0]) / (radii[0] * shape[0])
    dx = (cols + 0.5 - centre[1] * shape[1]) / (radii[1] * shape[1])
    return dy**2 + dx**2 <= 1.0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union of two bool masks."""
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


BAD_ARRAYS = [
    (np.zeros((4, 4, 3), np.float32), r"img must be 2-D \(H, W\); found ndim 3, shape \(4, 4, 3\)"),
    (np.zeros(16, np.float32), r"img must be 2-D \(H, W\); found ndim 1"),
    (np.zeros((0, 4), np.float32), r"img must not be empty; found shape \(0, 4\)"),
    (np.zeros((4, 4), np.complex64), "img must be .*; found dtype complex64"),
    (np.zeros((4, 4), object), "img must be .*; found dtype object"),
]
"""Arrays no function accepts as an image, and the message that says why."""


# --- normalise ---


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_normalise_gives_float32_in_unit_range(shape: tuple[int, int], dtype: Any) -> None:
    """Any real dtype and shape gives a float32 array of the same shape inside [0, 1], without NaN."""
    img = (noise(shape, np.float64) * 1000 - (500 if np.dtype(dtype).kind != "u" else 0)).astype(dtype)
    out = normalise(img)
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize(("low", "high"), [(0.5, 99.5), (0.0, 100.0), (10.0, 90.0), (2.0, 60.0)])
def test_normalise_maps_the_percentiles_onto_zero_and_one(low: float, high: float) -> None:
    """On a small image the exact percentiles map to 0 and 1, linearly in between, clipped outside."""
    img = noise((300, 200), np.float64) ** 2
    lo, hi = np.percentile(img, [low, high])
    np.testing.assert_allclose(normalise(img, low, high), np.clip((img - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_normalise_clips_the_tails_it_is_asked_to() -> None:
    """With 10 and 90, about a tenth of the pixels is 0 and a tenth is 1."""
    out = normalise(noise((512, 512)), 10, 90)
    assert np.mean(out == 0) == pytest.approx(0.1, abs=0.01)
    assert np.mean(out == 1) == pytest.approx(0.1, abs=0.01)


def test_normalise_on_a_large_image_estimates_the_percentiles_from_a_subsample() -> None:
    """On 2048x2048 (16 times the sample) the subsampled percentiles are within 0.01 of the exact ones."""
    img = noise((2048, 2048)) ** 3
    lo, hi = np.percentile(img, [0.5, 99.5])
    exact = np.clip((img - lo) / (hi - lo), 0, 1)
    assert np.abs(normalise(img) - exact).max() < 0.01


@pytest.mark.parametrize("value", [0.0, 7.0, -3.5, 65535.0])
def test_normalise_of_a_constant_image_is_zero(value: float) -> None:
    """A constant image has no contrast to stretch: all zeros, no NaN."""
    out = normalise(np.full((37, 53), value, np.float32))
    assert np.array_equal(out, np.zeros((37, 53), np.float32))


def test_normalise_does_not_change_its_input() -> None:
    """The input array is left as it was."""
    img = noise((64, 48))
    before = img.copy()
    normalise(img)
    np.testing.assert_array_equal(img, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_normalise_refuses_non_finite_pixels(bad: float) -> None:
    """NaN or infinity in the input is a ValueError naming img."""
    img = noise((20, 20))
    img[3, 4] = bad
    with pytest.raises(ValueError, match="img must be finite"):
        normalise(img)


@pytest.mark.parametrize(("low", "high"), [(50, 50), (60, 40), (-1, 99), (1, 101), (np.nan, 99)])
def test_normalise_refuses_bad_percentiles(low: float, high: float) -> None:
    """Percentiles must satisfy 0 <= low < high <= 100."""
    with pytest.raises(ValueError, match="low and high"):
        normalise(noise((8, 8)), low, high)


@pytest.mark.parametrize(
    ("img", "message"), [*BAD_ARRAYS, (np.zeros((4, 4), bool), "img must be a real .*found dtype bool")]
)
def test_normalise_refuses_bad_arrays(img: np.ndarray, message: str) -> None:
    """A wrong ndim, an empty array or a non-real dtype is a ValueError naming img and what was found."""
    with pytest.raises(ValueError, match=message):
        normalise(img)


def test_normalise_refuses_a_list() -> None:
    """A nested list is not an array: TypeError naming img."""
    with pytest.raises(TypeError, match=r"img must be a numpy\.ndarray; found list"):
        normalise([[0.0, 1.0]])  # type: ignore[arg-type]


# --- fit ---


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_fit_keeps_the_aspect_and_centres_the_image(shape: tuple[int, int], size: int) -> None:
    """The canvas is size x size float32; the resized image touches two opposite edges and is centred."""
    canvas, placement = fit(noise(shape) + 1.0, size)
    assert canvas.shape == (size, size) and canvas.dtype == np.float32
    assert placement.source_shape == shape and placement.size == size
    height, width = placement.resized_shape
    assert max(height, width) == size and min(height, width) >= 1
    assert placement.scale == size / max(shape)
    assert abs(height - max(1.0, shape[0] * placement.scale)) <= 0.5
    assert abs(width - max(1.0, shape[1] * placement.scale)) <= 0.5
    assert (placement.top, placement.left) == ((size - height) // 2, (size - width) // 2)
    inside = np.zeros((size, size), bool)
    inside[placement.slices] = True
    assert (canvas[inside] >= 1.0).all() and (canvas[~inside] == 0.0).all()
    assert np.isfinite(canvas).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [224, 33])
def test_fit_of_a_constant_image_is_that_constant(shape: tuple[int, int], size: int) -> None:
    """Resampling weights sum to one: a constant image stays that constant on the canvas."""
    canvas, placement = fit(np.full(shape, 0.7, np.float64), size)
    np.testing.assert_allclose(canvas[placement.slices], 0.7, rtol=1e-6)


@pytest.mark.parametrize(("shape", "size"), [((2048, 2048), 224), ((1955, 1841), 256), ((301, 97), 33)])
def test_fit_downsampling_preserves_the_mean(shape: tuple[int, int], size: int) -> None:
    """Area averaging keeps the mean brightness of the image."""
    img = noise(shape)
    canvas, placement = fit(img, size)
    assert canvas[placement.slices].mean() == pytest.approx(img.mean(), rel=2e-3)


@pytest.mark.parametrize("factor", [2, 3, 8])
def test_fit_by_an_integer_factor_is_the_block_mean(factor: int) -> None:
    """Shrinking 24k x 24k to 24 averages each k x k block exactly."""
    img = noise((24 * factor, 24 * factor), np.float64)
    canvas, _ = fit(img, 24)
    expected = img.reshape(24, factor, 24, factor).mean(axis=(1, 3))
    np.testing.assert_allclose(canvas, expected, atol=1e-6)


def test_fit_upsampling_is_bilinear_with_aligned_centres() -> None:
    """Growing a linear ramp reproduces the ramp between the first and last pixel centres."""
    img = np.tile(np.arange(10, dtype=np.float32), (10, 1))
    canvas, _ = fit(img, 40)  # 4x: output centre j sits at source position (j + 0.5) / 4 - 0.5
    positions = (np.arange(40) + 0.5) / 4 - 0.5
    np.testing.assert_allclose(canvas[5], np.clip(positions, 0, 9), atol=1e-5)


def test_fit_does_not_change_its_input() -> None:
    """The input array is left as it was."""
    img = noise((300, 200))
    before = img.copy()
    fit(img, 64)
    np.testing.assert_array_equal(img, before)


def test_fit_2048_to_224_is_fast() -> None:
    """Fitting a 2048x2048 float32 image to 224 takes less than 30 ms (best of seven)."""
    img = noise((2048, 2048))
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        fit(img, 224)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.030, f"best {min(timings) * 1000:.1f} ms"


@pytest.mark.parametrize(
    ("img", "message"),
    [*BAD_ARRAYS, (np.zeros((4, 4), np.uint16), "img must be a float32 or float64 array; found dtype uint16")],
)
def test_fit_refuses_bad_arrays(img: np.ndarray, message: str) -> None:
    """Only non-empty 2-D float arrays are fitted; otherwise ValueError naming img and what was found."""
    with pytest.raises(ValueError, match=message):
        fit(img, 16)


@pytest.mark.parametrize("size", [0, -4, 2.5, True, "224", None])
def test_fit_refuses_a_bad_size(size: object) -> None:
    """The size is an int >= 1."""
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        fit(noise((8, 8)), size)  # type: ignore[arg-type]


def test_fit_refuses_nan() -> None:
    """A NaN pixel would spread over its neighbourhood: ValueError naming img."""
    img = noise((50, 50))
    img[10, 10] = np.nan
    with pytest.raises(ValueError, match="img must be finite; found 1 NaN"):
        fit(img, 16)


# --- unfit ---


@pytest.mark.parametrize("shape", [s for s in SHAPES if min(s) >= 97])
@pytest.mark.parametrize("size", [224, 256, 128])
def test_mask_round_trip_through_fit_and_unfit(shape: tuple[int, int], size: int) -> None:
    """A lung-sized mask fitted, unfitted (linear, thresholded at 0.5) comes back with IoU > 0.95."""
    mask = ellipse(shape, (0.45, 0.3), (0.3, 0.15)) | ellipse(shape, (0.45, 0.7), (0.3, 0.15))
    canvas, placement = fit(mask.astype(np.float32), size)
    back = unfit(canvas, placement)
    assert back.shape == shape and back.dtype == np.float32
    assert iou(back > 0.5, mask) > 0.95


@pytest.mark.parametrize("shape", [(1955, 1841), (301, 97), (60, 45)])
@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int32])
def test_nearest_unfit_keeps_labels_and_dtype(shape: tuple[int, int], dtype: Any) -> None:
    """Nearest-neighbour unfit of a label map keeps its dtype and only the labels it had."""
    mask = ellipse(shape)
    canvas, placement = fit(mask.astype(np.float32), 224)
    labels = (canvas > 0.5).astype(dtype)
    back = unfit(labels, placement, order="nearest")
    assert back.shape == shape and back.dtype == np.dtype(dtype)
    assert set(np.unique(back)) <= {0, 1}
    assert iou(back.astype(bool), mask) > 0.95


@pytest.mark.parametrize("shape", [(60, 45), (7, 5), (1, 1), (2048, 2048)])
def test_unfit_of_a_constant_map_is_that_constant(shape: tuple[int, int]) -> None:
    """A constant heatmap comes back constant, whether the source was larger or smaller than the canvas."""
    _, placement = fit(noise(shape), 224)
    back = unfit(np.full((224, 224), 0.25, np.float32), placement)
    np.testing.assert_allclose(back, 0.25, rtol=1e-5)  # float32 sums of up to 225 weights


def test_fit_then_unfit_of_a_small_smooth_image_is_close_to_it() -> None:
    """A smooth image smaller than the canvas grows and shrinks back to nearly itself."""
    rows, cols = np.mgrid[:60, :45]
    img = (np.sin(rows / 9.0) * np.cos(cols / 7.0)).astype(np.float32)
    canvas, placement = fit(img, 224)
    assert np.abs(unfit(canvas, placement) - img).max() < 0.02


def test_unfit_drops_the_padding() -> None:
    """What lies on the padding never reaches the source grid."""
    _, placement = fit(noise((100, 50)), 64)
    canvas = np.full((64, 64), 99.0, np.float32)
    canvas[placement.slices] = 1.0
    np.testing.assert_array_equal(unfit(canvas, placement), 1.0)


@pytest.mark.parametrize(
    ("arr", "order", "message"),
    [
        (np.zeros((32, 32), np.float32), "linear", r"arr must have shape \(64, 64\); found \(32, 32\)"),
        (np.zeros((64, 64), np.uint8), "linear", "arr must be a float32 or float64 array.*found dtype uint8"),
        (np.zeros((64, 64, 1), np.float32), "linear", "arr must be 2-D"),
        (np.zeros((64, 64), np.complex64), "nearest", "arr must be a real or bool array; found dtype complex64"),
        (np.zeros((64, 64), np.float32), "cubic", "order must be 'linear' or 'nearest'"),
    ],
)
def test_unfit_refuses_bad_input(arr: np.ndarray, order: str, message: str) -> None:
    """A map of the wrong shape or dtype, or an unknown order, is a ValueError saying what was expected."""
    _, placement = fit(noise((100, 50)), 64)
    with pytest.raises(ValueError, match=message):
        unfit(arr, placement, order)  # type: ignore[arg-type]


def test_unfit_refuses_something_else_than_a_fit() -> None:
    """The placement must be the Fit that fit returned."""
    with pytest.raises(TypeError, match="fit must be a Fit"):
        unfit(np.zeros((64, 64), np.float32), {"size": 64})  # type: ignore[arg-type]


def test_fit_placement_is_frozen() -> None:
    """A Fit cannot be changed after it is made."""
    _, placement = fit(noise((10, 20)), 8)
    assert isinstance(placement, Fit)
    with pytest.raises(AttributeError):
        placement.top = 3  # type: ignore[misc]


# --- resize ---


@pytest.mark.parametrize("source", [(50, 40), (7, 300), (300, 7)])
@pytest.mark.parametrize("target", [(50, 40), (25, 20), (100, 13), (1, 1), (3, 900)])
def test_resize_reaches_any_shape_and_keeps_constants(source: tuple[int, int], target: tuple[int, int]) -> None:
    """Any source and target shape, shrinking or growing per axis, keep a constant image constant."""
    out = resize(np.full(source, 3.0, np.float32), target)
    assert out.shape == target and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(0, 3), (3,), (2, -1), (2.0, 3)])
def test_resize_refuses_a_bad_shape(shape: tuple) -> None:
    """The target shape is two ints >= 1."""
    with pytest.raises(ValueError, match="shape must be two positive ints"):
        resize(noise((4, 4)), shape)


# --- crop_to_mask and Box ---


def rectangle(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Return a bool mask that is True on rows[0]:rows[1], cols[0]:cols[1]."""
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


@pytest.mark.parametrize(
    ("margin", "expected"),
    [(0.0, (100, 300, 50, 150)), (0.05, (90, 310, 45, 155)), (0.1, (80, 320, 40, 160)), (1.0, (0, 400, 0, 250))],
)
def test_crop_to_mask_widens_the_bounding_box_by_the_margin(margin: float, expected: tuple[int, ...]) -> None:
    """The box is the mask's bounding box widened by margin x its height/width per side, clipped to the image."""
    img = noise((400, 250))
    crop, box = crop_to_mask(img, rectangle(img.shape, (100, 300), (50, 150)), margin)
    assert (box.row0, box.row1, box.col0, box.col1) == expected
    assert box.source_shape == (400, 250) and crop.shape == box.shape
    np.testing.assert_array_equal(crop, img[box.slices])


@pytest.mark.parametrize(("rows", "cols"), [((0, 5), (0, 5)), ((395, 400), (245, 250)), ((0, 400), (0, 250))])
def test_crop_to_mask_stays_inside_the_image(rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """A mask touching the borders gives a box clipped to the image."""
    _, box = crop_to_mask(noise((400, 250)), rectangle((400, 250), rows, cols), 0.5)
    assert 0 <= box.row0 < box.row1 <= 400 and 0 <= box.col0 < box.col1 <= 250


def test_crop_is_a_view_and_paste_puts_it_back() -> None:
    """The crop shares memory with the image, and Box.paste restores it in place with fill around."""
    img = noise((120, 90)) + 1.0
    crop, box = crop_to_mask(img, ellipse(img.shape, radii=(0.2, 0.3)))
    assert np.shares_memory(crop, img)
    pasted = box.paste(crop, fill=-1.0)
    assert pasted.shape == img.shape and pasted.dtype == img.dtype
    inside = np.zeros(img.shape, bool)
    inside[box.slices] = True
    np.testing.assert_array_equal(pasted[inside], img[inside])
    assert (pasted[~inside] == -1.0).all()


def test_heatmap_on_a_crop_goes_back_to_the_full_image() -> None:
    """crop → fit → unfit → paste places a map computed on the crop at the right place on the full image."""
    mask = ellipse((1955, 1841), (0.45, 0.5), (0.3, 0.35))
    crop, box = crop_to_mask(mask.astype(np.float32), mask)
    canvas, placement = fit(crop, 224)
    full = box.paste(unfit(canvas, placement))
    assert full.shape == mask.shape
    assert iou(full > 0.5, mask) > 0.95


@pytest.mark.parametrize("grid", [(256, 241), (100, 94), (1955, 1841)])
def test_unfit_onto_a_reduced_grid_is_the_full_map_reduced(grid: tuple[int, int]) -> None:
    """A map of a crop made straight onto the image's reduced grid is, to a fraction of its range, the full-grid map
    reduced to it; onto the image's own grid it is exactly ``box.paste(unfit(...))``."""
    mask = ellipse((1955, 1841), (0.45, 0.5), (0.3, 0.35))
    crop, box = crop_to_mask(mask.astype(np.float32), mask)
    rows, cols = np.mgrid[:224, :224]
    heat = np.exp(-((rows - 90.0) ** 2 + (cols - 130.0) ** 2) / 3000.0).astype(np.float32)
    _, placement = fit(crop, 224)
    full = box.paste(unfit(heat, placement))
    onto = preprocess.unfit_onto(heat, placement, box, grid)
    assert onto.dtype == np.float32 and onto.shape == grid
    if grid == mask.shape:
        assert onto.tobytes() == full.tobytes()
    else:
        assert float(np.abs(onto - resize(full, grid)).max()) < 0.05


@pytest.mark.parametrize(
    ("grid", "message"), [((0, 5), "grid must be"), ((1956, 10), "grid must be"), ((5,), "grid must be")]
)
def test_unfit_onto_refuses_a_grid_outside_the_image(grid: tuple[int, ...], message: str) -> None:
    mask = ellipse((1955, 1841), (0.45, 0.5), (0.3, 0.35))
    crop, box = crop_to_mask(mask.astype(np.float32), mask)
    canvas, placement = fit(crop, 64)
    with pytest.raises(ValueError, match=message):
        preprocess.unfit_onto(canvas, placement, box, grid)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mask", "margin", "message"),
    [
        (np.zeros((40, 30), bool), 0.05, "mask must have at least one True pixel"),
        (np.ones((40, 31), bool), 0.05, r"mask must have shape \(40, 30\); found \(40, 31\)"),
        (np.ones((40, 30), np.uint8), 0.05, "mask must be a bool array; found dtype uint8"),
        (np.ones((40, 30), bool), -0.1, r"margin must be a number in \[0, 1\]"),
        (np.ones((40, 30), bool), 1.5, r"margin must be a number in \[0, 1\]"),
    ],
)
def test_crop_to_mask_refuses_bad_input(mask: np.ndarray, margin: float, message: str) -> None:
    """An empty, misshapen or non-bool mask, or a margin outside [0, 1], is a ValueError saying so."""
    with pytest.raises(ValueError, match=message):
        crop_to_mask(noise((40, 30)), mask, margin)


def test_paste_refuses_a_map_of_another_shape() -> None:
    """Box.paste needs a map of the crop's shape."""
    box = Box(10, 20, 5, 25, source_shape=(40, 30))
    with pytest.raises(ValueError, match=r"arr must have shape \(10, 20\); found \(20, 10\)"):
        box.paste(np.zeros((20, 10), np.float32))


# --- mask_outside ---


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16])
@pytest.mark.parametrize("fill", [0.0, 1.0, 7.0])
def test_mask_outside_fills_only_outside(dtype: Any, fill: float) -> None:
    """Pixels outside the mask become fill, pixels inside keep their value, dtype and input unchanged."""
    img = (noise((50, 40)) * 100).astype(dtype)
    before = img.copy()
    mask = ellipse(img.shape)
    out = mask_outside(img, mask, fill)
    assert out.dtype == img.dtype and out.shape == img.shape
    np.testing.assert_array_equal(out[mask], img[mask])
    assert (out[~mask] == fill).all()
    np.testing.assert_array_equal(img, before)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: mask_outside(noise((5, 5)), np.ones((5, 6), bool)), r"mask must have shape \(5, 5\)"),
        (lambda: mask_outside(noise((5, 5)), np.ones((5, 5), np.float32)), "mask must be a bool array"),
        (lambda: mask_outside(np.ones((5, 5), bool), np.ones((5, 5), bool)), "img must be a real"),
        (lambda: mask_outside(noise((5, 5)), np.ones((5, 5), bool), np.nan), "fill must be a finite number"),
    ],
)
def test_mask_outside_refuses_bad_input(call: Callable[[], object], message: str) -> None:
    """A misshapen or non-bool mask, a bool image or a NaN fill is a ValueError saying so."""
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("source", "target"),
    [((256, 256), (1024, 1024)), ((1024, 977), (224, 214)), ((600, 500), (1024, 977)), ((3, 700), (9, 5))],
)
def test_banded_resampling_gives_the_same_bits_as_whole_arrays(
    source: tuple[int, int], target: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resampling is done in cache-sized bands of the output; every value is the one the whole-array computation
    gives, in float32 and float64, growing and shrinking."""
    from cxr_node.imaging import resample

    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        img = rng.random(source).astype(dtype)
        banded = resample.resize(img, target)
        monkeypatch.setattr(resample, "BAND_ELEMENTS", 1 << 40)
        whole = resample.resize(img, target)
        monkeypatch.setattr(resample, "BAND_ELEMENTS", 1)  # one output row at a time
        rows = resample.resize(img, target)
        monkeypatch.undo()
        assert banded.dtype == whole.dtype == np.float32
        assert banded.tobytes() == whole.tobytes() == rows.tobytes()


@pytest.mark.parametrize(
    ("source", "target", "window"),
    [
        ((256, 241), (978, 921), (slice(100, 700), slice(50, 800))),
        ((978, 921), (128, 128), (slice(0, 1), slice(127, 128))),
        ((117, 128), (816, 894), (slice(None), slice(3, 4))),
        ((300, 7), (9, 5), (slice(2, 9), slice(0, 5))),
        ((64, 64), (64, 64), (slice(5, 9), slice(60, 64))),
    ],
)
@pytest.mark.parametrize("order", ["linear", "nearest"])
def test_a_window_of_a_resampling_is_the_same_bits_as_that_part_of_the_whole(
    source: tuple[int, int], target: tuple[int, int], window: tuple[slice, slice], order: str
) -> None:
    """``resize(..., window=w)`` is ``resize(...)[w]`` value for value (what the overlay draws inside the lungs)."""
    img = np.random.default_rng(11).random(source).astype(np.float32)
    whole = resize(img, target, order)[window]  # type: ignore[arg-type]
    part = resize(img, target, order, window=window)  # type: ignore[arg-type]
    assert part.dtype == whole.dtype and part.shape == whole.shape
    assert part.tobytes() == whole.tobytes()


def test_tap_tables_are_shared_read_only() -> None:
    """The tap tables are made once per (n_in, n_out) and cannot be changed by a caller that shares them."""
    from cxr_node.imaging import resample

    first, again = resample._linear_taps(128, 978), resample._linear_taps(128, 978)
    assert first[0] is again[0] and first[1] is again[1]
    for table in (*first, *resample._area_taps(978, 128), resample._nearest_index(7, 9)):
        with pytest.raises(ValueError, match="read-only"):
            table[..., 0] = 0


def test_resize_above_is_resize_then_threshold_bit_for_bit() -> None:
    """``resize_above`` gives ``resize(...) > threshold`` for every pixel: smooth and noisy maps, float32 and float64,
    growing and shrinking, values exactly at the threshold, thresholds the fast path does not take."""
    from cxr_node.imaging.resample import resize_above

    rng = np.random.default_rng(5)
    for trial in range(120):
        small = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
        shape = (int(rng.integers(1, 700)), int(rng.integers(1, 700)))
        if trial % 3:
            base = rng.random((max(2, small[0] // 6), max(2, small[1] // 6))).astype(np.float32)
            img = resize(base, small)
        else:
            img = rng.random(small)
        if trial % 5 == 0:
            img = np.round(img * 4) / 4  # many values exactly at 0.25, 0.5, 0.75
        img = img.astype(np.float32 if trial % 2 else np.float64)
        for threshold in (0.5, 0.25, 0.45, 0.0, -1.0):
            expected = resize(img, shape) > threshold
            found = resize_above(img, shape, threshold)
            assert found.dtype == np.bool_ and found.shape == shape, (trial, threshold)
            assert np.array_equal(found, expected), (trial, small, shape, threshold, img.dtype)


@pytest.mark.parametrize("shape", [(1955, 1841), (978, 921), (100, 60), (64, 64)])
def test_unfit_above_is_unfit_then_threshold(shape: tuple[int, int]) -> None:
    """The lung mask the engine takes from a U-Net probability map is the one ``unfit(...) > threshold`` gives."""
    mask = ellipse(shape, (0.45, 0.5), (0.3, 0.35))
    canvas, placement = fit(mask.astype(np.float32), 128)
    rows, cols = np.mgrid[:128, :128]
    probability = np.clip(canvas * 0.9 + 0.05 * np.sin(rows / 7.0) * np.cos(cols / 5.0) + 0.02, 0.0, 1.0)
    for threshold in (0.5, 0.3):
        found = preprocess.unfit_above(probability, placement, threshold)
        assert np.array_equal(found, unfit(probability, placement) > threshold)
    with pytest.raises(ValueError, match="arr must be finite"):
        preprocess.unfit_above(np.full((128, 128), np.nan, np.float32), placement, 0.5)


@pytest.mark.parametrize("window", [(slice(0, 0), slice(None)), (slice(None, None, 2), slice(None)), (slice(None),)])
def test_resize_refuses_a_bad_window(window: object) -> None:
    with pytest.raises(ValueError, match="window must be"):
        resize(np.zeros((8, 8), np.float32), (4, 4), window=window)  # type: ignore[arg-type]


# --- the same bits as the earlier code (tests/previous_numerics.py) ---


def sample_values(pattern: str, size: int, dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Return ``size`` values of a pattern that stresses rank selection: ties, zeros of both signs, negatives."""
    if pattern == "noise":
        values = rng.random(size)
    elif pattern == "few levels":
        values = rng.integers(0, 40, size) / 7.0
    elif pattern == "dark background":
        values = np.where(rng.random(size) < 0.3, 0.0, rng.random(size))
    elif pattern == "signed zeros":
        values = np.where(rng.random(size) < 0.3, -0.0, rng.normal(size=size))
        values[rng.random(size) < 0.1] = 0.0
    else:
        values = rng.normal(size=size) * 1000
    return values.astype(dtype)


@pytest.mark.parametrize("pattern", ["noise", "few levels", "dark background", "signed zeros", "wide"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.uint16, np.int16, np.int64])
@pytest.mark.parametrize("size", [1, 2, 4095, 4096, 4097, 30_001, 225_429])
def test_percentiles_are_numpys_bit_for_bit(pattern: str, dtype: Any, size: int) -> None:
    """The rank-at-a-time percentiles equal numpy.percentile's, value, dtype and bits, for any pair of percentiles."""
    rng = np.random.default_rng(size)
    sample = sample_values(pattern, size, dtype, rng).reshape(1, -1)
    pairs = [(0.5, 99.5), (0.0, 100.0), (0.0, 50.0), (50.0, 100.0), (10.0, 10.001), (2.0, 60.0)]
    pairs += [tuple(sorted(rng.uniform(0, 100, 2))) for _ in range(4)]
    for low, high in pairs:
        expected = np.percentile(sample, [low, high])
        found = preprocess._percentiles(sample, low, high)
        assert [type(v) for v in found] == [type(v) for v in expected]
        assert b"".join(v.tobytes() for v in found) == expected.tobytes(), (low, high)


def test_percentiles_leave_a_selected_zero_to_numpy_when_the_sample_holds_minus_zero() -> None:
    """When a selected rank is zero and -0.0 is present, numpy itself decides which zero (it is not fixed)."""
    sample = np.zeros((1, 10_000), np.float32)
    sample[0, ::3] = -0.0
    sample[0, -50:] = 1.0
    expected = np.percentile(sample, [0.5, 99.5])
    assert b"".join(v.tobytes() for v in preprocess._percentiles(sample, 0.5, 99.5)) == expected.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_normalise_gives_the_earlier_bits(shape: tuple[int, int], dtype: Any) -> None:
    """normalise returns the same bytes as the earlier code on noise, dark backgrounds and few grey levels."""
    rng = np.random.default_rng(sum(shape))
    scale = {"u1": 40, "u2": 1000, "i2": 1000}.get(np.dtype(dtype).str[1:], 1)
    for pattern in ("noise", "dark background", "few levels"):
        img = (sample_values(pattern, shape[0] * shape[1], np.float64, rng) * scale).astype(dtype).reshape(shape)
        for low, high in ((0.5, 99.5), (0.0, 100.0), (5.0, 95.0)):
            assert normalise(img, low, high).tobytes() == previous.normalise(img, low, high).tobytes()


@pytest.mark.parametrize("max_side", [1024, None])
def test_normalise_of_the_real_cr_gives_the_earlier_bits(chest_cr: Path, max_side: int | None) -> None:
    """On the real chest CR, reduced as the worker does and at full size, normalise gives the earlier bytes."""
    image = decode(dcmread(chest_cr), max_side=max_side).pixels
    assert normalise(image).tobytes() == previous.normalise(image).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.uint16, np.int16])
@pytest.mark.parametrize("fill", [0.0, -0.0, 1.0, 7.0, 0.5])
@pytest.mark.parametrize("layout", ["C", "crop view", "F"])
def test_mask_outside_gives_the_earlier_bits(dtype: Any, fill: float, layout: str) -> None:
    """mask_outside gives the earlier bytes and a C-ordered array for any dtype, fill and input layout."""
    img = (noise((60, 50)) * 100).astype(dtype)
    mask = ellipse(img.shape)
    if layout == "crop view":
        img, mask = img[5:50, 3:41], mask[5:50, 3:41]
    elif layout == "F":
        img = np.asfortranarray(img)
    out = mask_outside(img, mask, fill)
    assert out.flags.c_contiguous and previous.same(out, previous.mask_outside(img, mask, fill))


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.5])
def test_masking_the_crop_is_masking_then_cropping(margin: float) -> None:
    """The engine masks only the crop: the pixels are those of the whole image masked, then cropped."""
    img = noise((400, 250))
    mask = ellipse(img.shape, centre=(0.45, 0.55), radii=(0.3, 0.2))
    crop, box = crop_to_mask(img, mask, margin)
    masked_crop = mask_outside(crop, mask[box.slices])
    whole_crop, whole_box = crop_to_mask(previous.mask_outside(img, mask), mask, margin)
    assert box == whole_box and masked_crop.tobytes() == np.ascontiguousarray(whole_crop).tobytes()


@pytest.mark.parametrize(
    ("shape", "size", "grid"),
    [
        ((978, 921), 128, (128, 128)),
        ((921, 978), 128, (128, 128)),
        ((300, 200), 224, (128, 128)),
        ((64, 90), 128, (7, 5)),
    ],
)
def test_fit_and_reduce_is_fit_and_resize_bit_for_bit(shape: tuple[int, int], size: int, grid: tuple[int, int]) -> None:
    """The shared first pass changes no value: the canvas, the placement and the grid are what the two calls give."""
    img = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    canvas, placement, reduced = preprocess.fit_and_reduce(img, size, grid)
    expected_canvas, expected_placement = fit(img, size)
    assert placement == expected_placement
    assert canvas.dtype == expected_canvas.dtype and np.array_equal(canvas, expected_canvas)
    expected = resize(img, grid)
    assert reduced.dtype == np.float32 and reduced.shape == grid and np.array_equal(reduced, expected)


def test_fit_and_reduce_refuses_what_fit_refuses() -> None:
    with pytest.raises(ValueError, match="finite"):
        preprocess.fit_and_reduce(np.full((8, 8), np.nan, dtype=np.float32), 4, (2, 2))
    with pytest.raises(ValueError, match="shape"):
        preprocess.fit_and_reduce(np.zeros((8, 8), dtype=np.float32), 4, (0, 2))
