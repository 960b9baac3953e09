"""The values outputs copy from their source image, checked against their VR and the output IOD in one place.

Every output (SR, SC, SEG, GSPS) carries the source's Patient and Study attributes: the root attributes of
the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study modules, which the
four IODs share. They come from :func:`copy_source` alone, so two outputs of one image can never be filed
under different patients. Each value is checked against its VR (characters, length, format, multiplicity)
and, for Patient's Sex, its enumerated values, then:

- **repaired** where the repair is unambiguous: surrounding spaces and NULs removed; a date ``YYYY.MM.DD``,
  ``YYYY-MM-DD`` or ``YYYY/MM/DD`` written ``YYYYMMDD``; a time ``HH:MM:SS`` written ``HHMMSS``; a code
  string in lower case upper-cased; empty trailing name components dropped; ``MALE``, ``FEMALE``, ``OTHER``
  written ``M``, ``F``, ``O``;
- otherwise **left out**: a Type 2 attribute of the Patient or General Study module stays, empty; any other
  is absent; a sequence item holding such a value is dropped. An accession number over 16 characters is
  therefore left empty, never truncated: a truncated accession number can name another study. A text holding
  bytes its character set does not define (pydicom decoded them to replacement characters) is left out too.

A sequence's items must also hold what the standard's module tables require there (:func:`item_problem`: no
empty item, every Type 1 attribute, a code's value and scheme, an issuer's identifier), else the item is
dropped; a sequence left without items is left out unless it may be empty (Type 2). The Specific Character Set
is written in a form the outputs can declare (:func:`character_set`).

The other values the builders and highdicom read from the source (acquisition equipment, body part, patient
orientation, frame of reference, pixel spacing) are checked the same way in the header handed to them, and
left out of it when they cannot be kept. A UID that identifies the source (SOP Instance, SOP Class, Series,
Study) cannot be repaired or left out: the output is not built. Each repair or omission is a :class:`Note`;
the SR's processing summary lists them and the worker logs their attribute names, never their values.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Final, Literal

import pydicom
from highdicom._standard_utils import get_module_attribute_map  # the standard's IOD tables highdicom copies by
from highdicom.valuerep import _check_specific_character_set  # the check highdicom makes of the term
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

from cxr_node.dicom.codes import MODALITY_OF_CLASS
from cxr_node.dicom.uids import uid_problem
from cxr_node.results.common import UTF8, OutputError, copy_element, put, without_pixels

Action = Literal["repaired", "left empty", "left out"]

MODULES: Final = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")
"""The modules of the Patient and Study information entities, as highdicom's tables name them."""
_MANDATORY: Final = ("patient", "general-study")
"""Modules every output IOD requires: their Type 2 attributes are always written, empty when unknown."""
IDENTIFYING_UIDS: Final = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID")
"""The source's own UIDs: outputs reference them, so none can be repaired or left out."""
CONTEXT: Final = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "BodyPartExamined",
    "PatientOrientation",
    "FrameOfReferenceUID",
    "PixelSpacing",
    "ImagerPixelSpacing",
)
"""Values outside the Patient and Study modules that the builders or highdicom copy into an output."""
_MAX_LENGTH: Final = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240, "SH": 16,
    "ST": 1024, "TM": 14, "UC": 2**32 - 2, "UI": 64, "UR": 2**32 - 2, "UT": 2**32 - 2,
}  # fmt: skip
_TEXT_BLOCK_VRS: Final = frozenset({"LT", "ST", "UT"})
_REGEX_VRS: Final = frozenset({"AE", "AS", "CS", "DS", "DT", "IS", "UR"})
SHOWN: Final = frozenset({"StudyDate", "StudyTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime"})
"""The only attributes whose values a note repeats (before and after a repair): no patient's values."""
_FORMAT_FIRST: Final = frozenset({"DA", "TM", "DT", "UI"})  # their format says more than their length
_DATE: Final = re.compile(r"\d{8}")
_DOTTED_DATE: Final = re.compile(r"(\d{4})[./-](\d{2})[./-](\d{2})")
_TIME: Final = re.compile(r"([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)?")
_COLON_TIME: Final = re.compile(r"\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?")
_SEXES: Final = {"": "", "M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}


@dataclass(frozen=True)
class Note:
    """One value copied from the source that was repaired or left out.

    Parameters
    ----------
    attribute : str
        The attribute's keyword (or what else was left out, e.g. ``similar case 2``).
    action : {"repaired", "left empty", "left out"}
        What became of it.
    why : str
        The kind of problem or repair, never the value (e.g. ``over 16 characters``).
    before, after : str
        The value before and after a repair, only for the study and acquisition dates and times (:data:`SHOWN`).
    """

    attribute: str
    action: Action
    why: str
    before: str = ""
    after: str = ""

    def __str__(self) -> str:
        if self.before:
            return f"{self.attribute} {self.before} -> {self.after}"
        return f"{self.attribute} {self.action} ({self.why})"


@dataclass(frozen=True)
class Copied:
    """What the outputs of one source copy from it.

    Parameters
    ----------
    header : Dataset
        The source header the builders read: no pixel data, the Patient and Study attributes as every output
        carries them, the other copied values checked.
    attributes : tuple of DataElement
        The Patient and Study attributes every output carries, in tag order.
    notes : tuple of Note
        Each value repaired or left out.
    """

    header: Dataset
    attributes: tuple[DataElement, ...]
    notes: tuple[Note, ...] = field(default=())

    def apply(self, output: Dataset) -> None:
        """Give ``output`` exactly these Patient and Study attributes, whatever its builder copied itself."""
        _replace_module_attributes(output, self.attributes)


@dataclass(frozen=True)
class _Spec:
    tag: BaseTag
    keyword: str
    required: bool


@cache
def module_specs() -> tuple[_Spec, ...]:
    """The root attributes of :data:`MODULES`, in tag order, each marked when it must be present (Type 2)."""
    table = get_module_attribute_map()
    specs: dict[BaseTag, _Spec] = {}
    for module in MODULES:
        for item in table[module]:
            tag = tag_for_keyword(str(item["keyword"]))
            if item["path"] or tag is None:
                continue
            required = module in _MANDATORY and item["type"] in ("1", "2")
            specs[Tag(tag)] = _Spec(Tag(tag), str(item["keyword"]), required)
    return tuple(specs[tag] for tag in sorted(specs))


@cache
def module_tags() -> frozenset[BaseTag]:
    """The tags of every Patient and Study module attribute an output may carry."""
    return frozenset(spec.tag for spec in module_specs())


def copy_source(source: Dataset) -> Copied:
    """Check every value the outputs copy from ``source``; return them with the notes of what was changed.

    Raises
    ------
    OutputError
        When a UID that identifies the source (SOP Instance, SOP Class, Series, Study) is missing or invalid.
    """
    for keyword in IDENTIFYING_UIDS:
        problem = uid_problem(str(source.get(keyword, "") or ""))
        if problem:
            raise OutputError(f"the source's {keyword} cannot be referenced: {problem}")
    notes: list[Note] = []
    attributes = tuple(_module_attributes(source, notes))
    header = without_pixels(source)
    _replace_module_attributes(header, attributes)
    for keyword in CONTEXT:
        _check_context(header, keyword, notes)
    _check_character_set(header, notes)
    _check_modality(header, notes)
    return Copied(header, attributes, tuple(notes))


def _replace_module_attributes(dataset: Dataset, attributes: tuple[DataElement, ...]) -> None:
    """Remove every Patient and Study module attribute from ``dataset``, then add copies of ``attributes``
    (``Dataset.pop`` of each tag, then ``add``, without their per-call conversions where they change nothing)."""
    elements = dataset._dict
    for tag in module_tags() & elements.keys():  # BaseTags: what ``pop`` would make of them
        del elements[tag]
    for element in attributes:
        put(dataset, copy_element(element))


def _module_attributes(source: Dataset, notes: list[Note]) -> Iterable[DataElement]:
    for spec in module_specs():
        element = source.get(spec.tag) if spec.tag in source else None
        if element is None:
            if spec.required:
                yield _empty(spec.tag)
            continue
        kept, why = checked(element)
        if kept is not None:
            if why:
                notes.append(_repaired(element, kept, why))
            yield kept
        elif spec.required:
            notes.append(Note(spec.keyword, "left empty", why))
            yield _empty(spec.tag)
        else:
            notes.append(Note(spec.keyword, "left out", why))


def _check_context(header: Dataset, keyword: str, notes: list[Note]) -> None:
    tag = Tag(keyword)
    if tag not in header:
        return
    element = header[tag]
    kept, why = checked(element)
    if kept is not None and keyword == "PatientOrientation" and not _orientation_kept(_values(kept)):
        kept, why = None, "not a row and a column direction of A, P, R, L, H, F"
    if kept is None:
        del header[tag]
        notes.append(Note(keyword, "left out", why))
    elif why:
        header[tag] = kept
        notes.append(_repaired(element, kept, why))


def _check_modality(header: Dataset, notes: list[Note]) -> None:
    """Give a radiograph sent without its Modality (Type 1) the one its SOP class implies, as triage took it: the
    SR's builder, as highdicom's, reads the source's Modality."""
    if str(header.get("Modality", "") or "").strip():
        return
    implied = MODALITY_OF_CLASS.get(str(header.get("SOPClassUID", "")).strip(" \0"))
    if implied is not None:
        header.Modality = implied
        notes.append(Note("Modality", "repaired", "missing; the SOP class's"))


def _orientation_kept(values: list[str]) -> bool:
    """Whether an overlay can carry this PatientOrientation: two of the biped directions highdicom takes (one letter
    each), or not two directions at all (then the overlay says it has none)."""
    return len(values) != 2 or not all(values) or all(value in _BIPED for value in values)


_BIPED: Final = frozenset({"A", "P", "R", "L", "H", "F"})


def _check_character_set(header: Dataset, notes: list[Note]) -> None:
    """Give ``header`` a Specific Character Set the outputs can declare for the values it holds (see
    :func:`character_set`). The header's values are decoded first, with the source's own character set: pydicom
    decodes a value when it is first read, with the character set the data set declares at that moment."""
    if _SPECIFIC_CHARACTER_SET not in header:
        return
    wanted, why = character_set(_values(header[_SPECIFIC_CHARACTER_SET]))
    if not why:
        return
    _decode_all(header)
    if wanted is None and not _all_ascii(header):
        wanted, why = UTF8, f"{why}; written as {UTF8}, which holds every value"
    if wanted is None:
        del header[_SPECIFIC_CHARACTER_SET]
    else:
        header[_SPECIFIC_CHARACTER_SET] = DataElement(_SPECIFIC_CHARACTER_SET, "CS", wanted)
    notes.append(Note("SpecificCharacterSet", "repaired", why))


def character_set(terms: list[str]) -> tuple[str | list[str] | None, str]:
    """Return the Specific Character Set an output declares for values read with ``terms``, and how it was
    repaired ("" when the terms are kept as they are; None: the default repertoire, the attribute absent).

    The standard's forms are kept. An empty first value of a multi-valued set (the default repertoire with code
    extensions, PS3.3 C.12.1.1.2) is written ``ISO 2022 IR 6``; a single code-extension term as the same set
    without extensions (``ISO 2022 IR 100`` as ``ISO_IR 100``; a multi-byte one after ``ISO 2022 IR 6``); a
    common misspelling (``ISO_IR 6``, ``ISO-8859-1``, ``UTF-8``) as the term it means; an empty value or the
    default repertoire alone as no attribute. A term still unknown (to pydicom, which then decoded the values with
    its default) or one highdicom does not take (``ISO 2022 IR 149``, ``ISO 2022 IR 58``) is replaced by
    ``ISO_IR 192``: UTF-8 holds whatever the values decoded to.
    """
    cleaned = [_CHARSET_ALIASES.get(term.strip().upper(), term.strip().upper()) for term in terms]
    if len(cleaned) == 1:
        term = cleaned[0]
        if term in ("", "ISO_IR 6", "ISO 2022 IR 6"):
            cleaned = []
        elif term.startswith("ISO 2022 IR "):
            single = term.replace("ISO 2022 IR ", "ISO_IR ")
            cleaned = [single] if single in _SINGLE_TERMS else ["ISO 2022 IR 6", term]
    elif cleaned and not cleaned[0]:
        cleaned[0] = "ISO 2022 IR 6"
    if not cleaned:
        return None, "empty or the default repertoire; left out"
    wanted: str | list[str] = cleaned[0] if len(cleaned) == 1 else cleaned
    if not all(term in pydicom.charset.python_encoding for term in cleaned):
        return UTF8, f"not a character set the standard defines; written as {UTF8}"
    try:
        _check_specific_character_set(wanted)
    except ValueError:  # a set highdicom does not take (e.g. ISO 2022 IR 149, Korean): the values decoded well
        return UTF8, f"written as {UTF8}, which holds the same characters"
    return wanted, "" if cleaned == terms else "written as the standard's term"


_SPECIFIC_CHARACTER_SET: Final = BaseTag(0x00080005)
_SINGLE_TERMS: Final = frozenset(f"ISO_IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 13, 166, 192))
"""The single-byte character sets without code extensions (PS3.3 Table C.12-2), and UTF-8."""
_CHARSET_ALIASES: Final = {
    "ISO-IR 6": "ISO_IR 6",
    "ISO-8859-1": "ISO_IR 100",
    "ISO8859-1": "ISO_IR 100",
    "ISO_8859-1": "ISO_IR 100",
    "LATIN1": "ISO_IR 100",
    "LATIN-1": "ISO_IR 100",
    "UTF-8": "ISO_IR 192",
    "UTF8": "ISO_IR 192",
    "ISO-IR 192": "ISO_IR 192",
    "ISO-IR 100": "ISO_IR 100",
}
"""Misspellings of character set terms seen in the field, and the defined term each means."""


def _decode_all(dataset: Dataset) -> None:
    """Read every element of ``dataset`` and of its sequences' items once, so that each value is decoded now (see
    :func:`_check_character_set`); an element pydicom cannot read is left as it is (loading dropped those)."""
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
        except Exception:  # noqa: S112 - garbage raises many types; it is left for the checks that follow
            continue
        if element.VR == "SQ":
            for item in element.value or ():
                if isinstance(item, Dataset):
                    _decode_all(item)


def _all_ascii(dataset: Dataset) -> bool:
    """Whether every text value of ``dataset``, its sequences' items included, is ASCII."""
    return all(
        all(value.isascii() for value in _values(element))
        for element in dataset.iterall()
        if element.VR in _MAX_LENGTH or element.VR == "PN"
    )


def _empty(tag: BaseTag) -> DataElement:
    vr = dictionary_VR(tag)
    return DataElement(tag, vr, [] if vr == "SQ" else None)


def _repaired(before: DataElement, after: DataElement, why: str) -> Note:
    keyword = before.keyword or str(before.tag)
    if keyword in SHOWN and before.VM == 1:
        return Note(keyword, "repaired", why, str(before.value), str(after.value))
    return Note(keyword, "repaired", why)


# ------------------------------------------------------------------------------------------------ elements


def checked(element: DataElement, path: tuple[str, ...] = ()) -> tuple[DataElement | None, str]:
    """Return ``element`` as an output may carry it, and what was repaired ("" when nothing was).

    The element itself comes back when its value is valid (so outputs stay byte for byte what they were); a
    new element when it was repaired; None, with the reason, when it cannot be kept. ``path`` names the
    sequences the element is inside (their keywords from the data set's root): a sequence's items are checked
    against what the standard's module tables require of the items at that place (:func:`_item_rules`).
    """
    if element.VR == "SQ":
        return _checked_sequence(element, (*path, element.keyword or str(element.tag)))
    if element.VR not in _MAX_LENGTH and element.VR != "PN":
        return element, ""
    values = _values(element)
    if len(values) > 1 and _single_valued(element.tag):
        return None, "more than one value (a backslash)"
    fixed, whys = [], []
    for value in values:
        keyword = element.keyword
        problem = value_problem(element.VR, value, keyword)
        if not problem:
            fixed.append(value)
            continue
        repair = _repair(element.VR, value, keyword)
        if repair is None:
            return None, problem
        fixed.append(repair[0])
        whys.append(repair[1])
    if not whys:
        return element, ""
    value_out: object = fixed[0] if len(fixed) == 1 else fixed
    return DataElement(element.tag, element.VR, value_out), "; ".join(dict.fromkeys(whys))


def _single_valued(tag: BaseTag) -> bool:
    try:
        return dictionary_VM(tag) == "1"
    except KeyError:
        return False


def _values(element: DataElement) -> list[str]:
    value = element.value
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return ["" if item is None else str(item) for item in items]


def _checked_sequence(element: DataElement, path: tuple[str, ...]) -> tuple[DataElement | None, str]:
    """Keep the items whose every value can be kept (repaired where needed) and that hold what the standard
    requires of an item there; drop the others. A sequence without items is kept only where it may be empty
    (Type 2): elsewhere the standard asks for one item or more."""
    total = len(element.value or [])
    if not total:
        return (element, "") if _sequence_type(path) in ("2", "2C") else (None, "no items")
    items, whys, reasons = [], [], []
    for item in element.value:
        kept_item, why = _checked_item(item, path)
        if kept_item is None:
            reasons.append(why)
            continue
        items.append(kept_item)
        if why:
            whys.append(why)
    dropped = len(reasons)
    if not dropped and not whys:
        return element, ""
    if dropped == total:
        return None, reasons[0] if len(set(reasons)) == 1 else "invalid values in every item"
    if dropped:
        whys.append(f"{dropped} of {total} items with invalid values left out")
    return DataElement(element.tag, "SQ", items), "; ".join(dict.fromkeys(whys))


def _checked_item(item: Dataset, path: tuple[str, ...]) -> tuple[Dataset | None, str]:
    """The item as an output may carry it, and what was repaired; None and why when it cannot be kept: a value
    that cannot be, or a nested sequence the item requires, or something :func:`item_problem` finds."""
    whys, changed, removed = [], Dataset(), []
    rules = _item_rules().get(path, {})
    for element in item:
        kept, why = checked(element, path)
        name = element.keyword or str(element.tag)
        if kept is None and element.VR == "SQ" and rules.get(name, "3") not in ("1", "1C"):
            removed.append(element.tag)  # an optional sequence of the item, left out: the item stays
            whys.append(f"{name} left out ({why})")
        elif kept is None:
            return None, why
        elif why:
            whys.append(f"{name} {why}")
            changed.add(kept)
    repaired = item
    if whys:
        repaired = copy.deepcopy(item)
        for element in changed:
            repaired[element.tag] = element
        for tag in removed:
            del repaired[tag]
    problem = item_problem(repaired, rules)
    if problem:
        return None, problem
    return repaired, "; ".join(whys)


def item_problem(item: Dataset, rules: dict[str, str]) -> str:
    """Why a sequence item does not hold what the standard requires of it (``rules``: the keywords of the
    attributes an item there may hold, and their Types), or "".

    An item must hold something; every Type 1 attribute, with a value. A coded entry (an item whose attributes
    include Code Meaning) needs its meaning and a code value, and its coding scheme unless the code is a URN; an
    HL7 v2 hierarchic designator (Local Namespace Entity ID or Universal Entity ID) needs one of the two, and a
    universal one its type. Other conditional (Type 1C) attributes are not judged.
    """
    if not len(item):
        return "an empty item"
    missing = [name for name, kind in rules.items() if kind == "1" and not _has_value(item, name)]
    if missing:
        return f"an item without its {missing[0]}"
    if "CodeMeaning" in rules:
        value = next((name for name in _CODE_VALUES if _has_value(item, name)), "")
        if not value:
            return "a code without a code value"
        if value != "URNCodeValue" and not _has_value(item, "CodingSchemeDesignator"):
            return "a code without its coding scheme"
    if "LocalNamespaceEntityID" in rules and "UniversalEntityID" in rules:
        if not (_has_value(item, "LocalNamespaceEntityID") or _has_value(item, "UniversalEntityID")):
            return "an issuer without an identifier"
        if _has_value(item, "UniversalEntityID") and not _has_value(item, "UniversalEntityIDType"):
            return "an issuer without the type of its universal identifier"
    return ""


_CODE_VALUES: Final = ("CodeValue", "LongCodeValue", "URNCodeValue")


def _has_value(item: Dataset, keyword: str) -> bool:
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in item:
        return False
    value = item[tag].value
    return value is not None and value != "" and not (isinstance(value, list | MultiValue) and not len(value))


@cache
def _item_rules() -> dict[tuple[str, ...], dict[str, str]]:
    """For each place a sequence's items sit in the Patient and Study modules (the sequences' keywords from the
    root), the keywords of the attributes an item there may hold and their Types."""
    table = get_module_attribute_map()
    rules: dict[tuple[str, ...], dict[str, str]] = {}
    for module in MODULES:
        for entry in table[module]:
            rules.setdefault(tuple(entry["path"]), {})[str(entry["keyword"])] = str(entry["type"])
    return rules


def _sequence_type(path: tuple[str, ...]) -> str:
    """The Type of the sequence at ``path`` (its own keyword last), "3" when the tables do not say."""
    return _item_rules().get(path[:-1], {}).get(path[-1], "3")


# -------------------------------------------------------------------------------------------------- values


def value_problem(vr: str, value: str, keyword: str = "") -> str:
    """Return why one text value cannot be written with ``vr`` (and, for Patient's Sex, its defined terms),
    or "" when it can. The reason never repeats the value."""
    if not value:
        return ""
    allowed = "\x1b\t\n\r\f" if vr in _TEXT_BLOCK_VRS else "\x1b"
    if any(ch < " " and ch not in allowed for ch in value) or "\x7f" in value:
        return "holds a control character"
    if "\ufffd" in value:  # what pydicom decodes bytes its character set does not define to
        return "bytes its character set does not define"
    problem = _format_problem(vr, value) if vr in _FORMAT_FIRST else _length_problem(vr, value)
    problem = problem or _format_problem(vr, value)
    if not problem and keyword == "PatientSex" and value not in ("M", "F", "O"):
        return "not M, F or O"
    return problem


def _length_problem(vr: str, value: str) -> str:
    if vr == "PN":
        groups = value.split("=")
        if len(groups) > 3:
            return "more than 3 component groups"
        if any(len(group) > 64 for group in groups):
            return "over 64 characters"
        if any(group.count("^") > 4 for group in groups):
            return "more than 5 name components"
        return ""
    limit = _MAX_LENGTH.get(vr)
    return f"over {limit} characters" if limit is not None and len(value) > limit else ""


def _format_problem(vr: str, value: str) -> str:
    if vr == "DA":
        return "" if _calendar_date(value) else "not a date YYYYMMDD"
    if vr == "TM":
        return "" if _TIME.fullmatch(value) else "not a time HHMMSS"
    if vr == "UI":
        problem = uid_problem(value)
        return f"not a valid UID ({problem})" if problem else ""
    if vr in _REGEX_VRS:
        try:
            validate_value(vr, value, pydicom.config.RAISE)
        except ValueError:
            return f"not a valid {vr} value"
    return ""


def _calendar_date(value: str) -> bool:
    if not _DATE.fullmatch(value):
        return False
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


def _repair(vr: str, value: str, keyword: str) -> tuple[str, str] | None:
    """Return the value repaired and how, when one unambiguous repair makes it valid; else None."""
    candidate, whys = value, []
    stripped = value.strip(" \0")
    if stripped != value:
        candidate = stripped
        whys.append("surrounding spaces or NULs removed")
    for fix in (_fix_date, _fix_time, _fix_sex, _fix_code, _fix_name):
        if not value_problem(vr, candidate, keyword):
            break
        repaired = fix(vr, candidate, keyword)
        if repaired is not None:
            candidate, why = repaired
            whys.append(why)
    if value_problem(vr, candidate, keyword) or not whys:
        return None
    return candidate, "; ".join(whys)


def _fix_date(vr: str, value: str, _keyword: str) -> tuple[str, str] | None:
    match = _DOTTED_DATE.fullmatch(value) if vr == "DA" else None
    return ("".join(match.groups()), "date separators removed") if match else None


def _fix_time(vr: str, value: str, _keyword: str) -> tuple[str, str] | None:
    return (value.replace(":", ""), "time separators removed") if vr == "TM" and _COLON_TIME.fullmatch(value) else None


def _fix_code(vr: str, value: str, _keyword: str) -> tuple[str, str] | None:
    return (value.upper(), "upper-cased") if vr == "CS" and value != value.upper() else None


def _fix_name(vr: str, value: str, _keyword: str) -> tuple[str, str] | None:
    if vr != "PN":
        return None
    trimmed = "=".join(group.rstrip("^") for group in value.split("="))
    return (trimmed, "empty name components removed") if trimmed != value else None


def _fix_sex(_vr: str, value: str, keyword: str) -> tuple[str, str] | None:
    if keyword != "PatientSex" or value.upper() not in _SEXES:
        return None
    return _SEXES[value.upper()], "written as its defined term"
