"""SR content items as plain pydicom data sets, shaped exactly as highdicom 0.28's templates shape them.

highdicom builds each content item as a validating ``Dataset`` subclass and re-reads the whole tree when the
document is assembled (about 100 ms for one report). These functions write the same items directly: the
value types and templates the node's report uses (CODE, TEXT, UIDREF, DATE, NUM, IMAGE, SCOORD, CONTAINER;
TID 1500, 1501, 1410, 300, 4019, 1001-1004). They check nothing: the values come from the node's own
findings, the report's builder checks what comes from outside, and :func:`cxr_node.results.common.encode`
validates every value as it writes it, before any byte is handed on. ``tests/dicom/test_sr_equivalence.py`` keeps
them equal, element by element, to what highdicom builds (:mod:`cxr_node.results.sr_reference`).

The elements and data sets are made without their constructors (each item repeats the same few codes, value types
and relationships: those elements are copied from prototypes made once), a few microseconds each instead of tens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial
from typing import Final, TypeVar

import numpy as np
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import DA, DS

CONTAINS: Final = "CONTAINS"
HAS_OBS_CONTEXT: Final = "HAS OBS CONTEXT"
HAS_CONCEPT_MOD: Final = "HAS CONCEPT MOD"
SELECTED_FROM: Final = "SELECTED FROM"
HAS_ACQ_CONTEXT: Final = "HAS ACQ CONTEXT"

_LANGUAGE: Final = Code("en-US", "RFC5646", "English (United States)")
_SOURCE: Final = Code("260753009", "SCT", "Source")
_DCM = dcm_codes.DCM
_T = TypeVar("_T")
IMAGE_REGION, TRACKING_IDENTIFIER, TRACKING_UID = (
    _DCM.ImageRegion,
    _DCM.TrackingIdentifier,
    _DCM.TrackingUniqueIdentifier,
)
ALGORITHM_NAME, ALGORITHM_VERSION = _DCM.AlgorithmName, _DCM.AlgorithmVersion
OBSERVER_TYPE, DEVICE, DEVICE_UID = _DCM.ObserverType, _DCM.Device, _DCM.DeviceObserverUID
DEVICE_NAME, DEVICE_MANUFACTURER, DEVICE_MODEL = (
    _DCM.DeviceObserverName,
    _DCM.DeviceObserverManufacturer,
    _DCM.DeviceObserverModelName,
)
LANGUAGE_OF_CONTENT, PROCEDURE_REPORTED = _DCM.LanguageOfContentItemAndDescendants, _DCM.ProcedureReported
IMAGING_MEASUREMENTS, MEASUREMENT_GROUP, FINDING = _DCM.ImagingMeasurements, _DCM.MeasurementGroup, _DCM.Finding
FINDING_SITE: Final = dcm_codes.SCT.FindingSite

# tags, in the order the items use them (made BaseTags once: an element's tag is one)
_CODE_VALUE, _SCHEME, _SCHEME_VERSION, _MEANING = map(BaseTag, (0x00080100, 0x00080102, 0x00080103, 0x00080104))
_LONG_CODE_VALUE, _URN_CODE_VALUE = BaseTag(0x00080119), BaseTag(0x00080120)
_MAPPING_RESOURCE, _TEMPLATE_IDENTIFIER = BaseTag(0x00080105), BaseTag(0x0040DB00)
_REFERENCED_SOP_SEQUENCE, _REFERENCED_SOP_CLASS, _REFERENCED_SOP_INSTANCE = map(
    BaseTag, (0x00081199, 0x00081150, 0x00081155)
)
_UNITS, _RELATIONSHIP, _VALUE_TYPE, _CONCEPT_NAME = map(BaseTag, (0x004008EA, 0x0040A010, 0x0040A040, 0x0040A043))
_CONTINUITY, _DATE, _UID, _TEXT, _FLOAT, _CONCEPT_CODE = map(
    BaseTag, (0x0040A050, 0x0040A121, 0x0040A124, 0x0040A160, 0x0040A161, 0x0040A168)
)
_MEASURED_VALUE, _NUMERIC_VALUE, _TEMPLATE, _CONTENT = map(BaseTag, (0x0040A300, 0x0040A30A, 0x0040A504, 0x0040A730))
_GRAPHIC_DATA, _GRAPHIC_TYPE = BaseTag(0x00700022), BaseTag(0x00700023)


def element(tag: int, vr: str, value: object) -> DataElement:
    """One element; a text value is stored as it is, as pydicom would store it (texts here hold no backslash), a
    UID as a pydicom ``UID``, a sequence as it is, anything else converted by pydicom."""
    tag = tag if type(tag) is BaseTag else BaseTag(tag)
    if isinstance(value, str):
        return _ready(tag, vr, UID(value) if vr == "UI" else value)
    if vr == "SQ" and isinstance(value, DicomSequence):
        return _ready(tag, vr, value, config.settings.reading_validation_mode)
    return DataElement(tag, vr, value)


def _ready(tag: BaseTag, vr: str, value: object, mode: int = config.IGNORE) -> DataElement:
    """The element ``DataElement(tag, vr, value, already_converted=True, validation_mode=mode)`` makes, without
    its constructor's per-attribute work (the value needs no conversion: a text, a UID or a Sequence)."""
    made = _new_element()
    made.__dict__.update(_ELEMENT_STATE, tag=tag, VR=vr, _value=value, validation_mode=mode)
    return made


@lru_cache(maxsize=1024)
def _prototype(tag: BaseTag, vr: str, value: str) -> DataElement:
    """An element of the report's own vocabulary (a value type, a relationship, a code's value, designator or
    meaning), made once; never handed out: :func:`_fixed` hands out copies."""
    return _ready(tag, vr, value)


def _fixed(tag: BaseTag, vr: str, value: str) -> DataElement:
    """:func:`element` for a text of the report's vocabulary: a copy of its prototype (cheaper than making it)."""
    return _copy(_prototype(tag, vr, value))


def _copy(prototype: DataElement) -> DataElement:
    """A copy of an element whose value never changes (a text), with a state of its own."""
    made = _new_element()
    made.__dict__ = prototype.__dict__.copy()
    return made


def _blank(cls: type[_T]) -> Callable[[], _T]:
    return partial(object.__new__, cls)


_ELEMENT_STATE: Final = DataElement(BaseTag(0), "CS", "", already_converted=True).__dict__.copy()
"""What ``DataElement.__init__`` sets on an element, to be completed with its tag, VR, value and mode."""
_new_element: Final = _blank(DataElement)
_DATASET_STATE: Final = Dataset().__dict__.copy()
"""What ``Dataset.__init__`` sets on a data set; its containers are made anew for each data set."""
_DATASET_CONTAINERS: Final = tuple(
    key for key, value in _DATASET_STATE.items() if isinstance(value, dict | list) and key != "_dict"
)
"""The containers of a data set's state other than its elements (:func:`of_elements` gives it those)."""
_new_dataset: Final = _blank(Dataset)
_new_sequence: Final = _blank(DicomSequence)


def dataset(*elements: tuple[int, str, object]) -> Dataset:
    """A data set of ``(tag, VR, value)`` elements."""
    made: dict[BaseTag, DataElement] = {}
    for tag, vr, value in elements:
        one = element(tag, vr, value)
        made[one.tag] = one
    return of_elements(made)


def of_elements(elements: dict[BaseTag, DataElement]) -> Dataset:
    """The data set ``Dataset(elements)`` makes, without its constructor's validated attribute assignments.

    Only for elements made here: no private tags, no Pixel Data and no Pixel Representation, nothing the
    assignment of an element to a data set would have to act upon.
    """
    made = _new_dataset()
    state = made.__dict__  # filled in place: assigning ``__dict__`` would go through ``Dataset.__setattr__``
    state.update(_DATASET_STATE)
    for key in _DATASET_CONTAINERS:
        state[key] = state[key].copy()
    state["_dict"] = elements
    return made


def add(parent: Dataset, child: DataElement) -> None:
    """Add ``child`` to ``parent`` as ``parent.add(child)`` would, without its per-element work: only for what that
    work does nothing to (a public tag other than Pixel Data, no Pixel Representation in ``parent``, a sequence's
    value already a pydicom Sequence)."""
    parent._dict[child.tag] = child


def sequence(items: Iterable[Dataset]) -> DicomSequence:
    """A pydicom Sequence of ``items``."""
    made = _new_sequence()
    made.__dict__["_list"] = list(items)
    return made


def _sequence_element(tag: BaseTag, items: list[Dataset]) -> DataElement:
    """``element(tag, "SQ", sequence(items))``, without its checks."""
    made = _new_sequence()
    made.__dict__["_list"] = items
    return _ready(tag, "SQ", made, config.settings.reading_validation_mode)


@lru_cache(maxsize=1024)
def _code_elements(value: str, scheme: str, meaning: str, version: str | None) -> tuple[DataElement, ...]:
    """The prototypes (:func:`_prototype`) of the elements of a code, in the order highdicom's ``CodedConcept`` sets
    them."""
    if len(value) > 16:
        value_tag = (_URN_CODE_VALUE, "UR") if value.startswith("urn") or "://" in value else (_LONG_CODE_VALUE, "UC")
    else:
        value_tag = (_CODE_VALUE, "SH")
    found = [(*value_tag, value), (_MEANING, "LO", meaning), (_SCHEME, "SH", scheme)]
    if version is not None:
        found.append((_SCHEME_VERSION, "SH", version))
    return tuple(_prototype(tag, vr, text) for tag, vr, text in found)


def coded(code: Code) -> Dataset:
    """A Code Sequence item (the Basic Code Sequence macro), as highdicom's ``CodedConcept``."""
    if len(code.meaning) > 64:
        raise ValueError("Code meaning can have maximally 64 characters.")
    version = None if code.scheme_version is None else str(code.scheme_version)
    prototypes = _code_elements(str(code.value), str(code.scheme_designator), str(code.meaning), version)
    return of_elements({one.tag: _copy(one) for one in prototypes})


def item(value_type: str, name: Code, relationship: str | None, *elements: tuple[int, str, object]) -> Dataset:
    """A content item: value type, concept name, relationship (None for the root) and its value elements."""
    made = {
        _VALUE_TYPE: _fixed(_VALUE_TYPE, "CS", value_type),
        _CONCEPT_NAME: _sequence_element(_CONCEPT_NAME, [coded(name)]),
    }
    for tag, vr, value in elements:
        one = element(tag, vr, value)
        made[one.tag] = one
    if relationship is not None:
        made[_RELATIONSHIP] = _fixed(_RELATIONSHIP, "CS", relationship)
    return of_elements(made)


def with_children(parent: Dataset, children: Iterable[Dataset]) -> Dataset:
    """``parent`` with ``children`` as its Content Sequence (none when there are no children)."""
    found = list(children)
    if found:
        add(parent, element(_CONTENT, "SQ", sequence(found)))
    return parent


def code(name: Code, value: Code, relationship: str) -> Dataset:
    """A CODE item."""
    return item("CODE", name, relationship, (_CONCEPT_CODE, "SQ", sequence([coded(value)])))


def text(name: Code, value: str, relationship: str) -> Dataset:
    """A TEXT item."""
    return item("TEXT", name, relationship, (_TEXT, "UT", value))


def uidref(name: Code, value: str, relationship: str) -> Dataset:
    """A UIDREF item."""
    return item("UIDREF", name, relationship, (_UID, "UI", value))


def date(name: Code, value: DA, relationship: str) -> Dataset:
    """A DATE item."""
    return item("DATE", name, relationship, (_DATE, "DA", value))


def num(name: Code, value: float, unit: Code, relationship: str = CONTAINS) -> Dataset:
    """A NUM item; the value both as a decimal string and, for a float, as a floating point value."""
    measured = dataset((_UNITS, "SQ", sequence([coded(unit)])), (_NUMERIC_VALUE, "DS", DS(value, auto_format=True)))
    if isinstance(value, float):
        add(measured, element(_FLOAT, "FD", value))
    return item("NUM", name, relationship, (_MEASURED_VALUE, "SQ", sequence([measured])))


def container(
    name: Code, relationship: str | None, children: Iterable[Dataset], template: str | None = None
) -> Dataset:
    """A CONTAINER item (continuous), with its template identifier (DCMR) when given."""
    ds = item("CONTAINER", name, relationship, (_CONTINUITY, "CS", "CONTINUOUS"))
    if template is not None:
        templates = dataset((_MAPPING_RESOURCE, "CS", "DCMR"), (_TEMPLATE_IDENTIFIER, "CS", template))
        add(ds, element(_TEMPLATE, "SQ", sequence([templates])))
    return with_children(ds, children)


def image(name: Code, sop_class_uid: str, sop_instance_uid: str, relationship: str) -> Dataset:
    """An IMAGE item referencing one single-frame image."""
    reference = dataset(
        (_REFERENCED_SOP_CLASS, "UI", sop_class_uid), (_REFERENCED_SOP_INSTANCE, "UI", sop_instance_uid)
    )
    return item("IMAGE", name, relationship, (_REFERENCED_SOP_SEQUENCE, "SQ", sequence([reference])))


def polyline_region(points: np.ndarray, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """A TID 1410 Image Region: a SCOORD POLYLINE in the pixels of one source image (``(N, 2)`` column, row)."""
    region = item(
        "SCOORD",
        IMAGE_REGION,
        CONTAINS,
        (_GRAPHIC_DATA, "FL", points.flatten().tolist()),
        (_GRAPHIC_TYPE, "CS", "POLYLINE"),
    )
    return with_children(region, [image(_SOURCE, sop_class_uid, sop_instance_uid, SELECTED_FROM)])


def tracking(identifier: str, uid: str) -> list[Dataset]:
    """TID 4108 Tracking Identifier and Tracking Unique Identifier."""
    return [
        text(TRACKING_IDENTIFIER, identifier, HAS_OBS_CONTEXT),
        uidref(TRACKING_UID, uid, HAS_OBS_CONTEXT),
    ]


def algorithm(name: str, version: str) -> list[Dataset]:
    """TID 4019 Algorithm Identification: name and version."""
    return [
        text(ALGORITHM_NAME, name, HAS_CONCEPT_MOD),
        text(ALGORITHM_VERSION, version, HAS_CONCEPT_MOD),
    ]


def measurement(name: Code, value: float, unit: Code, algorithm_id: Sequence[Dataset] = ()) -> Dataset:
    """TID 300 Measurement: a NUM, with the algorithm that made it when given."""
    return with_children(num(name, value, unit), algorithm_id)


def device_observer(uid: str, name: str, manufacturer: str, model_name: str) -> list[Dataset]:
    """TID 1002 Observer Context for a device (TID 1004)."""
    return [
        code(OBSERVER_TYPE, DEVICE, HAS_OBS_CONTEXT),
        uidref(DEVICE_UID, uid, HAS_OBS_CONTEXT),
        text(DEVICE_NAME, name, HAS_OBS_CONTEXT),
        text(DEVICE_MANUFACTURER, manufacturer, HAS_OBS_CONTEXT),
        text(DEVICE_MODEL, model_name, HAS_OBS_CONTEXT),
    ]


def language() -> Dataset:
    """TID 1204 Language of Content Item and Descendants (en-US)."""
    return code(LANGUAGE_OF_CONTENT, _LANGUAGE, HAS_CONCEPT_MOD)


def measurement_report(
    title: Code,
    observer: Sequence[Dataset],
    procedure: Code,
    library: Sequence[Dataset],
    groups: Sequence[Dataset],
) -> Dataset:
    """TID 1500 Measurement Report: the root container with language, observer, procedure, image library and
    the Imaging Measurements container holding ``groups``."""
    children = [
        language(),
        *observer,
        code(PROCEDURE_REPORTED, procedure, HAS_CONCEPT_MOD),
        *library,
        container(IMAGING_MEASUREMENTS, CONTAINS, groups),
    ]
    return container(title, None, children, template="1500")
