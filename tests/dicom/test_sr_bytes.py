"""The outputs' values are validated while they are written, and the writer keeps the node's vocabulary across
calls: neither changes a byte or an error. Each invalid or messy report gives the error that validating every value
first and then writing with ``dcmwrite`` gives (``encode_reference``), whatever the order of the faults; the
vocabulary's kept bytes follow each data set's character set.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from cxr_node.results import outputs
from cxr_node.results.common import OutputError, OutputOptions, encode, encode_reference, validate_values
from cxr_node.results.encoding import write_explicit_le
from tests.dicom.test_encoding import _dataset, _every_vr
from tests.dicom.test_sr_equivalence import CASES, findings_on, phantom_source
from tests.dicom.test_sr_equivalence import frozen_clock as frozen_clock  # one instant for every report

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _report() -> Dataset:
    source, image, mask = phantom_source(SpecificCharacterSet="ISO_IR 100")
    return outputs.build_dataset(source, findings_on(image, mask, similar=CASES), OutputOptions(), "sr")


def _group(ds: Dataset) -> Dataset:
    """The first TEXT item of the finding's measurement group (three levels down)."""
    item: Dataset = ds.ContentSequence[8].ContentSequence[0].ContentSequence[0]
    return item


def _add(*elements: tuple[Callable[[Dataset], Dataset], int, str, object]) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for where, tag, vr, value in elements:
            where(ds).add(DataElement(tag, vr, value))

    return change


def _root(ds: Dataset) -> Dataset:
    return ds


FAULTS: dict[str, Callable[[Dataset], None]] = {
    "a lower-case relationship deep down": _add((_group, 0x0040A010, "CS", "contains")),
    "a long description, then a lower-case code string deeper": _add(
        (_root, 0x00081030, "LO", "x" * 70), (_group, 0x00100040, "CS", "female")
    ),
    "a text Latin-1 cannot hold, then a lower-case code string": _add(
        (_root, 0x00081030, "LO", "Ελληνικά"), (_root, 0x00180015, "CS", "chest")
    ),
    "a lower-case code string, then a text Latin-1 cannot hold": _add(
        (_root, 0x00080008, "CS", ["ORIGINAL", "primary"]), (_root, 0x00081030, "LO", "Ελληνικά")
    ),
    "a UID that is not one, deep down": _add((_group, 0x0040A124, "UI", "1.2.abc")),
    "a group length and a lower-case code string": _add(
        (_root, 0x00080000, "UL", 4), (_root, 0x00180015, "CS", "chest")
    ),
    "a date with dashes": _add((_root, 0x00080021, "DA", "2020-03-01")),
    "a valid LO text refused as CS": _add((_root, 0x00081030, "LO", "female"), (_group, 0x00100040, "CS", "female")),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
def test_a_faulty_report_fails_as_when_every_value_was_checked_first(fault: str) -> None:
    """Whatever is wrong, and in whatever order, the error is the one of validating the whole tree, then writing."""
    ds = _report()
    FAULTS[fault](ds)
    with pytest.raises(OutputError) as reference:
        encode_reference(ds)
    with pytest.raises(OutputError) as fast:
        encode(ds)
    assert str(fast.value) == str(reference.value)


def test_a_text_its_character_set_cannot_hold_fails_in_the_writer() -> None:
    """With every value valid, the writer's own error is the one reported (``dcmwrite`` words it otherwise)."""
    ds = _report()
    _add((_root, 0x00081030, "LO", "Ελληνικά"))(ds)
    validate_values(ds)
    with pytest.raises(OutputError, match="'latin-1' codec can't encode"):
        encode(ds)


def test_a_refused_code_is_refused_every_time() -> None:
    """The vocabulary's validations are kept only for values that passed: a refused code value fails each time."""
    ds = _report()
    ds.ContentSequence[0].ConceptNameCodeSequence[0].CodeValue = "1" * 17
    for _ in range(2):
        with pytest.raises(OutputError, match="CodeValue"):
            encode(ds)


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192", ["ISO 2022 IR 6", "ISO 2022 IR 87"]])
def test_vocabulary_is_written_in_each_data_sets_character_set(charset: str | list[str] | None) -> None:
    """Code meanings, one ASCII and one not, in items with and without their own character set: the bytes
    ``dcmwrite`` writes, whichever report was written before."""
    ds = _dataset(charset)
    plain = Dataset()
    plain.CodeValue, plain.CodingSchemeDesignator, plain.CodeMeaning = "1", "99X", "Lung"
    accented = Dataset()
    accented.CodeValue, accented.CodingSchemeDesignator, accented.CodeMeaning = "2", "99X", "Poumon gauche é"
    own = copy.deepcopy(accented)
    own.SpecificCharacterSet = "ISO_IR 192"
    ds.add(DataElement(0x0040A043, "SQ", DicomSequence([plain, accented, own])))
    for _ in range(2):
        try:
            expected = encode_reference(ds)
        except OutputError:
            with pytest.raises(OutputError):
                encode(ds)
        else:
            assert encode(ds) == expected


def test_a_report_is_its_reference_before_and_after_others() -> None:
    """A report written first, then after reports in other character sets, gives the same bytes each time."""
    first = _report()
    before = encode(first)
    for charset in ("ISO_IR 192", "ISO_IR 126"):
        source, image, mask = phantom_source(SpecificCharacterSet=charset)
        other = outputs.build_dataset(source, findings_on(image, mask, similar=CASES), OutputOptions(), "sr")
        assert encode(other) == encode_reference(other)
    assert encode(first) == before == encode_reference(first)


def test_the_check_sees_each_element_once_in_iterall_order() -> None:
    """The writer shows the check every element but sequences, in ``iterall`` order, a text written before in
    the call (same tag, VR and character set) excepted."""
    ds = _report()
    seen: list[DataElement] = []
    assert write_explicit_le(ds, seen.append) is not None
    expected, texts = [], set()
    for element in ds.iterall():
        if element.VR == "SQ":
            continue
        if isinstance(element.value, str):
            key = (element.tag, element.VR, element.value)  # one character set throughout
            if key in texts:
                continue
            texts.add(key)
        expected.append(element)
    assert [id(element) for element in seen] == [id(element) for element in expected]


def test_raw_elements_are_still_validated() -> None:
    """A data set read from a file (raw elements: written by ``dcmwrite``) is validated in full first."""
    buffer = io.BytesIO()
    _every_vr().save_as(buffer, enforce_file_format=True)
    raw = dcmread(io.BytesIO(buffer.getvalue()))
    assert encode(raw) == encode_reference(raw)
    raw.add(DataElement(0x00180015, "CS", "chest"))
    with pytest.raises(ValueError, match="BodyPartExamined"):
        validate_values(raw)
    with pytest.raises(OutputError, match="BodyPartExamined"):
        encode(raw)
