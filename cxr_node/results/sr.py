"""The Structured Report: a TID 1500 Measurement Report of one analysed (or not analysed) chest radiograph.

Why TID 1500 in a Comprehensive SR: common web viewers (OHIF) display only TID 1500, and only its
measurement groups with an image region, so the probability sits in a planar-ROI group (TID 1410)
whose region is the lung outline. TID 1500 is extensible; what it has no row for (the neighbours'
UIDs, the intended-use text, the reason an image was not analysed) is added as UIDREF, DATE and TEXT
items; Comprehensive SR holds them with the SCOORD region and is the SR class viewers handle most
widely. docs/outputs.md shows the tree.

How it is built: the content items and the document are written directly as pydicom data sets
(:mod:`~cxr_node.results.sr_content`, :mod:`~cxr_node.results.sr_document`), about twenty times cheaper
than through highdicom's templates, which re-read and deep-copy the tree. highdicom stays the reference:
:func:`cxr_node.results.sr_reference.build_sr_reference` builds the same report with its templates and
``ComprehensiveSR``, and ``tests/dicom/test_sr_equivalence.py`` requires the two to be equal element by element
(and byte for byte) on many inputs, so a change in highdicom shows up as a failing test. The Image Library
entry, when the source can be described, is still written by highdicom.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

import highdicom.sr as hsr
import numpy as np
from highdicom.sr.content import _check_valid_source_image_dataset  # the check highdicom makes of a source
from highdicom.sr.templates import _get_coded_modality  # the modality code highdicom's library entries use
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA

from cxr_node.dicom import codes
from cxr_node.dicom.uids import derived_uid
from cxr_node.imaging.masks import cached_lung_outlines, convex_hull
from cxr_node.results import sr_content as item
from cxr_node.results.common import (
    Identity,
    OutputError,
    OutputOptions,
    contributing_equipment,
    copy_character_set,
    without_pixels,
)
from cxr_node.results.findings import MODE_NOTICES, Findings, SimilarCase
from cxr_node.results.sr_document import comprehensive_sr

_REPORT_TITLE: Final = dcm_codes.DCM.ImagingMeasurementReport
LABEL_VALUES = {"covid": codes.PRESENT, "non-covid": codes.ABSENT}
REPAIRS_LIMIT = 1024
"""Characters of the processing summary's line on repaired source values that are kept."""


def build_sr(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the Comprehensive SR (TID 1500) of ``findings`` on the ``source`` image.

    The content items and the document are written directly (:mod:`~cxr_node.results.sr_content`,
    :mod:`~cxr_node.results.sr_document`); the result equals, element by element, what highdicom builds
    (:func:`cxr_node.results.sr_reference.build_sr_reference`).

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source image's header (pixel data not needed); only read.
    findings : Findings
        What was found, or why the image was not analysed.
    options : OutputOptions
        The site's choices (institution name).
    ids : Identity
        The output's UIDs, series number and description.

    Raises
    ------
    OutputError
        When the content cannot be built (where highdicom would refuse it).
    """
    try:
        content = report_content(source, findings, ids.notes)
        sr = comprehensive_sr(
            source,
            content,
            ids,
            findings.provenance.manufacturer,
            contributing_equipment(findings.provenance, options),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"structured report cannot be built: {exc}") from exc
    copy_character_set(source, sr, (*own_texts(findings), repairs_text(ids.notes)))
    return sr


def report_content(source: Dataset, findings: Findings, notes: Sequence[str]) -> Dataset:
    """The root CONTAINER of the report: TID 1500 with one group for the finding (or for why there is none), a
    "Similar past cases" container with one group per similar case, and the report-level evaluations.

    The similar cases stay out of Imaging Measurements: OHIF 3.13 stops drawing a report whose Imaging
    Measurements hold a group without an image region (TRAPS.md), and a past case has no region on this image.
    """
    provenance = findings.provenance
    ensemble = provenance.ensemble
    observer = item.device_observer(ensemble.device_uid, provenance.algorithm, provenance.manufacturer, ensemble.name)
    groups = [_finding_group(source, findings) if findings.summary.analysed else _not_analysed_group(source, findings)]
    root = item.measurement_report(_REPORT_TITLE, observer, codes.PLAIN_CHEST_XRAY, _library(source), groups)
    cases = [_neighbour_group(source, findings, case) for case in findings.summary.similar]
    if cases:
        root.ContentSequence.append(item.container(codes.SIMILAR_CASES, item.CONTAINS, cases))
    root.ContentSequence.append(_evaluations(findings, notes))
    return root


def usable_evidence(source: Dataset) -> Dataset:
    """Return a header copy of the source without pixel data and without invalid spacing values.

    A spacing of ``0\\0`` is treated as unknown (TRAPS.md): highdicom and viewers would divide by it.
    """
    header = without_pixels(source)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if not _valid_spacing(header.get(keyword)):
            del header[keyword]
    return header


def _valid_spacing(value: Sequence[float] | None) -> bool:
    """Whether a spacing is absent or two positive numbers."""
    return value is None or (len(value) == 2 and all(float(v) > 0 for v in value))


def library_ready(evidence: Dataset) -> bool:
    """Whether highdicom can describe the image in the Image Library: for a radiograph it needs Patient
    Orientation and a valid Imager Pixel Spacing, which real CRs often lack (the library is then left empty)."""
    orientation = evidence.get("PatientOrientation")
    spacing = evidence.get("ImagerPixelSpacing")
    return bool(orientation and len(orientation) == 2 and spacing and len(spacing) == 2 and _valid_spacing(spacing))


def _library(source: Dataset) -> list[Dataset]:
    """The Image Library (TID 1600) of the one image analysed: highdicom's entry when it can describe the image,
    else the entry with the descriptors the image has (:func:`partial_library`)."""
    if not library_ready(source):
        return [_partial_library(source)]
    return list(hsr.ImageLibrary([usable_evidence(source)]))


def _partial_library(source: Dataset) -> Dataset:
    """:func:`partial_library`, written directly (:mod:`~cxr_node.results.sr_content`); the tests hold the two equal."""
    acquisition = item.HAS_ACQ_CONTEXT
    descriptors = [
        item.code(dcm_codes.DCM.Modality, coded_modality(str(source.SOPClassUID)), acquisition),
        item.num(dcm_codes.DCM.PixelDataRows, _number(source.Rows), _PIXELS, acquisition),
        item.num(dcm_codes.DCM.PixelDataColumns, _number(source.Columns), _PIXELS, acquisition),
    ]
    orientation = source.get("PatientOrientation")
    if orientation and len(orientation) == 2 and all(orientation):
        descriptors += [
            item.text(dcm_codes.DCM.PatientOrientationRow, str(orientation[0]), acquisition),
            item.text(dcm_codes.DCM.PatientOrientationColumn, str(orientation[1]), acquisition),
        ]
    spacing = source.get("ImagerPixelSpacing")
    if spacing and len(spacing) == 2 and _valid_spacing(spacing):
        mm = dcm_codes.UCUM.Millimeter
        descriptors += [
            item.num(dcm_codes.DCM.HorizontalPixelSpacing, _number(spacing[1]), mm, acquisition),
            item.num(dcm_codes.DCM.VerticalPixelSpacing, _number(spacing[0]), mm, acquisition),
        ]
    entry = item.image(dcm_codes.SCT.Source, str(source.SOPClassUID), str(source.SOPInstanceUID), item.CONTAINS)
    group = item.container(dcm_codes.DCM.ImageLibraryGroup, item.CONTAINS, [item.with_children(entry, descriptors)])
    return item.container(dcm_codes.DCM.ImageLibrary, item.CONTAINS, [group])


def _number(value: object) -> float:
    """A descriptor's value, refused as highdicom's NUM item refuses it (neither int nor float: TypeError)."""
    if not isinstance(value, int | float):
        raise TypeError('Argument "value" must have type "int" or "float".')
    return value


@lru_cache(maxsize=64)
def coded_modality(sop_class_uid: str) -> Code:
    """The acquisition modality (CID 29) highdicom's library entries give an image of ``sop_class_uid`` (ValueError
    for a class that is not an image's)."""
    return _get_coded_modality(sop_class_uid)


_PIXELS: Final = Code("{pixels}", "UCUM", "Pixels")


def partial_library(source: Dataset) -> hsr.ContainerContentItem:
    """The Image Library (TID 1600) of an image highdicom cannot describe in full (real CRs often lack Patient
    Orientation or a valid Imager Pixel Spacing): its reference, modality and matrix (TID 1602), and the
    orientation and spacing (TID 1603) only where the image has sound values. Built with highdicom's content
    items for the reference builder; :func:`build_sr` writes the same entry directly."""
    acquisition = hsr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    descriptors: list[hsr.ContentItem] = [
        hsr.CodeContentItem(dcm_codes.DCM.Modality, _get_coded_modality(source.SOPClassUID), acquisition),
        hsr.NumContentItem(dcm_codes.DCM.PixelDataRows, source.Rows, _PIXELS, relationship_type=acquisition),
        hsr.NumContentItem(dcm_codes.DCM.PixelDataColumns, source.Columns, _PIXELS, relationship_type=acquisition),
    ]
    orientation = source.get("PatientOrientation")
    if orientation and len(orientation) == 2 and all(orientation):
        descriptors += [
            hsr.TextContentItem(dcm_codes.DCM.PatientOrientationRow, orientation[0], acquisition),
            hsr.TextContentItem(dcm_codes.DCM.PatientOrientationColumn, orientation[1], acquisition),
        ]
    spacing = source.get("ImagerPixelSpacing")
    if spacing and len(spacing) == 2 and _valid_spacing(spacing):
        mm = dcm_codes.UCUM.Millimeter
        descriptors += [
            hsr.NumContentItem(dcm_codes.DCM.HorizontalPixelSpacing, spacing[1], mm, relationship_type=acquisition),
            hsr.NumContentItem(dcm_codes.DCM.VerticalPixelSpacing, spacing[0], mm, relationship_type=acquisition),
        ]
    contains = hsr.RelationshipTypeValues.CONTAINS
    entry = hsr.ImageContentItem(
        name=dcm_codes.SCT.Source,
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=contains,
    )
    entry.ContentSequence = hsr.ContentSequence(descriptors)
    group = hsr.ContainerContentItem(dcm_codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hsr.ContentSequence([entry])
    library = hsr.ContainerContentItem(dcm_codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hsr.ContentSequence([group])
    return library


def _finding_group(source: Dataset, findings: Findings) -> Dataset:
    """The planar-ROI group (TID 1410) a viewer draws: the lung region, the probabilities and the decision."""
    provenance, summary = findings.provenance, findings.summary
    version = provenance.model_version
    ensemble = item.algorithm(provenance.model_name, version)
    measurements = [
        item.measurement(codes.PROBABILITY, rounded(summary.probability), codes.UNIT_PROBABILITY, ensemble),
        *(
            item.measurement(
                codes.PROBABILITY,
                rounded(p),
                codes.UNIT_PROBABILITY,
                item.algorithm(name, provenance.member_version(name)),
            )
            for name, p in summary.members
        ),
        item.measurement(codes.OPERATING_POINT, rounded(summary.operating_point), codes.UNIT_PROBABILITY),
    ]
    children = [
        *item.tracking("AI lung region", _tracking_uid(source, findings, "lung-region")),
        item.code(item.FINDING, codes.COVID19, item.CONTAINS),
        item.code(item.FINDING_SITE, codes.LUNG, item.HAS_CONCEPT_MOD),
        *item.algorithm(provenance.model_name, version),
        *measurements,
        item.code(codes.COVID19, codes.PRESENT if summary.positive else codes.ABSENT, item.CONTAINS),
        item.code(
            codes.LUNG_MASK_QUALITY, codes.PLAUSIBLE if summary.mask_plausible else codes.IMPLAUSIBLE, item.CONTAINS
        ),
        _region(source, findings),
    ]
    return item.container(item.MEASUREMENT_GROUP, item.CONTAINS, children, template="1410")


def _region(source: Dataset, findings: Findings) -> Dataset:
    """The lung region (SCOORD) on the source image, which must be one a region can be drawn on."""
    _check_valid_source_image_dataset(source)
    return item.polyline_region(lung_region(findings), str(source.SOPClassUID), str(source.SOPInstanceUID))


def _not_analysed_group(source: Dataset, findings: Findings) -> Dataset:
    """TID 1500 needs one group (TID 1501): for an image not analysed, the processing summary and mask verdict."""
    children = [
        *item.tracking("AI analysis: not analysed", _tracking_uid(source, findings, "not-analysed")),
        item.code(codes.PROCESSING_SUMMARY, codes.NONE_SUCCEEDED, item.CONTAINS),
    ]
    if findings.summary.mask_plausible is False:
        children.append(item.code(codes.LUNG_MASK_QUALITY, codes.IMPLAUSIBLE, item.CONTAINS))
    return item.container(item.MEASUREMENT_GROUP, item.CONTAINS, children, template="1501")


def _neighbour_group(source: Dataset, findings: Findings, case: SimilarCase) -> Dataset:
    """A TID 1501 group per similar past case: similarity, known label and identifiers the site allows."""
    children = [
        *item.tracking(case_title(case), _tracking_uid(source, findings, f"similar-{case.rank}")),
        item.measurement(codes.SIMILARITY, rounded(case.similarity), codes.UNIT_RATIO),
    ]
    if case.label:
        children.append(item.code(codes.COVID19, LABEL_VALUES[case.label], item.CONTAINS))
    children += _case_identifiers(case)
    return item.container(item.MEASUREMENT_GROUP, item.CONTAINS, children, template="1501")


def _tracking_uid(source: Dataset, findings: Findings, what: str) -> str:
    return derived_uid(str(source.SOPInstanceUID), findings.provenance.model_key, "sr", what)


def _case_identifiers(case: SimilarCase) -> list[Dataset]:
    items = [item.text(codes.CASE_NUMBER, case.case_number, item.CONTAINS)]
    if case.accession_number:
        items.append(item.text(codes.ACCESSION_NUMBER, case.accession_number, item.CONTAINS))
    date = study_date(case.study_date)
    if date is not None:
        items.append(item.date(codes.STUDY_DATE, DA(date), item.CONTAINS))
    if case.study_instance_uid:
        items.append(item.uidref(codes.STUDY_INSTANCE_UID, case.study_instance_uid, item.CONTAINS))
    if case.sop_instance_uid:
        items.append(item.uidref(codes.SIMILAR_CASE_SOP_INSTANCE_UID, case.sop_instance_uid, item.CONTAINS))
    return items


def _evaluations(findings: Findings, notes: Sequence[str]) -> Dataset:
    """The report-level Qualitative Evaluations container: processing summary, impression, what was repaired
    in the values copied from the source (when anything was), intended use."""
    children = [
        item.code(codes.PROCESSING_SUMMARY, summary_code(findings), item.CONTAINS),
        item.text(codes.IMPRESSION, impression(findings), item.CONTAINS),
    ]
    if not findings.summary.analysed:
        children.append(item.text(codes.REASON_NOT_ANALYSED, findings.summary.reason, item.CONTAINS))
    elif findings.summary.outside_domain:
        children.append(item.text(codes.OUTSIDE_DOMAIN, findings.summary.domain_text, item.CONTAINS))
    if notes:
        children.append(item.text(codes.COMMENT, repairs_text(notes), item.CONTAINS))
    children.append(item.text(codes.INTENDED_USE, findings.provenance.intended_use, item.CONTAINS))
    children.append(item.text(codes.DEPLOYMENT_MODE, findings.provenance.mode_text, item.CONTAINS))
    return item.container(codes.QUALITATIVE_EVALUATIONS, item.CONTAINS, children)


def lung_region(findings: Findings) -> np.ndarray:
    """The closed polyline around both lungs (convex hull of their outlines), in source pixel coordinates.

    Falls back to the image border when the mask has no outline (an implausible mask is not analysed).
    """
    rows, cols = findings.summary.source_shape
    border = np.array([[0, 0], [cols - 1, 0], [cols - 1, rows - 1], [0, rows - 1], [0, 0]], dtype=np.float64)
    if findings.lung_mask is None:
        return border.astype(np.float32)
    outlines = cached_lung_outlines(findings.lung_mask, findings.summary.source_shape)  # the GSPS draws them too
    if not outlines:
        return border.astype(np.float32)
    return np.round(convex_hull(np.vstack(outlines)), 1).astype(np.float32)


def case_title(case: SimilarCase) -> str:
    """The tracking identifier of a similar case's group, e.g. ``Similar case 1: ACC123, 2020-03-01, confirmed
    covid``."""
    label = f", {case.label_text}" if case.label else ""
    date = f", {_iso_date(case.study_date)}" if case.study_date else ""
    return f"Similar case {case.rank}: {case.display_id}{date}{label}"[:64]


def repairs_text(notes: Sequence[str], limit: int = REPAIRS_LIMIT) -> str:
    """The processing summary's line on the source values repaired or left out ("" when none), e.g.
    ``Source values repaired: StudyDate 2020.03.01 -> 20200301; AccessionNumber left empty (over 16
    characters)``; at most ``limit`` characters. Names the attributes, never a patient's values."""
    if not notes:
        return ""
    text = "Source values repaired: " + "; ".join(notes)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_code(findings: Findings) -> Code:
    if not findings.summary.analysed:
        return codes.NONE_SUCCEEDED
    return codes.SUCCEEDED_WITH_FINDINGS if findings.summary.positive else codes.SUCCEEDED_WITHOUT_FINDINGS


def impression(findings: Findings) -> str:
    """The one-sentence result, as the SR's Impression and the overlay's first line say it (after the go-live
    mode's notice, in shadow and supervised mode)."""
    algorithm = findings.provenance.algorithm
    notice = MODE_NOTICES[findings.provenance.mode]
    marked = f"{notice}: " if notice else ""
    if not findings.summary.analysed:
        return f"{marked}Not analysed by {algorithm}: {findings.summary.reason}"
    outside = f"; {findings.summary.domain_text}" if findings.summary.outside_domain else ""
    return (
        f"{marked}{findings.summary.decision} by {algorithm} (probability {findings.summary.probability:.2f}, "
        f"operating point {findings.summary.operating_point:.2f}, {findings.operating_point_source}){outside}"
    )


def own_texts(findings: Findings) -> tuple[str, ...]:
    cases: Sequence[SimilarCase] = findings.summary.similar
    return (
        impression(findings),
        findings.provenance.intended_use,
        findings.summary.reason,
        *(case_title(case) for case in cases),
    )


def study_date(value: str | None) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value or "", "%Y%m%d").date()
    except ValueError:
        return None


def _iso_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value


def rounded(value: float | None) -> float:
    return round(float(value or 0.0), 4)
