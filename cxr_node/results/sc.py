"""The Secondary Capture overlay: the source image with the lung contour, the heatmap and a banner burnt in.

The one output every viewer shows. It is an RGB image at the analysed resolution (the source reduced to
at most ``worker.max_side``), in the source's patient and study, in a new series. It carries no Pixel
Spacing: it is a picture of a result, not an image to measure on (DerivationDescription says so).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from cxr_node.results.common import (
    Identity,
    OutputError,
    OutputOptions,
    contributing_equipment,
    copy_character_set,
    copy_series_context,
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


def build_sc(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the Secondary Capture overlay of ``findings`` in the ``source`` image's study.

    Raises
    ------
    OutputError
        When the findings have no image or highdicom refuses the content.
    """
    pixels = overlay_pixels(findings)
    orientation = _orientation(source)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=ids.series_instance_uid,
            series_number=ids.series_number,
            sop_instance_uid=ids.sop_instance_uid,
            instance_number=ids.instance_number,
            manufacturer=findings.provenance.manufacturer,
            patient_orientation=orientation or UNKNOWN_ORIENTATION,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing_equipment(findings.provenance, options),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"overlay cannot be built: {exc}") from exc
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: the source says nothing usable, so neither does the overlay
    _describe(sc, source, findings, ids)
    copy_series_context(source, sc)
    copy_character_set(source, sc, (findings.provenance.intended_use, findings.summary.reason))
    return sc


def _describe(sc: Dataset, source: Dataset, findings: Findings, ids: Identity) -> None:
    sc.SeriesDescription = ids.series_description
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    rows, columns = findings.image.shape if findings.image is not None else findings.summary.source_shape
    sc.DerivationDescription = (
        f"AI overlay by {findings.provenance.algorithm}: source reduced to {columns}x{rows}, lung contour and"
        f" Grad-CAM heatmap drawn, banner added; no pixel spacing; go-live mode {findings.provenance.mode_text}"
    )[:1024]
    sc.SourceImageSequence = DicomSequence([_source_reference(source)])


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = dcm_codes.DCM.SourceImageForImageProcessingOperation
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        purpose.value,
        purpose.scheme_designator,
        purpose.meaning,
    )
    item.PurposeOfReferenceCodeSequence = DicomSequence([code])
    return item


def _orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2 or not all(value):
        return None
    return (str(value[0]), str(value[1]))
