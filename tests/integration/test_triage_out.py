"""Worklist triage out to a real MLLP listener and a real FHIR server on loopback: ACKs AA, AE then AA, AR, a
connection dropped mid-message; the positive-only filter; shadow mode; FHIR 201, 500 then 201, and 400."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import hl7
import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import dcmread
from structlog.testing import capture_logs

from cxr_node.app import Receiver, build_dispatcher
from cxr_node.cli import main
from cxr_node.jobs import codec
from cxr_node.jobs.states import JobState
from cxr_node.results.findings import MaskVerdict, Summary
from tests.integration.helpers import write_config
from tests.integration.test_delivery import written_node

START, END = b"\x0b", b"\x1c\x0d"


class Ris:
    """An MLLP listener on loopback answering each message as its script says (then ``AA``): ``AA``, ``AE``,
    ``AR``, ``drop-partial`` (closes after a few bytes), ``drop-after`` (reads it all, closes without an ACK)."""

    def __init__(self, script: tuple[str, ...] = ()) -> None:
        self.script = list(script)
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def control_ids(self) -> list[str]:
        """MSH-10 of every complete message received, in order."""
        with self.lock:
            return [str(hl7.parse(text).segment("MSH")(10)) for text in self.received]

    def _next(self) -> str:
        with self.lock:
            return self.script[0] if self.script else "AA"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                self._serve(connection)

    def _serve(self, connection: socket.socket) -> None:
        buffer = b""
        while True:
            if not buffer and self._next() == "drop-partial":
                if connection.recv(8):
                    self._pop()
                return
            chunk = connection.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while END in buffer:
                block, buffer = buffer.split(END, 1)
                text = block.lstrip(START).decode("utf-8")
                action = self._pop()
                with self.lock:
                    self.received.append(text)
                if action == "drop-after":
                    return
                control_id = str(hl7.parse(text).segment("MSH")(10))
                msh = f"MSH|^~\\&|RIS|HOSP|CXR_NODE||20260101||ACK^R01^ACK|A{len(self.received)}|P|2.5"
                ack = f"{msh}\rMSA|{action}|{control_id}|said {action}\r"
                connection.sendall(START + ack.encode() + END)

    def _pop(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else "AA"

    def stop(self) -> None:
        """Stop listening."""
        self.stopping.set()
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def ris_factory() -> Iterator[Callable[..., Ris]]:
    """Start RIS listeners; all stop at the end."""
    started: list[Ris] = []

    def start(*script: str) -> Ris:
        started.append(Ris(tuple(script)))
        return started[-1]

    yield start
    for ris in started:
        ris.stop()


def hl7_destination(ris: Ris, name: str = "ris", **more: object) -> dict[str, object]:
    """A ``protocol: hl7`` destination entry for ``ris``."""
    return {"name": name, "protocol": "hl7", "host": "127.0.0.1", "port": ris.port, "send": "all",
            "receiving_application": "RIS", **more}  # fmt: skip


def node_with(make_settings, chest_cr, tiny_manifest, count, destinations, **more) -> Receiver:
    """A node holding ``count`` written jobs (tiny models: not analysed) for ``destinations``."""
    return written_node(make_settings, chest_cr, tiny_manifest, count, destinations=destinations, **more)


def rounds(node: Receiver, done: Callable[[], bool], limit: int = 80) -> None:
    """Delivery rounds, bounded in count and time, until ``done()``."""
    dispatcher = build_dispatcher(node.settings, node.store)
    deadline = time.monotonic() + 20
    for _ in range(limit):
        dispatcher.round()
        if done() or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def settled(node: Receiver, state: JobState, count: int) -> Callable[[], bool]:
    """True once ``count`` jobs are in ``state``."""
    return lambda: node.store.jobs.counts()[state] == count


def make_positive(node: Receiver, job_id: int) -> None:
    """Replace the stored result of ``job_id`` with a positive one (the tiny models never find anything)."""
    positive = Summary("tiny", "0.0.1", True, (256, 256), probability=0.91, threshold=0.5,
                       lung_mask=MaskVerdict(True, "plausible", 0.3, 2))  # fmt: skip
    with node.store.results.db.transaction() as db:
        db.execute("UPDATE results SET summary = ? WHERE job_id = ?", (codec.encode_summary(positive), job_id))


def test_every_result_reaches_the_ris_once_with_a_valid_message(make_settings, chest_cr, tiny_manifest, ris_factory):
    """Two jobs with ``send: all`` are ACKed AA: delivered once each, the messages validate as ORU^R01 v2.5 with
    the control ID of their job, and more rounds send nothing again."""
    ris = ris_factory()
    node = node_with(make_settings, chest_cr, tiny_manifest, 2, [hl7_destination(ris)])
    try:
        rounds(node, settled(node, JobState.DELIVERED, 2))
        assert node.store.deliveries.counts() == {("ris", "delivered"): 2}
        ids = ris.control_ids()
        assert ids == [f"CXRN{job.id}." + ids[i].split(".")[1] for i, job in enumerate(node.store.jobs.query())]
        for text in ris.received:
            message = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT)
            message.validate()
            assert message.msh.msh_5.to_er7() == "RIS" and message.msh.msh_11.to_er7() == "P"
            assert "NA^not analysed^99CXRN" in text and "|R^Routine^HL70485" in text
        job = node.store.jobs.query()[0]
        source = dcmread(node.settings.storage.root / str(job.path), stop_before_pixels=True)
        first = hl7.parse(ris.received[0])
        assert str(first.segment("PID")(3)).split("^")[0] == source.PatientID
        assert str(first.segment("OBR")(3)) == (source.AccessionNumber or "")
        rounds(node, lambda: False, limit=3)
        assert len(ris.received) == 2
    finally:
        node.stop(grace_s=5)


def test_a_positive_result_is_stat_with_its_score(make_settings, chest_cr, tiny_manifest, ris_factory) -> None:
    """A positive stored result goes out with priority S, the probability, the finding POS flagged A, and the
    operating point with its source."""
    ris = ris_factory()
    node = node_with(make_settings, chest_cr, tiny_manifest, 1, [hl7_destination(ris)])
    try:
        make_positive(node, node.store.jobs.query()[0].id)
        rounds(node, settled(node, JobState.DELIVERED, 1))
        message = hl7.parse(ris.received[0])
        obx = {str(segment(3)(1)(1)): segment for segment in message.segments("OBX")}
        assert str(obx["CXRN-PROB"](5)) == "0.9100" and str(obx["CXRN-OP"](5)) == "0.5000"
        assert str(obx["CXRN-FINDING"](5)(1)(1)) == "POS" and str(obx["CXRN-FINDING"](8)) == "A"
        assert str(obx["CXRN-OPSRC"](5)) == "model manifest"
        assert str(message.segment("TQ1")(9)(1)(1)) == "S" and str(message.segment("OBR")(25)) == "P"
    finally:
        node.stop(grace_s=5)


def test_ae_is_retried_then_delivered(make_settings, chest_cr, tiny_manifest, ris_factory) -> None:
    """An AE counts a failed attempt and is retried with backoff; the AA after it delivers; the RIS saw the
    same control ID twice."""
    ris = ris_factory("AE")
    node = node_with(make_settings, chest_cr, tiny_manifest, 1, [hl7_destination(ris)])
    try:
        with capture_logs() as logs:
            rounds(node, settled(node, JobState.DELIVERED, 1))
        assert [e["error"] for e in logs if e["event"] == "send.retry_scheduled"] == ["the RIS answered AE: said AE"]
        ids = ris.control_ids()
        assert len(ids) == 2 and ids[0] == ids[1]
    finally:
        node.stop(grace_s=5)


def test_ar_is_a_permanent_refusal(make_settings, chest_cr, tiny_manifest, ris_factory) -> None:
    """An AR ends the delivery dead at once (one message sent) and the job dead with the RIS's words."""
    ris = ris_factory("AR")
    node = node_with(make_settings, chest_cr, tiny_manifest, 1, [hl7_destination(ris)])
    try:
        rounds(node, settled(node, JobState.DEAD, 1))
        job = node.store.jobs.query(JobState.DEAD)[0]
        assert "ris/oru: the RIS answered AR" in (job.reason or "")
        assert len(ris.received) == 1
        assert node.store.deliveries.resend(job.id) == [job.id]  # an operator re-sends it: the same message
        rounds(node, settled(node, JobState.DELIVERED, 1))
        assert ris.control_ids()[0] == ris.control_ids()[1]
    finally:
        node.stop(grace_s=5)


def test_a_dropped_connection_is_sent_again_with_the_same_control_id(
    make_settings, chest_cr, tiny_manifest, ris_factory
) -> None:
    """A RIS dropping the connection mid-message, then after reading a message without ACKing it, is down (no
    attempt counted); the same control ID comes again until ACKed, and never after."""
    ris = ris_factory("drop-partial", "drop-after")
    node = node_with(make_settings, chest_cr, tiny_manifest, 1, [hl7_destination(ris)])
    try:
        with capture_logs() as logs:
            rounds(node, settled(node, JobState.DELIVERED, 1))
        assert sum(e["event"] == "destination.down" for e in logs) >= 2
        assert not [e for e in logs if e["event"] == "send.retry_scheduled"]
        ids = ris.control_ids()
        assert len(ids) == 2 and ids[0] == ids[1]
        rounds(node, lambda: False, limit=3)
        assert len(ris.received) == 2
    finally:
        node.stop(grace_s=5)


def test_positive_only_and_shadow_mode(make_settings, chest_cr, tiny_manifest, ris_factory) -> None:
    """A ``send: positive`` RIS gets no delivery for a not-analysed result; in shadow mode a RIS not marked qa
    gets it withheld and a qa one gets it."""
    positive, normal, qa = ris_factory(), ris_factory(), ris_factory()
    destinations = [
        {**hl7_destination(positive, "positive"), "send": "positive"},
        hl7_destination(normal, "normal"),
        hl7_destination(qa, "qa", qa=True),
    ]
    node = node_with(make_settings, chest_cr, tiny_manifest, 1, destinations, **{"golive.initial_mode": "shadow"})
    try:
        rounds(node, settled(node, JobState.DELIVERED, 1))
        assert node.store.deliveries.counts() == {("normal", "withheld"): 1, ("qa", "delivered"): 1}
        assert (len(positive.received), len(normal.received), len(qa.received)) == (0, 0, 1)
        assert "SHADOW MODE - QA ONLY" in qa.received[0]
    finally:
        node.stop(grace_s=5)


def test_echo_and_a_ris_down(make_settings, chest_cr, tiny_manifest, ris_factory, tmp_path, capsys) -> None:
    """`cxr-node echo` connects to the RIS; a RIS that is not listening backs off without counting attempts."""
    ris = ris_factory()
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    down = {"name": "down", "protocol": "hl7", "host": "127.0.0.1", "port": port}
    node = node_with(make_settings, chest_cr, tiny_manifest, 1, [hl7_destination(ris), {**down, "send": "all"}])
    try:
        config = write_config(node.settings, tmp_path / "node.yaml")
        assert main(["echo", "ris", "--config", str(config)]) == 0
        assert "connected" in capsys.readouterr().out
        build_dispatcher(node.settings, node.store).round()
        state = node.store.deliveries.destinations()["down"]
        assert not state.reachable and state.failures == 1
        assert node.store.deliveries.counts()[("down", "pending")] == 1
        assert node.store.deliveries.counts()[("ris", "delivered")] == 1
    finally:
        node.stop(grace_s=5)


class Fhir:
    """A FHIR server on loopback: validates each posted Bundle with fhir.resources R4B, answers its script's
    statuses in turn (then 201), and serves ``GET /fhir/metadata``."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.bundles: list[dict[str, Any]] = []
        fhir = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(200 if self.path == "/fhir/metadata" else 404, {"resourceType": "CapabilityStatement"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                Bundle.model_validate_json(body)
                fhir.bundles.append(json.loads(body))
                code = fhir.statuses.pop(0) if fhir.statuses else 201
                issue = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                                         "diagnostics": f"said {code}"}]}  # fmt: skip
                self._answer(code, {"resourceType": "Bundle", "type": "transaction-response"} if code < 300 else issue)

            def _answer(self, code: int, data: dict[str, Any]) -> None:
                payload = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("statuses", "state", "posts"),
    [((), JobState.DELIVERED, 1), ((500,), JobState.DELIVERED, 2), ((400,), JobState.DEAD, 1)],
    ids=["201", "500-then-201", "400"],
)
def test_fhir_transaction(make_settings, chest_cr, tiny_manifest, statuses, state, posts) -> None:
    """A valid transaction Bundle (Observation + DiagnosticReport, conditional creates on the job's identifier) is
    delivered on 201, retried after a 500 (the same Bundle again), dead at once on a 400."""
    server = Fhir(*statuses)
    destination = {"name": "fhir", "protocol": "fhir", "url": server.url, "send": "all"}
    node = node_with(make_settings, chest_cr, tiny_manifest, 1, [destination])
    try:
        rounds(node, settled(node, state, 1))
        assert node.store.jobs.counts()[state] == 1
        assert len(server.bundles) == posts and all(b == server.bundles[0] for b in server.bundles)
        entries = server.bundles[0]["entry"]
        assert [e["request"]["url"] for e in entries] == ["Observation", "DiagnosticReport"]
        job_id = node.store.jobs.query()[0].id
        assert all(f"CXRN{job_id}." in e["request"]["ifNoneExist"] for e in entries)
        assert entries[1]["resource"]["result"] == [{"reference": entries[0]["fullUrl"]}]
        if state is JobState.DEAD:
            assert "said 400" in (node.store.jobs.query()[0].reason or "")
    finally:
        node.stop(grace_s=5)
        server.stop()
