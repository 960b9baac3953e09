"""The reference Structured Report: the same TID 1500 report built entirely with highdicom's templates and
``ComprehensiveSR``, checked by highdicom at every step.

The node writes the report with :func:`cxr_node.results.sr.build_sr`, which builds the same data set directly
(about twenty times cheaper). This builder is what it must equal: ``tests/dicom/test_sr_equivalence.py`` builds
both on many inputs and compares them element by element, so a change in highdicom (a new attribute, another
VR, another order) shows up as a failing test, not as a silent difference.
"""

from __future__ import annotations

from typing import cast

import highdicom.sr as hsr
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from cxr_node.dicom import codes
from cxr_node.dicom.uids import derived_uid
from cxr_node.results.common import Identity, OutputError, OutputOptions, contributing_equipment, copy_character_set
from cxr_node.results.findings import Findings, SimilarCase
from cxr_node.results.sr import (
    LABEL_VALUES,
    case_title,
    impression,
    library_ready,
    lung_region,
    own_texts,
    partial_library,
    repairs_text,
    rounded,
    study_date,
    summary_code,
    usable_evidence,
)


def build_sr_reference(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the Comprehensive SR (TID 1500) of ``findings`` on ``source``, built with highdicom.

    Parameters and errors as :func:`cxr_node.results.sr.build_sr`.
    """
    evidence = usable_evidence(source)
    try:
        report = hsr.MeasurementReport(
            observation_context=_observation_context(findings),
            procedure_reported=codes.PLAIN_CHEST_XRAY,
            imaging_measurements=_groups(evidence, findings),
            title=dcm_codes.DCM.ImagingMeasurementReport,
            referenced_images=[evidence] if library_ready(evidence) else None,
        )
        if not library_ready(evidence):
            content = report[0].ContentSequence
            content.insert(len(content) - 1, partial_library(evidence))  # before the Imaging Measurements
        if findings.summary.similar:
            report[0].ContentSequence.append(_similar_cases(evidence, findings))
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
    copy_character_set(source, sr, (*own_texts(findings), repairs_text(ids.notes)))
    return sr


def _observation_context(findings: Findings) -> hsr.ObservationContext:
    provenance = findings.provenance
    device = hsr.DeviceObserverIdentifyingAttributes(
        uid=provenance.ensemble.device_uid,
        name=provenance.algorithm,
        manufacturer_name=provenance.manufacturer,
        model_name=provenance.ensemble.name,
    )
    return hsr.ObservationContext(
        observer_device_context=hsr.ObserverContext(
            observer_type=dcm_codes.cid270.Device, observer_identifying_attributes=device
        )
    )


Group = hsr.MeasurementsAndQualitativeEvaluations | hsr.PlanarROIMeasurementsAndQualitativeEvaluations


def _groups(evidence: Dataset, findings: Findings) -> list[Group]:
    if findings.summary.analysed:
        return [_finding_group(evidence, findings)]
    return [_not_analysed_group(evidence, findings)]


def _finding_group(evidence: Dataset, findings: Findings) -> hsr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The planar-ROI group a viewer draws: the lung region, the probabilities and the decision."""
    provenance = findings.provenance
    ensemble = hsr.AlgorithmIdentification(name=provenance.model_name, version=provenance.model_version)
    measurements = [
        hsr.Measurement(
            codes.PROBABILITY, rounded(findings.summary.probability), codes.UNIT_PROBABILITY, algorithm_id=ensemble
        )
    ]
    measurements += [
        hsr.Measurement(
            codes.PROBABILITY,
            rounded(probability),
            codes.UNIT_PROBABILITY,
            algorithm_id=hsr.AlgorithmIdentification(name=name, version=provenance.member_version(name)),
        )
        for name, probability in findings.summary.members
    ]
    measurements.append(
        hsr.Measurement(codes.OPERATING_POINT, rounded(findings.summary.operating_point), codes.UNIT_PROBABILITY)
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


def _neighbour_group(
    evidence: Dataset, findings: Findings, case: SimilarCase
) -> hsr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group per similar past case: similarity, known label and identifiers the site allows."""
    qualitative = [hsr.QualitativeEvaluation(codes.COVID19, LABEL_VALUES[case.label])] if case.label else None
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hsr.TrackingIdentifier(
            uid=derived_uid(str(evidence.SOPInstanceUID), findings.provenance.model_key, "sr", f"similar-{case.rank}"),
            identifier=case_title(case),
        ),
        measurements=[hsr.Measurement(codes.SIMILARITY, rounded(case.similarity), codes.UNIT_RATIO)],
        qualitative_evaluations=qualitative,
    )
    group[0].ContentSequence.extend(_case_identifiers(case))
    return group


def _similar_cases(evidence: Dataset, findings: Findings) -> hsr.ContainerContentItem:
    """The root-level container of the similar-case groups (kept out of Imaging Measurements, see sr.py)."""
    contains = hsr.RelationshipTypeValues.CONTAINS
    container = hsr.ContainerContentItem(codes.SIMILAR_CASES, relationship_type=contains)
    groups = [cast(hsr.ContentItem, _neighbour_group(evidence, findings, case)[0]) for case in findings.summary.similar]
    container.ContentSequence = hsr.ContentSequence(groups)
    return container


def _case_identifiers(case: SimilarCase) -> list[hsr.ContentItem]:
    contains = hsr.RelationshipTypeValues.CONTAINS
    items: list[hsr.ContentItem] = [hsr.TextContentItem(codes.CASE_NUMBER, case.case_number, contains)]
    if case.accession_number:
        items.append(hsr.TextContentItem(codes.ACCESSION_NUMBER, case.accession_number, contains))
    date = study_date(case.study_date)
    if date is not None:
        items.append(hsr.DateContentItem(codes.STUDY_DATE, date, contains))
    if case.study_instance_uid:
        items.append(hsr.UIDRefContentItem(codes.STUDY_INSTANCE_UID, case.study_instance_uid, contains))
    if case.sop_instance_uid:
        items.append(hsr.UIDRefContentItem(codes.SIMILAR_CASE_SOP_INSTANCE_UID, case.sop_instance_uid, contains))
    return items


def _evaluations(findings: Findings, notes: tuple[str, ...]) -> hsr.ContainerContentItem:
    """The report-level Qualitative Evaluations container."""
    contains = hsr.RelationshipTypeValues.CONTAINS
    items: list[hsr.ContentItem] = [hsr.CodeContentItem(codes.PROCESSING_SUMMARY, summary_code(findings), contains)]
    items.append(hsr.TextContentItem(codes.IMPRESSION, impression(findings), contains))
    if not findings.summary.analysed:
        items.append(hsr.TextContentItem(codes.REASON_NOT_ANALYSED, findings.summary.reason, contains))
    elif findings.summary.outside_domain:
        items.append(hsr.TextContentItem(codes.OUTSIDE_DOMAIN, findings.summary.domain_text, contains))
    if notes:
        items.append(hsr.TextContentItem(codes.COMMENT, repairs_text(notes), contains))
    items.append(hsr.TextContentItem(codes.INTENDED_USE, findings.provenance.intended_use, contains))
    items.append(hsr.TextContentItem(codes.DEPLOYMENT_MODE, findings.provenance.mode_text, contains))
    container = hsr.ContainerContentItem(codes.QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hsr.ContentSequence(items)
    return container
