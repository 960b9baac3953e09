"""The pixel decoding as it was before the CPU cut of :func:`cxr_node.dicom.pixels.decode` (test code only).

Kept verbatim (bar this docstring, and one later fix applied to both: the Modality LUT Sequence applied to int64
stored values, so a negative first mapped value on unsigned pixels no longer overflows) so the tests can check,
bit for bit, that the faster decode gives the same :class:`~cxr_node.dicom.pixels.DecodedImage` and raises the
same errors: pydicom's whole-frame decode (with its masking of the bits above BitsStored), a range scan of the
stored values, then the presentation transform and block mean band by band.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array

from cxr_node.errors import PixelDecodeError

GRAYSCALE: Final = ("MONOCHROME1", "MONOCHROME2")
SPACING_RANGE_MM: Final = (0.01, 10.0)
"""Plausible pixel spacings (radiographs are about 0.1-0.2 mm); a value outside is a header error."""
BAND_PIXELS: Final = 1 << 18
"""Stored pixels transformed at once: a band's float32 temporaries (1 MiB each) stay in a core's cache through the
several passes of the presentation transform and the block mean (about 1.7x faster than 8 MiB bands)."""
PREFERRED_DECODERS: Final = ("pylibjpeg", "pillow")
"""pydicom plugins tried first, in this order, where installed for a transfer syntax: on the JPEG 2000 chest CRs of
bench/cost.py pylibjpeg-openjpeg (the node's dependency) and Pillow take the least CPU; GDCM, which pydicom tries
first when it is installed, decodes with two threads in less wall time but 20-75 % more CPU, and a busy worker is
short of CPU. All give the same pixels."""
DECODER_FAILURES: Final = (AttributeError, KeyError, NotImplementedError, RuntimeError, TypeError, ValueError)
"""What pydicom and its plugins raise for data they cannot decode (MemoryError is left to propagate)."""
LUT_FAILURES: Final = (*DECODER_FAILURES, IndexError, OverflowError, struct.error)
"""What pydicom raises for a malformed LUT Descriptor or LUT Data."""
MAX_FRAME_BYTES: Final = 256 * 1024 * 1024
"""The largest decoded frame a decoder is asked for by default (a 16-bit 11585 x 11585 image)."""
ITEM_TAG: Final = b"\xfe\xff\x00\xe0"
SEQUENCE_DELIMITER: Final = b"\xfe\xff\xdd\xe0"
JPEG_SOF: Final = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7))
"""JPEG start-of-frame markers (ISO 10918-1 B.1.1.3) and JPEG-LS SOF55 (ISO 14495-1)."""

Voi = Literal["lut", "window", "none"]
Window = tuple[float, float]
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DecodedImage:
    """A greyscale image in presentation values, ready for stage 2, and what was done to get it.

    Attributes
    ----------
    pixels : numpy.ndarray
        (H, W) float32 in ``[0, 1]``, higher is brighter (MONOCHROME1 already inverted).
    original_shape : tuple[int, int]
        (Rows, Columns) of the stored image.
    pixel_spacing_mm : tuple[float, float] | None
        (row, column) spacing of the *original* pixels from PixelSpacing, else ImagerPixelSpacing; None when
        absent or invalid. The spacing of :attr:`pixels` is this divided by :attr:`scale`.
    photometric : str
        The original PhotometricInterpretation.
    bits_stored : int
        The original BitsStored.
    window : tuple[float, float] | None
        (center, width) of the window applied, in Modality LUT output units; None when none was.
    scale : float
        Size of :attr:`pixels` over the original size (1.0, or 1/k after a k x k block mean).
    voi : {"lut", "window", "none"}
        Which VOI transformation was applied: the VOI LUT Sequence, a window, or the data range.
    """

    pixels: np.ndarray
    original_shape: tuple[int, int]
    pixel_spacing_mm: tuple[float, float] | None
    photometric: str
    bits_stored: int
    window: Window | None
    scale: float
    voi: Voi


def decode(ds: Dataset, max_side: int | None = None, max_frame_bytes: int = MAX_FRAME_BYTES) -> DecodedImage:
    """Decode the single greyscale frame of ``ds`` into presentation values in ``[0, 1]``.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A data set with a ``file_meta`` Transfer Syntax UID and single-frame MONOCHROME1/2 Pixel Data.
    max_side : int, optional
        When given, the image is reduced by the smallest integer block mean (area average) that makes its
        longer side at most ``max_side``; the reduction is done band by band before any full-size float array.
    max_frame_bytes : int, optional
        The largest decoded frame the header may describe; larger is refused before any decoder runs.

    Returns
    -------
    DecodedImage
        The (H, W) float32 pixels and what was applied.

    Raises
    ------
    PixelDecodeError
        No pixel data, colour, several frames, a frame over ``max_frame_bytes``, offset tables, fragments or a
        codestream that contradict the header, no decoder for the transfer syntax, corrupt data, or an invalid
        Modality LUT; the message says which in one line.
    ValueError
        ``max_side`` is not a positive integer.
    """
    _check_max_side(max_side)
    photometric = _check_header(ds)
    _check_allocation(ds, max_frame_bytes)
    stored = _stored_values(ds)
    factor = block_factor(stored.shape, max_side)
    transform, window, voi = _presentation(ds, stored, invert=photometric == "MONOCHROME1")
    return DecodedImage(
        pixels=_reduce_in_bands(stored, factor, transform),
        original_shape=(int(stored.shape[0]), int(stored.shape[1])),
        pixel_spacing_mm=pixel_spacing_mm(ds),
        photometric=photometric,
        bits_stored=int(ds.BitsStored),
        window=window,
        scale=1.0 / factor,
        voi=voi,
    )


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """Return (row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None if neither is valid.

    A value is valid when it has two finite numbers inside :data:`SPACING_RANGE_MM` (so ``0\\0`` is not).
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _valid_spacing(_header_numbers(ds, keyword))
        if spacing is not None:
            return spacing
    return None


def block_factor(shape: tuple[int, ...], max_side: int | None) -> int:
    """Return the smallest integer k such that ``ceil(side / k) <= max_side`` for both sides (1 without limit)."""
    if max_side is None:
        return 1
    return max(1, math.ceil(max(shape) / max_side))


def block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """Average ``arr`` (H, W) float32 over ``factor`` x ``factor`` blocks; edge blocks average what they hold.

    Returns a (ceil(H / factor), ceil(W / factor)) float32 array. Strided adds, not reshapes: several times
    faster for small factors. The first row (column) of each block starts the sum instead of a zeroed array, and
    each part of the grid is divided by its own count (full blocks, the last row, the last column, the corner):
    the same sums and quotients as adding to zeros and dividing by a full-size table of counts, in fewer passes.
    """
    if factor == 1:
        return arr
    rows, cols = arr.shape
    row_sums = np.array(arr[::factor], dtype=np.float32)
    for offset in range(1, factor):
        part = arr[offset::factor]
        row_sums[: part.shape[0]] += part
    sums = np.array(row_sums[:, ::factor], dtype=np.float32)
    for offset in range(1, factor):
        part = row_sums[:, offset::factor]
        sums[:, : part.shape[1]] += part
    full_rows, last_rows = divmod(rows, factor)
    full_cols, last_cols = divmod(cols, factor)
    sums[:full_rows, :full_cols] /= np.float32(factor * factor)
    if last_cols:
        sums[:full_rows, full_cols:] /= np.float32(factor * last_cols)
    if last_rows:
        sums[full_rows:, :full_cols] /= np.float32(last_rows * factor)
    if last_rows and last_cols:
        sums[full_rows:, full_cols:] /= np.float32(last_rows * last_cols)
    return sums


def _check_max_side(max_side: int | None) -> None:
    """Raise ValueError unless ``max_side`` is None or a positive int."""
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive int or None; found {max_side!r}")


def _check_header(ds: Dataset) -> str:
    """Return the PhotometricInterpretation after checking the header describes one greyscale frame."""
    if "PixelData" not in ds:
        raise PixelDecodeError("no Pixel Data (7FE0,0010) in the data set")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in GRAYSCALE:
        raise PixelDecodeError(f"PhotometricInterpretation {photometric!r} is not greyscale (MONOCHROME1/2)")
    samples = _header_int(ds, "SamplesPerPixel", default=1)
    if samples != 1:
        raise PixelDecodeError(f"SamplesPerPixel is {samples}; a greyscale image has 1")
    frames = _header_int(ds, "NumberOfFrames", default=1)
    if frames != 1:
        raise PixelDecodeError(f"NumberOfFrames is {frames}; only single-frame images are decoded")
    _header_int(ds, "BitsStored")
    return photometric


def _check_allocation(ds: Dataset, max_frame_bytes: int) -> None:
    """Raise PixelDecodeError when decoding ``ds`` would allocate beyond what its header and the bound allow."""
    rows, columns = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    samples, bits = _header_int(ds, "SamplesPerPixel", default=1), _header_int(ds, "BitsAllocated")
    if min(rows, columns, bits) < 1:
        raise PixelDecodeError(f"Rows {rows}, Columns {columns}, BitsAllocated {bits}: not an image")
    size = rows * columns * samples * -(-bits // 8)
    if size > max_frame_bytes:
        raise PixelDecodeError(
            f"decoded frame of {rows} x {columns} x {samples} x {bits} bits is {size / 2**20:.0f} MB,"
            f" over the {max_frame_bytes / 2**20:.0f} MB bound"
        )
    syntax = ds.get("file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is not None and syntax.is_transfer_syntax and syntax.is_encapsulated:
        try:
            _check_encapsulated(ds, (rows, columns, samples))
        except ValueError as e:
            raise PixelDecodeError(f"pixel data not decodable ({syntax.name}): {e}") from e


def _check_encapsulated(ds: Dataset, shape: tuple[int, int, int]) -> None:
    """Raise ValueError when the offset tables, fragments or first codestream's size contradict the header."""
    frames = _header_int(ds, "NumberOfFrames", default=1)
    value = ds.PixelData
    data = memoryview(value if isinstance(value, bytes | bytearray) else b"")
    offsets, fragments, first = _encapsulated_items(data)
    if offsets not in (0, frames):
        raise ValueError(f"Basic Offset Table has {offsets} entries for {frames} frame(s)")
    extended = ds.get("ExtendedOffsetTable")
    if extended is not None and len(extended) // 8 != frames:
        raise ValueError(f"Extended Offset Table has {len(extended) // 8} entries for {frames} frame(s)")
    if fragments < frames:
        raise ValueError(f"{fragments} fragment(s) of compressed pixel data for {frames} frame(s)")
    found = _codestream_shape(first)
    if found is not None and found != shape:
        raise ValueError(
            f"codestream is {found[0]} x {found[1]} x {found[2]}, the header says {shape[0]} x {shape[1]} x {shape[2]}"
        )


def _encapsulated_items(data: memoryview) -> tuple[int, int, memoryview]:
    """(Basic Offset Table entries, fragments, first fragment) of encapsulated Pixel Data (PS3.5 A.4)."""
    at, offsets, fragments, first = 0, -1, 0, memoryview(b"")
    while at + 8 <= len(data) and bytes(data[at : at + 4]) != SEQUENCE_DELIMITER:
        if bytes(data[at : at + 4]) != ITEM_TAG:
            raise ValueError(f"encapsulated Pixel Data has no item at byte {at}")
        length = int.from_bytes(data[at + 4 : at + 8], "little")
        if at + 8 + length > len(data):
            raise ValueError(f"encapsulated Pixel Data item at byte {at} runs past the end")
        if offsets < 0:
            offsets = length // 4
        else:
            first = data[at + 8 : at + 8 + length] if not fragments else first
            fragments += 1
        at += 8 + length
    if offsets < 0:
        raise ValueError("encapsulated Pixel Data has no Basic Offset Table item")
    return offsets, fragments, first


def _codestream_shape(data: memoryview) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG, JPEG-LS, JPEG 2000 or JP2 codestream declares; None for others."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\x4f\xff\x51") and len(data) >= 42:
        width = int.from_bytes(data[8:12], "big") - int.from_bytes(data[16:20], "big")
        height = int.from_bytes(data[12:16], "big") - int.from_bytes(data[20:24], "big")
        return height, width, int.from_bytes(data[40:42], "big")
    if head == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return _codestream_shape(_jp2_codestream(data))
    if head.startswith(b"\xff\xd8"):
        return _jpeg_shape(data)
    return None


def _jp2_codestream(data: memoryview) -> memoryview:
    """The contents of the first 'jp2c' box of a JP2 file (ISO 15444-1 I.4), empty when there is none."""
    at = 0
    while at + 8 <= len(data):
        length, kind, header = int.from_bytes(data[at : at + 4], "big"), bytes(data[at + 4 : at + 8]), 8
        if length == 1 and at + 16 <= len(data):
            length, header = int.from_bytes(data[at + 8 : at + 16], "big"), 16
        if kind == b"jp2c":
            return data[at + header : at + length] if length else data[at + header :]
        if length < header:
            break
        at += length
    return memoryview(b"")


def _jpeg_shape(data: memoryview) -> tuple[int, int, int] | None:
    """(lines, samples per line, components) of the first SOF segment before the first scan; None without one."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length: TEM, RSTn, SOI
            at += 2
            continue
        if marker in JPEG_SOF and at + 10 <= len(data):
            height, width = int.from_bytes(data[at + 5 : at + 7], "big"), int.from_bytes(data[at + 7 : at + 9], "big")
            return height, width, data[at + 9]
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def _header_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """Return an integer header value, ``default`` when absent; PixelDecodeError when unreadable or missing."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise PixelDecodeError(f"{keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise PixelDecodeError(f"{keyword} {value!r} is not an integer") from e


def _stored_values(ds: Dataset) -> np.ndarray:
    """Return the (Rows, Columns) stored values, decoded without caching them on ``ds``."""
    syntax = ds.get("file_meta", Dataset()).get("TransferSyntaxUID", "no transfer syntax")
    try:
        arr = _decoded(ds, syntax)
    except DECODER_FAILURES as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PixelDecodeError(f"pixel data not decodable ({getattr(syntax, 'name', syntax)}): {reason}") from e
    if arr.ndim != 2 or arr.dtype.kind not in "iub":
        raise PixelDecodeError(f"decoded pixels are {arr.dtype} with shape {arr.shape}; expected integer (H, W)")
    return arr


def _decoded(ds: Dataset, syntax: object) -> np.ndarray:
    """Decode with the least-CPU plugin installed for the transfer syntax (:data:`PREFERRED_DECODERS`), then, if
    that one fails, with each other plugin in pydicom's own order."""
    try:
        available = get_decoder(str(syntax)).available_plugins
    except (NotImplementedError, ValueError):  # no decoder for this syntax: pydicom says why
        available = ()
    preferred = next((name for name in PREFERRED_DECODERS if name in available), "")
    if preferred:
        try:
            return pixel_array(ds, decoding_plugin=preferred)
        except DECODER_FAILURES:
            pass
    return pixel_array(ds)


def _presentation(ds: Dataset, stored: np.ndarray, *, invert: bool) -> tuple[Transform, Window | None, Voi]:
    """Return the stored-values → ``[0, 1]`` presentation transform, the window applied and the VOI kind."""
    modality = _modality_transform(ds)
    low, high = _modality_range(ds, stored, modality)
    to_unit, window, voi = _voi_transform(ds, low, high)

    def transform(band: np.ndarray) -> np.ndarray:
        out = np.asarray(to_unit(modality(band)), dtype=np.float32)
        if invert:
            np.subtract(np.float32(1.0), out, out=out)
        return out

    return transform, window, voi


def _modality_transform(ds: Dataset) -> Transform:
    """Return the Modality LUT as a function of stored values: the LUT Sequence, a rescale, or the identity.

    The LUT Sequence goes through pydicom; a rescale is done here in float32 (pydicom's is float64, twice the
    memory and time), after checking the slope is a finite non-zero number.
    """
    if ds.get("ModalityLUTSequence"):
        return lambda band: apply_modality_lut(band.astype(np.int64), ds)
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        return lambda band: band
    slope, intercept = _header_number(ds, "RescaleSlope"), _header_number(ds, "RescaleIntercept")
    if slope is None or slope == 0 or intercept is None:
        found = f"{ds.get('RescaleSlope')!r}/{ds.get('RescaleIntercept')!r}"
        raise PixelDecodeError(f"RescaleSlope/RescaleIntercept {found} are not a finite non-zero slope and offset")
    return lambda band: _f32(band) * np.float32(slope) + np.float32(intercept)


def _modality_range(ds: Dataset, stored: np.ndarray, modality: Transform) -> tuple[float, float]:
    """Return the lowest and highest Modality LUT output over the stored values present."""
    lowest, highest = int(stored.min()), int(stored.max())
    try:
        probe = _lut_probe(ds.ModalityLUTSequence[0], lowest, highest) if ds.get("ModalityLUTSequence") else None
        values = modality(np.array([lowest, highest]) if probe is None else probe)
    except LUT_FAILURES as e:
        raise PixelDecodeError(f"Modality LUT Sequence cannot be applied: {e}") from e
    return float(np.min(values)), float(np.max(values))


def _lut_probe(item: Dataset, lowest: int, highest: int) -> np.ndarray:
    """Return every input in ``[lowest, highest]`` a LUT maps distinctly: its ends and the table's entries."""
    entries, first = _lut_span(item)
    inside = np.arange(max(lowest, first), min(highest, first + entries - 1) + 1)
    return np.concatenate([np.array([lowest, highest]), inside])


def _lut_span(item: Dataset) -> tuple[int, int]:
    """Return (number of entries, first value mapped) of a LUT Descriptor (0 entries means 65536)."""
    descriptor = [int(v) for v in item.LUTDescriptor]
    return descriptor[0] or 1 << 16, descriptor[1]


def _voi_transform(ds: Dataset, low: float, high: float) -> tuple[Transform, Window | None, Voi]:
    """Return the VOI as a function of modality values into ``[0, 1]``: LUT, else first window, else range."""
    lut = _voi_lut(ds)
    if lut is not None:
        return lut, None, "lut"
    window = _first_window(ds, low, high)
    if window is not None:
        center, width = window
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        return _windowing(center, width, function), window, "window"
    return _linear(low, high), None, "none"


def _voi_lut(ds: Dataset) -> Transform | None:
    """Return the first VOI LUT Sequence item scaled to its own output range, or None if absent or unusable."""
    items = ds.get("VOILUTSequence")
    if not items or "LUTDescriptor" not in items[0] or "LUTData" not in items[0]:
        return None
    try:
        entries, first = _lut_span(items[0])
        table = apply_voi(np.arange(first, first + entries), ds).astype(np.float64)
    except LUT_FAILURES:
        return None
    low, high = float(table.min()), float(table.max())
    scale = np.float32(1.0 / (high - low) if high > low else 0.0)

    def lookup(values: np.ndarray) -> np.ndarray:
        inputs = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)  # pydicom wraps beyond
        return (apply_voi(inputs, ds).astype(np.float32) - np.float32(low)) * scale

    return lookup


def _first_window(ds: Dataset, low: float, high: float) -> Window | None:
    """Return the first (center, width) if usable: finite, width > 0 (>= 1 for LINEAR), overlapping the data."""
    centers, widths = _header_numbers(ds, "WindowCenter"), _header_numbers(ds, "WindowWidth")
    if not centers or not widths or not all(map(math.isfinite, (centers[0], widths[0]))):
        return None
    center, width = centers[0], widths[0]
    linear = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() not in ("LINEAR_EXACT", "SIGMOID")
    if (width < 1.0) if linear else (width <= 0.0):
        return None
    if center + width / 2 < low or center - width / 2 > high:
        return None
    return center, width


def _windowing(center: float, width: float, function: str) -> Transform:
    """Return the window of PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.1 (SIGMOID), C.11.2.1.3.2 (LINEAR_EXACT)."""
    if function == "SIGMOID":
        return lambda x: _sigmoid(_f32(x), center, width)
    if function != "LINEAR_EXACT":  # LINEAR, the default, also for an unknown function
        center, width = center - 0.5, width - 1.0
        if width == 0:
            return lambda x: (_f32(x) > np.float32(center)).astype(np.float32)
    offset, gain = np.float32(0.5 - center / width), np.float32(1.0 / width)

    def linear(x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32)  # one new array, then in place: the same values, fewer passes
        out *= gain
        out += offset
        return np.clip(out, 0.0, 1.0, out=out)

    return linear


def _sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Return ``1 / (1 + exp(-4 (x - center) / width))`` in float32; far tails saturate to 0 and 1."""
    with np.errstate(over="ignore"):
        result: np.ndarray = np.float32(1.0) / (
            np.float32(1.0) + np.exp(np.float32(-4.0 / width) * (x - np.float32(center)))
        )
        return result


def _linear(low: float, high: float) -> Transform:
    """Return the map of ``[low, high]`` onto ``[0, 1]`` (all zeros for a constant image)."""
    gain = np.float32(1.0 / (high - low)) if high > low else np.float32(0.0)
    return lambda x: (_f32(x) - np.float32(low)) * gain


def _f32(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as float32 (a copy unless it already is)."""
    return np.asarray(x, dtype=np.float32)


def _reduce_in_bands(stored: np.ndarray, factor: int, transform: Transform) -> np.ndarray:
    """Apply ``transform`` band by band and block-mean each band by ``factor`` into one float32 array."""
    rows, cols = stored.shape
    out = np.empty((-(-rows // factor), -(-cols // factor)), dtype=np.float32)
    step = factor * max(1, BAND_PIXELS // (cols * factor))
    for start in range(0, rows, step):
        reduced = block_mean(transform(stored[start : start + step]), factor)
        out[start // factor : start // factor + reduced.shape[0]] = reduced
    return out


def _header_numbers(ds: Dataset, keyword: str) -> list[float]:
    """Return a numeric (DS/IS, VM 1-n) header value as floats; empty when absent or not all numbers."""
    value: Any = ds.get(keyword)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value is None or value == "":
        return []
    items = value.split("\\") if isinstance(value, str) else list(value) if isinstance(value, Iterable) else [value]
    try:
        return [float(item) for item in items]
    except (TypeError, ValueError):
        return []


def _header_number(ds: Dataset, keyword: str) -> float | None:
    """Return the first value of a numeric header element if it is a finite number, else None."""
    numbers = _header_numbers(ds, keyword)
    return numbers[0] if numbers and math.isfinite(numbers[0]) else None


def _valid_spacing(numbers: list[float]) -> tuple[float, float] | None:
    """Return two spacings if both are finite and plausible, else None."""
    low, high = SPACING_RANGE_MM
    if len(numbers) != 2 or not all(math.isfinite(v) and low <= v <= high for v in numbers):
        return None
    return numbers[0], numbers[1]
