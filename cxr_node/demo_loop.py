"""The demo's second act: the loop back from the radiology department, played over real HL7 v2 sockets.

The demo node is configured with a worklist triage destination (``protocol: hl7``, positive results) and its
HL7 listener (``hl7_in``). This module plays the other side: :class:`DemoRis` is the RIS, an MLLP listener on
loopback that acknowledges each ORU^R01 the node sends (AA, built by python-hl7) and notes when it arrived;
:func:`send_findings` is the radiologists' reporting system sending each phantom's final finding back to the node
as ORU^R01 (OBR-3 the accession number, OBX-5 a SNOMED CT code), reading the node's ACKs; :func:`run_report` runs
``cxr-node report`` over the day's results and their outcomes, as a site would.
"""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import hl7
from hl7.client import MLLPClient

from cxr_node.jobs.records import Job, StoredResult
from cxr_node.outcomes.hl7_in import Framer, frame

MAX_MESSAGE: Final = 1_048_576
FINDINGS: Final = {"covid": ("840539006", "COVID-19"), "non-covid": ("260415000", "Not detected")}
"""The SNOMED CT code the demo's reporting system sends for each phantom label."""


@dataclass(frozen=True)
class Triage:
    """One worklist triage message the demo RIS received: when, its control ID, accession and finding."""

    at: float
    control_id: str
    accession: str
    finding: str


class DemoRis:
    """The RIS side of the demo: an MLLP listener on loopback that acknowledges each message AA."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[Triage] = []
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> DemoRis:
        """Listen in a background thread."""
        ris = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                framer = Framer(MAX_MESSAGE)
                self.request.settimeout(30)
                while data := self.request.recv(65536):
                    for raw in framer.feed(data):
                        self.request.sendall(frame(ris.take(raw)))

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="demo-ris", daemon=True).start()
        return self

    def take(self, raw: bytes) -> bytes:
        """Note one message; return its ACK (AA)."""
        message = hl7.parse(raw.decode("utf-8", errors="replace"))
        obr, finding = message.segment("OBR"), ""
        for obx in message.segments("OBX"):
            if str(obx[3][0][0]) == "CXRN-FINDING":
                finding = str(obx[5][0][1])
        with self._lock:
            self.received.append(Triage(time.time(), str(message.segment("MSH")[10]), str(obr[3]), finding))
        return str(message.create_ack("AA")).encode("utf-8")

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def show_triage(ris: DemoRis, jobs: Sequence[Job], results: dict[int, StoredResult | None]) -> None:
    """Print what the RIS received: each positive study flagged, and how long after its result."""
    by_accession = {job.accession_number: job for job in jobs}
    positives = sum(1 for r in results.values() if r is not None and r.summary.positive)
    print(f"  worklist triage: the demo RIS received {len(ris.received)} ORU^R01 for {positives} positive result(s)")
    for item in ris.received:
        job = by_accession.get(item.accession)
        result = results.get(job.id) if job else None
        after = f"{item.at - result.created_at:.1f} s after the result" if result else ""
        print(f"    {item.control_id:<18} accession {item.accession:<14} {item.finding:<32} {after}")


def oru(control_id: str, accession: str, label: str, now: datetime) -> str:
    """A final-result ORU^R01 as a reporting system sends it: the accession in OBR-3 (filler order number), the
    report time in OBR-22, status F in OBR-25, the finding as a SNOMED CT code in OBX-5."""
    code, meaning = FINDINGS[label]
    stamp = now.strftime("%Y%m%d%H%M%S")
    obr = ["OBR", "1", "", accession, "RAD^Chest radiograph^L", *[""] * 21]
    obr[7], obr[22], obr[25] = stamp, stamp, "F"
    return "\r".join([
        f"MSH|^~\\&|REPORTING|RADIOLOGY|CXR_NODE|AI|{stamp}||ORU^R01^ORU_R01|{control_id}|P|2.5",
        "PID|1||DEMO",
        "|".join(obr),
        f"OBX|1|CWE|FINDING^Final finding^L||{code}^{meaning}^SCT||||||F",
    ])  # fmt: skip


def send_findings(port: int, labelled: Sequence[tuple[str, str]]) -> Counter[str]:
    """Send each (accession, label) as a final ORU^R01 to the node's HL7 listener; count the ACK codes."""
    answers: Counter[str] = Counter()
    now = datetime.now(UTC)
    with MLLPClient("127.0.0.1", port) as client:
        for number, (accession, label) in enumerate(labelled, start=1):
            reply = hl7.parse(client.send_message(oru(f"DEMO-{number}", accession, label, now)).decode("utf-8"))
            answers[str(reply.segment("MSA")[1])] += 1
    return answers


def run_report(config: Path, out: Path) -> list[str]:
    """``cxr-node report`` over today (UTC) into ``out``; its summary lines (or its error line)."""
    today = datetime.now(UTC).date()
    done = subprocess.run(
        [sys.executable, "-m", "cxr_node", "report", "--config", str(config), "--since", today.isoformat(),
         "--until", (today + timedelta(days=1)).isoformat(), "--out", str(out), "--resamples", "200"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    return (done.stdout + done.stderr).strip().splitlines()
