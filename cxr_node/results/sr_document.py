"""The Comprehensive SR document around a content tree: the SOP-level modules highdicom 0.28's
``ComprehensiveSR`` writes, assembled directly from what the node knows.

highdicom's constructor deep-copies the content tree, re-reads it into its own classes and walks it twice to
collect the evidence; the node's report references exactly one image, the source, so the evidence is that
image and nothing needs collecting. Every attribute, its VR and its value are those highdicom writes (the
File Meta Information and the contributing-equipment entry naming highdicom included, as the reference
builder writes them; highdicom's own entry is made once and each document's copy dated by the document's clock);
``tests/dicom/test_sr_equivalence.py`` checks it against
:func:`cxr_node.results.sr_reference.build_sr_reference` on many inputs, so a change in highdicom shows up as
a failing test.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from functools import cache
from typing import Final

import highdicom as hd
from highdicom._standard_utils import (  # the standard's IOD tables highdicom copies by
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from highdicom.valuerep import _check_specific_character_set  # the same check highdicom makes
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ComprehensiveSRStorage
from pydicom.valuerep import DA, TM

from cxr_node.results.as_highdicom import equipment_items, file_meta
from cxr_node.results.common import Identity, copy_element, put
from cxr_node.results.sr_content import add, dataset, sequence

_BASE_PATIENT_STUDY: Final = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime",
)  # fmt: skip
"""What highdicom's SOPClass reads from the first evidence by attribute access (absent: AttributeError)."""


def now() -> datetime.datetime:
    """The clock the document's dates and times come from (one reading per document)."""
    return datetime.datetime.now()


def comprehensive_sr(
    evidence: Dataset,
    content: Dataset,
    ids: Identity,
    manufacturer: str,
    contributing: Sequence[hd.ContributingEquipment],
) -> Dataset:
    """Return the Comprehensive SR of ``content`` (the root CONTAINER) on the one image ``evidence``, complete,
    unverified and preliminary, as highdicom's ``ComprehensiveSR`` writes it.

    Raises
    ------
    ValueError, TypeError, AttributeError
        Where highdicom's constructor raises them for these arguments.
    """
    for keyword in _BASE_PATIENT_STUDY:
        getattr(evidence, keyword)  # highdicom reads each; a missing one fails the same way
    sr = Dataset()
    sr.preamble = b"\x00" * 128
    sr.file_meta = file_meta(ComprehensiveSRStorage, ids.sop_instance_uid)
    clock = now()
    _patient_and_study(evidence, sr)
    _series_and_instance(sr, evidence, ids, manufacturer, clock)
    for element in content:
        add(sr, element)
    add(sr, DataElement(0x0040A375, "SQ", sequence([_evidence_item(evidence)])))  # Current Requested Procedure Ev.
    add(sr, DataElement(0x0040A372, "SQ", sequence([])))  # Performed Procedure Code Sequence
    add(sr, DataElement(0x00081111, "SQ", sequence([])))  # Referenced Performed Procedure Step Sequence
    add(sr, DataElement(0x0018A001, "SQ", sequence(equipment_items(evidence, contributing, clock))))
    return sr


def _series_and_instance(
    sr: Dataset, evidence: Dataset, ids: Identity, manufacturer: str, clock: datetime.datetime
) -> None:
    if ids.series_number < 1 or ids.instance_number < 1:
        raise ValueError("series and instance numbers must be positive integers")
    for name, value in (("series_description", ids.series_description), ("manufacturer", manufacturer)):
        if len(value) > 64:
            raise ValueError(f'Values of argument "{name}" must not exceed 64 characters.')
    charset = evidence.get("SpecificCharacterSet")
    date, time = DA(clock.date()), TM(clock.time())  # immutable: one value serves two elements
    elements: list[tuple[int, str, object]] = [
        (0x00080012, "DA", date),  # Instance Creation Date
        (0x00080013, "TM", time),  # Instance Creation Time
        (0x00080016, "UI", ComprehensiveSRStorage),
        (0x00080018, "UI", ids.sop_instance_uid),
        (0x00080023, "DA", date),  # Content Date
        (0x00080033, "TM", time),  # Content Time
        (0x00080060, "CS", "SR"),
        (0x00080070, "LO", manufacturer),
        (0x0008103E, "LO", ids.series_description),
        (0x0020000E, "UI", ids.series_instance_uid),
        (0x00200011, "IS", ids.series_number),
        (0x00200013, "IS", ids.instance_number),
        (0x0040A491, "CS", "COMPLETE"),
        (0x0040A493, "CS", "UNVERIFIED"),
        (0x0040A496, "CS", "PRELIMINARY"),
    ]
    if charset is not None:
        elements.append((0x00080005, "CS", _checked_charset(charset)))
    for tag, vr, element_value in elements:
        add(sr, DataElement(tag, vr, element_value))


def _checked_charset(charset: str | Sequence[str]) -> str | Sequence[str]:
    """The source's Specific Character Set, checked as highdicom checks it (a ValueError for unknown terms)."""
    return _check_specific_character_set(charset)


def _patient_and_study(evidence: Dataset, sr: Dataset) -> None:
    """Copy the root attributes of the Patient and Study modules of the evidence's IOD (the outputs then get
    the checked copies every output shares, :meth:`cxr_node.results.copied.Copied.apply`)."""
    for tag in patient_and_study_tags(str(evidence.SOPClassUID)):
        if tag in evidence:
            put(sr, copy_element(evidence[tag]))
    if 0x00080090 not in sr:
        sr.add(DataElement(0x00080090, "PN", None))  # Referring Physician's Name, Type 2
    sex = evidence.PatientSex
    if sex not in (None, "") and sex not in ("M", "F", "O"):
        raise ValueError(f"{sex!r} is not a valid PatientSexValues")
    DA(evidence.PatientBirthDate)  # highdicom parses these three; a value it cannot parse fails the same way
    DA(evidence.StudyDate)
    TM(evidence.StudyTime)


@cache
def patient_and_study_tags(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """The root attributes of the Patient and Study entities' modules of the IOD of ``sop_class_uid``, as
    highdicom's ``copy_patient_and_study_information`` copies them (KeyError for a class it does not know)."""
    iod = get_sop_class_iod_map()[sop_class_uid]
    attributes = get_module_attribute_map()
    tags: list[BaseTag] = []
    for entity in ("Patient", "Study"):
        for module in get_iod_module_map()[iod]:
            if module["ie"] != entity:
                continue
            for entry in attributes[module["key"]]:
                tag = tag_for_keyword(str(entry["keyword"]))
                if not entry["path"] and tag is not None:
                    tags.append(Tag(tag))
    return tuple(dict.fromkeys(tags))


def _evidence_item(evidence: Dataset) -> Dataset:
    """The Current Requested Procedure Evidence item of the one image the report references."""
    instance = dataset((0x00081150, "UI", evidence.SOPClassUID), (0x00081155, "UI", evidence.SOPInstanceUID))
    series = dataset((0x00081199, "SQ", sequence([instance])), (0x0020000E, "UI", evidence.SeriesInstanceUID))
    return dataset((0x00081115, "SQ", sequence([series])), (0x0020000D, "UI", evidence.StudyInstanceUID))
