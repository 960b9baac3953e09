"""The outcome mapping file: the shipped default, its semantics (codes first, words in order) and bad files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cxr_node.outcomes.hl7_message import ACCEPTED, REJECTED, Refusal, ack, escape, parse_oru, plan
from cxr_node.outcomes.mapping import Coding, Finding, Mapping, Match, Unmapped, load_mapping

SHIPPED = Path(__file__).resolve().parents[2] / "cxr_node" / "outcomes" / "default-mapping.yaml"


@pytest.fixture(scope="module")
def shipped() -> Mapping:
    """The default mapping shipped in config/."""
    return load_mapping(SHIPPED)


@pytest.mark.parametrize(
    ("system", "code", "label"),
    [
        ("SCT", "840539006", "positive"),
        ("http://snomed.info/sct", "882784691000119100", "positive"),
        ("2.16.840.1.113883.6.96", "260373001", "positive"),
        ("sct", "260415000", "negative"),
        ("LN", "LA6576-8", "positive"),
        ("http://loinc.org", "LA11883-8", "negative"),
        ("CO-RADS", "3", "not_assessable"),
        ("CO-RADS", "5", "positive"),
        ("CORADS", "1", "negative"),
    ],
)
def test_shipped_codes(shipped: Mapping, system: str, code: str, label: str) -> None:
    """Each coded value of the shipped file maps to its label, whatever alias names its system."""
    found = shipped.classify(Finding((Coding(system, code),)))
    assert found == Match(label, f"{system}|{code}")


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("SARS-CoV-2 NOT DETECTED", "negative"),
        ("Detected", "positive"),
        ("No evidence of COVID-19 pneumonia", "negative"),
        ("Bilateral COVID-19 pneumonia", "positive"),
        ("CO-RADS 4", "positive"),
        ("co-rads 2", "negative"),
        ("1", "positive"),
        ("0", "negative"),
        ("Indeterminate", "not_assessable"),
        ("  non-diagnostic   study ", "not_assessable"),
    ],
)
def test_shipped_words(shipped: Mapping, text: str, label: str) -> None:
    """Words are matched case-insensitively, first rule in file order, negations before what they negate."""
    found = shipped.classify(Finding(text=text))
    assert isinstance(found, Match)
    assert found.label == label


def test_codes_win_over_words(shipped: Mapping) -> None:
    """A mapped code decides even when the words would say otherwise."""
    finding = Finding((Coding("SCT", "260415000"),), "detected")
    assert shipped.classify(finding).label == "negative"


def test_unmapped_and_conflicting(shipped: Mapping) -> None:
    """What matches nothing is unmapped with a reason; codes that disagree are conflicting, never guessed."""
    assert shipped.classify(Finding(text="cardiomegaly")) == Unmapped("not in the mapping")
    assert shipped.classify(Finding(text="abnormal")) == Unmapped("not in the mapping")
    assert shipped.classify(Finding()) == Unmapped("empty value")
    both = Finding((Coding("SCT", "260373001"), Coding("SCT", "260415000")))
    assert shipped.classify(both) == Unmapped("conflicting codes")
    assert shipped.classify(Finding((Coding("SCT", "1"),))) == Unmapped("code not in the mapping")


S = "systems: {s: [S]}\ncodes:\n"
ONE = "  - {system: s, code: '1', label: positive}\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("codes: [", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("colours: {}\ncodes: []\n", "unknown section 'colours'"),
        (S + "  - {system: s, code: '1', label: maybe}\n", "codes entry 1: label must be one of"),
        (S + "  - {system: t, code: '1', label: positive}\n", "codes entry 1: system 't'"),
        (S + "  - {system: s, label: positive}\n", "codes entry 1: missing 'code'"),
        (S + ONE + ONE, "codes entry 2: code s|1 is listed twice"),
        (
            "words:\n  - {phrase: a, label: positive}\n  - {equals: no, label: negative}\n",
            "words entry 2: words must be",
        ),
        ("words:\n  - {phrase: covid, equals: covid, label: positive}\n", "words entry 1: give exactly one"),
        ("words:\n  - {phrase: covid, label: positive, colour: red}\n", "words entry 1: unknown key 'colour'"),
        ("systems: {a: [X], b: [x]}\ncodes: []\n", "alias 'x' also names system"),
        ("version: 1\n", "has no rule"),
    ],
)
def test_bad_file_refused_in_one_line(tmp_path: Path, content: str, message: str) -> None:
    """A bad mapping file is refused with one line naming the file and the entry."""
    path = tmp_path / "mapping.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_mapping(path)
    assert str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)


def test_missing_file_refused(tmp_path: Path) -> None:
    """A missing mapping file is one line naming it."""
    with pytest.raises(ValueError, match="cannot read the outcome mapping"):
        load_mapping(tmp_path / "absent.yaml")


# --- HL7 v2 reading, pure ------------------------------------------------------------------------------

MSH = "MSH|^~\\&|RIS|HOSP|CXR|NODE|20240301120000+0100||ORU^R01^ORU_R01|{id}|P|2.5.1"


def _oru(*segments: str, control: str = "M1") -> bytes:
    return "\r".join([MSH.format(id=control), *segments]).encode()


def test_oru_fields(shipped: Mapping) -> None:
    """Accession from OBR-3, study from ZDS-1, codes and words per OBX, report time from OBR-22."""
    raw = _oru(
        "PID|1||12345^^^H||DOE^JANE",
        "ORC|RE|P77|F77",
        "OBR|1|P1|ACC-9|XR^Chest|||20240301100000|||||||||||||||20240301110000+0000|||F",
        "OBX|1|CWE|18748-4^Dx^LN||840539006^COVID-19^SCT||||||F",
        "OBX|2|TX|IMP^Impression^L||No evidence of pneumonia||||||F",
        "OBX|3|NM|SIZE^^L||12|mm|||||F",
        "OBX|4|CWE|X^^L||260373001^Detected^SCT||||||W",
        "ZDS|1.2.840.1234.5^RIS^Application^DICOM",
    )
    found = plan(parse_oru(raw, ["OBR-3", "OBR-2"]), shipped)
    assert [(o.source_id, o.accession_number, o.label, o.code) for o in found.outcomes] == [
        ("M1/1", "ACC-9", "positive", "SCT|840539006"),
        ("M1/2", "ACC-9", "negative", "words:no evidence of"),
    ]
    assert found.outcomes[0].study_instance_uid == "1.2.840.1234.5"
    assert found.outcomes[0].reported_at == 1709290800.0
    assert found.left_out == {"OBX-2 value type NM is neither coded nor text": 1, "OBX-11 status W": 1}


def test_accession_fallbacks_and_preliminary(shipped: Mapping) -> None:
    """OBR-2 then ORC fields give the accession when OBR-3 is empty; a preliminary report records nothing."""
    raw = _oru("ORC|RE||F5", "OBR|1|||XR", "OBX|1|ST|X||positive")
    assert plan(parse_oru(raw, ["OBR-3", "OBR-2", "ORC-3"]), shipped).outcomes[0].accession_number == "F5"
    raw = _oru("OBR|1||A1|XR|||||||||||||||||||||P", "OBX|1|ST|X||positive")
    found = plan(parse_oru(raw, ["OBR-3"]), shipped)
    assert found.outcomes == () and found.only_not_final


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not an HL7 v2 message"),
        (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\r", "only ORU^R01 is accepted, found ADT^A01"),
        (b"MSH|^~\\&|A|B|C|D|2024||ORU^R01||P|2.5\r", "MSH-10"),
    ],
)
def test_not_an_oru_is_rejected(raw: bytes, reason: str) -> None:
    """What is not an ORU^R01 with a control ID is refused AR with the reason."""
    with pytest.raises(Refusal, match=re.escape(reason)) as caught:
        parse_oru(raw, ["OBR-3"])
    assert caught.value.code == REJECTED


def test_ack_escapes_and_copies_the_header() -> None:
    """The ACK swaps sender and receiver, copies MSH-10 into MSA-2 and escapes the text."""
    header = parse_oru(_oru("OBR|1||A"), ["OBR-3"]).header
    segments = ack(header, ACCEPTED, "a|b^c").decode().split("\r")
    assert segments[0].startswith("MSH|^~\\&|CXR|NODE|RIS|HOSP|")
    assert segments[1] == "MSA|AA|M1|a\\F\\b\\S\\c"
    assert escape("x\\y\r\nz") == "x\\E\\y z"
