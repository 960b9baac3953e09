"""The reference Secondary Capture overlay: the same picture and header built with highdicom's
``SCImage.from_ref_dataset``, checked by highdicom at every step.

The node writes the overlay with :func:`cxr_node.results.sc.build_sc`, which assembles the same data set
directly. This builder is what it must equal: ``tests/dicom/test_sc_equivalence.py`` builds both on many inputs
and compares them element by element and byte for byte, so a change in highdicom (a new attribute, another VR,
another value) shows up as a failing test, not as a silent difference.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from cxr_node.results.common import (
    Identity,
    OutputError,
    OutputOptions,
    contributing_equipment,
    copy_character_set,
    copy_series_context,
)
from cxr_node.results.findings import Findings
from cxr_node.results.sc import UNKNOWN_ORIENTATION, describe, orientation_of, overlay_pixels


def build_sc_reference(source: Dataset, findings: Findings, options: OutputOptions, ids: Identity) -> Dataset:
    """Return the Secondary Capture overlay of ``findings`` in the ``source`` image's study, built with highdicom.

    Parameters and errors as :func:`cxr_node.results.sc.build_sc`.
    """
    pixels = overlay_pixels(findings)
    orientation = orientation_of(source)
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
    describe(sc, source, findings, ids)
    copy_series_context(source, sc)
    copy_character_set(source, sc, (findings.provenance.intended_use, findings.summary.reason))
    return sc
