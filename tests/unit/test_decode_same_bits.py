"""The faster :func:`cxr_node.dicom.pixels.decode` gives, bit for bit, what the earlier one gave, or the same error.

The earlier decode is kept in :mod:`tests.previous_pixels`. Each case is decoded by both from its own copy of the
data set; the results must agree in every field (pixels byte for byte, dtype and shape included), or both must
raise the same exception with the same message, and warn alike. The cases are a seeded random draw over the
header (bits allocated and stored, signedness, garbage above BitsStored, Modality LUT, VOI, photometric, shape,
max_side, band size) plus the real WG04 files and the forms Pixel Data takes (deferred, buffered, padded, short).
"""

from __future__ import annotations

import copy
import io
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from cxr_node.dicom import pixels
from tests import previous_pixels

CASES: Final = 400
SEED: Final = 20250611
NATIVE: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
SHAPES: Final = [(1, 1), (1, 37), (37, 1), (2, 2), (7, 13), (64, 64), (131, 257), (1025, 3), (3, 1031), (97, 1023)]
MAX_SIDES: Final = [None, 1, 2, 3, 7, 64, 100, 1023, 1024, 1025]
BAND_PIXELS: Final = [pixels.BAND_PIXELS, 1, 100, 4099]
"""Band sizes the new decode is run with (the old one keeps its own): the result must not depend on them."""
FUNCTIONS: Final = [None, "LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]
REAL_FILES: Final = [
    "RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_UNCI.dcm", "MR2_UNCR.dcm", "MR2_J2KR.dcm", "693_UNCR.dcm", "693_J2KR.dcm",
    "mlut_18.dcm", "vlut_04.dcm", "JPEG-LL.dcm", "JPEG2000_UNC.dcm", "liver.dcm", "liver_expb.dcm",
    "OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm", "emri_small.dcm", "emri_small_big_endian.dcm",
    "emri_small_jpeg_2k_lossless_too_short.dcm", "US1_UNCR.dcm", "SC_rgb.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm", "gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm", "eCT_Supplemental.dcm",
]  # fmt: skip


def outcome(
    decode: Callable[..., Any], ds: Dataset, max_side: int | None
) -> tuple[tuple[Any, ...], set[tuple[type[Warning], str]]]:
    """What ``decode`` gives: its result's fields (pixels as dtype, shape and bytes) or the exception, and the
    warnings it raised, as a set (how often a warning repeats depends on the bands)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = decode(ds, max_side=max_side)
            result: tuple[Any, ...] = (
                image.pixels.dtype,
                image.pixels.shape,
                image.pixels.tobytes(),
                image.original_shape,
                image.pixel_spacing_mm,
                image.photometric,
                image.bits_stored,
                image.window,
                image.scale,
                image.voi,
            )
        except Exception as e:  # the same failure is the contract, whatever it is
            result = (type(e), str(e))
    return result, {(w.category, str(w.message)) for w in caught}


def assert_same(
    ds: Dataset | Callable[[], Dataset], max_side: int | None, band_pixels: int = pixels.BAND_PIXELS
) -> tuple[Any, ...]:
    """Decode a copy of ``ds`` (or a data set made by it) with each implementation and check both give the same;
    return that outcome."""
    make = ds if callable(ds) else lambda: copy.deepcopy(ds)
    old = outcome(previous_pixels.decode, make(), max_side)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pixels, "BAND_PIXELS", band_pixels)
        new = outcome(pixels.decode, make(), max_side)
    assert new[0] == old[0]
    assert new[1] == old[1]
    return new[0]


def header(
    rows: int, cols: int, syntax: UID, bits_allocated: int, bits_stored: int, signed: int, **attrs: Any
) -> Dataset:
    """Return a single-frame greyscale data set without Pixel Data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = signed
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def words(rng: np.random.Generator, shape: tuple[int, int], allocated: int, stored: int, signed: int) -> np.ndarray:
    """Return stored values as unsigned words of ``allocated`` bits: the high bits clean (zero, or the sign), zero
    for signed values (two's complement in ``stored`` bits only), or garbage."""
    span = 1 << stored
    low, high = (-(span // 2), span // 2) if signed else (0, span)
    values = rng.integers(low, high, shape, dtype=np.int64)
    if rng.random() < 0.3:  # a smooth image: a narrow band of values, like a radiograph
        values = np.clip(np.cumsum(rng.integers(-3, 4, shape), axis=1) + (low + high) // 2, low, high - 1)
    unsigned = values & ((1 << allocated) - 1)  # two's complement in the word, sign bits set above BitsStored
    high_bits = rng.choice(["clean", "zero", "garbage"]) if stored < allocated else "clean"
    if high_bits == "zero":
        unsigned &= span - 1
    elif high_bits == "garbage":
        unsigned = (unsigned & (span - 1)) | (rng.integers(0, 1 << allocated, shape, dtype=np.int64) & ~(span - 1))
    return unsigned.astype(f"u{allocated // 8}")


def lut_item(rng: np.random.Generator, first: int, entries: int, depth: int) -> Dataset:
    """Return a LUT Sequence item: ``entries`` random increasing values of ``depth`` bits mapped from ``first``."""
    item = Dataset()
    data = np.sort(rng.integers(0, 1 << depth, entries)).tolist()
    item.LUTDescriptor = [entries % (1 << 16), first, depth]
    item.LUTData = data
    return item


def random_case(seed: int) -> tuple[Dataset, int | None, int]:
    """Return a random data set, max_side and band size, from ``seed``."""
    rng = np.random.default_rng([SEED, seed])
    allocated = int(rng.choice([8, 16, 16, 16, 32]))
    stored = int(rng.integers(max(1, allocated - 8), allocated + 1)) if allocated != 32 else int(rng.choice([12, 24]))
    signed = int(rng.integers(0, 2))
    syntax = NATIVE[int(rng.choice([0, 0, 0, 1, 2, 3]))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    attrs: dict[str, Any] = {"PhotometricInterpretation": str(rng.choice(["MONOCHROME1", "MONOCHROME2"]))}
    modality = rng.choice(["none", "rescale", "rescale", "lut", "bad"])
    if modality == "rescale":
        attrs["RescaleSlope"] = float(rng.choice([1, 0.5, 2.5, -1, 1e-3, 3.7e5]))
        attrs["RescaleIntercept"] = float(rng.choice([0, 1000, -1024.3, 7]))
    elif modality == "lut":
        first = int(rng.choice([0, 0, -100, 5]))
        attrs["ModalityLUTSequence"] = [lut_item(rng, first, int(rng.choice([256, 4096, 65536])), 16)]
    voi = rng.choice(["none", "window", "window", "window", "lut"])
    if voi == "window":
        span = 1 << stored
        centers = [float(rng.normal(span / 2, span / 3)), 10.0]
        widths = [float(rng.choice([0.5, 1, 2, span / 7, span, 3 * span, -5, float("nan")])), 20.0]
        attrs["WindowCenter"], attrs["WindowWidth"] = centers[: int(rng.integers(1, 3))], widths[:2]
        function = FUNCTIONS[int(rng.integers(len(FUNCTIONS)))]
        if function:
            attrs["VOILUTFunction"] = function
    elif voi == "lut":
        attrs["VOILUTSequence"] = [lut_item(rng, int(rng.choice([0, -50, 300])), 4096, int(rng.choice([8, 16])))]
    ds = header(*shape, syntax, allocated, stored, signed, **attrs)
    if modality == "bad":  # as read from a file: undecoded bytes, however wrong
        for tag, texts in ((0x00281053, [b"0", b"nan", b"1", b"abc"]), (0x00281052, [b"0", b"", b"x"])):
            text = texts[int(rng.integers(len(texts)))]
            ds[tag] = RawDataElement(Tag(tag), "DS", len(text), text, 0, True, True)
    order: Literal["<", ">"] = ">" if syntax == ExplicitVRBigEndian else "<"
    data = words(rng, shape, allocated, stored, signed)
    ds.PixelData = data.astype(data.dtype.newbyteorder(order)).tobytes()
    if len(ds.PixelData) % 2:
        ds.PixelData += b"\0"
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    max_side = MAX_SIDES[int(rng.integers(len(MAX_SIDES)))]
    return ds, max_side, BAND_PIXELS[int(rng.integers(len(BAND_PIXELS)))]


@pytest.mark.parametrize("seed", range(CASES))
def test_random_header_decodes_to_the_same_bits(seed: int) -> None:
    """A random header and its Pixel Data decode to the same result (or the same error) as before."""
    assert_same(*random_case(seed))


@pytest.mark.slow  # decodes all the random cases again (10 s): a check of the draw, not of the decoder
def test_random_cases_cover_success_failure_and_each_voi() -> None:
    """The draw decodes most cases, through each kind of VOI, and fails some."""
    results = [outcome(pixels.decode, *random_case(seed)[:2])[0] for seed in range(CASES)]
    decoded = [r for r in results if len(r) > 2]
    assert CASES // 2 < len(decoded) < CASES
    assert {r[9] for r in decoded} == {"lut", "window", "none"}


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT"])
@pytest.mark.parametrize("edge", ["low", "high"])
@pytest.mark.parametrize("nudge", [0.0, 1e-4, -1e-4, 0.25, -0.25, 1.0, -1.0])
def test_window_edge_at_the_data_range_decodes_to_the_same_bits(function: str, edge: str, nudge: float) -> None:
    """A linear window whose lower or upper edge falls on, just inside or just outside the lowest or highest
    value: whether values reach 0 or 1, or stay inside, the result is the same."""
    stored = np.repeat(np.linspace(100, 4000, 64).round().astype(np.uint16)[:, None], 33, axis=1)
    width = 4001.0  # wider than the values: one edge near them, the other beyond
    half = (width - 1) / 2 + 0.5 if function == "LINEAR" else width / 2  # center - half is the lower edge
    center = (100 + half if edge == "low" else 4000 - half) + nudge
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        ds = header(64, 33, ExplicitVRLittleEndian, 16, 12, 0, PhotometricInterpretation=photometric)
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
        ds.PixelData = stored.astype("<u2").tobytes()
        assert len(assert_same(ds, None)) > 2


@pytest.fixture(scope="module")
def rg1(chest_cr: Path) -> Dataset:
    """The real CR chest PA (15 bits stored of 16), read once."""
    return dcmread(chest_cr)


@pytest.mark.parametrize("max_side", [None, 1024, 1023, 700, 256, 1])
def test_real_chest_decodes_to_the_same_bits(rg1: Dataset, max_side: int | None) -> None:
    """RG1, uncompressed, as the worker decodes it."""
    assert len(assert_same(rg1, max_side)) > 2


@pytest.mark.parametrize("name", REAL_FILES)
@pytest.mark.parametrize("max_side", [None, 1024, 100])
def test_real_file_decodes_to_the_same_bits(wg04: Path, name: str, max_side: int | None) -> None:
    """Each WG04/pydicom test file, compressed, big endian, colour and multi-frame ones included."""
    assert_same(dcmread(wg04 / name), max_side)


@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("window", [True, False])
def test_real_chest_with_garbage_high_bits_decodes_to_the_same_bits(rg1: Dataset, signed: int, window: bool) -> None:
    """RG1 with random bits above BitsStored 15 (which pydicom masks, or sign-extends when signed)."""
    ds = copy.deepcopy(rg1)
    stored = np.frombuffer(ds.PixelData, "<u2")
    ds.PixelData = (stored | (np.random.default_rng(signed).integers(0, 2, stored.shape) << 15)).astype("<u2").tobytes()
    ds.PixelRepresentation = signed
    if not window:
        del ds.WindowCenter, ds.WindowWidth
    assert len(assert_same(ds, 1024)) > 2


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_real_chest_written_in_another_native_syntax_decodes_to_the_same_bits(
    rg1: Dataset, tmp_path: Path, syntax: UID
) -> None:
    """RG1 written and read back as implicit VR, deflated or big endian."""
    ds = copy.deepcopy(rg1)
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = syntax
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    dcmwrite(tmp_path / "rg1.dcm", ds, implicit_vr=implicit, little_endian=little, force_encoding=True)
    assert len(assert_same(dcmread(tmp_path / "rg1.dcm"), 1024)) > 2


def test_deferred_pixel_data_decodes_to_the_same_bits(chest_cr: Path) -> None:
    """Pixel Data left in the file by dcmread (defer_size) is read when decoded, as before."""
    ds = dcmread(chest_cr, defer_size=1024)
    assert len(assert_same(ds, 1024)) > 2


@pytest.mark.parametrize("wrap", [io.BytesIO, lambda b: io.BufferedReader(io.BytesIO(b))])
def test_buffered_pixel_data_decodes_to_the_same_bits(rg1: Dataset, wrap: Callable[[bytes], Any]) -> None:
    """Pixel Data given as a binary stream (pydicom 3's buffered values) decodes as before."""

    def make() -> Dataset:
        ds = copy.deepcopy(rg1)
        ds["PixelData"] = DataElement(0x7FE00010, "OW", wrap(rg1.PixelData))
        return ds

    assert len(assert_same(make, 1024)) > 2


@pytest.mark.parametrize(
    ("change", "decodes"),
    [
        (lambda data: data + b"\0", True),  # an odd length: pydicom warns and reads the frame
        (lambda data: data + b"\0\0\0\0", True),  # excess padding: the same
        (lambda data: data[:-2], False),  # short: pydicom's error
        (lambda data: data[:-1], False),
        (lambda data: b"", False),
    ],
)
def test_pixel_data_length_is_handled_as_before(change: Callable[[bytes], bytes], decodes: bool) -> None:
    """Pixel Data longer or shorter than the frame gives the same result or error as before."""
    ds = header(7, 9, ExplicitVRLittleEndian, 16, 12, 0)
    ds.PixelData = change(np.arange(63, dtype="<u2").tobytes())
    ds["PixelData"].VR = "OW"
    assert (len(assert_same(ds, None)) > 2) == decodes


@pytest.mark.parametrize("padded", [True, False])
def test_odd_length_8_bit_pixel_data_decodes_to_the_same_bits(padded: bool) -> None:
    """7 x 9 8-bit pixels (63 bytes), with and without the padding byte DICOM requires."""
    ds = header(7, 9, ExplicitVRLittleEndian, 8, 7, 1)
    ds.PixelData = np.arange(63, dtype=np.uint8).tobytes() + (b"\0" if padded else b"")
    assert len(assert_same(ds, 4)) > 2


@pytest.mark.parametrize(
    "edit",
    [
        lambda ds: setattr(ds, "BitsStored", 17),
        lambda ds: setattr(ds, "BitsStored", 0),
        lambda ds: setattr(ds, "BitsAllocated", 12),
        lambda ds: setattr(ds, "BitsAllocated", 24),
        lambda ds: setattr(ds, "PixelRepresentation", 2),
        lambda ds: setattr(ds, "FloatPixelData", b"\0" * 4 * 63),
        lambda ds: delattr(ds, "BitsStored"),
        lambda ds: delattr(ds.file_meta, "TransferSyntaxUID"),
        lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", RLELossless),
        lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4"),
        lambda ds: setattr(ds, "ModalityLUTSequence", [Dataset()]),
    ],
)
def test_broken_header_fails_as_before(edit: Callable[[Dataset], None]) -> None:
    """A header pydicom or decode refuses raises the same error as before."""
    ds = header(7, 9, ExplicitVRLittleEndian, 16, 12, 0)
    ds.PixelData = (np.arange(63, dtype="<u2") | 0xF000).tobytes()
    edit(ds)
    assert len(assert_same(ds, None)) == 2


def test_uncompressed_frame_is_read_in_place(rg1: Dataset) -> None:
    """Decoding RG1 to 1024 allocates less than its 7 MB frame: the stored values are not copied."""
    ds = copy.deepcopy(rg1)
    tracemalloc.start()
    try:
        pixels.decode(ds, max_side=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1955 * 1841 * 2, f"peak {peak / 2**20:.1f} MiB"
