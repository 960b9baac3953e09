"""Elements the writers make once and copy into each output (the overlay's constants, its purpose code, the File
Meta Information's copies) are never shared in a way that lets one output change another, and write the same bytes
as elements made anew."""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_node.results import encoding, sc
from cxr_node.results.common import copy_element


def test_an_overlays_constant_elements_are_copies() -> None:
    """Changing a constant element of one overlay's data set leaves the prototypes, hence the next overlay, alone."""
    copied = [copy_element(element) for element in sc._constant_elements()]
    modality = next(element for element in copied if element.tag == 0x00080060)
    modality.value = "XX"
    assert next(element.value for element in sc._constant_elements() if element.tag == 0x00080060) == "OT"


def test_the_purpose_code_item_is_cloned() -> None:
    """Each source reference gets its own purpose code item: changing one leaves the next reference's alone."""
    source = Dataset()
    source.SOPClassUID, source.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    first = sc._source_reference(source)
    first.PurposeOfReferenceCodeSequence[0].CodeMeaning = "changed"
    second = sc._source_reference(source)
    assert second.PurposeOfReferenceCodeSequence[0].CodeMeaning != "changed"


def test_file_meta_copies_write_the_bytes_of_new_elements() -> None:
    """A File Meta element copied by attributes writes the bytes an element made anew from its value writes, and
    completing the copy leaves the data set's own File Meta Information unchanged."""
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.FileMetaInformationVersion = b"\x00\x01"
    before = {element.tag: element.value for element in dataset.file_meta}
    fast = encoding._file_meta(dataset)
    for element in dataset.file_meta:
        assert encoding._meta_copy(element) == DataElement(element.tag, element.VR, element.value)
    anew = Dataset()
    anew.update(dataset)
    anew.file_meta = FileMetaDataset()
    for element in dataset.file_meta:
        anew.file_meta.add(DataElement(element.tag, element.VR, element.value))
    assert fast == encoding._file_meta(anew)
    assert {element.tag: element.value for element in dataset.file_meta} == before
