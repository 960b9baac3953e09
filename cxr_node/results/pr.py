"""The Grayscale Softcopy Presentation State: the lung outlines and the result's text drawn over the original image.

Nothing is burnt in: a viewer that supports GSPS shows the source image with the outlines and text as
vector graphics in a layer named ``AI``; the source's display (VOI, polarity) is kept.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from cxr_node.imaging.masks import cached_lung_outlines
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
from cxr_node.results.sc import banner
from cxr_node.results.sr import usable_evidence

LAYER = "AI"
CONTENT_LABEL = "AI_RESULT"


def build_pr(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the GSPS that draws ``findings`` on ``source``.

    Raises
    ------
    OutputError
        When the findings were not analysed or highdicom refuses the content.
    """
    if not findings.summary.analysed or findings.lung_mask is None:
        raise OutputError("a presentation state needs an analysed image's lung outline")
    provenance = findings.provenance
    referenced = usable_evidence(source)
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description=f"AI result of {provenance.algorithm}"[:64])
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[referenced],
        graphic_layer=layer,
        graphic_objects=_outlines(findings),
        text_objects=_texts(findings),
    )
    try:
        pr = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[referenced],
            **equipment(provenance, ids),
            content_label=CONTENT_LABEL,
            content_description=f"AI result, {provenance.intended_use}"[:64],
            graphic_layers=[layer],
            graphic_annotations=[annotation],
            presentation_lut_transformation=_polarity(source),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing_equipment(provenance, options),
            series_description=ids.series_description,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"presentation state cannot be built: {exc}") from exc
    copy_series_context(source, pr)
    copy_character_set(source, pr, (provenance.intended_use,))
    return pr


def _polarity(source: Dataset) -> hd.PresentationLUTTransformation:
    """Keep the source's polarity: a MONOCHROME1 image is shown inverted (PS3.3 C.11.6)."""
    inverse = str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    shape = hd.PresentationLUTShapeValues.INVERSE if inverse else hd.PresentationLUTShapeValues.IDENTITY
    return hd.PresentationLUTTransformation(presentation_lut_shape=shape)


def _outlines(findings: Findings) -> list[hd.pr.GraphicObject]:
    assert findings.lung_mask is not None
    return [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=outline.astype(np.float32),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
        )
        for outline in cached_lung_outlines(findings.lung_mask, findings.summary.source_shape)  # traced for the SR
    ]


def _texts(findings: Findings) -> list[hd.pr.TextObject]:
    """One text object per banner line, stacked in the lower part of the image, left-aligned."""
    rows, cols = findings.summary.source_shape
    text = banner(findings)
    lines = (text.title, *text.lines)
    line_height = rows * 0.035
    top = rows - 0.02 * rows - line_height * len(lines)
    objects = []
    for number, line in enumerate(lines):
        y = top + number * line_height
        objects.append(
            hd.pr.TextObject(
                text_value=line[:1024],
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=(0.02 * cols, y, 0.98 * cols - 1, min(y + line_height, rows - 1.0)),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    return objects
