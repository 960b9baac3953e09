"""A fast Explicit VR Little Endian writer for the outputs, byte for byte what pydicom's ``dcmwrite`` writes.

pydicom's writer costs about 25 µs per element (a buffer per element, the character set converted per
element, ambiguous VRs resolved over the whole tree); an SR of a few hundred content items spent more time
being written than being built. :func:`write_explicit_le` walks the data set once and joins the bytes,
following pydicom 3.0's writer rule for rule (padding, multi-values, number strings, character sets,
defined-length items, sequences). Whatever it does not cover — raw (undecoded) elements, ambiguous or
rare VRs, buffered values, values too long for their length field — makes it return None, and the caller
writes with pydicom instead. ``tests/dicom/test_encoding.py`` checks it against ``dcmwrite`` on every output
kind.

It can show each element to a check before writing it, so the outputs' value validation
(:func:`cxr_node.results.common.encode`) rides on the same walk. The bytes of the node's own vocabulary (code
values, meanings and designators, value types, relationships), the same in every report, are kept across calls;
nothing else outlives a call.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
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
_ONE_TEXT_VRS: Final = _TEXT_VRS | _STRING_VRS | {"UI", "DA", "TM", "DT"}
"""The VRs :func:`_one_text` writes one text of: encoded, or (the others) written as it is, padded."""
VOCABULARY: Final = frozenset(
    {
        0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080105, 0x00080119, 0x00080120,  # codes, mapping resource
        0x0040A010, 0x0040A040, 0x0040A050, 0x0040DB00,  # relationship, value type, continuity, template
    }
)  # fmt: skip
"""The tags of codes and of the structure of SR content items: the node's own vocabulary, never a patient's value,
and the same in every report; what is worked out from them alone may be kept across outputs."""
_BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OW", "OV"})
_NUMBERS: Final = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_LONG_LENGTH: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
_LUT_DESCRIPTORS: Final = frozenset({0x00283002, 0x00281101, 0x00281102, 0x00281103})
_PIXEL_DATA: Final = 0x7FE00010
_GROUP_LENGTH: Final = 0x00020000
_CHARSET: Final = BaseTag(0x00080005)
_ITEM: Final = b"\xfe\xff\x00\xe0"
_SEQUENCE_END: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_END: Final = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<L")


Check = Callable[[DataElement], None]
"""What :func:`write_explicit_le` may call with each element before writing it."""


class Unsupported(Exception):
    """Something the fast writer does not cover; the caller writes with pydicom."""


def write_explicit_le(dataset: Dataset, check: Check | None = None) -> bytes | None:
    """Return the Part 10 bytes pydicom's ``dcmwrite(..., enforce_file_format=True)`` writes for ``dataset``
    (Explicit VR Little Endian), or None when the data set holds something this writer does not cover.

    ``check``, when given, is called with each element of ``dataset`` other than a sequence, just before it is
    written, in the order of ``Dataset.iterall`` (tag order, depth first); what it raises propagates. An element
    whose text value was written before in the call, with the same tag, VR and character set, is not shown again:
    a check of the VR and text alone (:func:`cxr_node.results.common.validate_values`) has passed it already. With
    ``check``, a group length element (never written, and not shown) makes the writer return None.

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
    writer = _Writer([preamble, b"DICM", meta], check)
    try:
        writer.dataset(dataset, _encodings((default_encoding,)))
    except Unsupported:
        return None
    return b"".join(writer.parts)


def _file_meta(dataset: Dataset) -> bytes:
    """The File Meta Information group, completed and validated as ``dcmwrite`` does it."""
    original = getattr(dataset, "file_meta", None)
    meta = FileMetaDataset()
    for element in original or ():
        meta.add(_meta_copy(element))
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        current, own = meta.get(meta_keyword), dataset.get(keyword)
        if current is None or (own and own != current):
            setattr(meta, meta_keyword, own)
    validate_file_meta(meta, enforce_standard=True)
    meta.pop(_GROUP_LENGTH, None)  # written first, with the length of what follows
    writer = _Writer([])
    try:
        length = writer.dataset(meta, _encodings((default_encoding,)))
    except Unsupported:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_file_meta_info(buffer, meta, enforce_standard=True)
        return buffer.getvalue()
    return b"".join([_head(_GROUP_LENGTH, "UL"), _U16.pack(4), _U32.pack(length), *writer.parts])


def _meta_copy(element: DataElement) -> DataElement:
    """A new element with ``element``'s tag, VR and value, for the completed File Meta Information: its attributes
    copied when the value is a text or bytes (it cannot change, and is already what the element's conversion makes
    of it), else made anew from the value."""
    value = element.value
    if type(element) is not DataElement or not isinstance(value, str | bytes):
        return DataElement(element.tag, element.VR, value)
    copied = DataElement.__new__(DataElement)
    copied.__dict__.update(element.__dict__)
    return copied


@cache
def _encodings(charset: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(convert_encodings(list(charset)))


@lru_cache(maxsize=4096)
def _head(tag: int, vr: str) -> bytes:
    """The element's tag and VR as written (its length follows: 2 bytes, or 2 reserved and 4 for a long VR)."""
    return struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode()) + (b"\0\0" if vr in _LONG_LENGTH else b"")


class _Writer:
    """One data set's bytes, collected in ``parts``. The bytes of an element with a text value depend on its tag, VR,
    text and character set alone: they are kept for the rest of the call (an SR repeats its code values, meanings,
    designators and relationships many times), never beyond it. ``check``, when given, sees each element before it
    is written (:func:`write_explicit_le`)."""

    def __init__(self, parts: list[bytes], check: Check | None = None) -> None:
        self.parts = parts
        self.check = check
        self.texts: dict[tuple[int, str, str, tuple[str, ...]], bytes] = {}

    def dataset(self, dataset: Dataset, parent: tuple[str, ...]) -> int:
        """Append the elements of ``dataset`` in tag order; return the number of bytes appended."""
        elements = dataset._dict
        charset_element = elements.get(_CHARSET)
        if charset_element is not None and not isinstance(charset_element, DataElement):
            raise Unsupported("raw Specific Character Set")
        charset = None if charset_element is None else charset_element.value
        encodings = (
            parent if charset is None else _encodings((charset,) if isinstance(charset, str) else tuple(charset))
        )
        texts, check, append = self.texts, self.check, self.parts.append
        written = 0
        for tag in sorted(elements, key=int):
            element = elements[tag]
            if not tag & 0xFFFF and tag > 0x6FFFF:
                if check is not None:  # not written (PS3.5 7.2), but checked like any element
                    raise Unsupported(f"{tag}: group length")
                continue
            if not isinstance(element, DataElement):
                raise Unsupported(f"{tag}: raw element")
            vr = element.VR
            if vr == "SQ":
                written += self.sequence(element, encodings)
                continue
            value = element._value  # what ``element.value`` returns, without the property's call
            if not isinstance(value, str):
                if check is not None:
                    check(element)
                written += self.element(element, vr if vr != "OB or OW" else _resolved_vr(element, dataset), encodings)
                continue
            if element.is_undefined_length:
                raise Unsupported(f"{element.tag}: undefined length")
            key = (int(tag), vr, value, encodings)  # most elements: one text, often met before
            encoded = texts.get(key)
            if encoded is None:
                if check is not None:
                    check(element)
                encoded = texts[key] = _text_element(element, key[0], vr, value, encodings)
            append(encoded)
            written += len(encoded)
        return written

    def element(self, element: DataElement, vr: str, encodings: tuple[str, ...]) -> int:
        """Append one element whose value is not a text (nor a sequence); return the number of bytes appended."""
        tag = int(element.tag)
        if element.is_undefined_length and tag != _PIXEL_DATA:
            raise Unsupported(f"{element.tag}: undefined length")
        value = element.value
        if not isinstance(value, bytes) and element.is_buffered:
            raise Unsupported(f"{element.tag}: buffered element")
        if vr in _BINARY_VRS and type(value) is bytes and len(value) % 2:
            head = _head(tag, vr) + _U32.pack(len(value) + 1)
            self.parts += (head, value, b"\0")  # large: the value is not copied to be padded
            return len(head) + len(value) + 1
        head, data = _element_bytes(element, tag, vr, value, encodings)
        self.parts += (head, data)
        return len(head) + len(data)

    def sequence(self, element: DataElement, encodings: tuple[str, ...]) -> int:
        """Append a sequence, its items of defined or undefined length; return the number of bytes appended."""
        tag = element.tag
        undefined = element.is_undefined_length
        parts = self.parts
        head = len(parts)
        parts.append(b"")  # the header, once the length is known
        length = 0
        for item in element.value or ():
            item_head = len(parts)
            parts.append(b"")
            item_length = self.dataset(item, encodings)
            if getattr(item, "is_undefined_length_sequence_item", False):
                parts[item_head] = _ITEM + b"\xff\xff\xff\xff"
                parts.append(_ITEM_END)
                length += item_length + 16
            else:
                parts[item_head] = _ITEM + _U32.pack(item_length)
                length += item_length + 8
        parts[head] = _head(int(tag), "SQ") + _U32.pack(0xFFFFFFFF if undefined else length)
        if undefined:
            parts.append(_SEQUENCE_END)
            length += len(_SEQUENCE_END)
        return length + 12


def _element_bytes(
    element: DataElement, tag: int, vr: str, value: object, encodings: tuple[str, ...]
) -> tuple[bytes, bytes]:
    """An element's header (tag, VR, length) and value bytes."""
    data = b"" if _is_empty(value) else _value_bytes(vr, element, encodings)
    length = len(data)
    if vr in _LONG_LENGTH:
        return _head(tag, vr) + _U32.pack(length), data
    if length > 0xFFFF:
        raise Unsupported(f"{element.tag}: value too long for a 16-bit length")
    return _head(tag, vr) + _U16.pack(length), data


def _text_element(element: DataElement, tag: int, vr: str, value: str, encodings: tuple[str, ...]) -> bytes:
    """The bytes of an element whose value is one text: :func:`_element_bytes`, joined; for the VRs texts mostly
    have, written here directly (:func:`_one_text`), and for the node's vocabulary made once per process."""
    if vr not in _ONE_TEXT_VRS:
        return b"".join(_element_bytes(element, tag, vr, value, encodings))
    if tag in VOCABULARY and value.isascii():
        return _vocabulary_text(tag, vr, value, encodings)
    return _one_text(tag, vr, value, encodings)


def _one_text(tag: int, vr: str, value: str, encodings: tuple[str, ...]) -> bytes:
    """What :func:`_element_bytes` makes of one text of a VR in :data:`_ONE_TEXT_VRS`: the text encoded (or, in the
    VRs that hold ASCII alone, as it is) and padded."""
    if vr in _TEXT_VRS:
        data = encode_string(value, list(encodings)) if value else b""
        if len(data) % 2:
            data += b" "
    else:
        data = _padded(value, "\0" if vr == "UI" else " ") if value else b""
    if vr in _LONG_LENGTH:
        return _head(tag, vr) + _U32.pack(len(data)) + data
    if len(data) > 0xFFFF:
        raise Unsupported(f"{Tag(tag)}: value too long for a 16-bit length")
    return _head(tag, vr) + _U16.pack(len(data)) + data


@lru_cache(maxsize=4096)
def _vocabulary_text(tag: int, vr: str, value: str, encodings: tuple[str, ...]) -> bytes:
    """:func:`_one_text`, kept across calls for the tags of :data:`VOCABULARY` (an ASCII text encodes the same way
    under every writing validation mode, so the bytes depend on the arguments alone)."""
    return _one_text(tag, vr, value, encodings)


def _resolved_vr(element: DataElement, dataset: Dataset) -> str:
    """The element's VR; for native Pixel Data of VR 'OB or OW', the one pydicom's writer picks (PS3.5 A.2)."""
    vr = str(element.VR)
    if vr != "OB or OW" or element.tag != _PIXEL_DATA:
        return vr
    if dataset.original_encoding[0]:
        return "OW"
    return "OW" if int(dataset.BitsAllocated) > 8 else "OB"


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
