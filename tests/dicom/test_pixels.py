"""Dataset → presentation array: real radiographs, the grayscale pipeline on synthetic headers, failures."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
from pydicom.tag import Tag
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, JPEG2000Lossless

from cxr_node.dicom.pixels import DecodedImage, block_factor, block_mean, decode, pixel_spacing_mm
from cxr_node.errors import CxrNodeError, PixelDecodeError

RNG_SEED = 20240601


def image(words: np.ndarray, **attrs: Any) -> Dataset:
    """Return a single-frame 16-bit MONOCHROME2 data set of ``words`` (stored as written), with ``attrs`` set."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = words.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.HighBit = ds.BitsStored - 1
    dtype = "<i2" if ds.PixelRepresentation and words.dtype.kind == "i" else "<u2"
    ds.PixelData = words.astype(dtype).tobytes()
    return ds


def ramp(rows: int = 64, cols: int = 64, high: int = 4095) -> np.ndarray:
    """Return a (rows, cols) uint16 ramp from 0 to ``high`` along the rows."""
    return np.repeat(np.linspace(0, high, rows).round().astype(np.uint16)[:, None], cols, axis=1)


def raw_ds(ds: Dataset, keyword_tag: int, text: bytes) -> None:
    """Put a DS element into ``ds`` as read from a file: undecoded bytes, however wrong."""
    ds[keyword_tag] = RawDataElement(Tag(keyword_tag), "DS", len(text), text, 0, True, True)


def region_mean(pixels: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    """Return the mean of ``pixels`` over a region given as fractions of the height and width."""
    height, width = pixels.shape
    top, bottom, left, right = int(rows[0] * height), int(rows[1] * height), int(cols[0] * width), int(cols[1] * width)
    return float(pixels[top:bottom, left:right].mean())


# --- real radiographs (NEMA WG04 RG1: CR chest PA, MONOCHROME1, 15 bits, window 15000/30000, spacing 0\0) ---


@pytest.fixture(scope="module")
def rg1(chest_cr: Path) -> Dataset:
    """The real CR chest PA, read once."""
    return dcmread(chest_cr)


@pytest.mark.parametrize("max_side", [None, 1024, 256])
def test_monochrome1_chest_has_dark_lungs_and_bright_mediastinum(rg1: Dataset, max_side: int | None) -> None:
    """After the MONOCHROME1 inversion both lung fields are clearly darker than the mediastinum and spine."""
    pixels = decode(rg1, max_side).pixels
    right_lung = region_mean(pixels, (0.2, 0.45), (0.15, 0.30))
    left_lung = region_mean(pixels, (0.2, 0.45), (0.62, 0.80))
    spine = region_mean(pixels, (0.2, 0.45), (0.46, 0.54))
    assert max(right_lung, left_lung) + 0.15 < spine, (right_lung, left_lung, spine)


def test_real_chest_header_is_reported(rg1: Dataset) -> None:
    """The result says what the header held: MONOCHROME1, 15 bits, the window applied, no usable spacing."""
    decoded = decode(rg1)
    assert decoded.photometric == "MONOCHROME1"
    assert decoded.bits_stored == 15
    assert decoded.original_shape == (1955, 1841) == decoded.pixels.shape
    assert decoded.window == (15000.0, 30000.0)
    assert decoded.voi == "window"
    assert decoded.pixel_spacing_mm is None  # the file says PixelSpacing 0\0
    assert decoded.scale == 1.0


def test_real_chest_is_float32_in_unit_range(rg1: Dataset) -> None:
    """Pixels are float32, finite and inside [0, 1]."""
    pixels = decode(rg1).pixels
    assert pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
    assert 0.0 <= pixels.min() < pixels.max() <= 1.0


def test_jpeg2000_lossless_decodes_equal_to_uncompressed(rg1: Dataset, wg04: Path) -> None:
    """RG1 in JPEG 2000 lossless gives exactly the same presentation values as the uncompressed file."""
    np.testing.assert_array_equal(decode(dcmread(wg04 / "RG1_J2KR.dcm")).pixels, decode(rg1).pixels)


def test_jpeg2000_lossy_decodes_close_to_uncompressed(rg1: Dataset, wg04: Path) -> None:
    """RG1 in lossy JPEG 2000 is within 0.03 (max) and 0.005 (mean) of the uncompressed file, not equal."""
    error = np.abs(decode(dcmread(wg04 / "RG1_J2KI.dcm")).pixels - decode(rg1).pixels)
    assert 0 < error.max() <= 0.03 and error.mean() <= 0.005, (error.max(), error.mean())


@pytest.mark.parametrize("max_side", [1955, 1954, 1024, 700, 224, 17, 1])
def test_max_side_bounds_the_longer_side(rg1: Dataset, max_side: int) -> None:
    """The longer side is at most max_side, by the smallest integer block, and scale says by how much."""
    decoded = decode(rg1, max_side)
    factor = math.ceil(1955 / max_side)
    assert decoded.pixels.shape == (math.ceil(1955 / factor), math.ceil(1841 / factor))
    assert max(decoded.pixels.shape) <= max_side
    assert decoded.scale == pytest.approx(1 / factor)


@pytest.mark.parametrize("max_side", [1024, 700, 100])
def test_downsampling_is_the_block_mean_of_the_full_image(rg1: Dataset, max_side: int) -> None:
    """Reducing band by band gives the k x k block means of the full-resolution result, edge blocks included."""
    full = decode(rg1).pixels.astype(np.float64)
    factor = block_factor(full.shape, max_side)
    starts_r, starts_c = np.arange(0, full.shape[0], factor), np.arange(0, full.shape[1], factor)
    sums = np.add.reduceat(np.add.reduceat(full, starts_r, axis=0), starts_c, axis=1)
    counts = np.outer(np.diff([*starts_r, full.shape[0]]), np.diff([*starts_c, full.shape[1]]))
    np.testing.assert_allclose(decode(rg1, max_side).pixels, sums / counts, atol=2e-6)


@pytest.mark.parametrize("factor", [2, 3, 5])
def test_block_mean_sums_in_order_and_divides_by_each_block_count(factor: int) -> None:
    """Each output is, in float32, the block's rows added top to bottom, then its columns left to right, divided by
    the pixels the block holds: full blocks, the last row and column of partial blocks and the corner alike."""
    rng = np.random.default_rng(factor)
    for shape in [(1, 1), (factor, factor), (7, 16), (2 * factor + 1, 3 * factor - 1), (41, 33)]:
        arr = rng.random(shape, dtype=np.float32)
        expected = np.empty((-(-shape[0] // factor), -(-shape[1] // factor)), dtype=np.float32)
        for i in range(expected.shape[0]):
            for j in range(expected.shape[1]):
                block = arr[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
                rows = block[0].copy()
                for row in block[1:]:
                    rows += row
                total = rows[0]
                for value in rows[1:]:
                    total = np.float32(total + value)
                expected[i, j] = total / np.float32(block.size)
        assert block_mean(arr, factor).tobytes() == expected.tobytes(), shape


def test_decode_does_not_change_the_data_set(rg1: Dataset) -> None:
    """The header is left as it was: no cached pixel array, no converted values."""
    before = {elem.keyword: elem.value for elem in rg1 if elem.keyword != "PixelData"}
    decode(rg1, 512)
    assert {elem.keyword: elem.value for elem in rg1 if elem.keyword != "PixelData"} == before
    assert getattr(rg1, "_pixel_array", None) is None


# --- VOI: windows, LUTs and their garbage ---


@pytest.mark.parametrize("function", [None, "LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_matches_pydicom_scaled_to_unit_range(function: str | None) -> None:
    """Each VOI LUT Function gives pydicom's windowing output divided by its 12-bit output range."""
    attrs = {"WindowCenter": 1500, "WindowWidth": 1001} | ({"VOILUTFunction": function} if function else {})
    ds = image(ramp(), **attrs)
    expected = apply_windowing(pixel_array(ds), ds) / 4095
    decoded = decode(ds)
    np.testing.assert_allclose(decoded.pixels, expected, atol=2e-6)
    assert decoded.window == (1500.0, 1001.0)


def test_first_of_several_windows_is_applied() -> None:
    """With several windows the first one is used and reported."""
    ds = image(ramp(), WindowCenter=[1000, 3000], WindowWidth=[500, 2000])
    decoded = decode(ds)
    assert decoded.window == (1000.0, 500.0)
    np.testing.assert_allclose(decoded.pixels, apply_windowing(pixel_array(ds), ds, index=0) / 4095, atol=2e-6)


def test_linear_window_of_width_one_is_a_threshold() -> None:
    """A LINEAR window of width 1 splits the values at center - 0.5 into black and white (PS3.3 C.11.2.1.2)."""
    decoded = decode(image(ramp(), WindowCenter=2000, WindowWidth=1))
    assert set(np.unique(decoded.pixels)) == {0.0, 1.0}
    assert decoded.window == (2000.0, 1.0)


@pytest.mark.parametrize(
    ("center", "width"),
    [(b"2000", b"0"), (b"2000", b"-40"), (b"2000", b"0.5"), (b"nan", b"400"), (b"2000", b"inf"), (b"abc", b"400"),
     (b"90000", b"400"), (b"-9000", b"400"), (b"", b"")],
)  # fmt: skip
def test_garbage_window_falls_back_to_the_data_range(center: bytes, width: bytes) -> None:
    """An unusable or out-of-range window is ignored: the values present map onto [0, 1]."""
    ds = image(ramp(high=3000) + 500)
    raw_ds(ds, 0x00281050, center)
    raw_ds(ds, 0x00281051, width)
    decoded = decode(ds)
    assert (decoded.window, decoded.voi) == (None, "none")
    assert (decoded.pixels.min(), decoded.pixels.max()) == (0.0, 1.0)


def test_without_voi_the_data_range_maps_onto_unit_range() -> None:
    """No VOI: the lowest stored value becomes 0, the highest 1, linearly in between."""
    decoded = decode(image(ramp(high=3000) + 500))
    expected = (ramp(high=3000).astype(np.float64)) / 3000
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)
    assert (decoded.window, decoded.voi) == (None, "none")


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_constant_image_is_finite(photometric: str) -> None:
    """A constant image without VOI decodes to a constant in [0, 1], never NaN."""
    pixels = decode(image(np.full((8, 9), 700, np.uint16), PhotometricInterpretation=photometric)).pixels
    assert np.isfinite(pixels).all() and np.ptp(pixels) == 0 and 0 <= pixels[0, 0] <= 1


@pytest.mark.parametrize("window", [{}, {"WindowCenter": 1800, "WindowWidth": 900}])
def test_monochrome1_is_the_inverse_of_monochrome2(window: dict[str, int]) -> None:
    """The same stored values as MONOCHROME1 and MONOCHROME2 add up to 1 everywhere, window or not."""
    one = decode(image(ramp(), PhotometricInterpretation="MONOCHROME1", **window)).pixels
    two = decode(image(ramp(), PhotometricInterpretation="MONOCHROME2", **window)).pixels
    np.testing.assert_allclose(one + two, 1.0, atol=1e-6)
    assert two[-1, 0] > two[0, 0] and one[-1, 0] < one[0, 0]


def test_voi_lut_sequence_is_applied_and_scaled_to_its_range(wg04: Path) -> None:
    """vlut_04's VOI LUT Sequence is applied and scaled by the range of the table."""
    ds = dcmread(wg04 / "vlut_04.dcm")
    table = apply_voi(np.arange(256), ds).astype(np.float64)
    expected = (apply_voi(pixel_array(ds), ds) - table.min()) / np.ptp(table)
    decoded = decode(ds)
    assert (decoded.voi, decoded.window) == ("lut", None)
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)


def lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    """Return a LUT Sequence item with ``descriptor`` and US ``data``."""
    item = Dataset()
    item.LUTDescriptor, item.LUTData = descriptor, data
    return item


def test_voi_lut_overstating_its_bits_still_spans_the_unit_range() -> None:
    """A 12-bit table declared as 16 bits (a common vendor slip) is scaled by its own range, not by 2**16."""
    ds = image(ramp())
    ds.VOILUTSequence = [lut_item([4096, 0, 16], list(range(4096)))]
    decoded = decode(ds)
    assert decoded.voi == "lut"
    np.testing.assert_allclose(decoded.pixels, ramp() / 4095, atol=1e-6)


def test_incomplete_voi_lut_falls_back_to_the_window() -> None:
    """A VOI LUT item without LUT Data is passed over for the window beside it."""
    ds = image(ramp(), WindowCenter=2000, WindowWidth=1000)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    ds.VOILUTSequence = [item]
    assert (decode(ds).voi, decode(ds).window) == ("window", (2000.0, 1000.0))


def test_short_modality_lut_raises() -> None:
    """A Modality LUT whose data is shorter than its descriptor says cannot be applied: PixelDecodeError."""
    ds = image(ramp())
    ds.ModalityLUTSequence = [lut_item([4096, 0, 16], list(range(100)))]
    with pytest.raises(PixelDecodeError, match="Modality LUT Sequence cannot be applied"):
        decode(ds)


def test_modality_lut_with_a_negative_first_value_on_unsigned_pixels_is_applied() -> None:
    """A Modality LUT whose first mapped value reads as negative (a US/SS descriptor read as SS) maps unsigned
    stored values from it, as pydicom does on wider integers; before, the uint16 subtraction escaped as an
    OverflowError that no caller expects."""
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 3
    ds = image(stored)
    ds.ModalityLUTSequence = [lut_item([256, -5, 16], [2 * v for v in range(256)])]
    expected = 2.0 * (stored + 5)  # LUT[value - first], first = -5
    np.testing.assert_allclose(decode(ds).pixels, (expected - expected.min()) / np.ptp(expected), atol=1e-6)


def test_modality_lut_sequence_is_applied(wg04: Path) -> None:
    """mlut_18's Modality LUT Sequence (signed 12-bit input) is applied, then the data range maps onto [0, 1]."""
    ds = dcmread(wg04 / "mlut_18.dcm")
    values = apply_modality_lut(pixel_array(ds), ds).astype(np.float64)
    np.testing.assert_allclose(decode(ds).pixels, (values - values.min()) / np.ptp(values), atol=1e-6)


def test_ct_window_in_rescaled_units(wg04: Path) -> None:
    """A signed CT with RescaleIntercept -1024 is windowed in Hounsfield units (window 40/100), as pydicom does."""
    ds = dcmread(wg04 / "693_UNCR.dcm")
    hu = apply_modality_lut(pixel_array(ds), ds)
    low, high = -(2**13) - 1024, 2**13 - 1 - 1024  # pydicom's output range: 14-bit signed, rescaled
    expected = (apply_windowing(hu, ds) - low) / (high - low)
    np.testing.assert_allclose(decode(ds).pixels, expected, atol=2e-6)


# --- Modality LUT, signed and odd bit depths ---


def test_signed_pixels_with_rescale_and_window() -> None:
    """Signed 12-bit values are rescaled (slope 0.5, intercept 1000) before a LINEAR_EXACT window in those units."""
    stored = np.linspace(-2048, 2047, 64 * 48).round().astype(np.int16).reshape(64, 48)
    attrs = {"PixelRepresentation": 1, "RescaleSlope": 0.5, "RescaleIntercept": 1000}
    ds = image(stored, **attrs, WindowCenter=1000, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT")
    expected = np.clip((stored * 0.5 + 1000 - 1000) / 1000 + 0.5, 0, 1)
    np.testing.assert_allclose(decode(ds).pixels, expected, atol=1e-6)


def test_signed_pixels_without_voi_keep_their_order() -> None:
    """Negative stored values are darker than positive ones: -5, 0, 5 become 0, 0.5, 1."""
    ds = image(np.array([[-5, 0, 5]], np.int16), PixelRepresentation=1)
    np.testing.assert_allclose(decode(ds).pixels, [[0.0, 0.5, 1.0]])


@pytest.mark.parametrize("slope", [b"0", b"nan", b"abc"])
def test_unusable_rescale_slope_raises(slope: bytes) -> None:
    """A rescale slope that is zero or not a number makes the values meaningless: PixelDecodeError."""
    ds = image(ramp(), RescaleIntercept=0)
    raw_ds(ds, 0x00281053, slope)
    with pytest.raises(PixelDecodeError, match="RescaleSlope"):
        decode(ds)


@pytest.mark.parametrize("signed", [0, 1])
def test_garbage_high_bits_are_masked(signed: int) -> None:
    """Bits above BitsStored 12 carrying garbage do not change the result (unsigned masked, signed sign-extended)."""
    clean = np.random.default_rng(RNG_SEED).integers(0, 4096, (40, 30)).astype(np.uint16)
    garbage = clean | np.uint16(0xA000)
    attrs = {"PixelRepresentation": signed, "BitsStored": 12}
    np.testing.assert_array_equal(decode(image(garbage, **attrs)).pixels, decode(image(clean, **attrs)).pixels)
    stored = pixel_array(image(garbage, **attrs))
    assert stored.min() >= (-2048 if signed else 0) and stored.max() <= (2047 if signed else 4095)


@pytest.mark.parametrize("bits", [8, 10, 12, 15, 16])
def test_odd_bits_stored_use_the_full_range(bits: int) -> None:
    """Whatever BitsStored, the darkest stored value maps to 0 and the brightest to 1 without VOI."""
    stored = ramp(high=2**bits - 1)
    decoded = decode(image(stored, BitsStored=bits))
    assert (decoded.bits_stored, decoded.pixels[0, 0], decoded.pixels[-1, 0]) == (bits, 0.0, 1.0)


# --- pixel spacing ---


@pytest.mark.parametrize(
    ("pixel_spacing", "imager_spacing", "expected"),
    [
        (b"0.14\\0.15", None, (0.14, 0.15)),
        (b"0\\0", None, None),
        (b"0\\0", b"0.2\\0.2", (0.2, 0.2)),
        (None, b"0.175\\0.175", (0.175, 0.175)),
        (None, None, None),
        (b"-0.1\\0.1", None, None),
        (b"nan\\0.1", None, None),
        (b"abc\\0.1", None, None),
        (b"0.1", None, None),
        (b"0.1\\0.1\\0.1", None, None),
        (b"1e9\\1e9", None, None),
        (b"", None, None),
    ],
)
def test_pixel_spacing(pixel_spacing: bytes | None, imager_spacing: bytes | None, expected: tuple | None) -> None:
    """PixelSpacing, else ImagerPixelSpacing, when two plausible positive numbers; otherwise unknown (None)."""
    ds = image(ramp(4, 4))
    if pixel_spacing is not None:
        raw_ds(ds, 0x00280030, pixel_spacing)
    if imager_spacing is not None:
        raw_ds(ds, 0x00181164, imager_spacing)
    assert pixel_spacing_mm(ds) == expected
    assert decode(ds).pixel_spacing_mm == expected


# --- memory ---


def test_large_image_decodes_downsampled_within_bounded_memory() -> None:
    """A 4096x4096 16-bit image with a rescale and a window decodes to 1024x1024 with < 200 MB of allocations."""
    stored = np.random.default_rng(RNG_SEED).integers(0, 4096, (4096, 4096), dtype=np.uint16)
    ds = image(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=4000, WindowWidth=6000)
    del stored
    tracemalloc.start()
    try:
        decoded = decode(ds, max_side=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.pixels.shape == (1024, 1024)
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


# --- what cannot be decoded ---


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm"])
def test_colour_raises(wg04: Path, name: str) -> None:
    """A colour image is refused with a PixelDecodeError naming its photometric interpretation."""
    with pytest.raises(PixelDecodeError, match=r"PhotometricInterpretation .* is not greyscale"):
        decode(dcmread(wg04 / name))


def test_greyscale_with_three_samples_raises() -> None:
    """A header claiming MONOCHROME2 with three samples per pixel is refused."""
    with pytest.raises(PixelDecodeError, match="SamplesPerPixel is 3"):
        decode(image(ramp(), SamplesPerPixel=3))


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm"])
def test_multi_frame_raises(wg04: Path, name: str) -> None:
    """A multi-frame image is refused before its frames are decoded."""
    with pytest.raises(PixelDecodeError, match="NumberOfFrames is 10"):
        decode(dcmread(wg04 / name))


def test_no_pixel_data_raises() -> None:
    """A data set without Pixel Data is refused."""
    ds = image(ramp())
    del ds.PixelData
    with pytest.raises(PixelDecodeError, match="no Pixel Data"):
        decode(ds)


def test_truncated_pixel_data_raises() -> None:
    """Pixel Data shorter than Rows x Columns is refused with pydicom's reason."""
    ds = image(ramp())
    ds.PixelData = ds.PixelData[:-128]
    with pytest.raises(PixelDecodeError, match=r"not decodable .*less than expected"):
        decode(ds)


def test_transfer_syntax_without_decoder_raises() -> None:
    """A transfer syntax pydicom has no decoder for (MPEG-2) is refused."""
    ds = image(ramp())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(PixelDecodeError, match="not decodable"):
        decode(ds)


def test_missing_decoder_plugin_raises(wg04: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JPEG 2000 with no decoding plugin installed is refused, not a crash."""
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(PixelDecodeError, match="not decodable"):
        decode(dcmread(wg04 / "RG1_J2KR.dcm"))


def test_missing_transfer_syntax_raises() -> None:
    """A data set without a Transfer Syntax UID cannot be decoded."""
    ds = image(ramp())
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(PixelDecodeError, match="not decodable"):
        decode(ds)


def test_pixel_decode_error_is_a_node_error() -> None:
    """PixelDecodeError belongs to the node's exception tree, so the CLI reports it in one line."""
    assert issubclass(PixelDecodeError, CxrNodeError)


@pytest.mark.parametrize("max_side", [0, -1, 2.5, True, "512"])
def test_invalid_max_side_raises(max_side: object) -> None:
    """max_side must be a positive int."""
    with pytest.raises(ValueError, match="max_side"):
        decode(image(ramp()), max_side)  # type: ignore[arg-type]


def test_decoded_image_is_frozen(rg1: Dataset) -> None:
    """A DecodedImage cannot be changed after it is made."""
    decoded = decode(rg1, 64)
    assert isinstance(decoded, DecodedImage)
    with pytest.raises(AttributeError):
        decoded.scale = 2.0  # type: ignore[misc]


def test_jpeg2000_is_decoded_by_the_least_cpu_plugin_then_any(wg04: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG 2000 CR goes to pylibjpeg-openjpeg first (whatever else is installed, GDCM included); when the
    preferred plugin fails on a file, pydicom's own order is tried, so a decodable image is still decoded."""
    from cxr_node.dicom import pixels

    calls: list[str] = []
    real = pixels.pixel_array

    def recording(ds: Dataset, **kwargs: Any) -> Any:
        calls.append(kwargs.get("decoding_plugin", ""))
        return real(ds, **kwargs)

    monkeypatch.setattr(pixels, "pixel_array", recording)
    ds = dcmread(wg04 / "RG1_J2KR.dcm")
    first = decode(ds, 512).pixels
    assert calls == ["pylibjpeg"]

    def preferred_fails(ds: Dataset, **kwargs: Any) -> Any:
        calls.append(kwargs.get("decoding_plugin", ""))
        if kwargs.get("decoding_plugin"):
            raise RuntimeError("this plugin cannot decode it")
        return real(ds, **kwargs)

    calls.clear()
    monkeypatch.setattr(pixels, "pixel_array", preferred_fails)
    assert decode(ds, 512).pixels.tobytes() == first.tobytes()
    assert calls == ["pylibjpeg", ""]
