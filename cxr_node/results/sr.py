"""The Structured Report: a TID 1500 Measurement Report of one analysed (or not analysed) chest radiograph.

Why TID 1500 in a Comprehensive SR: common web viewers (OHIF) display only TID 1500, and only its
measurement groups with an image region, so the probability sits in a planar-ROI group (TID 1410)
whose region is the lung outline. TID 1500 is extensible; what it has no row for (the neighbours'
UIDs, the intended-use text, the reason an image was not analysed) is added as UIDREF, DATE and TEXT
items; Comprehensive SR holds them with the SCOORD region and is the SR class viewers handle most
widely. docs/outputs.md
shows the tree.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import highdicom.sr as hsr
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from cxr_node.dicom import codes
from cxr_node.dicom.uids import NODE_MANUFACTURER, derived_uid
from cxr_node.imaging.masks import convex_hull, lung_outlines
from cxr_node.results.common import (
    Identity,
    OutputError,
    OutputOptions,
    contributing_equipment,
    copy_character_set,
    without_pixels,
)
from cxr_node.results.findings import Findings, SimilarCase

_LABEL_VALUES = {"covid": codes.PRESENT, "non-covid": codes.ABSENT}
REPAIRS_LIMIT = 1024
"""Characters of the processing summary's line on repaired source values that are kept."""


def build_sr(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the Comprehensive SR (TID 1500) of ``findings`` on the ``source`` image.

    Parameters
    ----------
    source : pydicom.dataset.Dataset
        The source image's header (pixel data not needed).
    findings : Findings
        What was found, or why the image was not analysed.
    options : OutputOptions
        The site's choices (institution name).
    ids : Identity
        The output's UIDs, series number and description.

    Raises
    ------
    OutputError
        When highdicom refuses the content.
    """
    evidence = usable_evidence(source)
    try:
        report = hsr.MeasurementReport(
            observation_context=_observation_context(findings),
            procedure_reported=codes.PLAIN_CHEST_XRAY,
            imaging_measurements=_groups(evidence, findings),
            title=dcm_codes.DCM.ImagingMeasurementReport,
            referenced_images=[evidence] if _library_ready(evidence) else None,
        )
        report[0].ContentSequence.append(_evaluations(findings, ids.notes))
        sr = hsr.ComprehensiveSR(
            evidence=[evidence],
            content=report[0],
            series_instance_uid=ids.series_instance_uid,
            series_number=ids.series_number,
            sop_instance_uid=ids.sop_instance_uid,
            instance_number=ids.instance_number,
            manufacturer=findings.provenance.manufacturer,
            is_complete=True,
            contributing_equipment=contributing_equipment(findings.provenance, options),
            series_description=ids.series_description,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"structured report cannot be built: {exc}") from exc
    copy_character_set(source, sr, (*_own_texts(findings), repairs_text(ids.notes)))
    return sr


def usable_evidence(source: Dataset) -> Dataset:
    """Return a header copy of the source without pixel data and without invalid spacing values.

    A spacing of ``0\\0`` is treated as unknown (TRAPS.md): highdicom and viewers would divide by it.
    """
    header = without_pixels(source)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value is not None and (len(value) != 2 or any(float(v) <= 0 for v in value)):
            del header[keyword]
    return header


def _library_ready(evidence: Dataset) -> bool:
    """Whether highdicom can describe the image in the Image Library: for a radiograph it needs Patient
    Orientation and a valid Imager Pixel Spacing, which real CRs often lack (the library is then left empty)."""
    orientation = evidence.get("PatientOrientation")
    spacing = evidence.get("ImagerPixelSpacing")
    return bool(orientation and len(orientation) == 2 and spacing and len(spacing) == 2)


def _observation_context(findings: Findings) -> hsr.ObservationContext:
    provenance = findings.provenance
    device = hsr.DeviceObserverIdentifyingAttributes(
        uid=provenance.device_uid,
        name=NODE_MANUFACTURER,
        manufacturer_name=provenance.manufacturer,
        model_name=provenance.algorithm[:64],
    )
    return hsr.ObservationContext(
        observer_device_context=hsr.ObserverContext(
            observer_type=dcm_codes.cid270.Device, observer_identifying_attributes=device
        )
    )


Group = hsr.MeasurementsAndQualitativeEvaluations | hsr.PlanarROIMeasurementsAndQualitativeEvaluations


def _groups(evidence: Dataset, findings: Findings) -> list[Group]:
    groups: list[Group] = []
    if findings.summary.analysed:
        groups.append(_finding_group(evidence, findings))
    else:
        groups.append(_not_analysed_group(evidence, findings))
    groups += [_neighbour_group(evidence, findings, case) for case in findings.summary.similar]
    return groups


def _finding_group(evidence: Dataset, findings: Findings) -> hsr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The planar-ROI group a viewer draws: the lung region, the probabilities and the decision."""
    provenance = findings.provenance
    ensemble = hsr.AlgorithmIdentification(name=provenance.model_name, version=provenance.model_version)
    measurements = [
        hsr.Measurement(
            codes.PROBABILITY, _round(findings.summary.probability), codes.UNIT_PROBABILITY, algorithm_id=ensemble
        )
    ]
    measurements += [
        hsr.Measurement(
            codes.PROBABILITY,
            _round(probability),
            codes.UNIT_PROBABILITY,
            algorithm_id=hsr.AlgorithmIdentification(name=name, version=provenance.model_version),
        )
        for name, probability in findings.summary.members
    ]
    measurements.append(
        hsr.Measurement(codes.OPERATING_POINT, _round(findings.summary.operating_point), codes.UNIT_PROBABILITY)
    )
    return hsr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(
            uid=derived_uid(str(evidence.SOPInstanceUID), provenance.model_key, "sr", "lung-region"),
            identifier="AI lung region",
        ),
        referenced_region=hsr.ImageRegion(
            graphic_type=hsr.GraphicTypeValues.POLYLINE,
            graphic_data=lung_region(findings),
            source_image=hsr.SourceImageForRegion.from_source_image(evidence),
        ),
        finding_type=codes.COVID19,
        algorithm_id=ensemble,
        finding_sites=[hsr.FindingSite(codes.LUNG)],
        measurements=measurements,
        qualitative_evaluations=[
            hsr.QualitativeEvaluation(codes.COVID19, codes.PRESENT if findings.summary.positive else codes.ABSENT),
            hsr.QualitativeEvaluation(
                codes.LUNG_MASK_QUALITY, codes.PLAUSIBLE if findings.summary.mask_plausible else codes.IMPLAUSIBLE
            ),
        ],
    )


def _not_analysed_group(evidence: Dataset, findings: Findings) -> hsr.MeasurementsAndQualitativeEvaluations:
    """TID 1500 needs one group: for an image not analysed it holds the processing summary (and mask verdict)."""
    evaluations = [hsr.QualitativeEvaluation(codes.PROCESSING_SUMMARY, codes.NONE_SUCCEEDED)]
    if findings.summary.mask_plausible is False:
        evaluations.append(hsr.QualitativeEvaluation(codes.LUNG_MASK_QUALITY, codes.IMPLAUSIBLE))
    return hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(
            uid=derived_uid(str(evidence.SOPInstanceUID), findings.provenance.model_key, "sr", "not-analysed"),
            identifier="AI analysis: not analysed",
        ),
        qualitative_evaluations=evaluations,
    )


def lung_region(findings: Findings) -> np.ndarray:
    """The closed polyline around both lungs (convex hull of their outlines), in source pixel coordinates.

    Falls back to the image border when the mask has no outline (an implausible mask is not analysed).
    """
    rows, cols = findings.summary.source_shape
    border = np.array([[0, 0], [cols - 1, 0], [cols - 1, rows - 1], [0, rows - 1], [0, 0]], dtype=np.float64)
    if findings.lung_mask is None:
        return border.astype(np.float32)
    outlines = lung_outlines(findings.lung_mask, findings.summary.source_shape)
    if not outlines:
        return border.astype(np.float32)
    return np.round(convex_hull(np.vstack(outlines)), 1).astype(np.float32)


def _neighbour_group(
    evidence: Dataset, findings: Findings, case: SimilarCase
) -> hsr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group per similar past case: similarity, known label and identifiers the site allows."""
    qualitative = [hsr.QualitativeEvaluation(codes.COVID19, _LABEL_VALUES[case.label])] if case.label else None
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(
            uid=derived_uid(str(evidence.SOPInstanceUID), findings.provenance.model_key, "sr", f"similar-{case.rank}"),
            identifier=_case_title(case),
        ),
        measurements=[hsr.Measurement(codes.SIMILARITY, _round(case.similarity), codes.UNIT_RATIO)],
        qualitative_evaluations=qualitative,
    )
    group[0].ContentSequence.extend(_case_identifiers(case))
    return group


def _case_title(case: SimilarCase) -> str:
    label = f", {case.label}" if case.label else ""
    date = f", {_iso_date(case.study_date)}" if case.study_date else ""
    return f"Similar case {case.rank}: {case.display_id}{date}{label}"[:64]


def _case_identifiers(case: SimilarCase) -> list[hsr.ContentItem]:
    contains = hsr.RelationshipTypeValues.CONTAINS
    items: list[hsr.ContentItem] = [hsr.TextContentItem(codes.CASE_NUMBER, case.case_number, contains)]
    if case.accession_number:
        items.append(hsr.TextContentItem(codes.ACCESSION_NUMBER, case.accession_number, contains))
    study_date = _date(case.study_date)
    if study_date is not None:
        items.append(hsr.DateContentItem(codes.STUDY_DATE, study_date, contains))
    if case.study_instance_uid:
        items.append(hsr.UIDRefContentItem(codes.STUDY_INSTANCE_UID, case.study_instance_uid, contains))
    if case.sop_instance_uid:
        items.append(hsr.UIDRefContentItem(codes.SIMILAR_CASE_SOP_INSTANCE_UID, case.sop_instance_uid, contains))
    return items


def _evaluations(findings: Findings, notes: Sequence[str]) -> hsr.ContainerContentItem:
    """The report-level Qualitative Evaluations container: processing summary, impression, what was repaired
    in the values copied from the source (when anything was), intended use."""
    contains = hsr.RelationshipTypeValues.CONTAINS
    items: list[hsr.ContentItem] = [hsr.CodeContentItem(codes.PROCESSING_SUMMARY, _summary(findings), contains)]
    items.append(hsr.TextContentItem(codes.IMPRESSION, impression(findings), contains))
    if not findings.summary.analysed:
        items.append(hsr.TextContentItem(codes.REASON_NOT_ANALYSED, findings.summary.reason, contains))
    if notes:
        items.append(hsr.TextContentItem(codes.COMMENT, repairs_text(notes), contains))
    items.append(hsr.TextContentItem(codes.INTENDED_USE, findings.provenance.intended_use, contains))
    container = hsr.ContainerContentItem(codes.QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hsr.ContentSequence(items)
    return container


def repairs_text(notes: Sequence[str], limit: int = REPAIRS_LIMIT) -> str:
    """The processing summary's line on the source values repaired or left out ("" when none), e.g.
    ``Source values repaired: StudyDate 2020.03.01 -> 20200301; AccessionNumber left empty (over 16
    characters)``; at most ``limit`` characters. Names the attributes, never a patient's values."""
    if not notes:
        return ""
    text = "Source values repaired: " + "; ".join(notes)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(findings: Findings) -> Code:
    if not findings.summary.analysed:
        return codes.NONE_SUCCEEDED
    return codes.SUCCEEDED_WITH_FINDINGS if findings.summary.positive else codes.SUCCEEDED_WITHOUT_FINDINGS


def impression(findings: Findings) -> str:
    """The one-sentence result, as the SR's Impression and the overlay's first line say it."""
    algorithm = findings.provenance.algorithm
    if not findings.summary.analysed:
        return f"Not analysed by {algorithm}: {findings.summary.reason}"
    return (
        f"{findings.summary.decision} by {algorithm} (probability {findings.summary.probability:.2f}, "
        f"operating point {findings.summary.operating_point:.2f})"
    )


def _own_texts(findings: Findings) -> tuple[str, ...]:
    cases: Sequence[SimilarCase] = findings.summary.similar
    return (
        impression(findings),
        findings.provenance.intended_use,
        findings.summary.reason,
        *(_case_title(case) for case in cases),
    )


def _date(value: str | None) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value or "", "%Y%m%d").date()
    except ValueError:
        return None


def _iso_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value


def _round(value: float | None) -> float:
    return round(float(value or 0.0), 4)
