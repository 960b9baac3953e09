"""The node's decoders (pydicom + pylibjpeg, openjpeg, libjpeg, rle, pyjpegls) read every accepted syntax."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
import pytest
from pydicom import dcmread

from cxr_node.dicom.sop import DECODABLE_TRANSFER_SYNTAXES
from tests.syntaxes import NEAR, SYNTAXES, Variant, pixels

LOSSLESS: Final = [name for name, spec in SYNTAXES.items() if spec.lossless]
LOSSY_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    # (max, mean) absolute error in stored values, about twice what was measured on RG1 here.
    "jpeg_baseline": (32, 2.0),  # 8-bit, quality 90: max 15, mean 0.87 of 255
    "jpeg_extended": (48, 6.0),  # 12-bit, quality 90: max 20, mean 2.95 of 4095
    "jpegls_near": (NEAR, NEAR),  # JPEG-LS guarantees |error| <= NEAR
    "j2k": (800, 100.0),  # WG04 RG1_J2KI, 15-bit: max 403, mean 50.1 of 32767
}


def test_variants_cover_every_decodable_syntax() -> None:
    """There is one variant for each transfer syntax the receiver accepts for radiographs."""
    assert sorted(spec.uid for spec in SYNTAXES.values()) == sorted(DECODABLE_TRANSFER_SYNTAXES)


def test_variants_are_distinct_instances_of_the_source_study(
    syntax_variants: dict[str, Variant], chest_cr: Path
) -> None:
    """Each variant has its own SOP Instance UID and keeps the source's patient, study and series."""
    source = dcmread(chest_cr, stop_before_pixels=True)
    headers = [dcmread(v.path, stop_before_pixels=True) for v in syntax_variants.values()]
    uids = {str(ds.SOPInstanceUID) for ds in headers} | {str(source.SOPInstanceUID)}
    assert len(uids) == len(SYNTAXES) + 1
    for ds in headers:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        kept = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality")
        assert [ds[k].value for k in kept] == [source[k].value for k in kept]


@pytest.mark.parametrize("name", SYNTAXES)
def test_variant_is_written_in_its_transfer_syntax(syntax_variants: dict[str, Variant], name: str) -> None:
    """The file's meta header names the transfer syntax the variant stands for."""
    variant = syntax_variants[name]
    assert dcmread(variant.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == variant.transfer_syntax


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_variant_decodes_to_its_reference_exactly(syntax_variants: dict[str, Variant], name: str) -> None:
    """A lossless variant decodes to the full-size image, equal pixel for pixel to its uncompressed input."""
    variant = syntax_variants[name]
    decoded, reference = pixels(variant.path), pixels(variant.reference)
    assert decoded.shape == reference.shape == (1955, 1841)
    np.testing.assert_array_equal(decoded, reference)


@pytest.mark.parametrize("name", LOSSY_BOUNDS)
def test_lossy_variant_decodes_close_to_its_reference(
    syntax_variants: dict[str, Variant], name: str, record_property: pytest.RecordProperty
) -> None:
    """A lossy variant decodes to the full-size image within its bound of its uncompressed input."""
    variant = syntax_variants[name]
    decoded, reference = pixels(variant.path), pixels(variant.reference)
    assert decoded.shape == reference.shape == (1955, 1841)
    error = np.abs(decoded.astype(np.int32) - reference.astype(np.int32))
    record_property("max_abs_error", int(error.max()))
    record_property("mean_abs_error", round(float(error.mean()), 3))
    max_bound, mean_bound = LOSSY_BOUNDS[name]
    assert error.max() <= max_bound and error.mean() <= mean_bound, (error.max(), error.mean())
    assert error.max() > 0, "a lossy variant identical to its input proves nothing about the lossy decoder"


def test_every_lossy_variant_has_a_bound() -> None:
    """Each lossy syntax has an error bound, so none escapes the closeness check."""
    assert set(LOSSY_BOUNDS) == {name for name, spec in SYNTAXES.items() if not spec.lossless}
