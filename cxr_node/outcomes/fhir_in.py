"""The FHIR route: final DiagnosticReports pulled from a FHIR R4 server (``cxr-node outcomes pull``).

The search is ``GET {base}/DiagnosticReport?status=final,amended,corrected&_lastUpdated=ge{since}&_count=..
&_include=DiagnosticReport:result&_include=DiagnosticReport:based-on``; the Bundle's ``next`` links are followed
(same server only, at most ``max_pages``). Each resource is validated with fhir.resources' R4B models (the
release closest to R4 it ships; the elements read here are the same in R4). Per report: the accession number
from an identifier of type ACSN (v2-0203), else from one of the ServiceRequest it is based on; the findings
from ``conclusionCode``, then the Observations of ``result`` (contained, included, else read one by one)
with their ``valueCodeableConcept`` (or ``valueString``), then ``conclusion`` words. Findings that disagree
make the report *conflicting*; one outcome per report version, ``source_id`` = id/_history/versionId.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from cxr_node.errors import CxrNodeError
from cxr_node.jobs.interfaces import OutcomeStore
from cxr_node.jobs.records import NewOutcome
from cxr_node.outcomes.mapping import Coding, Finding, Mapping, Match

ACSN: Final = "ACSN"
MAX_BODY: Final = 32 * 1024 * 1024
MAX_REFERENCES: Final = 20
PAGE_SIZE: Final = 100
MAX_ACCESSION: Final = 64


class FhirError(CxrNodeError):
    """The FHIR server could not be read (down, refused, not FHIR); the message is one line."""


@dataclass(frozen=True)
class Pulled:
    """What a pull did: pages read, outcomes recorded and repeated, reports left out by reason."""

    pages: int = 0
    reports: int = 0
    recorded: int = 0
    repeated: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Client:
    """GETs on one FHIR server: its base URL, an optional bearer token and CA file, a timeout."""

    base: str
    token: str = ""
    ca_file: Path | None = None
    timeout_s: float = 30.0

    def get(self, url: str) -> dict[str, Any]:
        """The JSON object at ``url`` (on this server only).

        Raises
        ------
        FhirError
            One line: not this server, unreachable, an HTTP error (401 named), too large, not JSON.
        """
        if not _same_server(url, self.base):
            raise FhirError(f"the FHIR server pointed to another server ({_origin(url)}): not followed")
        request = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})  # noqa: S310 - http(s) only
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context()) as answer:  # noqa: S310
                body = answer.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            hint = " (check --token-file)" if exc.code in (401, 403) else ""
            raise FhirError(f"FHIR server {_origin(url)} answered {exc.code} {exc.reason}{hint}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FhirError(f"cannot reach FHIR server {_origin(url)}: {reason}") from exc
        if len(body) > MAX_BODY:
            raise FhirError(f"FHIR server {_origin(url)}: answer larger than {MAX_BODY // 1048576} MB")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FhirError(f"FHIR server {_origin(url)}: the answer is not JSON") from exc
        if not isinstance(data, dict):
            raise FhirError(f"FHIR server {_origin(url)}: the answer is not a FHIR resource")
        return data

    def _context(self) -> ssl.SSLContext | None:
        if not self.base.startswith("https:"):
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


def search_url(base: str, since: datetime | None) -> str:
    """The first page's URL: final, amended and corrected reports updated since ``since``, results included."""
    query = [("status", "final,amended,corrected"), ("_count", str(PAGE_SIZE)),
             ("_include", "DiagnosticReport:result"), ("_include", "DiagnosticReport:based-on")]  # fmt: skip
    if since is not None:
        query.append(("_lastUpdated", f"ge{since.isoformat()}"))
    return f"{base.rstrip('/')}/DiagnosticReport?{urllib.parse.urlencode(query)}"


def pages(client: Client, since: datetime | None, max_pages: int) -> Iterator[tuple[Bundle, int]]:
    """The search's Bundles, following ``next`` links, at most ``max_pages``; each with how many of its entries
    were not valid resources (left out of it).

    Raises
    ------
    FhirError
        When an answer is not a valid Bundle.
    """
    url: str | None = search_url(client.base, since)
    for _ in range(max_pages):
        if url is None:
            return
        data = client.get(url)
        if data.get("resourceType") != "Bundle":
            found = data.get("resourceType") or "no resourceType"
            raise FhirError(f"FHIR server {_origin(url)}: the answer is not a Bundle (found {str(found)[:40]})")
        bundle, invalid = _valid_bundle(data, url)
        yield bundle, invalid
        url = next((link.url for link in bundle.link or () if link.relation == "next"), None)


def _valid_bundle(data: dict[str, Any], url: str) -> tuple[Bundle, int]:
    """The Bundle without its entries that are not valid resources, and how many those were."""
    entries = data.get("entry") or []
    kept = [entry for entry in entries if isinstance(entry, dict) and _valid_entry(entry)]
    try:
        bundle = Bundle.model_validate({**data, "entry": kept or None})
    except ValidationError as exc:
        raise FhirError(f"FHIR server {_origin(url)}: not a valid Bundle: {str(exc).splitlines()[0]}") from exc
    return bundle, len(entries) - len(kept)


def _valid_entry(entry: dict[str, Any]) -> bool:
    try:
        Bundle.model_validate({"resourceType": "Bundle", "type": "collection", "entry": [entry]})
    except ValidationError:
        return False
    return True


# ------------------------------------------------------------------------------------------ a report


@dataclass
class Resolver:
    """The resources a report refers to: contained, in the same Bundle, else read from the server (bounded)."""

    client: Client | None
    included: dict[str, Any] = field(default_factory=dict)
    reads: int = 0

    def resolve(self, report: DiagnosticReport, reference: str | None) -> Any:
        """The resource ``reference`` names, or None."""
        if not reference:
            return None
        if reference.startswith("#"):
            return next((r for r in report.contained or () if r.id == reference[1:]), None)
        key = "/".join(reference.rstrip("/").split("/")[-2:])
        if key in self.included:
            return self.included[key]
        if self.client is None or self.reads >= MAX_REFERENCES or key.count("/") != 1:
            return None
        self.reads += 1
        try:
            data = self.client.get(f"{self.client.base.rstrip('/')}/{key}")
            resource = _parse(data)
        except (FhirError, ValidationError):
            return None
        self.included[key] = resource
        return resource


def _parse(data: dict[str, Any]) -> Observation | ServiceRequest | None:
    kind = data.get("resourceType")
    if kind == "Observation":
        return Observation.model_validate(data)
    return ServiceRequest.model_validate(data) if kind == "ServiceRequest" else None


def report_outcome(report: DiagnosticReport, resolver: Resolver, mapping: Mapping) -> NewOutcome | str:
    """The outcome of one report, or why there is none."""
    if not report.id:
        return "report without id"
    accession = _accession(report.identifier) or next(
        (_accession(getattr(r, "identifier", None)) for r in _based_on(report, resolver)), ""
    )
    if not accession or len(accession) > MAX_ACCESSION:
        return "no accession number (identifier of type ACSN)" if not accession else "accession number too long"
    found = _findings(report, resolver, mapping)
    if isinstance(found, str):
        return found
    version = (report.meta.versionId if report.meta else None) or (
        report.meta.lastUpdated.isoformat() if report.meta and report.meta.lastUpdated else "0"
    )
    when = report.issued or report.effectiveDateTime
    reported = when.timestamp() if isinstance(when, datetime) else None
    return NewOutcome(source="fhir", source_id=f"{report.id}/_history/{version}", accession_number=accession,
                      label=found.label, code=found.code, reported_at=reported)  # fmt: skip


def _based_on(report: DiagnosticReport, resolver: Resolver) -> list[Any]:
    found = [resolver.resolve(report, ref.reference) for ref in report.basedOn or ()]
    return [r for r in found if isinstance(r, ServiceRequest)]


def _accession(identifiers: list[Identifier] | None) -> str:
    for identifier in identifiers or ():
        codes = [c.code for c in (identifier.type.coding or ())] if identifier.type and identifier.type.coding else []
        if ACSN in codes and identifier.value:
            return str(identifier.value).strip()
    return ""


def _findings(report: DiagnosticReport, resolver: Resolver, mapping: Mapping) -> Match | str:
    """Codes of conclusionCode and the results' values; the conclusion's words when no code maps."""
    matches: list[Match] = []
    reasons: list[str] = []
    concepts: list[CodeableConcept] = list(report.conclusionCode or ())
    texts: list[str] = []
    for ref in report.result or ():
        observation = resolver.resolve(report, ref.reference)
        if isinstance(observation, Observation) and observation.status not in ("entered-in-error", "cancelled"):
            if observation.valueCodeableConcept is not None:
                concepts.append(observation.valueCodeableConcept)
            elif observation.valueString:
                texts.append(observation.valueString)
    for concept in concepts:
        codings = tuple(Coding(c.system or "", c.code or "") for c in concept.coding or () if c.code)
        words = concept.text or " ".join(c.display for c in concept.coding or () if c.display)
        _add(mapping.classify(Finding(codings, words)), matches, reasons)
    for text in [*texts, *([report.conclusion] if report.conclusion and not matches else [])]:
        _add(mapping.classify(Finding(text=text)), matches, reasons)
    labels = {m.label for m in matches}
    if len(labels) > 1:
        return "conflicting findings"
    if matches:
        return matches[0]
    return reasons[0] if reasons else "no finding (conclusionCode, result, conclusion)"


def _add(found: Match | Any, matches: list[Match], reasons: list[str]) -> None:
    if isinstance(found, Match):
        matches.append(found)
    else:
        reasons.append(found.reason)


# ------------------------------------------------------------------------------------------- the pull


def pull(client: Client, since: datetime | None, mapping: Mapping, store: OutcomeStore, max_pages: int) -> Pulled:
    """Search, map and record (each outcome committed as it is recorded); see the module's docstring."""
    counts: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    unmapped: Counter[str] = Counter()
    for bundle, invalid in pages(client, since, max_pages):
        counts["pages"] += 1
        unmapped["invalid FHIR resource"] += invalid
        resolver = Resolver(client, _included(bundle))
        for entry in bundle.entry or ():
            report = entry.resource
            if not isinstance(report, DiagnosticReport) or (entry.search and entry.search.mode == "include"):
                continue
            counts["reports"] += 1
            made = report_outcome(report, resolver, mapping)
            if isinstance(made, str):
                unmapped[made] += 1
                continue
            created = store.record(made)[1]
            counts["recorded" if created else "repeated"] += 1
            labels[made.label] += 1
    left_out = {reason: n for reason, n in unmapped.items() if n}
    return Pulled(counts["pages"], counts["reports"], counts["recorded"], counts["repeated"], dict(labels),
                  left_out)  # fmt: skip


def _included(bundle: Bundle) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in bundle.entry or ():
        resource = entry.resource
        if resource is not None and resource.id:
            found[f"{resource.get_resource_type()}/{resource.id}"] = resource
    return found


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url[:60]


def _same_server(url: str, base: str) -> bool:
    return _origin(url) == _origin(base) and urllib.parse.urlsplit(url).scheme in ("http", "https")
