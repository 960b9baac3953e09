"""The ORU^R01 of a triage result: built and validated by hl7apy, fields as docs/triage-out.md lists them, messy
source values repaired or left out, the same bytes (control ID included) on every resend; ACKs judged."""

from __future__ import annotations

import hl7
import pytest
from hl7apy import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset

from cxr_node.config import Destination
from cxr_node.dicom import status
from cxr_node.results.findings import MaskVerdict, Mode, Summary
from cxr_node.send.hl7 import Ack, Addressing, encode, escape, frame, judge, person_name, read_ack, read_block
from cxr_node.send.triage import SourceValues, TriageFacts, header_values
from cxr_node.work.write import TriageTarget

POSITIVE = Summary("cxr-demo", "1.0.0", True, (256, 256), probability=0.8731, threshold=0.42,
                   lung_mask=MaskVerdict(True, "plausible", 0.3, 2))  # fmt: skip
NEGATIVE = Summary("cxr-demo", "1.0.0", True, (256, 256), probability=0.1, threshold=0.42,
                   lung_mask=MaskVerdict(True, "plausible", 0.3, 2))  # fmt: skip
NOT_ANALYSED = Summary("cxr-demo", "1.0.0", False, (256, 256), reason="pixels cannot be decoded: bad|value^here")
SOURCE = SourceValues("PAT-1", "HOSP", "Doe^John^Q^Dr^Jr", "19700101", "F", "ACC1", "1.2.3.4", "20260102", "101112")


def facts(
    summary: Summary = POSITIVE, source: SourceValues = SOURCE, job_id: int = 42, mode: Mode = "live"
) -> TriageFacts:
    """Triage facts of job ``job_id``."""
    return TriageFacts(job_id, "instance-key", summary, mode, 1767268800.0, "site calibration of 2026-01-01", source)


def parsed(data: bytes) -> hl7.Message:
    """The message as python-hl7 reads it."""
    return hl7.parse(data.decode("utf-8").strip("\r"))


def obx_values(message: hl7.Message) -> dict[str, str]:
    """OBX-5 by OBX-3's code."""
    return {str(obx(3)(1)(1)): message.unescape(str(obx(5))) for obx in message.segments("OBX")}


@pytest.mark.parametrize("summary", [POSITIVE, NEGATIVE, NOT_ANALYSED], ids=["positive", "negative", "not-analysed"])
def test_the_message_validates_as_oru_r01_v25(summary: Summary) -> None:
    """hl7apy parses the sent bytes back as a valid ORU^R01 v2.5 under strict validation."""
    data = encode(facts(summary), Addressing("CXR_NODE", "RIS", "HOSP"))
    message = parse_message(data.decode().strip("\r"), validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_12.to_er7() == "2.5"


def test_fields_of_a_positive_result() -> None:
    """MSH, PID, ORC/OBR and the OBX say what docs/triage-out.md lists, with priority stat."""
    message = parsed(encode(facts(), Addressing("CXR_NODE", "RIS", "HOSP")))
    msh = message.segment("MSH")
    assert [str(msh(3)), str(msh(5)), str(msh(6)), str(msh(11))] == ["CXR_NODE", "RIS", "HOSP", "P"]
    assert str(msh(10)).startswith("CXRN42.") and len(str(msh(10))) <= 20
    pid = message.segment("PID")
    assert str(pid(3)(1)(1)) == "PAT-1" and str(pid(3)(1)(4)) == "HOSP"
    assert str(pid(5)) == "Doe^John^Q^Jr^Dr" and str(pid(7)) == "19700101" and str(pid(8)) == "F"
    orc, obr = message.segment("ORC"), message.segment("OBR")
    assert str(orc(3)) == "ACC1" and str(obr(3)) == "ACC1" and str(obr(25)) == "P"
    assert str(obr(4)(1)(1)) == "CXRN-TRIAGE" and str(obr(7)) == "20260102101112"
    assert str(obr(27)(1)(6)) == "S" and str(message.segment("TQ1")(9)(1)(1)) == "S"
    assert obx_values(message) == {
        "CXRN-PROB": "0.8731",
        "CXRN-FINDING": "POS^COVID-19 pneumonia suggested^99CXRN",
        "CXRN-MODEL": "cxr-demo 1.0.0",
        "CXRN-OP": "0.4200",
        "CXRN-OPSRC": "site calibration of 2026-01-01",
        "CXRN-MODE": "live",
    }
    assert all(str(obx(11)) == "P" for obx in message.segments("OBX"))


def test_a_not_analysed_result_says_why_and_is_routine() -> None:
    """No probability or operating point; the finding is NA, the reason is escaped text; priority routine."""
    message = parsed(encode(facts(NOT_ANALYSED, mode="supervised")))
    values = obx_values(message)
    assert values["CXRN-FINDING"].startswith("NA^not analysed")
    assert values["CXRN-REASON"] == "pixels cannot be decoded: bad|value^here"
    assert "CXRN-PROB" not in values and "CXRN-OP" not in values
    assert values["CXRN-MODE"].startswith("supervised: SUPERVISED MODE")
    assert str(message.segment("TQ1")(9)(1)(1)) == "R"


def test_the_control_id_and_bytes_are_stable_across_retries() -> None:
    """The same job gives the same bytes every time; another job, or the same number in another store, another
    control ID."""
    first, again = encode(facts()), encode(facts())
    assert first == again
    other_job = str(parsed(encode(facts(job_id=43))).segment("MSH")(10))
    other_store = TriageFacts(42, "another-key", POSITIVE, "live", 1767268800.0, "", SOURCE).control_id
    assert len({str(parsed(first).segment("MSH")(10)), other_job, other_store}) == 3


def test_messy_values_are_escaped_never_structure() -> None:
    """Delimiters, the escape character and control characters in source values cannot break the message."""
    messy = SourceValues("A|B^C", "", "O'Brien&Co^Ann~Marie\\X", "", "", "AC\r\nC|1", "1.2.3", "", "")
    data = encode(facts(source=messy))
    assert data.count(b"\r") == len(parsed(data)) and b"\n" not in data
    message = parsed(data)
    assert message.unescape(str(message.segment("PID")(3))) == "A|B^C"
    assert message.unescape(str(message.segment("OBR")(3))) == "AC  C|1"
    assert [message.unescape(str(part)) for part in message.segment("PID")(5)(1)][:2] == ["O'Brien&Co", "Ann~Marie\\X"]


def test_unknown_patient_values_are_explicit_nulls() -> None:
    """Without a usable patient ID or name the message still validates, with "" (HL7's explicit null)."""
    data = encode(facts(source=SourceValues(study_instance_uid="1.2.3")))
    parse_message(data.decode().strip("\r"), validation_level=VALIDATION_LEVEL.STRICT).validate()
    pid = parsed(data).segment("PID")
    assert str(pid(3)) == '""' and str(pid(5)) == '""' and not str(parsed(data).segment("OBR")(3))


def test_header_values_are_repaired_or_left_out() -> None:
    """A date with dashes is repaired, an over-long accession number and an invalid sex left out, never raised."""
    header = Dataset()
    header.PatientID = " PAT-1 "
    header.PatientName = "Doe^Jane"
    header.PatientSex = "X"
    header.PatientBirthDate = "1970-01-01"
    header.AccessionNumber = "A" * 20
    header.StudyDate = "20261301"
    values, changed = header_values(header)
    assert values == {"patient_id": "PAT-1", "patient_name": "Doe^Jane", "birth_date": "19700101"}
    assert set(changed) >= {"PatientBirthDate", "AccessionNumber", "PatientSex", "StudyDate"}


def test_person_name_maps_pn_to_xpn() -> None:
    """PN family^given^middle^prefix^suffix becomes XPN family^given^middle^suffix^prefix; an empty one nothing."""
    assert person_name("Doe^John^Q^Dr^Jr") == "Doe^John^Q^Jr^Dr"
    assert person_name("Doe=ド") == "Doe" and person_name("^^") == ""


@pytest.mark.parametrize(
    ("code", "ok", "permanent"),
    [("AA", True, False), ("CA", True, False), ("AE", False, False), ("CE", False, False), ("AR", False, True),
     ("CR", False, True), ("ZZ", False, False)],
)  # fmt: skip
def test_ack_codes(code: str, ok: bool, permanent: bool) -> None:
    """AA/CA deliver; AE/CE and unknown codes are failures to retry; AR/CR are permanent refusals."""
    answer = f"MSH|^~\\&|RIS||CXR||20260101||ACK|1|P|2.5\rMSA|{code}|CXRN1.ABCD|text\r".encode()
    outcome = judge(read_ack(answer), "CXRN1.ABCD")
    assert (outcome.ok, outcome.permanent) == (ok, permanent)
    assert outcome.status == (status.SUCCESS if ok else None)


def test_an_ack_of_another_message_or_garbage_is_a_failure() -> None:
    """An ACK naming another control ID is a failure; an answer that is not HL7 cannot be read."""
    assert not judge(Ack("AA", "CXRN2.X"), "CXRN1.X").ok
    with pytest.raises(ValueError, match="not an HL7 acknowledgment"):
        read_ack(b"\x00\xff garbage")


def test_framing() -> None:
    """A message is framed in VT ... FS CR; one holding a framing byte cannot be framed; escape cuts long text."""
    assert frame(b"MSH|x\r") == b"\x0bMSH|x\r\x1c\r"
    with pytest.raises(ValueError, match="framing"):
        frame(b"a\x1cb")
    assert escape("x" * 300) == "x" * 200


def test_read_block_is_bounded() -> None:
    """An answer never ending its block is cut off at the size limit."""
    import socket

    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"\x0bMSA|AA|1\x1c\r")
        assert read_block(left) == b"MSA|AA|1"
        right.sendall(b"x" * (70 * 1024))
        with pytest.raises(OSError, match="over"):
            read_block(left)


def test_which_results_a_triage_destination_wants() -> None:
    """``send: positive`` takes positive results only; ``send: all`` every result, not analysed included."""
    positive, every = TriageTarget("ris", "oru"), TriageTarget("ris", "oru", "all")
    assert [positive.wants(s) for s in (POSITIVE, NEGATIVE, NOT_ANALYSED)] == [True, False, False]
    assert [every.wants(s) for s in (POSITIVE, NEGATIVE, NOT_ANALYSED)] == [True, True, True]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"protocol": "hl7", "host": "ris"}, "a hl7 destination needs port"),
        ({"protocol": "hl7", "host": "ris", "port": 1, "url": "http://x"}, "url: only for protocol: dicomweb or fhir"),
        ({"protocol": "hl7", "host": "ris", "port": 1, "ae_title": "RIS"}, "ae_title: only for protocol: dimse"),
        ({"protocol": "fhir"}, "protocol: fhir needs url"),
        ({"protocol": "fhir", "url": "http://x/fhir", "auth": "bearer"}, "auth: bearer needs token_file"),
        ({"ae_title": "PACS", "host": "p", "port": 1, "send": "all"}, "send: only for protocol: hl7 or fhir"),
        ({"protocol": "fhir", "url": "http://x", "receiving_facility": "H"}, "only for protocol: hl7"),
    ],
)
def test_destination_validation(entry: dict[str, object], message: str) -> None:
    """Each protocol's required and forbidden keys are checked with a one-line error."""
    with pytest.raises(ValueError, match=message):
        Destination(name="x", **entry)  # type: ignore[arg-type]
