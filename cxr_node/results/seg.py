"""The lung mask as a DICOM Segmentation (binary, one segment "Lung", at the source image's size)."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from cxr_node.dicom import codes
from cxr_node.imaging.masks import resize_nearest
from cxr_node.results.common import (
    Identity,
    OutputError,
    OutputOptions,
    contributing_equipment,
    copy_character_set,
    copy_series_context,
    equipment,
)
from cxr_node.results.findings import Findings
from cxr_node.results.sr import usable_evidence


def build_seg(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the binary Segmentation of both lungs on ``source`` (the mask resized to the source's pixels).

    Raises
    ------
    OutputError
        When the findings have no lung mask (not analysed) or highdicom refuses the content.
    """
    if not findings.summary.analysed or findings.lung_mask is None:
        raise OutputError("a segmentation needs an analysed image's lung mask")
    provenance = findings.provenance
    segmenter = provenance.segmentation or provenance.ensemble  # the network whose mask this is
    mask = resize_nearest(findings.lung_mask, findings.summary.source_shape)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lung",
        segmented_property_category=dcm_codes.SCT.Organ,
        segmented_property_type=codes.LUNG,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=segmenter.name,
            version=segmenter.version,
            family=dcm_codes.cid7162.ArtificialIntelligence,
        ),
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=[_with_pixels_header(source)],
            pixel_array=mask[None].astype("uint8"),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            **equipment(provenance, ids),
            content_label="AI_LUNGS",
            content_description=f"AI lung segmentation, {provenance.intended_use}"[:64],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing_equipment(provenance, options),
            omit_empty_frames=False,
            series_description=ids.series_description,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"segmentation cannot be built: {exc}") from exc
    if "FrameOfReferenceUID" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", "") or ""
    seg.DerivationDescription = f"lung mask of {provenance.algorithm}, resized to the source by nearest neighbour"
    copy_series_context(source, seg)
    copy_character_set(source, seg, (provenance.intended_use,))
    return seg


def _with_pixels_header(source: Dataset) -> Dataset:
    """The source header without pixel data or invalid spacing (highdicom reads geometry, not pixels)."""
    return usable_evidence(source)
