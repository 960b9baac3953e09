"""The copying shortcuts of the outputs change nothing: the acquisition entry made for the SR and the overlay of one
image is highdicom's for every image, and independent in each output; multi-values and names are copied as
independently as a deep copy; a direct ``put`` stores what ``add`` stores.
"""

from __future__ import annotations

import copy

import highdicom as hd
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import PersonName

from cxr_node.results import as_highdicom
from cxr_node.results.common import copy_element, put
from tests.dicom.test_sr_equivalence import differences, phantom_source

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(
    "changes",
    [
        {"AcquisitionDateTime": "20200301101010"},
        {"AcquisitionDateTime": "20200301101011"},
        {"AcquisitionDateTime": "20200301101010.000000"},  # the same instant, written otherwise
        {"AcquisitionDate": "20200301", "AcquisitionTime": "101010"},
        {"SoftwareVersions": ["1", "2"]},
        {"SoftwareVersions": "1\\2"},
        {"StationName": "x" * 17},  # refused by highdicom
    ],
)
def test_the_acquisition_entry_is_highdicoms_for_each_image(changes: dict[str, object]) -> None:
    """Made twice (the SR, then the overlay), after entries of other values, the entry is highdicom's each time."""
    for other in ("20191231235959", "20200301101010"):
        as_highdicom.acquisition_equipment(phantom_source(Manufacturer="ACME", AcquisitionDateTime=other)[0])
    source = phantom_source("Doe^Jane", Manufacturer="ACME", **changes)[0]
    try:
        expected = hd.ContributingEquipment.for_image_acquisition(source)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        for _ in range(2):
            with pytest.raises(type(exc)):
                as_highdicom.acquisition_equipment(source)
        return
    first = as_highdicom.acquisition_equipment(source)
    first.Manufacturer = "Changed"  # an output's copy is its own
    first.PurposeOfReferenceCodeSequence[0].CodeMeaning = "Changed"
    second = as_highdicom.acquisition_equipment(source)
    assert differences(second, expected) == []
    assert str(second.get("ContributionDateTime")) == str(expected.get("ContributionDateTime"))


def test_copied_multi_values_and_names_are_independent_and_equal() -> None:
    """Copies equal deep copies; changing a copy's items, or its conversion's element, leaves the original alone."""
    source = Dataset()
    source.ImageType = ["ORIGINAL", "PRIMARY"]  # a multi-value converted by its element
    source.PixelSpacing = [0.2, 0.25]
    source.PatientName = "Doe^Jane"
    source.add(DataElement(0x00080016, "UI", "1.2.3"))
    for element in source:
        copied, deep = copy_element(element), copy.deepcopy(element)
        assert copied.value == deep.value and type(copied.value) is type(deep.value)
        if isinstance(element.value, MultiValue | PersonName):  # texts and UIDs cannot change: shared
            assert copied.value is not element.value
    image_type = copy_element(source["ImageType"])
    assert image_type.value._constructor.__self__ is image_type
    image_type.value.append("EXTRA")
    image_type.value[0] = "DERIVED"
    spacing = copy_element(source["PixelSpacing"])
    spacing.value[1] = 0.5
    assert list(source.ImageType) == ["ORIGINAL", "PRIMARY"]
    assert [float(v) for v in source.PixelSpacing] == [0.2, 0.25]
    name = copy_element(source["PatientName"])
    assert name.value == source.PatientName and name.value is not source.PatientName
    assert isinstance(name.value, PersonName) and name.value.__dict__ == source.PatientName.__dict__


def test_put_stores_what_add_stores() -> None:
    """Public elements are stored directly; private ones, sequences and pixel data go through ``add``."""
    elements = [
        DataElement(0x00100020, "LO", "P1"),
        DataElement(0x00090010, "LO", "CREATOR"),
        DataElement(0x00091001, "LO", "private"),
        DataElement(0x00081115, "SQ", [Dataset()]),
        DataElement(0x7FE00010, "OB", b"\0\0"),
    ]
    added, put_into = Dataset(), Dataset()
    for element in elements:
        added.add(copy_element(element))
        put(put_into, copy_element(element))
    assert added == put_into
    assert put_into[0x00091001].private_creator == "CREATOR"
    assert isinstance(put_into[0x00081115].value, DicomSequence)
