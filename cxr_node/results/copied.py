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
  therefore left empty, never truncated: a truncated accession number can name another study.

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
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

from cxr_node.dicom.uids import uid_problem
from cxr_node.results.common import OutputError, copy_element, put, without_pixels

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
    if kept is None:
        del header[tag]
        notes.append(Note(keyword, "left out", why))
    elif why:
        header[tag] = kept
        notes.append(_repaired(element, kept, why))


def _empty(tag: BaseTag) -> DataElement:
    vr = dictionary_VR(tag)
    return DataElement(tag, vr, [] if vr == "SQ" else None)


def _repaired(before: DataElement, after: DataElement, why: str) -> Note:
    keyword = before.keyword or str(before.tag)
    if keyword in SHOWN and before.VM == 1:
        return Note(keyword, "repaired", why, str(before.value), str(after.value))
    return Note(keyword, "repaired", why)


# ------------------------------------------------------------------------------------------------ elements


def checked(element: DataElement) -> tuple[DataElement | None, str]:
    """Return ``element`` as an output may carry it, and what was repaired ("" when nothing was).

    The element itself comes back when its value is valid (so outputs stay byte for byte what they were); a
    new element when it was repaired; None, with the reason, when it cannot be kept.
    """
    if element.VR == "SQ":
        return _checked_sequence(element)
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


def _checked_sequence(element: DataElement) -> tuple[DataElement | None, str]:
    """Keep the items whose every value can be kept (repaired where needed); drop the others."""
    items, whys, dropped = [], [], 0
    for item in element.value or []:
        kept_item, why = _checked_item(item)
        if kept_item is None:
            dropped += 1
            continue
        items.append(kept_item)
        if why:
            whys.append(why)
    total = len(element.value or [])
    if not dropped and not whys:
        return element, ""
    if dropped == total:
        return None, "invalid values in every item"
    if dropped:
        whys.append(f"{dropped} of {total} items with invalid values left out")
    return DataElement(element.tag, "SQ", items), "; ".join(dict.fromkeys(whys))


def _checked_item(item: Dataset) -> tuple[Dataset | None, str]:
    whys, changed = [], Dataset()
    for element in item:
        kept, why = checked(element)
        if kept is None:
            return None, why
        if why:
            whys.append(f"{element.keyword or element.tag} {why}")
            changed.add(kept)
    if not whys:
        return item, ""
    repaired = copy.deepcopy(item)
    for element in changed:
        repaired[element.tag] = element
    return repaired, "; ".join(whys)


# -------------------------------------------------------------------------------------------------- values


def value_problem(vr: str, value: str, keyword: str = "") -> str:
    """Return why one text value cannot be written with ``vr`` (and, for Patient's Sex, its defined terms),
    or "" when it can. The reason never repeats the value."""
    if not value:
        return ""
    allowed = "\x1b\t\n\r\f" if vr in _TEXT_BLOCK_VRS else "\x1b"
    if any(ch < " " and ch not in allowed for ch in value) or "\x7f" in value:
        return "holds a control character"
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
