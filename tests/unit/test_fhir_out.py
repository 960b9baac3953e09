"""The FHIR Bundle of a triage result: valid against fhir.resources R4B, conditional creates on the job's
identifier, the same bytes on every resend; the server's answers judged."""

from __future__ import annotations

import json

import pytest
from fhir.resources.R4B.bundle import Bundle

from cxr_node.results.findings import MaskVerdict, Summary
from cxr_node.send.fhir import IDENTIFIER_SYSTEM, encode, judge
from cxr_node.send.triage import SourceValues, TriageFacts

POSITIVE = Summary("cxr-demo", "1.0.0", True, (256, 256), probability=0.8731, threshold=0.42,
                   lung_mask=MaskVerdict(True, "plausible", 0.3, 2))  # fmt: skip
NOT_ANALYSED = Summary("cxr-demo", "1.0.0", False, (256, 256), reason="pixels cannot be decoded")
SOURCE = SourceValues("PAT-1", "", "Doe^John", "19700101", "F", "ACC1", "1.2.3.4", "20260102", "101112")


def facts(summary: Summary = POSITIVE, source: SourceValues = SOURCE) -> TriageFacts:
    """Triage facts of job 7."""
    return TriageFacts(7, "instance-key", summary, "supervised", 1767268800.0, "model manifest", source)


@pytest.mark.parametrize("summary", [POSITIVE, NOT_ANALYSED], ids=["positive", "not-analysed"])
def test_the_bundle_validates_and_is_stable(summary: Summary) -> None:
    """The Bundle parses as an R4B transaction and is byte for byte the same when built again."""
    data = encode(facts(summary))
    assert data == encode(facts(summary))
    parsed = Bundle.model_validate_json(data)
    assert parsed.type == "transaction" and len(parsed.entry or []) == 2


def test_observation_and_report_fields() -> None:
    """Observation: preliminary, probability, POS, operating point and source, study and order by identifier;
    the report references it; both are conditional creates on the job's identifier."""
    bundle = json.loads(encode(facts()))
    observation, report = (entry["resource"] for entry in bundle["entry"])
    control_id = facts().control_id
    for entry in bundle["entry"]:
        assert entry["request"]["ifNoneExist"].endswith(control_id)
        assert entry["resource"]["identifier"] == [{"system": IDENTIFIER_SYSTEM, "value": control_id}]
        assert entry["resource"]["status"] == "preliminary"
        assert entry["resource"]["basedOn"][0]["identifier"]["value"] == "ACC1"
        assert entry["resource"]["subject"]["identifier"]["value"] == "PAT-1"
    assert observation["valueQuantity"]["value"] == 0.8731
    assert observation["interpretation"][0]["coding"][0]["code"] == "POS"
    assert observation["derivedFrom"][0]["identifier"]["value"] == "urn:oid:1.2.3.4"
    assert observation["device"]["display"] == "cxr-demo 1.0.0"
    components = {c["code"]["coding"][0]["code"]: c for c in observation["component"]}
    assert components["CXRN-OPSRC"]["valueString"] == "model manifest"
    assert components["CXRN-PRIORITY"]["valueCodeableConcept"]["coding"][0]["code"] == "stat"
    assert components["CXRN-MODE"]["valueString"].startswith("supervised: SUPERVISED MODE")
    assert report["result"] == [{"reference": bundle["entry"][0]["fullUrl"]}]
    assert report["conclusion"].startswith("AI: COVID-19 pneumonia suggested.")


def test_a_not_analysed_result_has_no_value() -> None:
    """Not analysed: a data absent reason with the reason, no interpretation; unknown patient left out."""
    bundle = json.loads(encode(facts(NOT_ANALYSED, SourceValues(study_instance_uid="1.2.3"))))
    observation = bundle["entry"][0]["resource"]
    assert "valueQuantity" not in observation and "interpretation" not in observation
    assert observation["dataAbsentReason"]["text"] == "pixels cannot be decoded"
    assert "subject" not in observation and "basedOn" not in observation


@pytest.mark.parametrize(
    ("code", "ok", "permanent", "down"),
    [(200, True, False, False), (201, True, False, False), (400, False, True, False), (422, False, True, False),
     (408, False, False, False), (500, False, False, False), (401, False, False, True), (429, False, False, True),
     (503, False, False, True)],
)  # fmt: skip
def test_answers(code: int, ok: bool, permanent: bool, down: bool) -> None:
    """2xx delivers; 4xx but 408 is permanent; 5xx is retried; credentials, URL and busy statuses are down."""
    answer = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"no"}]}'
    outcome, is_down = judge(code, answer)
    assert (outcome.ok, outcome.permanent, is_down) == (ok, permanent, down)
    if code >= 400:
        assert outcome.comment.endswith(f"HTTP {code}: no")
