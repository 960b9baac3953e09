"""What every output shares: its kind, series, provenance, character set, and strict encoding.

:class:`OutputOptions` carries the site's choices (series numbers, descriptions); :func:`encode`
writes a dataset with pydicom's writing validation raising, so an invalid object is never produced.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from types import FunctionType, MethodType
from typing import Final, Literal, TypedDict, TypeVar, get_args

import highdicom as hd
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName, validate_value

from cxr_node.config import SeriesNumbers
from cxr_node.dicom import codes as node_codes
from cxr_node.dicom.uids import (
    NODE_MANUFACTURER,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PRIVATE_KIND,
    PRIVATE_MODEL,
    PRIVATE_SOURCE_UID,
    output_uid,
)
from cxr_node.results.encoding import VOCABULARY, write_explicit_le
from cxr_node.results.findings import Algorithm, Findings, Provenance

Kind = Literal["sr", "sc", "seg", "pr"]
"""The output kinds; :mod:`cxr_node.results.kinds` says what each one is."""
UTF8: Final = "ISO_IR 192"


class OutputError(ValueError):
    """An output could not be built or failed validation; it is never sent."""


@dataclass(frozen=True)
class OutputOptions:
    """The site's choices for the outputs.

    Parameters
    ----------
    series_numbers : Mapping[str, int]
        A fixed Series Number per output kind (viewers match SR thumbnails by it).
    series_description : str
        The start of every output series' description; must start with "AI".
    institution_name : str
        Written as the contributing equipment's institution, when set.
    """

    series_numbers: Mapping[str, int] = field(default_factory=lambda: SeriesNumbers().model_dump())
    series_description: str = "AI CXR analysis"
    institution_name: str = ""

    def __post_init__(self) -> None:
        if not self.series_description.startswith("AI"):
            raise ValueError(f"series_description must start with 'AI', found {self.series_description!r}")
        missing = [kind for kind in get_args(Kind) if kind not in self.series_numbers]
        if missing:
            raise ValueError(f"series_numbers must name every output kind, missing {missing}")

    def description(self, title: str) -> str:
        """The SeriesDescription of an output, e.g. ``AI CXR analysis - overlay`` (at most 64 characters)."""
        return f"{self.series_description} - {title}"[:64]


@dataclass(frozen=True)
class Identity:
    """The deterministic UIDs, numbers and description of one output, given to its builder, and the notes on
    what was repaired or left out of the values copied from the source (the SR's processing summary lists them)."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    instance_number: int = 1
    notes: tuple[str, ...] = ()


def identity(
    source: Dataset,
    findings: Findings,
    kind: Kind,
    series_number: int,
    description: str,
    notes: tuple[str, ...] = (),
) -> Identity:
    """Return the UIDs of the ``kind`` output of ``source``: the same inputs always give the same UIDs."""
    sop = str(source.SOPInstanceUID)
    model = findings.provenance.model_key
    return Identity(
        series_instance_uid=output_uid(sop, model, kind, "series"),
        sop_instance_uid=output_uid(sop, model, kind, "instance"),
        series_number=series_number,
        series_description=description,
        notes=notes,
    )


def mark_as_own(output: Dataset, source_sop_instance_uid: str, model: str, kind: Kind) -> None:
    """Add the node's private block (PS3.5 §7.8.1): the source image, model and kind its UIDs derive from.

    An object routed back is recognised as the node's own only when this block is there and its SOP
    Instance UID is the one they derive (:func:`cxr_node.dicom.uids.is_own_output`).
    """
    block = output.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_SOURCE_UID, "UI", source_sop_instance_uid)
    block.add_new(PRIVATE_MODEL, "UT", model)
    block.add_new(PRIVATE_KIND, "CS", kind.upper())


class EquipmentArgs(TypedDict):
    """The keyword arguments highdicom's SEG and GSPS constructors take for series, instance and equipment."""

    series_instance_uid: str
    series_number: int
    sop_instance_uid: str
    instance_number: int
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


def equipment(provenance: Provenance, ids: Identity) -> EquipmentArgs:
    """The series, instance and equipment arguments highdicom's SEG and GSPS constructors share."""
    return {
        "series_instance_uid": ids.series_instance_uid,
        "series_number": ids.series_number,
        "sop_instance_uid": ids.sop_instance_uid,
        "instance_number": ids.instance_number,
        "manufacturer": provenance.manufacturer,
        "manufacturer_model_name": provenance.algorithm[:64],
        "software_versions": provenance.model_version[:64],
        "device_serial_number": provenance.device_uid[:64],
    }


_ROLE_DESCRIPTIONS: Final = {
    "ensemble": "AI ensemble whose mean probability is the result",
    "classifier": "AI classifier, member of the ensemble",
    "segmentation": "AI lung segmentation: the region the classifiers see",
}


def contributing_equipment(provenance: Provenance, options: OutputOptions) -> list[hd.ContributingEquipment]:
    """The Contributing Equipment Sequence entries that name who made an output: the node (Processing
    Equipment, its own Device UID), then each algorithm (IHE AI Results' Processing Algorithm: manufacturer,
    model name, version and a Device UID that changes when the algorithm is retrained), the ensemble first.

    The entries depend on the provenance and the institution alone: highdicom builds them once for each, and
    every call returns its own copies (:func:`clone_dataset`)."""
    return [clone_dataset(entry) for entry in _equipment_entries(provenance, options.institution_name)]


@lru_cache(maxsize=16)
def _equipment_entries(provenance: Provenance, institution_name: str) -> tuple[hd.ContributingEquipment, ...]:
    """The entries :func:`contributing_equipment` copies; never handed out themselves."""
    node = hd.ContributingEquipment(
        manufacturer=provenance.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=NODE_MANUFACTURER,
        software_versions=provenance.software_version[:64],
        institution_name=institution_name or None,
        contribution_description=f"AI analysis; {provenance.intended_use}"[:1024],
    )
    node.DeviceUID = provenance.device_uid
    return (node, *(_algorithm_equipment(provenance, algorithm) for algorithm in provenance.algorithms))


def _algorithm_equipment(provenance: Provenance, algorithm: Algorithm) -> hd.ContributingEquipment:
    description = _ROLE_DESCRIPTIONS[algorithm.role]
    if algorithm.role == "ensemble":
        description += f" ({', '.join(provenance.members)})"
    entry = hd.ContributingEquipment(
        manufacturer=provenance.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        contribution_description=description[:1024],
    )
    # highdicom takes only the purposes of CID 7005; that context group is extensible, and AIR extends it
    entry.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(node_codes.PROCESSING_ALGORITHM)]
    entry.DeviceUID = algorithm.device_uid
    return entry


def copy_element(element: DataElement) -> DataElement:
    """A copy of ``element`` as independent as ``copy.deepcopy`` makes it, for a fraction of the cost: values that
    cannot change (text, numbers, bytes, UIDs) are shared, a sequence's items are copied with
    :func:`clone_dataset`, a multi-value's or a person name's state with :func:`_copy_value`, anything else is
    deep-copied."""
    if not isinstance(element, DataElement) or element.is_buffered:
        return copy.deepcopy(element)
    value = element.__dict__.get("_value")
    result = DataElement.__new__(DataElement)
    result.__dict__.update(element.__dict__)
    if value is None or isinstance(value, _IMMUTABLE_VALUES):
        return result
    kind = type(value)
    if kind is DicomSequence and value.__dict__.keys() <= _SEQUENCE_STATE:
        copied = DicomSequence.__new__(DicomSequence)
        copied.__dict__.update(value.__dict__)
        copied.__dict__["_list"] = [clone_dataset(item) for item in value]
        result.__dict__["_value"] = copied
    elif kind is MultiValue or kind is PersonName:
        result.__dict__["_value"] = _copy_value(value, element, result)
    else:
        result.__dict__["_value"] = copy.deepcopy(value)
    return result


def _copy_value(value: MultiValue[object] | PersonName, element: DataElement, result: DataElement) -> object:
    """A copy of ``element``'s multi-value or person name for its copy ``result``: a new object with its state (a
    multi-value's list of items copied, its item constructor shared, or bound to ``result`` when it is the element's
    own conversion) when every item or attribute it holds cannot change (as :func:`copy_element` shares them); else
    ``copy.deepcopy``'s copy."""
    state = value.__dict__
    if type(value) is PersonName:
        if not all(map(_unchanging, state.values())):
            return copy.deepcopy(value)
        name = object.__new__(PersonName)
        name.__dict__.update(state)
        return name
    items, constructor = state.get("_list"), state.get("_constructor")
    if state.keys() != _MULTI_VALUE_STATE or type(items) is not list or not all(map(_unchanging, items)):
        return copy.deepcopy(value)
    if type(constructor) is MethodType and constructor.__self__ is element:
        constructor = MethodType(constructor.__func__, result)  # deepcopy binds it to a copy of the element too
    elif not isinstance(constructor, type | FunctionType):
        return copy.deepcopy(value)
    copied = object.__new__(MultiValue)
    copied.__dict__.update(_list=list(items), _constructor=constructor)
    return copied


def _unchanging(value: object) -> bool:
    """Whether a copy may share ``value``: None, a text, bytes, a number, or a tuple of such."""
    if value is None or isinstance(value, _IMMUTABLE_VALUES):
        return True
    return type(value) is tuple and all(map(_unchanging, value))


_IMMUTABLE_VALUES: Final = (str, bytes, int, float)
"""Value types an element copy may share (UID, IS, DSfloat and BaseTag derive from them)."""
_SEQUENCE_STATE: Final = frozenset({"_list", "is_undefined_length"})
"""The attributes of a pydicom Sequence :func:`copy_element` knows how to copy (others: ``copy.deepcopy``)."""
_MULTI_VALUE_STATE: Final = frozenset({"_list", "_constructor"})
"""The attributes of a pydicom MultiValue :func:`copy_element` knows how to copy (others: ``copy.deepcopy``)."""

_D = TypeVar("_D", bound=Dataset)


def clone_dataset(dataset: _D) -> _D:
    """A copy of ``dataset``, of its class, as independent as ``copy.deepcopy`` makes it, for a fraction of the
    cost: each element copied with :func:`copy_element` (items in turn cloned), the other attributes shared when
    they cannot change and deep-copied otherwise; the private block cache starts empty."""
    result = object.__new__(type(dataset))
    state = result.__dict__
    for key, value in dataset.__dict__.items():
        if key == "_dict":
            state[key] = {tag: copy_element(element) for tag, element in value.items()}
        elif key == "_private_blocks":
            state[key] = {}  # the blocks name their data set; they are found again on use
        elif value is None or isinstance(value, _IMMUTABLE_VALUES):
            state[key] = value
        elif type(value) is dict and all(v is None or isinstance(v, _IMMUTABLE_VALUES) for v in value.values()):
            state[key] = dict(value)
        else:
            state[key] = copy.deepcopy(value)
    return result


def without_pixels(source: Dataset) -> Dataset:
    """A deep copy of ``source``'s header and File Meta Information, without its pixel data (group 7FE0)."""
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:
            put(header, copy_element(element))
    meta = getattr(source, "file_meta", None)
    copied: dict[BaseTag, DataElement | RawDataElement] = {}
    for tag, one in meta._dict.items() if isinstance(meta, Dataset) else ():
        copied[tag] = copy_element(one) if isinstance(one, DataElement) else copy.deepcopy(one)
    header.file_meta = FileMetaDataset(copied)  # what it makes of a deep copy of ``meta``: its elements, checked
    return header


def put(dataset: Dataset, element: DataElement) -> None:
    """``dataset.add(element)``, with the element stored directly where that is all ``add`` does: a public element,
    neither a sequence nor in the pixel data's group, added to a plain ``Dataset`` (``add`` finds a private element's
    creator, wraps and updates a sequence's items, resets the pixel array)."""
    tag = element.tag
    if (
        type(dataset) is Dataset
        and type(element) is DataElement
        and type(tag) is BaseTag
        and not tag & 0x10000
        and tag < 0x7FE00000
        and element.VR != "SQ"
    ):
        dataset._dict[tag] = element
    else:
        dataset.add(element)


def copy_character_set(source: Dataset, output: Dataset, own_texts: tuple[str, ...]) -> None:
    """Give ``output`` a SpecificCharacterSet that can hold the source's names and the node's own texts.

    The source's character set is kept when it can encode everything; otherwise UTF-8 (ISO_IR 192).
    """
    charset = source.get("SpecificCharacterSet")
    ascii_only = all(text.isascii() for text in own_texts)
    if charset is None and ascii_only:
        output.pop("SpecificCharacterSet", None)
        return
    if charset is not None and (ascii_only or _encodes(own_texts, charset)):
        output.SpecificCharacterSet = charset
        return
    output.SpecificCharacterSet = UTF8


def _encodes(texts: tuple[str, ...], charset: str | list[str]) -> bool:
    """Whether every text encodes, without replacement, in one of the character set's encodings."""
    try:
        encodings = pydicom.charset.convert_encodings(list(charset) if not isinstance(charset, str) else [charset])
    except (LookupError, ValueError):
        return False
    return all(any(_strictly_encodes(text, encoding) for encoding in encodings) for text in texts)


def _strictly_encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (LookupError, UnicodeError):
        return False
    return True


def copy_series_context(source: Dataset, output: Dataset) -> None:
    """Copy BodyPartExamined; give Laterality (General Series, Type 2C) an empty value only without one.

    dciodvfy wants Laterality absent for an unpaired body part (CHEST) and present, possibly empty,
    when the body part is unknown (TRAPS.md).
    """
    body_part = str(source.get("BodyPartExamined", "") or "")
    if body_part:
        output.BodyPartExamined = body_part
        output.pop("Laterality", None)
    elif "Laterality" not in output:
        output.Laterality = ""


@contextmanager
def _strict_writing() -> Iterator[None]:
    settings = pydicom.config.settings
    previous = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        settings.writing_validation_mode = previous


_TEXT_VRS: Final = frozenset(
    ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"]
)


def validate_values(dataset: Dataset) -> None:
    """Check every element's value against its VR (length, characters, format), nested sequences included.

    pydicom checks a value when it is assigned, and only warns by default; this checks them all again,
    raising. Elements are visited in the order of ``Dataset.iterall``; a value met again (an SR repeats its code
    meanings and designators many times) is checked once per call. :func:`encode` makes the same checks while it
    writes, in the same order (:func:`_validate_element`), and calls this only to report an error as it would have
    been reported had every value been checked before writing.

    Raises
    ------
    ValueError
        Naming the first element whose value its VR does not allow.
    """
    _validate_tree(dataset, set())


_CHECKED_TYPES: Final = (str, IS, DSfloat, DSdecimal, PersonName)


def _validate_tree(dataset: Dataset, checked: set[tuple[str, str]]) -> None:
    """Validate ``dataset`` and its items in tag order, depth first; ``checked`` holds the (VR, text) pairs passed."""
    elements = dataset._dict
    for tag in sorted(elements, key=int):
        element = elements[tag]
        if not isinstance(element, DataElement):
            element = dataset[tag]  # converts a raw element, as iterall does
        if element.VR == "SQ":
            for item in element.value:
                _validate_tree(item, checked)
        else:
            _validate_element(element, checked)


def _validate_element(element: DataElement, checked: set[tuple[str, str]]) -> None:
    """Validate the value of one element other than a sequence; ``checked`` holds the (VR, text) pairs passed."""
    vr = element.VR
    if vr not in _TEXT_VRS:
        return
    value = element.value
    if type(value) is str:  # most values: one text
        if (vr, value) not in checked:
            _validate_text(element, vr, value, checked)
    elif value is not None:
        for one in value if isinstance(value, list | tuple | MultiValue) else (value,):
            if one is not None and isinstance(one, _CHECKED_TYPES) and (vr, str(one)) not in checked:
                _validate_text(element, vr, str(one), checked)


def _validate_text(element: DataElement, vr: str, text: str, checked: set[tuple[str, str]]) -> None:
    try:
        if int(element.tag) in VOCABULARY:
            _valid_vocabulary(vr, text)
        else:
            validate_value(vr, text, pydicom.config.RAISE)
    except ValueError as exc:
        raise ValueError(f"{element.keyword or element.tag}: {exc}") from exc
    checked.add((vr, text))


@lru_cache(maxsize=4096)
def _valid_vocabulary(vr: str, text: str) -> None:
    """Raise ValueError when ``vr`` does not allow ``text``, a value of the node's vocabulary (codes, value types,
    relationships: the same in every report). Whether it does depends on the two alone: a pair that passed is not
    checked again (a refused one is, raising each time)."""
    validate_value(vr, text, pydicom.config.RAISE)


def encode(dataset: Dataset) -> bytes:
    """Return the Part 10 bytes of an output, its values validated and written as pydicom's strict writer
    writes them (:func:`cxr_node.results.encoding.write_explicit_le`, pydicom itself for anything it does not
    cover).

    Raises
    ------
    OutputError
        When pydicom refuses a value (too long, wrong VR format, missing file meta).
    """
    return _encode(dataset, fast=True)


def encode_reference(dataset: Dataset) -> bytes:
    """Return the Part 10 bytes of an output written by pydicom's own ``dcmwrite`` (what :func:`encode` must equal)."""
    return _encode(dataset, fast=False)


def _encode(dataset: Dataset, *, fast: bool) -> bytes:
    if dataset.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise OutputError(f"outputs are written Explicit VR Little Endian, found {dataset.file_meta.TransferSyntaxUID}")
    try:
        data = _checked_while_written(dataset) if fast else None
        if data is None:
            validate_values(dataset)
            with _strict_writing():
                data = write_explicit_le(dataset) if fast else None
                if data is None:
                    buffer = io.BytesIO()
                    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
                    data = buffer.getvalue()
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise OutputError(f"{dataset.get('SOPClassUID', 'output')} failed validation: {exc}") from exc
    return data


def _checked_while_written(dataset: Dataset) -> bytes | None:
    """The bytes of ``dataset`` from the fast writer, each value validated as it is written (one walk, not two), or
    None where the writer does not cover the data set (the caller then validates, and writes with pydicom).

    Raises
    ------
    ValueError, TypeError, AttributeError, KeyError
        The error :func:`validate_values` raises for the data set, when it raises one; else the writer's. Either way
        the error of validating every value first and then writing.
    """
    checked: set[tuple[str, str]] = set()
    try:
        with _strict_writing():
            return write_explicit_le(dataset, partial(_validate_element, checked=checked))
    except (ValueError, TypeError, AttributeError, KeyError):
        validate_values(dataset)  # a value refused after the writer's error is still the one reported
        raise
