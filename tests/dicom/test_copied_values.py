"""Values copied from the source: one helper gives the SR, SC, SEG and GSPS the same Patient and Study
attributes; non-conformant values are repaired or left out, and the SR says so without patient values."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from cxr_node.results.common import OutputError, OutputOptions
from cxr_node.results.copied import Note, checked, copy_source, module_specs
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, Summary
from cxr_node.results.outputs import build_outputs, writable_cases
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset
from tests.conftest import require_tool

PROVENANCE = Provenance("cxr-demo", "1.0.0", "demo: not for clinical use", ("mobilenet",), "0.1.0", "2.25.42")
KINDS = ("sr", "sc", "seg", "pr")
SHARED = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
    "PatientBirthDate", "PatientSex", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "ReferringPhysicianName", "StudyDate", "StudyTime", "StudyInstanceUID", "StudyDescription",
)  # fmt: skip
"""The Patient and Study attributes issue 13 names; every output must carry the same values."""


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def source(**changes: object) -> Dataset:
    """A phantom chest CR with every shared attribute set (issuers and other IDs included), then ``changes``."""
    ds = phantom_to_dataset(make_phantom(5, 1, 256), patient_id="P9", patient_name="Doe^Jane")
    ds.IssuerOfPatientID = "HOSPITAL A"
    ds.IssuerOfPatientIDQualifiersSequence = DicomSequence(
        [_item(UniversalEntityID="1.2.3.9", UniversalEntityIDType="ISO")]
    )
    ds.OtherPatientIDsSequence = DicomSequence(
        [_item(PatientID="X77", IssuerOfPatientID="HOSPITAL B", TypeOfPatientID="TEXT")]
    )
    ds.IssuerOfAccessionNumberSequence = DicomSequence([_item(LocalNamespaceEntityID="RIS A")])
    ds.PatientBirthDate, ds.PatientSex, ds.StudyID = "19400305", "F", "S1"
    ds.ReferringPhysicianName, ds.StudyDescription = "Who^Doctor", "CHEST PA"
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def findings(similar: tuple[SimilarCase, ...] = ()) -> Findings:
    """Analysed findings on the phantom, with ``similar`` cases."""
    phantom = make_phantom(5, 1, 256)
    summary = Summary(
        "cxr-demo", "1.0.0", True, (256, 256), probability=0.8, threshold=0.5, members=(("mobilenet", 0.8),),
        lung_mask=MaskVerdict(True, "plausible", 0.3, 2), similar=similar,
    )  # fmt: skip
    image = phantom.image.astype(np.float32)
    return Findings(PROVENANCE, summary, image=image, lung_mask=phantom.lung_mask.astype(bool), heatmap=image * 0)


def decoded(ds: Dataset, similar: tuple[SimilarCase, ...] = ()) -> tuple[dict[str, Dataset], tuple[Note, ...]]:
    """Every output kind built from ``ds``, decoded from its bytes, and the notes."""
    built = build_outputs(ds, findings(similar), OutputOptions(), KINDS)
    return {item.kind: dcmread(io.BytesIO(item.data)) for item in built}, built.notes


def texts(sr: Dataset) -> list[str]:
    """The TEXT values of the SR's report-level evaluations."""
    return [str(item.TextValue) for item in sr.ContentSequence[-1].ContentSequence if item.ValueType == "TEXT"]


def test_every_output_carries_the_same_patient_and_study() -> None:
    """SR, SC, SEG and GSPS carry identical Patient and Study attributes, the issuers and other IDs included."""
    outputs, notes = decoded(source())
    assert notes == ()
    reference = outputs["sr"]
    for keyword in SHARED:
        assert keyword in reference, keyword
        for kind, out in outputs.items():
            assert out[keyword].to_json_dict(None, None) == reference[keyword].to_json_dict(None, None), (kind, keyword)
    assert outputs["sc"].IssuerOfPatientID == "HOSPITAL A"
    assert outputs["sc"].OtherPatientIDsSequence[0].PatientID == "X77"
    tags = {
        kind: {e.tag for e in out if e.tag.group in (0x0010, 0x0038) or e.keyword in SHARED}
        for kind, out in outputs.items()
    }
    assert all(found == tags["sr"] for found in tags.values()), tags


def test_clean_values_are_copied_unchanged() -> None:
    """A conformant source is copied element for element: nothing is repaired and no note is made."""
    ds = source()
    copied = copy_source(ds)
    assert copied.notes == ()
    for element in copied.attributes:
        if element.tag in ds:
            assert element.value == ds[element.tag].value, element.keyword


@pytest.mark.parametrize(
    ("changes", "keyword", "expected", "note"),
    [
        ({"StudyDate": "2020.03.01"}, "StudyDate", "20200301", "StudyDate 2020.03.01 -> 20200301"),
        ({"StudyDate": "2020-03-01"}, "StudyDate", "20200301", "StudyDate 2020-03-01 -> 20200301"),
        ({"StudyTime": "12:30:05"}, "StudyTime", "123005", "StudyTime 12:30:05 -> 123005"),
        ({"StudyDate": "2020.13.01"}, "StudyDate", "", "StudyDate left empty (not a date YYYYMMDD)"),
        ({"AccessionNumber": "A" * 20}, "AccessionNumber", "", "AccessionNumber left empty (over 16 characters)"),
        ({"PatientBirthDate": "1940.03.05"}, "PatientBirthDate", "19400305", "PatientBirthDate repaired"),
        ({"PatientSex": "female"}, "PatientSex", "F", "PatientSex repaired"),
        ({"PatientSex": "X"}, "PatientSex", "", "PatientSex left empty (not M, F or O)"),
        ({"PatientID": "P9\0"}, "PatientID", "P9", "PatientID repaired (surrounding spaces or NULs removed)"),
        ({"PatientName": "Doe^Jane^^^^^"}, "PatientName", "Doe^Jane", "PatientName repaired"),
        ({"StudyDescription": "CHEST\x01PA"}, "StudyDescription", None, "StudyDescription left out"),
        ({"StudyID": "S" * 17}, "StudyID", "", "StudyID left empty (over 16 characters)"),
        ({"BodyPartExamined": "chest"}, "BodyPartExamined", "CHEST", "BodyPartExamined repaired (upper-cased)"),
        ({"PatientOrientation": ["AL", "F"]}, "PatientOrientation", "", "PatientOrientation left out (not a row"),
        ({"PatientOrientation": ["P", "X"]}, "PatientOrientation", "", "PatientOrientation left out (not a row"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_values_are_repaired_or_left_out(
    changes: dict[str, object], keyword: str, expected: str | None, note: str
) -> None:
    """An unambiguous repair is made; otherwise a Type 2 attribute is left empty and a Type 3 one absent; every
    output agrees, passes pydicom's strict writing, and the notes say what happened."""
    outputs, notes = decoded(source(**changes))
    assert any(str(n).startswith(note) for n in notes), notes
    for out in outputs.values():
        if expected is None:
            assert keyword not in out
        elif keyword not in ("BodyPartExamined", "PatientOrientation") or keyword in out:  # not in every IOD
            assert str(out[keyword].value or "") == expected


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_sr_says_what_was_repaired_without_patient_values() -> None:
    """The SR's processing summary names repaired attributes and shows study dates, never names or birth dates."""
    ds = source(StudyDate="2020.03.01", AccessionNumber="ACC-" + "9" * 20, PatientBirthDate="1940-03-05")
    ds.PatientName = "Doe^Jane^^^^^"
    outputs, _ = decoded(ds)
    [line] = [t for t in texts(outputs["sr"]) if t.startswith("Source values repaired:")]
    assert "StudyDate 2020.03.01 -> 20200301" in line
    assert "AccessionNumber left empty (over 16 characters)" in line
    assert "PatientBirthDate repaired" in line and "PatientName repaired" in line
    assert "Doe" not in line and "1940" not in line and "9999" not in line
    item = next(i for i in outputs["sr"].ContentSequence[-1].ContentSequence if i.get("TextValue") == line)
    assert item.ConceptNameCodeSequence[0].CodeValue == "121106"


def test_a_clean_source_gets_no_repair_line() -> None:
    """Nothing repaired, nothing said."""
    outputs, _ = decoded(source())
    assert not [t for t in texts(outputs["sr"]) if t.startswith("Source values repaired")]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_items_of_a_sequence_are_dropped_alone() -> None:
    """An OtherPatientIDsSequence item with an invalid value is left out; the valid item stays, in every output."""
    bad = _item(PatientID="X" * 70, IssuerOfPatientID="HOSPITAL C")
    ds = source()
    ds.OtherPatientIDsSequence.append(bad)
    outputs, notes = decoded(ds)
    assert [str(n) for n in notes] == ["OtherPatientIDsSequence repaired (1 of 2 items with invalid values left out)"]
    assert {len(out.OtherPatientIDsSequence) for out in outputs.values()} == {1}


def test_a_source_uid_that_cannot_be_referenced_stops_the_outputs() -> None:
    """An unusable Study Instance UID cannot be repaired or left out: no output is built, and the error says which."""
    with pytest.raises(OutputError, match="StudyInstanceUID cannot be referenced"):
        copy_source(source(StudyInstanceUID="1.2.3." + "4" * 70))


def test_similar_cases_that_cannot_be_written_are_left_out() -> None:
    """A similar case with an invalid UID, an over-long accession or a bad date is left out of every output,
    the others stay with their ranks, and a note says which."""
    good = SimilarCase(1, 0.9, "C0000001", "covid", "1.2.3", "1.2.3.4", "ACC1", "20200301")
    cases = (
        good,
        SimilarCase(2, 0.8, "C0000002", None, "1.2.3", "1.2.3.abc", "ACC2", "20200301"),
        SimilarCase(3, 0.7, "C0000003", None, "1.2.3", "1.2.3.5", "A" * 17, "20200301"),
        SimilarCase(4, 0.6, "C0000004", None, "1.2.3", "1.2.3.6", "ACC4", "2020.03.01"),
        SimilarCase(5, 0.5, "C0000005", "non-covid"),
    )
    kept, notes = writable_cases(findings(cases))
    assert [case.rank for case in kept.summary.similar] == [1, 5]
    assert [note.attribute for note in notes] == ["similar case 2", "similar case 3", "similar case 4"]
    outputs, all_notes = decoded(source(), cases)
    assert all_notes == notes
    uids = {str(i.UID) for i in _content(outputs["sr"]) if i.ValueType == "UIDREF"}
    assert "1.2.3.abc" not in uids and "1.2.3.4" in uids
    assert any(t.startswith("Source values repaired: similar case 2 left out") for t in texts(outputs["sr"]))


def _content(ds: Dataset) -> list[Dataset]:
    found = []
    for item in ds.get("ContentSequence", []):
        found += [item, *_content(item)]
    return found


def test_checked_keeps_valid_elements_as_they_are() -> None:
    """A valid element comes back as the very same object (outputs stay byte for byte what they were)."""
    ds = source()
    for keyword in ("PatientName", "OtherPatientIDsSequence", "StudyDate"):
        element = ds[keyword]
        assert checked(element) == (element, "")


def test_the_shared_attributes_are_those_of_the_patient_and_study_modules() -> None:
    """Every attribute issue 13 names is one the helper copies; the Type 2 ones of the mandatory modules are kept
    even when the source lacks them."""
    specs = {spec.keyword: spec for spec in module_specs()}
    assert set(SHARED) <= set(specs)
    required = {keyword for keyword, spec in specs.items() if spec.required}
    assert required == {
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
        "ReferringPhysicianName", "StudyID", "StudyInstanceUID",
    }  # fmt: skip
    copied = copy_source(source(StudyID=None, PatientSex=None))
    present = {element.keyword: element.value for element in copied.attributes}
    assert present["StudyID"] in (None, "") and present["PatientSex"] in (None, "")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_messy_outputs_pass_dciodvfy(tmp_path: Path) -> None:
    """Outputs of a source with a dotted date, a colon time, a long accession and a lower-case body part have
    no dciodvfy errors (the values were repaired or left out)."""
    ds = source(StudyDate="2020.03.01", StudyTime="12:30:05", AccessionNumber="A" * 20, BodyPartExamined="chest")
    built = build_outputs(ds, findings(), OutputOptions(), KINDS)
    for item in built:
        path = tmp_path / f"{item.kind}.dcm"
        path.write_bytes(item.data)
        done = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error -")]
        assert errors == [], (item.kind, errors)


def _round_trip(ds: Dataset) -> Dataset:
    """``ds`` written and read again, so that its texts are decoded from bytes with its own character set."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"


@pytest.mark.parametrize(
    ("charset", "name", "written", "note"),
    [
        (["", "ISO 2022 IR 87"], JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"], "written as the standard's term"),
        (["", "ISO 2022 IR 149"], KOREAN, "ISO_IR 192", "written as ISO_IR 192, which holds the same characters"),
        ("ISO 2022 IR 100", "Müller^José", "ISO_IR 100", "written as the standard's term"),
        ("ISO-8859-1", "Müller^José", "ISO_IR 100", "written as the standard's term"),
        ("ISO_IR 999", "Müller^José", "ISO_IR 192", "not a character set the standard defines"),
        ("ISO_IR 6", "Doe^Jane", None, "empty or the default repertoire; left out"),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"], ""),
        ("ISO_IR 100", "Müller^José", "ISO_IR 100", ""),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_character_set_the_outputs_cannot_declare_is_repaired(
    charset: str | list[str], name: str, written: str | list[str] | None, note: str
) -> None:
    """A Specific Character Set in a form highdicom or the standard does not take (an empty first term, a single
    code-extension term, a misspelling, an unknown term) gives every output one that holds the same names, and a
    note; the standard's own forms are kept as they are."""
    ds = source(SpecificCharacterSet=charset)
    ds.PatientName = name
    outputs, notes = decoded(_round_trip(ds))
    said = [n.why for n in notes if n.attribute == "SpecificCharacterSet"]
    assert said == ([] if not note else [said[0]]) and (not note or said[0].startswith(note)), said
    for kind, out in outputs.items():
        found = out.get("SpecificCharacterSet")
        assert (found if found is None or isinstance(found, str) else list(found)) == written, kind
        assert str(out.PatientName) == name, kind


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bytes_the_character_set_does_not_define_leave_the_value_out() -> None:
    """Latin-1 bytes declared as UTF-8 would reach the outputs as replacement characters: the name is left empty
    and the note says why, never a changed name."""
    ds = source(SpecificCharacterSet="ISO_IR 100")
    ds.PatientName = "Müller^José"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert data.count(b"ISO_IR 100") == 1
    outputs, notes = decoded(dcmread(io.BytesIO(data.replace(b"ISO_IR 100", b"ISO_IR 192"))))
    assert "PatientName left empty (bytes its character set does not define)" in [str(n) for n in notes]
    assert {str(out.PatientName) for out in outputs.values()} == {""}


@pytest.mark.parametrize(
    ("keyword", "value", "kept", "note"),
    [
        ("ReferencedStudySequence", [], 0, "ReferencedStudySequence left out (no items)"),
        ("ProcedureCodeSequence", [], 0, "ProcedureCodeSequence left out (no items)"),
        ("ProcedureCodeSequence", [_item(CodeValue="X1", CodingSchemeDesignator="", CodeMeaning="Chest")], 0,
         "ProcedureCodeSequence left out (a code without its coding scheme)"),
        ("ProcedureCodeSequence", [_item(CodeValue="X1", CodingSchemeDesignator="99L", CodeMeaning="Chest"),
                                   _item(CodeValue="X2", CodingSchemeDesignator="99L")], 1,
         "ProcedureCodeSequence repaired (1 of 2 items with invalid values left out)"),
        ("IssuerOfAccessionNumberSequence", [Dataset()], 0, "IssuerOfAccessionNumberSequence left out (an empty item)"),
        ("OtherPatientIDsSequence", [Dataset(), _item(PatientID="X77", TypeOfPatientID="TEXT")], 1,
         "OtherPatientIDsSequence repaired (1 of 2 items with invalid values left out)"),
        ("OtherPatientIDsSequence", [_item(PatientID="X77")], 0,
         "OtherPatientIDsSequence left out (an item without its TypeOfPatientID)"),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sequences_the_module_tables_refuse_are_left_out(
    tmp_path: Path, keyword: str, value: list[Dataset], kept: int, note: str
) -> None:
    """A sequence without items where the standard wants one or more, an empty item, an item without a Type 1
    attribute or a code without its scheme: the item (or the sequence) is left out with a note, and the outputs
    pass dciodvfy."""
    ds = source()
    setattr(ds, keyword, DicomSequence(value))
    built = build_outputs(ds, findings(), OutputOptions(), KINDS)
    assert note in [str(n) for n in built.notes]
    for item in built:
        out = dcmread(io.BytesIO(item.data))
        assert len(out.get(keyword, [])) == kept, item.kind
        path = tmp_path / f"{item.kind}.dcm"
        path.write_bytes(item.data)
        done = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error -")]
        assert errors == [], (item.kind, errors)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_radiograph_without_its_modality_gets_its_classs() -> None:
    """A CR sent without its Modality (Type 1) is analysed as triage takes it, a CR: the header handed to the
    builders says so (highdicom's source check reads it), every output is built, and a note says why."""
    outputs, notes = decoded(source(Modality=None))
    assert "Modality repaired (missing; the SOP class's)" in [str(n) for n in notes]
    assert {out.Modality for out in outputs.values()} == {"SR", "OT", "SEG", "PR"}
