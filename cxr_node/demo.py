"""``cxr-node demo``: run the node on loopback and act as the PACS that feeds it, as a user would.

Everything goes through the real interfaces: the node is ``cxr-node serve`` in a child process with a
config file, images are sent with a C-STORE SCU over DICOM, and what the node did is read from its
jobs store. Then the loop back (:mod:`cxr_node.demo_loop`): the positive results reach a demo RIS as HL7
worklist triage messages, the phantoms' final findings go back to the node over HL7, and ``cxr-node report``
measures the day. Output (config, inputs, node log, state, report) goes to one folder printed at the end.
"""

from __future__ import annotations

import csv
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from cxr_node.demo_loop import DemoRis, run_report, send_findings, show_triage
from cxr_node.dicom.sop import VERIFICATION_CLASS
from cxr_node.errors import CxrNodeError
from cxr_node.jobs import spool
from cxr_node.jobs.records import Job, StoredResult
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from cxr_node.results.kinds import REGISTRY
from cxr_node.send.scu import PeerAddress, echo, send_files

START_TIMEOUT_S = 90.0
INFERENCE_TIMEOUT_S = 300.0
DEMO_MANIFEST = Path("models/demo/manifest.yaml")


@dataclass(frozen=True)
class DemoInput:
    """One image the demo PACS sends, and what it is."""

    path: Path
    description: str
    accession: str = ""
    label: str = ""
    """The phantom's final finding (``covid`` or ``non-covid``), which the demo reports back; "" for others."""


def run_demo(out: Path, phantoms: int = 6, manifest: Path = DEMO_MANIFEST) -> int:
    """Run the whole demo into ``out``; return the exit code."""
    if not manifest.is_file():
        raise CxrNodeError(
            f"{manifest}: demo models not found (run from the repository root, or `cxr-node train demo`)"
        )
    if out.exists():
        shutil.rmtree(out)
    (out / "inputs").mkdir(parents=True)
    port, pacs_port, ris_port, hl7_port = _free_port(), _free_port(), _free_port(), _free_port()
    config = write_config(out, port, manifest.resolve(), pacs_port, (ris_port, hl7_port))
    print(f"cxr-node demo: working folder {out}")
    inputs = _phantom_inputs(out / "inputs", phantoms) + _real_inputs(out / "inputs")
    print(f"  prepared {len(inputs)} images ({phantoms} synthetic phantoms, {len(inputs) - phantoms} real radiographs)")
    pacs = DemoPacs(out / "pacs", pacs_port).start()
    print(f"  demo PACS (a Storage SCP) listening on 127.0.0.1:{pacs_port} for the results")
    ris = DemoRis(ris_port).start()
    print(f"  demo RIS (HL7 v2 over MLLP) listening on 127.0.0.1:{ris_port} for worklist triage messages")
    node = _start_node(config, port, out / "node.log")
    try:
        results = _send(inputs, port)
        _wait_for_delivery(out, sum(1 for code, _ in results.values() if code is not None))
        _print_table(inputs, results, out, pacs)
        _loop_back(out, config, ris, hl7_port, inputs)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        pacs.stop()
        ris.stop()
    previews = _previews(out / "pacs", out / "previews")
    print("  node stopped cleanly" if node.returncode == 0 else f"  node exited with {node.returncode}")
    print(f"  results received by the demo PACS (SR, SC, SEG, GSPS): {out / 'pacs'}")
    print(f"  overlay previews (PNG): {', '.join(str(p) for p in previews[:3])}{' ...' if len(previews) > 3 else ''}")
    print(f"  node log: {out / 'node.log'}   state: {out / 'state'}   config: {config}")
    return 0 if node.returncode == 0 else 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(out: Path, port: int, manifest: Path, pacs_port: int, hl7_ports: tuple[int, int] | None) -> Path:
    """The demo node's configuration in ``out``: the demo PACS as its destination and, with ``hl7_ports`` (the demo
    RIS's, the node's HL7 listener's), the worklist triage out and the final findings in over HL7; ``bench/e2e.py``
    runs the same node without HL7."""
    destinations: list[dict[str, object]] = [
        {"name": "demo_pacs", "ae_title": "DEMO_PACS", "host": "127.0.0.1", "port": pacs_port}
    ]
    config: dict[str, object] = {
        "node": {"ae_title": "CXR_NODE", "host": "127.0.0.1", "port": port, "receiver_processes": 1},
        "storage": {"root": str(out / "state")},
        "models": {"manifest": str(manifest)},
        "destinations": destinations,
        "delivery": {"poll_interval_ms": 200},
        "results": {"segmentation": True, "presentation_state": True},
        "metrics": {"port": _free_port()},
        "logging": {"level": "info", "format": "json"},
    }
    if hl7_ports is not None:
        ris_port, hl7_port = hl7_ports
        destinations.append(
            {"name": "demo_ris", "protocol": "hl7", "host": "127.0.0.1", "port": ris_port, "send": "positive"}
        )
        config["hl7_in"] = {"enabled": True, "host": "127.0.0.1", "port": hl7_port}
    path = out / "node.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _loop_back(out: Path, config: Path, ris: DemoRis, hl7_port: int, inputs: list[DemoInput]) -> None:
    """The loop back: what the RIS got, the phantoms' final findings sent to the node over HL7, the report."""
    store = SqliteStore(out / "state" / spool.DB_NAME, readonly=True)
    try:
        jobs = store.jobs.query()
        results = {job.id: store.results.result(job.id) for job in jobs}
    finally:
        store.close()
    show_triage(ris, jobs, results)
    labelled = [(item.accession, item.label) for item in inputs if item.label]
    answers = send_findings(hl7_port, labelled)
    said = ", ".join(f"{code} {count}" for code, count in answers.items())
    print(f"  final findings: the demo reporting system sent {len(labelled)} ORU^R01 to the node's HL7 listener "
          f"(127.0.0.1:{hl7_port}); ACKs: {said}")  # fmt: skip
    print(f"  performance report over today's results and their outcomes ({out / 'report' / 'report.html'}):")
    for line in run_report(config, out / "report"):
        print(f"    {line}")
    print()


def _phantom_inputs(folder: Path, count: int) -> list[DemoInput]:
    from cxr_node.training.phantoms import write_phantom_set

    labels = write_phantom_set(folder / "phantoms", n=count, seed=2021, size=512)
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        DemoInput(labels.parent / row["path"], f"phantom {row['modality']} {row['photometric']} ({row['label']})",
                  row["accession_number"], row["label"])
        for row in rows
    ]  # fmt: skip


def _real_inputs(folder: Path) -> list[DemoInput]:
    """Real radiographs from pydicom-data (NEMA WG04), when installed: chest PA in two syntaxes, and two to skip."""
    try:
        import data_store
    except ImportError:
        return []
    data = Path(data_store.__file__).parent / "data"
    lateral = dcmread(data / "RG1_UNCR.dcm")
    lateral.ViewPosition, lateral.SOPInstanceUID = "LL", generate_uid(entropy_srcs=["cxr-node demo lateral"])
    lateral.file_meta.MediaStorageSOPInstanceUID = lateral.SOPInstanceUID
    lateral.save_as(folder / "lateral.dcm")
    return [
        DemoInput(data / "RG1_UNCR.dcm", "real CR chest PA, uncompressed"),
        DemoInput(data / "RG1_J2KR.dcm", "real CR chest PA, JPEG 2000 lossless"),
        DemoInput(folder / "lateral.dcm", "real CR chest relabelled lateral"),
        DemoInput(data / "RG3_UNCR.dcm", "real CR extremity"),
    ]


def _start_node(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    print(f"  starting cxr-node serve on 127.0.0.1:{port} (log: {log})")
    node = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    peer = PeerAddress("CXR_NODE", "127.0.0.1", port)
    ready = config.parent / "state" / "run" / "receiver+worker+sender.ready"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise CxrNodeError(f"the node exited with code {node.returncode} at start-up; see {log}")
        try:
            if ready.exists() and echo(peer, calling_aet="DEMO_PACS", timeout_s=2) == 0:
                print("  node ready (models loaded) and answers C-ECHO")
                return node
        except CxrNodeError:
            pass
        time.sleep(0.3)
    node.kill()
    raise CxrNodeError(f"the node did not answer C-ECHO within {START_TIMEOUT_S:.0f} s; see {log}")


def _send(inputs: list[DemoInput], port: int) -> dict[Path, tuple[int | None, str]]:
    peer = PeerAddress("CXR_NODE", "127.0.0.1", port)
    results: dict[Path, tuple[int | None, str]] = {}
    for number, item in enumerate(inputs, start=1):
        [result] = send_files([item.path], peer, calling_aet="DEMO_PACS")
        code = "no answer" if result.status is None else f"0x{result.status:04X}"
        print(f"  [{number:>2}/{len(inputs)}] C-STORE {item.description:<44} -> {code}")
        results[item.path] = (result.status, result.comment)
    return results


class DemoPacs:
    """The PACS side of the demo: a real Storage SCP (pynetdicom) on loopback that keeps what it receives."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.arrived: dict[str, float] = {}
        self.server: Any = None

    def start(self) -> DemoPacs:
        """Listen for the node's results."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        ae = AE(ae_title="DEMO_PACS")
        ae.add_supported_context(VERIFICATION_CLASS)
        for kind in REGISTRY:
            ae.add_supported_context(kind.sop_class_uid, ALL_TRANSFER_SYNTAXES)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        kind = next((k.name for k in REGISTRY if k.sop_class_uid == ds.SOPClassUID), "other")
        ds.save_as(self.folder / f"{kind}-{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        source = ds.get("CurrentRequestedProcedureEvidenceSequence") or ds.get("SourceImageSequence")
        if kind == "sr" and source:
            uid = source[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            self.arrived[str(uid)] = time.time()
        return 0

    def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.shutdown()


def _wait_for_delivery(out: Path, expected: int) -> None:
    """Wait (bounded) until every job is finished (delivered, skipped, dead…), showing progress on one line."""
    deadline = time.monotonic() + INFERENCE_TIMEOUT_S
    store = SqliteStore(out / "state" / spool.DB_NAME, readonly=True)
    open_states = (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.WRITTEN)
    tty, shown = sys.stdout.isatty(), ""
    try:
        while time.monotonic() < deadline:
            counts = store.jobs.counts()
            pending = sum(counts[state] for state in open_states)
            done = counts[JobState.DELIVERED]
            bar = "#" * int(20 * done / max(expected, 1))
            line = f"  progress [{bar:<20}] {done} delivered, {pending} in progress, {counts[JobState.SKIPPED]} skipped"
            if line != shown:
                print(f"\r{line}   " if tty else line, end="" if tty else "\n", flush=True)
                shown = line
            if pending == 0 and sum(counts.values()) >= expected:
                if tty:
                    print()
                return
            time.sleep(0.5)
    finally:
        store.close()
    print(f"\n  still in progress after {INFERENCE_TIMEOUT_S:.0f} s; see the node log")


def _print_table(
    inputs: list[DemoInput], results: dict[Path, tuple[int | None, str]], out: Path, pacs: DemoPacs
) -> None:
    store = SqliteStore(out / "state" / spool.DB_NAME, readonly=True)
    try:
        jobs = {job.sop_instance_uid: job for job in store.jobs.query()}
        found = {job.id: store.results.result(job.id) for job in jobs.values()}
    finally:
        store.close()
    print()
    print(
        f"  {'image':<40} {'C-STORE':<7} {'job':<13} {'score':>5}  {'decision':<9} {'similar (top 2)':<34} "
        f"{'turnaround':>10}  note"
    )
    for item in inputs:
        uid = str(dcmread(item.path, stop_before_pixels=True).SOPInstanceUID)
        job = jobs.get(uid)
        code = results[item.path][0]
        shown = "----" if code is None else f"{code:04X}"
        state = f"{job.id}:{job.state}" if job else "-"
        score, decision, similar, note = _outcome(job, found.get(job.id) if job else None)
        took = f"{pacs.arrived[uid] - job.received_at:.1f}s" if job and uid in pacs.arrived else ""
        print(
            f"  {item.description:<40} {shown:<7} {state:<13} {score:>5}  {decision:<9} {similar:<34} "
            f"{took:>10}  {note}"
        )
    print("  (turnaround: from the node's receipt of the image to the SR stored at the demo PACS)")
    print()


def _outcome(job: Job | None, result: StoredResult | None) -> tuple[str, str, str, str]:
    """Score, decision, similar cases and a note for one row of the table."""
    if job is None:
        return "", "", "", "not stored"
    if result is None:
        return "", "", "", job.reason or ""
    summary = result.summary
    if not summary.analysed:
        return "", "not anal.", "", summary.reason[:80]
    decision = "POSITIVE" if summary.positive else "negative"
    similar = "; ".join(f"{case.display_id} {case.similarity:.2f}" for case in summary.similar[:2])
    return f"{summary.probability:.2f}", decision, similar, f"threshold {summary.operating_point:.2f}"


def _previews(pacs: Path, folder: Path) -> list[Path]:
    """PNG previews of the overlays the demo PACS received (what a viewer would show)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, path in enumerate(sorted(pacs.glob("sc-*.dcm")), start=1):
        ds = dcmread(path)
        accession = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(ds.get("AccessionNumber", "") or "no-accession"))
        target = folder / f"overlay-{number:02d}-{accession}.png"
        Image.fromarray(ds.pixel_array).save(target)
        written.append(target)
    return written
