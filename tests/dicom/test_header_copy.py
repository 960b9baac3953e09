"""The header copy the outputs start from is as independent of the source as a deep copy, and equal to it."""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from cxr_node.results.common import copy_element, without_pixels
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset


def _source() -> Dataset:
    ds = phantom_to_dataset(make_phantom(2, 1, 64), patient_id="P1", patient_name="Doe^Jane")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [0.2, 0.2]
    item = Dataset()
    item.PatientID = "X77"
    ds.OtherPatientIDsSequence = DicomSequence([item])
    return ds


def test_the_copy_equals_a_deep_copy_without_pixels() -> None:
    """Every element but the pixel data is there with the same VR and value, the file meta too."""
    source = _source()
    header = without_pixels(source)
    deep = copy.deepcopy(source)
    del deep.PixelData
    assert header == deep
    assert "PixelData" not in header and "PixelData" in source
    assert header.file_meta == source.file_meta


def test_changing_the_copy_leaves_the_source_alone() -> None:
    """Multi-values, sequence items, names and plain values changed in the copy stay as they were in the source."""
    source = _source()
    header = without_pixels(source)
    header.ImageType[0] = "DERIVED"
    header.PixelSpacing[1] = 0.5
    header.OtherPatientIDsSequence[0].PatientID = "CHANGED"
    header.PatientName = "Other^Name"
    header.PatientID = "P2"
    assert list(source.ImageType) == ["ORIGINAL", "PRIMARY"]
    assert [float(v) for v in source.PixelSpacing] == [0.2, 0.2]
    assert source.OtherPatientIDsSequence[0].PatientID == "X77"
    assert str(source.PatientName) == "Doe^Jane" and source.PatientID == "P1"


def test_an_element_copy_is_a_new_element() -> None:
    """The copy is another element object with the same tag, VR and value."""
    source = _source()
    for element in source:
        copied = copy_element(element)
        assert copied is not element
        assert (copied.tag, copied.VR, copied.value) == (element.tag, element.VR, element.value)
