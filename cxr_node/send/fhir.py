"""Worklist triage out as FHIR: an Observation and a DiagnosticReport in one transaction Bundle, POSTed to the
server's base URL, validated with fhir.resources before it leaves.

FHIR R4 is the target; fhir.resources 8 ships R4B (4.3) and R5 models, not R4 (4.0.1), so the resources are
checked against the R4B models, which for Observation, DiagnosticReport and Bundle hold the same elements as R4
(docs/triage-out.md). Each entry is a conditional create (``ifNoneExist`` on an identifier derived from the job:
the HL7 message control ID), so a Bundle sent again after a lost answer creates nothing twice, and its
``fullUrl`` is a UUID derived from the job, so the report's reference to the observation is the same every time.

The server's answer decides, as a STOW-RS answer does for DICOMweb (:mod:`cxr_node.send.stow`): 2xx delivered;
401, 403, 404, 405, 429, 502, 503, 504 or no answer: the destination is down (it backs off as a whole, no
attempt counted: credentials, URL, busy); 408 and every other 5xx: a failure, retried with backoff; every other
4xx: refused, dead at once (the server rejected this Bundle, and the same Bundle would be rejected again).
"""

from __future__ import annotations

import datetime
import http.client
import json
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final
from urllib.parse import urlencode

import structlog
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from cxr_node.dicom import status
from cxr_node.errors import SendError
from cxr_node.results.findings import DECISIONS, MODE_NOTICES
from cxr_node.send.http import MAX_ANSWER_BYTES, HttpEndpoint, why
from cxr_node.send.scu import StoreResult
from cxr_node.send.triage import TriageFacts

log = structlog.get_logger("cxr_node.send")

FHIR_JSON: Final = "application/fhir+json"
IDENTIFIER_SYSTEM: Final = "urn:cxr-node:triage"
"""The system of the identifier each resource gets (its value: the job's message control ID)."""
CODE_SYSTEM: Final = "urn:cxr-node:codes"
"""The node's local code system (the same codes as the HL7 message's 99CXRN)."""
UCUM: Final = "http://unitsofmeasure.org"
INTERPRETATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ABSENT: Final = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
PRIORITY: Final = "http://hl7.org/fhir/request-priority"
FINDING_CODES: Final = {DECISIONS[0]: "POS", DECISIONS[1]: "NEG", DECISIONS[2]: "NA"}
DOWN: Final = frozenset({401, 403, 404, 405, 429, 502, 503, 504})
"""HTTP statuses that say the destination, not this Bundle, is the problem: it backs off as a whole."""
RETRIED: Final = frozenset({408, 425})
"""4xx statuses worth a retry; every other 4xx is permanent, every other 5xx retried."""
_NAMESPACE: Final = uuid.UUID("5d1f8c3e-4f0b-5b8e-9a57-3c1f1e6b2a10")


def bundle(facts: TriageFacts) -> dict[str, Any]:
    """The transaction Bundle of ``facts`` (as JSON-ready data), validated with the R4B models.

    Raises
    ------
    ValueError
        When fhir.resources finds it invalid (a bug: every value is checked before it is set).
    """
    observation, report = _url(facts, "Observation"), _url(facts, "DiagnosticReport")
    data = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(observation, "Observation", _observation(facts), facts),
            _entry(report, "DiagnosticReport", _report(facts, observation), facts),
        ],
    }
    try:
        Bundle.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"the FHIR Bundle of job {facts.job_id} is invalid: {exc}") from exc
    return data


def encode(facts: TriageFacts) -> bytes:
    """The Bundle of ``facts`` as UTF-8 JSON (the same bytes every time)."""
    return json.dumps(bundle(facts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _url(facts: TriageFacts, kind: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{facts.control_id}/{kind}/{facts.instance_key}')}"


def _entry(full_url: str, kind: str, resource: dict[str, Any], facts: TriageFacts) -> dict[str, Any]:
    condition = urlencode({"identifier": f"{IDENTIFIER_SYSTEM}|{facts.control_id}"})
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": kind, "ifNoneExist": condition},
    }


def _code(code: str, display: str, system: str = CODE_SYSTEM) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _common(facts: TriageFacts) -> dict[str, Any]:
    """The elements the observation and the report share: identifier, order, patient, times."""
    source = facts.source
    common: dict[str, Any] = {
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": facts.control_id}],
        "status": "preliminary",  # no person has signed it
    }
    if source.accession_number:
        accession = {"type": _code("ACSN", "Accession ID", "http://terminology.hl7.org/CodeSystem/v2-0203"),
                     "value": source.accession_number}  # fmt: skip
        common["basedOn"] = [{"type": "ServiceRequest", "identifier": accession}]
    if source.patient_id:
        common["subject"] = {"type": "Patient", "identifier": {"value": source.patient_id}}
    if len(source.study_date) == 8:
        common["effectiveDateTime"] = f"{source.study_date[:4]}-{source.study_date[4:6]}-{source.study_date[6:]}"
    common["issued"] = datetime.datetime.fromtimestamp(facts.result_time, datetime.UTC).isoformat(timespec="seconds")
    return common


def _study(facts: TriageFacts) -> dict[str, Any]:
    uid = {"system": "urn:dicom:uid", "value": f"urn:oid:{facts.source.study_instance_uid}"}
    return {"type": "ImagingStudy", "identifier": uid}


def _observation(facts: TriageFacts) -> dict[str, Any]:
    summary = facts.summary
    model = f"{summary.model_name} {summary.model_version}"
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        **_common(facts),
        "category": [_code("imaging", "Imaging", "http://terminology.hl7.org/CodeSystem/observation-category")],
        "code": _code("CXRN-PROB", "AI probability of COVID-19 pneumonia"),
        "method": {"text": model},
        "device": {"display": model},
        "note": [{"text": line} for line in _notes(facts)],
        "component": _components(facts),
    }
    if facts.source.study_instance_uid:
        resource["derivedFrom"] = [_study(facts)]
    if summary.probability is not None:
        resource["valueQuantity"] = {"value": round(summary.probability, 4), "unit": "probability", "system": UCUM,
                                     "code": "1"}  # fmt: skip
        code, text = ("POS", "Positive") if summary.positive else ("NEG", "Negative")
        resource["interpretation"] = [_code(code, text, INTERPRETATION)]
    else:
        resource["dataAbsentReason"] = {**_code("error", "Error", ABSENT), "text": summary.reason[:200]}
    return resource


def _components(facts: TriageFacts) -> list[dict[str, Any]]:
    summary = facts.summary
    finding = _code(FINDING_CODES[summary.decision], summary.decision)
    priority = ("stat", "Stat") if facts.priority == "S" else ("routine", "Routine")
    components: list[dict[str, Any]] = [
        {"code": _code("CXRN-FINDING", "AI finding"), "valueCodeableConcept": finding},
        {"code": _code("CXRN-PRIORITY", "Worklist priority"), "valueCodeableConcept": _code(*priority, PRIORITY)},
        {"code": _code("CXRN-MODE", "AI go-live mode"), "valueString": _mode_text(facts)},
    ]
    if summary.threshold is not None:
        threshold = {"value": round(summary.threshold, 4), "unit": "probability", "system": UCUM, "code": "1"}
        components.append({"code": _code("CXRN-OP", "AI operating point (threshold)"), "valueQuantity": threshold})
        source = facts.operating_point_source or "unknown"
        components.append({"code": _code("CXRN-OPSRC", "AI operating point source"), "valueString": source})
    return components


def _mode_text(facts: TriageFacts) -> str:
    notice = MODE_NOTICES[facts.mode]
    return f"{facts.mode}: {notice}" if notice else facts.mode


def _notes(facts: TriageFacts) -> list[str]:
    lines = ["AI triage result, preliminary: not reviewed by a radiologist."]
    if MODE_NOTICES[facts.mode]:
        lines.append(MODE_NOTICES[facts.mode])
    if facts.summary.domain_text:
        lines.append(f"Image {facts.summary.domain_text}.")
    if not facts.summary.analysed:
        lines.append(f"Not analysed: {facts.summary.reason[:200]}")
    return lines


def _report(facts: TriageFacts, observation: str) -> dict[str, Any]:
    summary = facts.summary
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        **_common(facts),
        "category": [_code("RAD", "Radiology", "http://terminology.hl7.org/CodeSystem/v2-0074")],
        "code": _code("CXRN-TRIAGE", "Chest radiograph AI triage"),
        "result": [{"reference": observation}],
        "conclusion": " ".join([f"AI: {summary.decision}.", *_notes(facts)[1:]])[:1000],
        "conclusionCode": [_code(FINDING_CODES[summary.decision], summary.decision)],
    }
    if facts.source.study_instance_uid:
        resource["imagingStudy"] = [_study(facts)]
    return resource


def judge(http_status: int, answer: bytes) -> tuple[StoreResult, bool]:
    """What the server's answer to a transaction means, and whether the destination is down."""
    said = f"HTTP {http_status}{': ' + _diagnostics(answer) if http_status >= 400 else ''}"
    if 200 <= http_status < 300:
        return StoreResult(None, status.SUCCESS, said), False
    if http_status in DOWN:
        return StoreResult(None, None, f"the FHIR server answered {said}"), True
    permanent = 400 <= http_status < 500 and http_status not in RETRIED
    return StoreResult(None, None, f"the FHIR server answered {said}", permanent=permanent), False


def _diagnostics(answer: bytes) -> str:
    """The first issue's diagnostics or details of an OperationOutcome, else the start of the text (bounded)."""
    try:
        outcome = json.loads(answer.decode("utf-8", errors="replace"))
        issue = outcome["issue"][0]
        text = str(issue.get("diagnostics") or issue.get("details", {}).get("text") or issue.get("code") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = answer[:200].decode("utf-8", errors="replace")
    return " ".join(text.split())[:200]


class FhirTransport(HttpEndpoint):
    """Transaction Bundles POSTed to the FHIR base ``url``; TLS for an https URL, basic or bearer auth.

    Its probe (and ``cxr-node echo``) is ``GET <url>/metadata`` (the CapabilityStatement): it checks the address,
    TLS, the credentials and that a FHIR server answers there.
    """

    service: ClassVar[str] = "FHIR"
    accept: ClassVar[str] = FHIR_JSON

    def metadata(self) -> int:
        """GET ``<url>/metadata`` and return the HTTP status when it is 200.

        Raises
        ------
        SendError
            When the server cannot be reached or answers anything else; the message says why.
        """
        found = self.get("/metadata")
        if found != 200:
            raise SendError(f"{self} answered GET metadata with HTTP {found}")
        return found

    def probe(self, sop_classes: Sequence[str] = ()) -> frozenset[str]:
        """GET the CapabilityStatement; every kind is assumed accepted.

        Raises
        ------
        SendError
            As :meth:`metadata`.
        """
        self.metadata()
        return frozenset(sop_classes)

    def open(self, sop_classes: Sequence[str] = (), refused: Collection[str] = ()) -> FhirLink:
        """A link for one delivery round.

        Raises
        ------
        SendError
            When a secret or TLS file is unusable (the connection itself is made by the first request).
        """
        return FhirLink(self, self.headers(), frozenset(sop_classes) - frozenset(refused))


class FhirLink:
    """One kept-alive connection to a FHIR server for one delivery round."""

    def __init__(self, transport: FhirTransport, headers: dict[str, str], accepted: frozenset[str]) -> None:
        self.transport = transport
        self.headers = headers
        self._accepted = accepted
        self._alive = True
        self._connection = transport.connection()

    @property
    def accepted(self) -> frozenset[str]:
        """The kinds this link sends."""
        return self._accepted

    @property
    def alive(self) -> bool:
        """False once the server could not be reached, or said it (not the Bundle) is the problem."""
        return self._alive

    def send(self, path: Path) -> StoreResult:
        """Not for FHIR: a triage link sends Bundles (:meth:`deliver`), never files."""
        return StoreResult(path, None, "a FHIR destination takes triage messages, not DICOM files", permanent=True)

    def deliver(self, facts: TriageFacts) -> StoreResult:
        """POST the transaction Bundle of ``facts`` to the base URL and judge the answer."""
        try:
            payload = encode(facts)
        except ValueError as exc:
            return StoreResult(None, None, f"the Bundle cannot be built: {exc}"[:300], permanent=True)
        headers = {**self.headers, "Content-Type": f"{FHIR_JSON}; charset=utf-8", "Content-Length": str(len(payload))}
        try:
            self._connection.request("POST", self.transport.root or "/", body=payload, headers=headers)
            response = self._connection.getresponse()
            answer = response.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            self._alive = False
            return StoreResult(None, None, f"{self.transport} could not be reached: {why(exc)}")
        if not response.isclosed():  # an answer longer than read: this connection cannot be reused
            self._connection.close()
        outcome, down = judge(response.status, answer)
        if down:
            self._alive = False
        return outcome

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()
