"""The SR builder's and the writer's shortcuts change nothing: caches never carry one image's values into another's
output, copies are independent, the direct constructors make what pydicom's make, and the per-call memos of the
writer and the validator keep every element's own character set, VR and error.
"""

from __future__ import annotations

import copy
import dataclasses

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import UID

from cxr_node.results import as_highdicom, sr, sr_content
from cxr_node.results.common import (
    OutputOptions,
    clone_dataset,
    contributing_equipment,
    copy_element,
    encode,
    encode_reference,
    validate_values,
)
from cxr_node.results.encoding import write_explicit_le
from cxr_node.results.findings import MaskVerdict, SimilarCase
from tests.dicom.test_encoding import _dataset
from tests.dicom.test_sr_equivalence import CASES, _build_both, differences, findings_on, phantom_source
from tests.dicom.test_sr_equivalence import frozen_clock as frozen_clock  # both builders read one instant

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _sr_bytes(source: Dataset, findings: object, options: OutputOptions) -> tuple[bytes, bytes]:
    fast, reference = _build_both(source, findings, options)  # type: ignore[arg-type]
    assert differences(fast, reference) == []
    return encode(fast), encode_reference(reference)


def test_reports_of_two_patients_in_a_row_are_each_the_reference() -> None:
    """Two images with different patients, findings, cases, character sets and libraries, built in turn and then
    again, each give exactly highdicom's bytes, and the second report holds nothing of the first."""
    first_source, image, mask = phantom_source(name="Alpha^Anna", PatientID="PA1", SpecificCharacterSet="ISO_IR 100")
    first = findings_on(image, mask, similar=CASES)
    second_source, image2, mask2 = phantom_source(
        name="Beta^Bert", PatientID="PB2", PatientOrientation=["P", "F"], ImagerPixelSpacing=[0.2, 0.2]
    )
    second_source.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    second = findings_on(image2, mask2, probability=0.1, similar=CASES[3:], lung_mask=MaskVerdict(True, "ok", 0.4, 2))
    runs = [
        (first_source, first, OutputOptions(institution_name="St Alpha")),
        (second_source, second, OutputOptions(institution_name="St Beta")),
    ]
    written = [_sr_bytes(*run) for run in (*runs, *runs)]
    for fast, reference in written:
        assert fast == reference
    assert written[0] == written[2]
    assert written[1] == written[3]
    second_bytes = written[1][0]
    for value in (b"Alpha^Anna", b"PA1", b"St Alpha", str(first_source.SOPInstanceUID).encode()):
        assert value not in second_bytes


def test_contributing_equipment_is_a_fresh_copy_each_time() -> None:
    """Changing the entries one output got changes neither the next output's entries nor what highdicom builds."""
    provenance = findings_on(*phantom_source()[1:]).provenance
    options = OutputOptions(institution_name="St Elsewhere")
    given = contributing_equipment(provenance, options)
    given[0].InstitutionName = "Changed"
    given[1].PurposeOfReferenceCodeSequence[0].CodeMeaning = "Changed"
    again = contributing_equipment(provenance, options)
    assert [type(entry) for entry in again] == [hd.ContributingEquipment] * len(again)
    assert again[0].InstitutionName == "St Elsewhere"
    assert again[1].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert all(a is not b for a, b in zip(given, again, strict=True))


def test_contributing_equipment_follows_the_provenance_and_institution() -> None:
    """Another institution, mode or model version gives entries that say so, never the cached ones of another."""
    provenance = findings_on(*phantom_source()[1:]).provenance
    first = contributing_equipment(provenance, OutputOptions(institution_name="A"))
    second = contributing_equipment(provenance, OutputOptions(institution_name="B"))
    none = contributing_equipment(provenance, OutputOptions())
    assert (first[0].InstitutionName, second[0].InstitutionName, "InstitutionName" in none[0]) == ("A", "B", False)
    retrained = dataclasses.replace(provenance, model_version="2.0.0", algorithms=())
    assert contributing_equipment(retrained, OutputOptions())[1].SoftwareVersions == "2.0.0"
    assert none[1].SoftwareVersions == provenance.model_version


def _nested() -> Dataset:
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "DCM", "One"
    item = hd.sr.CodedConcept.from_code(dcm_codes.DCM.ProcessingEquipment)
    outer = hd.ContributingEquipment("ACME", dcm_codes.DCM.ProcessingEquipment, software_versions=["1", "2"])
    outer.add(DataElement(0x00081250, "SQ", DicomSequence([inner, item])))
    outer.is_undefined_length_sequence_item = True
    return outer


def test_a_clone_equals_a_deep_copy_and_is_independent() -> None:
    """A cloned data set has the class, elements, item classes and attributes of ``copy.deepcopy``'s copy, and
    changing the clone's values, multi-values or items leaves the original as it was."""
    original = _nested()
    clone, deep = clone_dataset(original), copy.deepcopy(original)
    assert type(clone) is hd.ContributingEquipment
    assert differences(clone, deep) == []
    assert [type(item) for item in clone[0x00081250].value] == [Dataset, hd.sr.CodedConcept]
    assert clone.is_undefined_length_sequence_item
    clone.Manufacturer = "Other"
    clone.SoftwareVersions.append("3")
    clone[0x00081250].value[0].CodeMeaning = "Changed"
    clone[0x00081250].value.append(Dataset())
    assert differences(original, deep) == []


def test_a_copied_sequence_element_is_independent() -> None:
    """Copying a sequence element copies its items: changing the copy's items leaves the original's alone."""
    element = _nested()[0x00081250]
    copied = copy_element(element)
    copied.value[0].CodeValue = "2"
    copied.value.append(Dataset())
    assert (element.value[0].CodeValue, len(element.value)) == ("1", 2)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"PatientOrientation": ["P", "F"]},
        {"PatientOrientation": ["P", ""], "ImagerPixelSpacing": [0.2, 0.25]},
        {"ImagerPixelSpacing": [0.2, 0.25], "PatientOrientation": None},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1"},
    ],
)
def test_the_direct_partial_library_equals_highdicoms(changes: dict[str, object]) -> None:
    """Modality, matrix, and the orientation and spacing the image has: the direct entry equals highdicom's."""
    source = phantom_source(**changes)[0]
    assert differences(sr._partial_library(source), sr.partial_library(source)) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"Manufacturer": "ACME", "ManufacturerModelName": "X1", "AcquisitionDate": "20200301", "AcquisitionTime": "1"},
        {"Manufacturer": "ACME", "AcquisitionDateTime": "20200301101010", "SoftwareVersions": ["1", "2"]},
        {"Manufacturer": ""},
        {"Manufacturer": "ACME", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33"},  # an SR: not an image
        {"Manufacturer": "ACME", "SOPClassUID": "1.2.3.4"},  # unknown class
    ],
)
def test_the_acquisition_entry_is_highdicoms(changes: dict[str, object]) -> None:
    """The source's acquisition equipment entry equals highdicom's, or fails with the same error."""
    source = phantom_source(**changes)[0]
    try:
        expected = hd.ContributingEquipment.for_image_acquisition(source)
    except (ValueError, AttributeError, KeyError) as exc:
        with pytest.raises(type(exc)):
            as_highdicom.acquisition_equipment(source)
        return
    assert differences(as_highdicom.acquisition_equipment(source), expected) == []


def test_direct_elements_and_data_sets_are_what_pydicom_makes() -> None:
    """An element, a data set and a sequence made without their constructors carry exactly the state pydicom's
    constructors give them (a pydicom release that adds state fails here, not in an output)."""
    made = sr_content.element(0x00080104, "LO", "Meaning")
    assert made.__dict__ == DataElement(0x00080104, "LO", "Meaning", already_converted=True, validation_mode=0).__dict__
    uid = sr_content.element(0x00081155, "UI", "1.2.3")
    assert type(uid.value) is UID
    items = sr_content.sequence([sr_content.dataset((0x00080100, "SH", "1"))])
    assert sr_content.element(0x0040A730, "SQ", items).__dict__ == DataElement(0x0040A730, "SQ", items).__dict__
    fast = sr_content.dataset((0x00080100, "SH", "1"), (0x00080104, "LO", "One"))
    slow = Dataset({element.tag: element for element in fast.values()})
    assert fast.__dict__ == slow.__dict__
    assert fast._private_blocks is not sr_content.dataset()._private_blocks
    assert items.__dict__.keys() == DicomSequence([]).__dict__.keys()


def test_one_text_in_two_character_sets_and_two_vrs_is_written_as_pydicom_writes_it() -> None:
    """The writer's memo of written texts keeps each element's character set, tag and VR: the same non-ASCII
    text in a Latin-1 data set, in an item declaring UTF-8, as LO and as UT, comes out as ``dcmwrite`` writes it."""
    ds = _dataset("ISO_IR 100")
    ds.add(DataElement(0x00081030, "LO", "Müller"))
    ds.add(DataElement(0x00204000, "LT", "Müller"))
    inner = Dataset()
    inner.SpecificCharacterSet = "ISO_IR 192"
    inner.add(DataElement(0x00081030, "LO", "Müller"))
    inner.add(DataElement(0x0040A160, "UT", "Müller"))
    plain = Dataset()
    plain.add(DataElement(0x00081030, "LO", "Müller"))
    ds.add(DataElement(0x00081115, "SQ", DicomSequence([inner, plain])))
    assert write_explicit_le(ds) is not None
    assert encode(ds) == encode_reference(ds)


def test_an_odd_length_binary_value_is_padded_as_pydicom_pads_it() -> None:
    """A large binary value of odd length is written unpadded in place and followed by its padding byte."""
    ds = _dataset()
    ds.add(DataElement(0x00091010, "OB", np.arange(100_001, dtype=np.uint8).tobytes()))
    assert encode(ds) == encode_reference(ds)


def test_a_value_valid_for_one_vr_is_still_checked_for_another() -> None:
    """The validator checks a text once per VR: lower case passes as LO and is still refused as CS, and the error
    names the first element (in tag order, depth first) that is refused."""
    ds = _dataset()
    ds.add(DataElement(0x00081030, "LO", "female"))
    item = Dataset()
    item.add(DataElement(0x00081030, "LO", "female"))
    item.add(DataElement(0x00100040, "CS", "female"))
    ds.add(DataElement(0x00081115, "SQ", DicomSequence([item])))
    ds.add(DataElement(0x00180015, "CS", "chest"))
    with pytest.raises(ValueError, match="PatientSex"):
        validate_values(ds)


def test_a_similar_case_left_out_leaves_no_trace_of_itself() -> None:
    """A report built after one with five similar cases, with one case only, holds that case alone."""
    source, image, mask = phantom_source()
    _sr_bytes(source, findings_on(image, mask, similar=CASES), OutputOptions())
    only = (SimilarCase(1, 0.5, "C0000999", None),)
    fast, reference = _sr_bytes(source, findings_on(image, mask, similar=only), OutputOptions())
    assert fast == reference
    assert b"C0000999" in fast
    assert all(case.case_number.encode() not in fast for case in CASES)
