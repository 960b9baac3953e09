"""FHIR in: ``cxr-node outcomes pull`` against a small FHIR server run by the test on loopback.

No FHIR server can be installed here offline (HAPI and the like need downloads), so the test serves Bundle pages
built and validated with fhir.resources' R4B models from a stdlib HTTP server: the search, the paging, a bearer
token, and the answers a real server gives when it is down, refuses or returns something else.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from cxr_node.app import open_store
from cxr_node.cli import main
from cxr_node.config import Settings
from tests.conftest import free_port
from tests.integration.helpers import write_config

TOKEN = "fhir-test-token-0123456789"  # noqa: S105 - a test token
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def report(rid: str, version: str, accession: str | None, **more: Any) -> dict[str, Any]:
    """A final DiagnosticReport (validated) with an ACSN identifier."""
    data = {"resourceType": "DiagnosticReport", "id": rid, "meta": {"versionId": version}, "status": "final",
            "code": {"text": "XR Chest"}, "issued": "2024-03-01T11:00:00+00:00", **more}  # fmt: skip
    if accession:
        data["identifier"] = [{"type": ACSN, "value": accession}]
    return DiagnosticReport.model_validate(data).model_dump(mode="json", exclude_none=True)


def bundle(entries: list[dict[str, Any]], next_url: str | None = None, mode: str = "match") -> dict[str, Any]:
    """A searchset Bundle of ``entries`` (validated), with a next link when given."""
    data: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                            "entry": [{"resource": e, "search": {"mode": mode}} for e in entries]}  # fmt: skip
    if next_url:
        data["link"] = [{"relation": "next", "url": next_url}]
    return Bundle.model_validate(data).model_dump(mode="json", exclude_none=True)


class Fhir(http.server.ThreadingHTTPServer):
    """Pages by path; every request recorded; the token checked."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {}
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", free_port()), Handler)

    @property
    def base(self) -> str:
        """The server's FHIR base URL."""
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers GETs from the server's pages; 401 without the token."""

    server: Fhir

    def do_GET(self) -> None:
        """Serve one page."""
        self.server.requests.append(self.path)
        parts = urlsplit(self.path)
        key = parts.path + ("?page=" + parse_qs(parts.query)["page"][0] if "page=" in parts.query else "")
        status, body = self.server.pages.get(key, (404, b'{"resourceType": "OperationOutcome"}'))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            status, body = 401, b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def fhir() -> Iterator[Fhir]:
    """A running test FHIR server."""
    server = Fhir()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def serve(fhir: Fhir, path: str, data: Any, status: int = 200) -> None:
    """Put ``data`` (JSON) at ``path`` on the test server."""
    fhir.pages[path] = (status, json.dumps(data).encode())


@pytest.fixture
def pull(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., int]:
    """Run ``cxr-node outcomes pull`` with a config file and a token file; return its exit code."""
    config = write_config(make_settings(), tmp_path / "node.yaml")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")

    def run(url: str, *more: str) -> int:
        return main(["outcomes", "pull", "--config", str(config), "--fhir-url", url, "--token-file", str(token), *more])

    return run


def test_pull_follows_pages_and_records_each_version_once(
    fhir: Fhir, pull: Callable[..., int], make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    """Reports on two pages are mapped from conclusionCode, contained and included Observations and the
    ServiceRequest's accession; a second pull records nothing new; what cannot be used is counted by reason."""
    sct = "http://snomed.info/sct"
    observation = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "COVID-19"},
                   "valueCodeableConcept": {"coding": [{"system": sct, "code": "260415000"}]}}  # fmt: skip
    request = {"resourceType": "ServiceRequest", "id": "sr1", "status": "completed", "intent": "order",
               "subject": {"reference": "Patient/p"}, "identifier": [{"type": ACSN, "value": "ACC-F3"}]}  # fmt: skip
    first = [
        report("r1", "1", "ACC-F1", conclusionCode=[{"coding": [{"system": sct, "code": "840539006"}]}]),
        report("r2", "3", "ACC-F2", contained=[observation], result=[{"reference": "#o1"}]),
        report("r3", "1", None, basedOn=[{"reference": "ServiceRequest/sr1"}], conclusion="CO-RADS 5"),
    ]
    serve(fhir, "/fhir/DiagnosticReport", bundle(first, f"{fhir.base}/DiagnosticReport?page=2"))
    fhir.pages["/fhir/DiagnosticReport"] = (200, json.dumps(
        {**json.loads(fhir.pages["/fhir/DiagnosticReport"][1]),
         "entry": [*json.loads(fhir.pages["/fhir/DiagnosticReport"][1])["entry"],
                   {"resource": request, "search": {"mode": "include"}}]}).encode())  # fmt: skip
    second = [report("r4", "1", None, conclusion="COVID-19"), report("r5", "2", "ACC-F5", conclusion="cardiomegaly")]
    serve(fhir, "/fhir/DiagnosticReport?page=2", bundle(second))
    assert pull(fhir.base, "--since", "2024-01-01") == 0
    out = capsys.readouterr().out
    assert "2 page(s), 5 DiagnosticReport(s)" in out
    assert "recorded 3, repeated (already recorded) 0" in out
    assert "unmappable 2: no accession number (identifier of type ACSN) 1, not in the mapping 1" in out
    query = parse_qs(urlsplit(fhir.requests[0]).query)
    assert query["status"] == ["final,amended,corrected"] and query["_lastUpdated"] == ["ge2024-01-01T00:00:00"]
    store = open_store(make_settings())
    try:
        got = {(o.accession_number, o.label, o.source_id) for o in store.outcomes.query()}
    finally:
        store.close()
    assert got == {("ACC-F1", "positive", "r1/_history/1"), ("ACC-F2", "negative", "r2/_history/3"),
                   ("ACC-F3", "positive", "r3/_history/1")}  # fmt: skip
    assert pull(fhir.base) == 0
    assert "recorded 0, repeated (already recorded) 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("down", "cannot reach FHIR server"),
        ("token", "answered 401 Unauthorized (check --token-file)"),
        ("not-bundle", "the answer is not a Bundle (found Patient)"),
        ("not-json", "the answer is not JSON"),
        ("elsewhere", "pointed to another server"),
    ],
)
def test_pull_errors_are_one_line(
    fhir: Fhir, pull: Callable[..., int], capsys: pytest.CaptureFixture[str], tmp_path: Path, setup: str, message: str
) -> None:
    """A server down, a refused token, an answer that is not a Bundle or not JSON, or a next link to another
    server end the pull with one line and exit code 1."""
    url = fhir.base
    if setup == "down":
        url = f"http://127.0.0.1:{free_port()}/fhir"
    elif setup == "token":
        fhir.pages["/fhir/DiagnosticReport"] = (401, b"{}")
    elif setup == "not-bundle":
        serve(fhir, "/fhir/DiagnosticReport", {"resourceType": "Patient", "id": "p"})
    elif setup == "not-json":
        fhir.pages["/fhir/DiagnosticReport"] = (200, b"<html>login</html>")
    else:
        serve(fhir, "/fhir/DiagnosticReport", bundle([], "http://198.51.100.7/fhir/DiagnosticReport?page=2"))
    assert pull(url) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
