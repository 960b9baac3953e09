"""Results to a DICOMweb server over STOW-RS: a real Orthanc with its DICOMweb plugin (in a private network
namespace) for delivery, idempotency, outages, kill -9 and TLS; a small STOW-RS server on loopback for what
Orthanc cannot be made to answer (a refused SOP class, a bearer token, failure statuses)."""

from __future__ import annotations

import io
import json
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from cxr_node.config import Settings
from cxr_node.jobs.states import JobState
from cxr_node.results.kinds import BY_NAME
from cxr_node.send import stow
from tests.integration import test_security
from tests.integration.helpers import write_config
from tests.integration.test_delivery import rounds_until, written_node
from tests.integration.test_security import Pki
from tests.orthanc import dicomweb_available, netns_available, run_in_netns

pki = test_security.pki
"""The throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""

TOKEN = "tok-" + "7f3a9c" * 6
"""The bearer token the small server expects (must never show in a log)."""


def _sequence(tag: str, uid: str, sop_class: str, reason: tuple[str, int] | None) -> dict[str, Any]:
    item: dict[str, Any] = {stow.REFERENCED_SOP_INSTANCE_UID: {"vr": "UI", "Value": [uid]},
            "00081150": {"vr": "UI", "Value": [sop_class]}}  # fmt: skip
    if reason is not None:
        item[reason[0]] = {"vr": "US", "Value": [reason[1]]}
    return {tag: {"vr": "SQ", "Value": [item]}}


class StowServer:
    """A STOW-RS and QIDO-RS server on 127.0.0.1 that stores in memory (over HTTPS with ``tls``).

    ``refuse``: output kinds answered 409 with Failure Reason 0x0122 (SOP class not supported); ``http_status``:
    an HTTP status answered to every store instead (with no data set); ``token``: the bearer token required.
    """

    def __init__(
        self,
        refuse: tuple[str, ...] = (),
        http_status: int | None = None,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.refused_classes = {BY_NAME[kind].sop_class_uid for kind in refuse}
        self.http_status = http_status
        self.token = token
        self.stored: list[Dataset] = []
        self.authorizations: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"http{'s' if tls else ''}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self) -> StowServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def uids(self) -> list[str]:
        """SOP Instance UIDs stored, in order."""
        return [str(ds.SOPInstanceUID) for ds in self.stored]

    def answer(self, content_type: str, payload: bytes) -> tuple[int, dict[str, Any] | None]:
        """Store the one instance of a multipart/related ``payload``; the HTTP status and the response data set."""
        if self.http_status is not None:
            return self.http_status, None
        boundary = re.search(r"boundary=\"?([^\";]+)", content_type)
        if boundary is None:
            return 400, None
        part = payload.split(b"--" + boundary[1].encode())[1]
        ds = dcmread(io.BytesIO(part[part.index(b"\r\n\r\n") + 4 : -2]))
        uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        if sop_class in self.refused_classes:
            reason = (stow.FAILURE_REASON, stow.SOP_CLASS_NOT_SUPPORTED)
            return 409, _sequence(stow.FAILED_SOP_SEQUENCE, uid, sop_class, reason)
        if uid not in self.uids():
            self.stored.append(ds)
        return 200, _sequence(stow.REFERENCED_SOP_SEQUENCE, uid, sop_class, None)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, data: Any) -> None:
                body = json.dumps(data).encode() if data is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", stow.DICOM_JSON)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _allowed(self) -> bool:
                server.authorizations.append(self.headers.get("Authorization", ""))
                if server.token is None or self.headers.get("Authorization") == f"Bearer {server.token}":
                    return True
                self._reply(401, None)
                return False

            def do_GET(self) -> None:
                if self._allowed():
                    self._reply(200 if self.path.startswith("/dicom-web/studies") else 404, [])

            def do_POST(self) -> None:
                payload = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self._allowed():
                    if self.path != "/dicom-web/studies":
                        self._reply(404, None)
                    else:
                        self._reply(*server.answer(self.headers.get("Content-Type", ""), payload))

        return Handler


def web(server: StowServer, **more: object) -> dict[str, object]:
    """A destinations entry for ``server``."""
    return {"name": "web", "protocol": "dicomweb", "url": server.url, **more}


@pytest.fixture
def netns() -> None:
    """Skip unless Orthanc with its DICOMweb plugin can run in a private network namespace."""
    reason = netns_available() or dicomweb_available()
    if reason:
        pytest.skip(reason)


def check_one_copy_each(report: dict[str, Any], count: int) -> None:
    """Every job delivered; Orthanc holds exactly one SR and one SC in each source study, readable by WADO-RS."""
    assert report["jobs"]["delivered"] == count, report
    assert report["deliveries"] == {"web/delivered": 2 * count}
    assert sorted(report["per_study"]) == report["sources"]
    assert all(counts == {"SR": 1, "OT": 1} for counts in report["per_study"].values()), report["per_study"]
    assert sorted(item["study"] for item in report["wado"]) == sorted(report["sources"] * 2)
    assert {item["sop_class"] for item in report["wado"]} == {BY_NAME["sr"].sop_class_uid, BY_NAME["sc"].sop_class_uid}
    assert report["password_logged"] is False


def test_results_reach_orthanc_over_stow_rs(netns: None, tmp_path: Path) -> None:
    """`cxr-node serve` delivers each image's SR and SC to Orthanc over STOW-RS with basic auth (password from a
    file): one of each in the source study, read back by WADO-RS; the password is never logged."""
    report = run_in_netns("dicomweb_out", str(tmp_path), "plain", "3", timeout=400)
    check_one_copy_each(report, 3)
    assert report["destination"] == {"reachable": True, "accepted": ["sc", "sr"], "refused": [], "error": None}


@pytest.mark.slow
def test_orthanc_down_then_up_gets_the_backlog(netns: None, tmp_path: Path) -> None:
    """While Orthanc is down the results wait (the destination is down, no attempt counted); once it is up every
    result arrives once."""
    report = run_in_netns("dicomweb_out", str(tmp_path), "outage", "3", timeout=400)
    assert report["before_up"]["written"] == 3, report
    assert report["destination_before_up"]["reachable"] is False
    assert "could not be reached" in report["destination_before_up"]["error"]
    check_one_copy_each(report, 3)


@pytest.mark.slow
def test_kill_9_mid_delivery_leaves_one_copy_each(netns: None, tmp_path: Path) -> None:
    """The sender killed with SIGKILL while it waits for Orthanc's answer to an output Orthanc already stored (the
    answer is held by the relay), then restarted: the output is sent again and Orthanc ends with exactly one copy
    of each output (same SOP Instance UIDs)."""
    report = run_in_netns("dicomweb_out", str(tmp_path), "kill", "4", timeout=500)
    assert report["at_kill"]["stored"] >= 1, report
    assert "web/delivered" not in report["at_kill"]["deliveries"], report  # stored there, not recorded here
    check_one_copy_each(report, 4)


@pytest.mark.slow
def test_tls_with_client_certificate(netns: None, tmp_path: Path, pki: Pki) -> None:
    """Over https with the site CA and a client certificate (TLS terminated in front of Orthanc, whose own HTTPS
    crashes here) every result arrives once."""
    folder = tmp_path / "pki"
    folder.mkdir()
    for source, name in [(pki.ca_cert, "ca.pem"), (pki.server_cert, "server.pem"), (pki.server_key, "server.key"),
                         (pki.client_cert, "client.pem"), (pki.client_key, "client.key")]:  # fmt: skip
        (folder / name).write_bytes(source.read_bytes())
    report = run_in_netns("dicomweb_out", str(tmp_path / "run"), "plain", "2", str(folder), timeout=400)
    check_one_copy_each(report, 2)
    assert report["tls_handshakes_failed"] == 0


def test_a_refused_sop_class_is_an_alarm(make_settings: Callable[..., Settings], chest_cr: Path,
                                         tiny_manifest: Path) -> None:  # fmt: skip
    """A server answering "SOP class not supported" (0x0122) for the SR gets the SC; the SR deliveries are
    recorded refused, the destination state says so, and destination.unmet is raised once per round."""
    with StowServer(refuse=("sr",)) as server:
        node = written_node(make_settings, chest_cr, tiny_manifest, 2, destinations=[web(server)])
        try:
            with capture_logs() as logs:
                rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 2)
            assert node.store.deliveries.counts() == {("web", "delivered"): 2, ("web", "refused"): 2}
            assert node.store.deliveries.destinations()["web"].refused == ["sr"]
            unmet = [e for e in logs if e["event"] == "destination.unmet"]
            assert unmet and unmet[0]["refused"] == ["sr"] and "0x0122" in unmet[0]["comment"]
            assert [str(ds.SOPClassUID) for ds in server.stored] == [BY_NAME["sc"].sop_class_uid] * 2
        finally:
            node.stop(grace_s=5)


@pytest.mark.parametrize(("code", "dead_after"), [(415, 1), (400, 1), (500, 3)])
def test_failures_are_permanent_or_retried(make_settings: Callable[..., Settings], chest_cr: Path,
                                           tiny_manifest: Path, code: int, dead_after: int) -> None:  # fmt: skip
    """A 4xx answer is dead at once (a retry cannot help); a 500 is retried with backoff up to max_attempts; both
    end dead with the HTTP status in the reason, and `resend` delivers once the server accepts."""
    with StowServer(http_status=code) as server:
        node = written_node(make_settings, chest_cr, tiny_manifest, 1, destinations=[web(server)])
        try:
            with capture_logs() as logs:
                rounds_until(node, lambda: node.store.jobs.counts()[JobState.DEAD] == 1)
            job = node.store.jobs.query(JobState.DEAD)[0]
            assert (job.reason or "").startswith("not delivered: web/") and f"HTTP {code}" in (job.reason or "")
            dead = [e for e in logs if e["event"] == "send.dead"]
            assert dead[0]["attempts"] == dead_after and dead[0]["permanent"] is (code < 500)
            assert len([e for e in logs if e["event"] == "send.retry_scheduled"]) == 2 * (dead_after - 1)  # SR and SC
            server.http_status = None
            assert node.store.deliveries.resend(dead=True) == [job.id]
            rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 1)
            assert len(server.stored) == 2
        finally:
            node.stop(grace_s=5)


def test_bearer_token_file_must_be_private_and_is_never_logged(
    make_settings: Callable[..., Settings], chest_cr: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """A token file others may read keeps the destination down with a chmod hint (no attempt counted); once it is
    0600 the results are delivered with the token; the token appears in no log event."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    with StowServer(token=TOKEN) as server:
        destination = web(server, auth="bearer", token_file=str(token))
        node = written_node(make_settings, chest_cr, tiny_manifest, 1, destinations=[destination])
        try:
            with capture_logs() as logs:
                rounds_until(node, lambda: False, limit=2)
                state = node.store.deliveries.destinations()["web"]
                assert not state.reachable and f"chmod 600 {token}" in (state.error or "")
                assert server.stored == [] and node.store.jobs.counts()[JobState.WRITTEN] == 1
                token.chmod(0o600)
                rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 1)
            assert len(server.stored) == 2 and f"Bearer {TOKEN}" in server.authorizations
            assert TOKEN not in repr(logs)
        finally:
            node.stop(grace_s=5)


def test_wrong_credentials_keep_the_destination_down(
    make_settings: Callable[..., Settings], chest_cr: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """A 401 is the destination's problem, not the output's: it backs off with a clear error, attempts stay 0."""
    token = tmp_path / "token"
    token.write_text("not-the-token\n")
    token.chmod(0o600)
    with StowServer(token=TOKEN) as server:
        node = written_node(make_settings, chest_cr, tiny_manifest, 1,
                            destinations=[web(server, auth="bearer", token_file=str(token))])  # fmt: skip
        try:
            with capture_logs() as logs:
                rounds_until(node, lambda: False, limit=2)
            state = node.store.deliveries.destinations()["web"]
            assert not state.reachable and "HTTP 401" in (state.error or "") and "credentials" in (state.error or "")
            assert any(e["event"] == "destination.down" for e in logs)
            assert node.store.deliveries.counts() == {("web", "pending"): 2}
        finally:
            node.stop(grace_s=5)


def test_echo_and_send_a_dicomweb_destination(make_settings: Callable[..., Settings], chest_cr: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    """`cxr-node echo web` probes by QIDO-RS with the token; `cxr-node send --to web` stores by STOW-RS; a server
    refusing the token makes echo fail with one line naming the HTTP status."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    with StowServer(token=TOKEN) as server:
        config = write_config(make_settings(destinations=[web(server, auth="bearer", token_file=str(token))]),
                              tmp_path / "node.yaml")  # fmt: skip
        echo = cli("echo", "web", "--config", str(config))
        sent = cli("send", str(chest_cr), "--to", "web", "--config", str(config))
        server.token = "another-" + TOKEN  # the server now expects another token
        refused = cli("echo", "web", "--config", str(config))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert f"QIDO-RS {server.url} (DICOMweb): HTTP 200" in echo.stdout
    assert sent.returncode == 0 and "1 sent, 0 failed" in sent.stdout and len(server.stored) == 1
    assert refused.returncode == 5 and "HTTP 401" in refused.stderr and refused.stderr.count("\n") == 1
    assert TOKEN not in echo.stdout + echo.stderr + refused.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m cxr_node ARGS`."""
    return subprocess.run([sys.executable, "-m", "cxr_node", *args], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def test_tls_verifies_the_server_and_presents_the_client_certificate(
    make_settings: Callable[..., Settings], chest_cr: Path, tiny_manifest: Path, pki: Pki
) -> None:
    """Over https the server is verified against ca_file and the node presents its certificate: delivered; without
    the site CA the certificate is not trusted and the destination stays down saying so."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(str(pki.ca_cert))
    with StowServer(tls=context) as server:
        client = {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
        trusted = web(server, ca_file=str(pki.ca_cert), **client)
        node = written_node(make_settings, chest_cr, tiny_manifest, 1,
                            destinations=[trusted, {**web(server, **client), "name": "untrusted"}])  # fmt: skip
        try:
            rounds_until(node, lambda: node.store.deliveries.counts().get(("web", "delivered")) == 2)
            assert len(server.stored) == 2
            state = node.store.deliveries.destinations()["untrusted"]
            assert not state.reachable and "certificate not trusted" in (state.error or "")
            assert node.store.deliveries.counts()[("untrusted", "pending")] == 2
        finally:
            node.stop(grace_s=5)
