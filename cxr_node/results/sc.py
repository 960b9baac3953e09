"""The Secondary Capture overlay: the source image with the lung contour, the heatmap and a banner burnt in.

The one output every viewer shows. It is an RGB image at the analysed resolution (the source reduced to
at most ``worker.max_side``), in the source's patient and study, in a new series. It carries no Pixel
Spacing: it is a picture of a result, not an image to measure on (DerivationDescription says so).

How it is built: the data set is assembled directly with pydicom, attribute for attribute what highdicom
0.28's ``SCImage.from_ref_dataset`` writes (its File Meta Information and contributing-equipment entry
included), with the checks it makes of the source; highdicom's constructor costs about ten times more, most of
it looking the source's SOP class up in the standard's IOD tables on every call. highdicom stays the
reference: :func:`cxr_node.results.sc_reference.build_sc_reference` builds the same overlay with it, and
``tests/dicom/test_sc_equivalence.py`` requires the two to be equal element by element and byte for byte on
many inputs, so a change in highdicom shows up as a failing test.
"""

from __future__ import annotations

import datetime
from functools import cache
from typing import Final

import highdicom as hd
import numpy as np
from highdicom.valuerep import (  # the checks highdicom makes of the same values
    _check_long_string,
    _check_specific_character_set,
    check_person_name,
)
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.tag import BaseTag
from pydicom.uid import SecondaryCaptureImageStorage
from pydicom.valuerep import DA, TM

from cxr_node.results.as_highdicom import equipment_items, file_meta
from cxr_node.results.common import (
    Identity,
    OutputError,
    OutputOptions,
    clone_dataset,
    contributing_equipment,
    copy_character_set,
    copy_element,
    copy_series_context,
    put,
)
from cxr_node.results.findings import MODE_NOTICES, Findings
from cxr_node.results.render import Banner, render_overlay, window_to_uint8

TITLE = "AI RESULT"
NEIGHBOURS_ON_BANNER = 3
UNKNOWN_ORIENTATION = ("L", "F")
"""What highdicom is given when the source has no usable PatientOrientation (it insists on one); the overlay is
then written with an empty PatientOrientation, never this placeholder."""


def banner(findings: Findings) -> Banner:
    """The banner's text: the go-live mode's notice (shadow, supervised), decision and probability, model,
    nearest neighbours, intended use."""
    provenance, summary = findings.provenance, findings.summary
    if summary.analysed:
        point = summary.operating_point
        source = findings.operating_point_source
        first = f"{summary.decision.upper()}   p = {summary.probability:.2f}  (operating point {point:.2f}, {source})"
    else:
        first = f"NOT ANALYSED: {summary.reason}"
    lines = [
        first,
        f"model {provenance.algorithm} ({len(provenance.members)} networks), cxr-node {provenance.software_version}",
    ]
    if summary.analysed and summary.outside_domain:
        lines.insert(1, f"WARNING: {summary.domain_text}")
    if MODE_NOTICES[provenance.mode]:  # shadow, supervised: said before anything else
        lines.insert(0, MODE_NOTICES[provenance.mode])
    if findings.summary.similar:
        shown = findings.summary.similar[:NEIGHBOURS_ON_BANNER]
        lines.append(
            "similar cases: "
            + ";  ".join(f"{case.display_id} {case.similarity:.2f} {case.label_text}".rstrip() for case in shown)
        )
    lines.append(provenance.intended_use)
    return Banner(title=TITLE, lines=tuple(lines), alert=bool(findings.summary.positive))


def overlay_pixels(findings: Findings) -> np.ndarray:
    """Render the overlay of ``findings`` as uint8 (H, W, 3) RGB."""
    if findings.image is None:
        raise OutputError("an overlay needs the decoded image; findings have none")
    heatmap = findings.heatmap if findings.summary.analysed else None
    mask = findings.lung_mask if findings.summary.analysed else None
    return render_overlay(window_to_uint8(findings.image), mask, heatmap, banner(findings))


def now() -> datetime.datetime:
    """The clock the overlay's dates and times come from (one reading per overlay)."""
    return datetime.datetime.now()


def build_sc(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the Secondary Capture overlay of ``findings`` in the ``source`` image's study.

    The data set is assembled directly (:func:`secondary_capture`); it equals, element by element, what highdicom
    builds (:func:`cxr_node.results.sc_reference.build_sc_reference`).

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source image's header (pixel data not needed); only read.
    findings : Findings
        What was found, or why the image was not analysed; must hold the decoded image.
    options : OutputOptions
        The site's choices (institution name).
    ids : Identity
        The output's UIDs, series number and description.

    Raises
    ------
    OutputError
        When the findings have no image or the source holds a value highdicom would refuse.
    """
    pixels = overlay_pixels(findings)
    orientation = orientation_of(source)
    provenance = findings.provenance
    try:
        clock = now()
        sc = secondary_capture(source, pixels, ids, provenance.manufacturer, orientation or UNKNOWN_ORIENTATION, clock)
        equipment = equipment_items(source, contributing_equipment(provenance, options), clock)
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"overlay cannot be built: {exc}") from exc
    sc.add(DataElement(_CONTRIBUTING_EQUIPMENT, "SQ", DicomSequence(equipment)))
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: the source says nothing usable, so neither does the overlay
    describe(sc, source, findings, ids)
    copy_series_context(source, sc)
    copy_character_set(source, sc, (provenance.intended_use, findings.summary.reason))
    return sc


def secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    ids: Identity,
    manufacturer: str,
    orientation: tuple[str, str],
    clock: datetime.datetime,
) -> Dataset:
    """The SC Image of the RGB ``pixels`` in ``source``'s study, without its Contributing Equipment Sequence, as
    highdicom's ``SCImage.from_ref_dataset`` writes it (RGB, 8 bits, patient coordinates, Explicit VR Little
    Endian; ImageType ``DERIVED\\SECONDARY\\OTHER``).

    Raises
    ------
    ValueError, TypeError, AttributeError
        Where highdicom's constructor raises them for these arguments.
    """
    _check_source(source)
    if ids.series_number < 1 or ids.instance_number < 1:
        raise ValueError("series and instance numbers must be positive integers")
    _check_long_string(manufacturer)
    row, column = (hd.PatientOrientationValuesBiped(value).value for value in orientation)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels: expected (H, W, 3) uint8 RGB, found {pixels.shape} {pixels.dtype}")
    sc = Dataset()
    sc.preamble = b"\x00" * 128
    sc.file_meta = file_meta(SecondaryCaptureImageStorage, ids.sop_instance_uid)
    copied = source._dict
    for tag, vr in _PATIENT_AND_STUDY:
        element = copied.get(tag)
        if element is not None and not isinstance(element, DataElement):
            element = source[tag]  # a raw element, converted as indexing converts it
        put(sc, DataElement(tag, vr, None) if element is None else copy_element(element))
    rows, columns = pixels.shape[:2]
    elements: tuple[tuple[int, str, object], ...] = (
        (0x00080008, "CS", ["DERIVED", "SECONDARY", "OTHER"]),  # Image Type
        (0x00080012, "DA", DA(clock.date())),  # Instance Creation Date
        (0x00080013, "TM", TM(clock.time())),  # Instance Creation Time
        (0x00080018, "UI", ids.sop_instance_uid),
        (0x00080023, "DA", DA(clock.date())),  # Content Date
        (0x00080033, "TM", TM(clock.time())),  # Content Time
        (0x00080070, "LO", manufacturer),
        (0x00181012, "DA", DA(clock.date())),  # Date of Secondary Capture
        (0x00181014, "TM", TM(clock.time())),  # Time of Secondary Capture
        (0x0020000D, "UI", str(source.StudyInstanceUID)),
        (0x0020000E, "UI", ids.series_instance_uid),
        (0x00200011, "IS", ids.series_number),
        (0x00200013, "IS", ids.instance_number),
        (0x00200020, "CS", [row, column]),  # Patient Orientation
        (0x00280010, "US", int(rows)),
        (0x00280011, "US", int(columns)),
        (0x7FE00010, "OB or OW", pixels.tobytes()),  # as highdicom sets it; written OB (8 bits allocated)
    )
    for number, vr_name, value in elements:
        put(sc, DataElement(number, vr_name, value))
    for element in _constant_elements():
        put(sc, copy_element(element))
    return sc


@cache
def _constant_elements() -> tuple[DataElement, ...]:
    """The elements :func:`secondary_capture` writes the same in every overlay, made once and copied
    (:func:`~cxr_node.results.common.copy_element`: their values cannot change, so the copies share them)."""
    constants: tuple[tuple[int, str, object], ...] = (
        (0x00080016, "UI", SecondaryCaptureImageStorage),
        (0x00080060, "CS", "OT"),  # Modality
        (0x00080064, "CS", "DI"),  # Conversion Type: digital interface
        (0x00280002, "US", 3),  # Samples per Pixel
        (0x00280004, "CS", "RGB"),
        (0x00280006, "US", 0),  # Planar Configuration: colour-by-pixel
        (0x00280100, "US", 8),  # Bits Allocated
        (0x00280101, "US", 8),  # Bits Stored
        (0x00280102, "US", 7),  # High Bit
        (0x00280103, "US", 0),  # Pixel Representation: unsigned
    )
    return tuple(DataElement(number, vr_name, value) for number, vr_name, value in constants)


def describe(sc: Dataset, source: Dataset, findings: Findings, ids: Identity) -> None:
    """Add to ``sc`` what says what the overlay is: series description, burnt-in annotation, image type,
    derivation and the source image it was derived from."""
    sc.SeriesDescription = ids.series_description
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    rows, columns = findings.image.shape if findings.image is not None else findings.summary.source_shape
    sc.DerivationDescription = (
        f"AI overlay by {findings.provenance.algorithm}: source reduced to {columns}x{rows}, lung contour and"
        f" Grad-CAM heatmap drawn, banner added; no pixel spacing; go-live mode {findings.provenance.mode_text}"
    )[:1024]
    sc.SourceImageSequence = DicomSequence([_source_reference(source)])


def orientation_of(source: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation (row, column), or None when it has no usable one."""
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2 or not all(value):
        return None
    return (str(value[0]), str(value[1]))


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = DicomSequence([clone_dataset(_purpose_of_reference())])
    return item


@cache
def _purpose_of_reference() -> Dataset:
    """The source reference's purpose code item, the same in every overlay: made once, cloned for each."""
    purpose = dcm_codes.DCM.SourceImageForImageProcessingOperation
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        purpose.value,
        purpose.scheme_designator,
        purpose.meaning,
    )
    return code


# ------------------------------------------------------------------------------------------ as highdicom writes it

_CONTRIBUTING_EQUIPMENT: Final = BaseTag(0x0018A001)
_PATIENT_AND_STUDY: Final = tuple(
    (BaseTag(tag), vr)
    for tag, vr in (
        (0x00100020, "LO"), (0x00100010, "PN"), (0x00100030, "DA"), (0x00100040, "CS"), (0x0020000D, "UI"),
        (0x00080050, "SH"), (0x00200010, "SH"), (0x00080020, "DA"), (0x00080030, "TM"), (0x00080090, "PN"),
    )
)  # fmt: skip
"""The Patient and Study attributes highdicom's SC copies from the source (the output path then replaces them with
the checked copies every output shares, :meth:`cxr_node.results.copied.Copied.apply`)."""


def _check_source(source: Dataset) -> None:
    """Raise where highdicom's ``SCImage.from_ref_dataset`` refuses the source's patient and study values."""
    charset = source.get("SpecificCharacterSet")
    if charset is not None:
        _check_specific_character_set(charset)
    for keyword in ("PatientName", "ReferringPhysicianName"):
        name = source.get(keyword)
        if name is not None:
            check_person_name(name)
    DA(source.get("PatientBirthDate"))
    sex = source.get("PatientSex")
    if sex is not None and sex != "":
        hd.PatientSexValues(sex)
    for keyword, parse in (("StudyDate", DA), ("StudyTime", TM)):
        value = source.get(keyword)
        if value is not None:
            parse(value)
