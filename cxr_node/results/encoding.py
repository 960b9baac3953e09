"""A fast Explicit VR Little Endian writer for the outputs, byte for byte what pydicom's ``dcmwrite`` writes.

pydicom's writer costs about 25 µs per element (a buffer per element, the character set converted per
element, ambiguous VRs resolved over the whole tree); an SR of a few hundred content items spent more time
being written than being built. :func:`write_explicit_le` walks the data set once and joins the bytes,
following pydicom 3.0's writer rule for rule (padding, multi-values, number strings, character sets,
defined-length items, sequences). Whatever it does not cover — raw (undecoded) elements, ambiguous or
rare VRs, buffered values, values too long for their length field — makes it return None, and the caller
writes with pydicom instead. ``tests/dicom/test_encoding.py`` checks it against ``dcmwrite`` on every output
kind.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable, Sequence
from functools import cache
from typing import Final

from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

PREAMBLE: Final = b"\x00" * 128
_STRING_VRS: Final = frozenset({"AE", "AS", "CS", "UR"})
_TEXT_VRS: Final = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OW", "OV"})
_NUMBERS: Final = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_LONG_LENGTH: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
_LUT_DESCRIPTORS: Final = frozenset({0x00283002, 0x00281101, 0x00281102, 0x00281103})
_PIXEL_DATA: Final = 0x7FE00010
_CHARSET: Final = BaseTag(0x00080005)
_ITEM: Final = b"\xfe\xff\x00\xe0"
_SEQUENCE_END: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_END: Final = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_TAG_HEAD: Final = struct.Struct("<HH2sH")
_LONG_HEAD: Final = struct.Struct("<HH2sHL")


class Unsupported(Exception):
    """Something the fast writer does not cover; the caller writes with pydicom."""


def write_explicit_le(dataset: Dataset) -> bytes | None:
    """Return the Part 10 bytes pydicom's ``dcmwrite(..., enforce_file_format=True)`` writes for ``dataset``
    (Explicit VR Little Endian), or None when the data set holds something this writer does not cover.

    Raises
    ------
    ValueError
        As ``dcmwrite``: invalid File Meta Information or preamble, or a text its character set cannot encode
        (under pydicom's writing validation mode).
    """
    preamble = getattr(dataset, "preamble", None) or PREAMBLE
    if len(preamble) != len(PREAMBLE):
        raise ValueError("'Dataset.preamble' must be 128-bytes long")
    meta = _file_meta(dataset)
    parts: list[bytes] = [preamble, b"DICM", meta]
    try:
        _write_dataset(dataset, _encodings((default_encoding,)), parts)
    except Unsupported:
        return None
    return b"".join(parts)


def _file_meta(dataset: Dataset) -> bytes:
    """The File Meta Information group, completed and validated as ``dcmwrite`` does it."""
    original = getattr(dataset, "file_meta", None)
    meta = FileMetaDataset()
    for element in original or ():
        meta.add(DataElement(element.tag, element.VR, element.value))
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        current, own = meta.get(meta_keyword), dataset.get(keyword)
        if current is None or (own and own != current):
            setattr(meta, meta_keyword, own)
    validate_file_meta(meta, enforce_standard=True)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@cache
def _encodings(charset: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(convert_encodings(list(charset)))


def _write_dataset(dataset: Dataset, parent: tuple[str, ...], parts: list[bytes]) -> None:
    charset_element = dataset.get_item(_CHARSET)
    if charset_element is not None and not isinstance(charset_element, DataElement):
        raise Unsupported("raw Specific Character Set")
    charset = None if charset_element is None else charset_element.value
    encodings = parent if charset is None else _encodings((charset,) if isinstance(charset, str) else tuple(charset))
    for tag in sorted(dataset.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # group lengths are not written (PS3.5 7.2)
        element = dataset.get_item(tag)
        if not isinstance(element, DataElement) or element.is_buffered:
            raise Unsupported(f"{tag}: raw or buffered element")
        _write_element(element, _resolved_vr(element, dataset), encodings, parts)


def _resolved_vr(element: DataElement, dataset: Dataset) -> str:
    """The element's VR; for native Pixel Data of VR 'OB or OW', the one pydicom's writer picks (PS3.5 A.2)."""
    vr = str(element.VR)
    if vr != "OB or OW" or element.tag != _PIXEL_DATA:
        return vr
    if dataset.original_encoding[0]:
        return "OW"
    return "OW" if int(dataset.BitsAllocated) > 8 else "OB"


def _write_element(element: DataElement, vr: str, encodings: tuple[str, ...], parts: list[bytes]) -> None:
    tag = element.tag
    if vr == "SQ":
        _write_sequence(element, encodings, parts)
        return
    if element.is_undefined_length and tag != _PIXEL_DATA:
        raise Unsupported(f"{tag}: undefined length")
    value = b"" if _is_empty(element.value) else _value_bytes(vr, element, encodings)
    if vr in _LONG_LENGTH:
        parts.append(_LONG_HEAD.pack(tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)))
    elif len(value) > 0xFFFF:
        raise Unsupported(f"{tag}: value too long for a 16-bit length")
    else:
        parts.append(_TAG_HEAD.pack(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)))
    parts.append(value)


def _write_sequence(element: DataElement, encodings: tuple[str, ...], parts: list[bytes]) -> None:
    tag = element.tag
    undefined = element.is_undefined_length
    head = len(parts)
    parts.append(b"")  # the header, once the length is known
    for item in element.value or ():
        item_head = len(parts)
        parts.append(b"")
        _write_dataset(item, encodings, parts)
        if getattr(item, "is_undefined_length_sequence_item", False):
            parts[item_head] = _ITEM + b"\xff\xff\xff\xff"
            parts.append(_ITEM_END)
        else:
            parts[item_head] = _ITEM + struct.pack("<L", sum(map(len, parts[item_head + 1 :])))
    length = 0xFFFFFFFF if undefined else sum(map(len, parts[head + 1 :]))
    parts[head] = _LONG_HEAD.pack(tag >> 16, tag & 0xFFFF, b"SQ", 0, length)
    if undefined:
        parts.append(_SEQUENCE_END)


def _is_empty(value: object) -> bool:
    """Whether a (non-sequence, unbuffered) value has no items, as pydicom's ``DataElement.is_empty`` decides."""
    if value is None:
        return True
    if isinstance(value, str | bytes | PersonName):
        return not value
    return hasattr(value, "__iter__") and len(value) == 0  # type: ignore[arg-type]


def _value_bytes(vr: str, element: DataElement, encodings: tuple[str, ...]) -> bytes:
    writer = _WRITERS.get(vr)
    if writer is None:
        raise Unsupported(f"{element.tag}: VR {vr}")
    return writer(element, encodings)


def _is_multi(value: object) -> bool:
    return isinstance(value, MultiValue | list | tuple)


def _padded(text: str, padding: str = " ") -> bytes:
    if len(text) % 2:
        text += padding
    return text.encode(default_encoding)


def _string(element: DataElement, _encodings: Sequence[str], padding: str = " ") -> bytes:
    value = element.value
    return _padded("\\".join(value) if _is_multi(value) else value, padding)


def _uid(element: DataElement, encodings: Sequence[str]) -> bytes:
    return _string(element, encodings, "\0")


def _text(element: DataElement, encodings: Sequence[str]) -> bytes:
    value = element.value
    if _is_multi(value):
        encoded = b"\\".join(v if isinstance(v, bytes) else encode_string(v, list(encodings)) for v in value)
    else:
        encoded = value if isinstance(value, bytes) else encode_string(value, list(encodings))
    return encoded + b" " if len(encoded) % 2 else encoded


def _person_name(element: DataElement, encodings: Sequence[str]) -> bytes:
    value = element.value
    names = list(value) if _is_multi(value) else [value]
    if _is_multi(value) and len(names) == 1:
        raise Unsupported(f"{element.tag}: one person name in a list")
    encoded = b"\\".join(name.encode(list(encodings)) for name in names)
    return encoded + b" " if len(encoded) % 2 else encoded


def _number_string(element: DataElement, _encodings: Sequence[str]) -> bytes:
    value = element.value
    items = value if _is_multi(value) else [value]
    return _padded("\\".join(x.original_string if hasattr(x, "original_string") else str(x) for x in items))


def _formatted(format_one: Callable[[object], str]) -> Callable[[DataElement, Sequence[str]], bytes]:
    def write(element: DataElement, encodings: Sequence[str]) -> bytes:
        value = element.value
        if isinstance(value, str):
            return _string(element, encodings)
        items = value if _is_multi(value) else [value]
        return _padded("\\".join(x if isinstance(x, str) else format_one(x) for x in items))

    return write


def _temporal(
    vr: str, kind: type[datetime.date | datetime.time], whole: str, fractional: str
) -> Callable[[object], str]:
    """The formatter of a DA, TM or DT value as pydicom writes it: the string received, else ``strftime``
    (``fractional`` when the value has microseconds)."""

    def format_value(value: object) -> str:
        if hasattr(value, "original_string"):
            return str(value.original_string)
        if not isinstance(value, datetime.date | datetime.time) or not isinstance(value, kind):
            raise Unsupported(f"{vr} value {type(value).__name__}")
        return value.strftime(fractional if getattr(value, "microsecond", 0) > 0 else whole)

    return format_value


def _numbers(element: DataElement, _encodings: Sequence[str]) -> bytes:
    value = element.value
    if value is None or value == "":
        return b""
    if element.tag in _LUT_DESCRIPTORS:
        raise Unsupported(f"{element.tag}: LUT descriptor")
    code = _NUMBERS[element.VR]
    if hasattr(value, "append"):
        return struct.pack(f"<{len(value)}{code}", *value)
    return struct.pack(f"<{code}", value)


def _tags(element: DataElement, _encodings: Sequence[str]) -> bytes:
    value = element.value
    tags = [Tag(t) for t in value] if _is_multi(value) else [Tag(value)]
    return b"".join(struct.pack("<HH", t.group, t.element) for t in tags)


def _binary(element: DataElement, _encodings: Sequence[str]) -> bytes:
    value = element.value
    if not isinstance(value, bytes):
        raise Unsupported(f"{element.tag}: {type(value).__name__} value")
    return value + b"\x00" if len(value) % 2 else value


def _unknown(element: DataElement, _encodings: Sequence[str]) -> bytes:
    value = element.value
    if not isinstance(value, bytes):
        raise Unsupported(f"{element.tag}: {type(value).__name__} value")
    return value  # pydicom writes UN as it is, unpadded


_WRITERS: Final[dict[str, Callable[[DataElement, Sequence[str]], bytes]]] = {
    **dict.fromkeys(_STRING_VRS, _string),
    **dict.fromkeys(_TEXT_VRS, _text),
    **dict.fromkeys(_BINARY_VRS, _binary),
    **dict.fromkeys(_NUMBERS, _numbers),
    "UI": _uid,
    "AT": _tags,
    "UN": _unknown,
    "PN": _person_name,
    "DS": _number_string,
    "IS": _number_string,
    "DA": _formatted(_temporal("DA", datetime.date, "%Y%m%d", "%Y%m%d")),
    "TM": _formatted(_temporal("TM", datetime.time, "%H%M%S", "%H%M%S.%f")),
    "DT": _formatted(_temporal("DT", datetime.datetime, "%Y%m%d%H%M%S%z", "%Y%m%d%H%M%S.%f%z")),
}
