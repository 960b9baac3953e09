"""``cxr-node demo``: run the node on loopback and act as the PACS that feeds it, as a user would.

Everything goes through the real interfaces: the node is ``cxr-node serve`` in a child process with a
config file, images are sent with a C-STORE SCU over DICOM, and what the node did is read from its
jobs store. Output (config, inputs, node log, state) goes to one folder that is printed at the end.
"""

from __future__ import annotations

import csv
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from cxr_node.errors import CxrNodeError
from cxr_node.jobs import spool
from cxr_node.jobs.states import JobState
from cxr_node.jobs.store import Job, SqliteJobStore, StoredResult
from cxr_node.send.scu import PeerAddress, echo, send_files

START_TIMEOUT_S = 90.0
INFERENCE_TIMEOUT_S = 300.0
DEMO_MANIFEST = Path("models/demo/manifest.yaml")


@dataclass(frozen=True)
class DemoInput:
    """One image the demo PACS sends, and what it is."""

    path: Path
    description: str


def run_demo(out: Path, phantoms: int = 6, manifest: Path = DEMO_MANIFEST) -> int:
    """Run the whole demo into ``out``; return the exit code."""
    if not manifest.is_file():
        raise CxrNodeError(
            f"{manifest}: demo models not found (run from the repository root, or `cxr-node train demo`)"
        )
    if out.exists():
        shutil.rmtree(out)
    (out / "inputs").mkdir(parents=True)
    port = _free_port()
    config = _write_config(out, port, manifest.resolve())
    print(f"cxr-node demo: working folder {out}")
    inputs = _phantom_inputs(out / "inputs", phantoms) + _real_inputs(out / "inputs")
    print(f"  prepared {len(inputs)} images ({phantoms} synthetic phantoms, {len(inputs) - phantoms} real radiographs)")
    node = _start_node(config, port, out / "node.log")
    try:
        results = _send(inputs, port)
        _wait_for_inference(out, sum(1 for code, _ in results.values() if code is not None))
        _print_table(inputs, results, out)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
    print("  node stopped cleanly" if node.returncode == 0 else f"  node exited with {node.returncode}")
    print("  results are recorded in the jobs store; the SR and overlay writers are not part of this version")
    print(f"  node log: {out / 'node.log'}   state: {out / 'state'}   config: {config}")
    return 0 if node.returncode == 0 else 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(out: Path, port: int, manifest: Path) -> Path:
    config = {
        "node": {"ae_title": "CXR_NODE", "host": "127.0.0.1", "port": port},
        "storage": {"root": str(out / "state")},
        "models": {"manifest": str(manifest)},
        "destinations": [],
        "logging": {"level": "info", "format": "json"},
    }
    path = out / "node.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _phantom_inputs(folder: Path, count: int) -> list[DemoInput]:
    from cxr_node.training.phantoms import write_phantom_set

    labels = write_phantom_set(folder / "phantoms", n=count, seed=2021, size=512)
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        DemoInput(labels.parent / row["path"], f"phantom {row['modality']} {row['photometric']} ({row['label']})")
        for row in rows
    ]


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
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise CxrNodeError(f"the node exited with code {node.returncode} at start-up; see {log}")
        try:
            if echo(peer, calling_aet="DEMO_PACS", timeout_s=2) == 0:
                print("  node answers C-ECHO")
                return node
        except CxrNodeError:
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


def _wait_for_inference(out: Path, expected: int) -> None:
    """Wait (bounded) until the ``expected`` jobs exist and none is queued or running, showing progress."""
    deadline = time.monotonic() + INFERENCE_TIMEOUT_S
    store = SqliteJobStore(out / "state" / spool.DB_NAME, readonly=True)
    shown = ""
    try:
        while time.monotonic() < deadline:
            counts = store.counts()
            pending = counts[JobState.QUEUED] + counts[JobState.RUNNING]
            line = f"  inference: {counts[JobState.INFERRED]} done, {pending} pending"
            if line != shown:
                print(line, flush=True)
                shown = line
            if pending == 0 and sum(counts.values()) >= expected:
                return
            time.sleep(0.5)
    finally:
        store.close()
    print(f"  inference: still pending after {INFERENCE_TIMEOUT_S:.0f} s; see the node log")


def _print_table(inputs: list[DemoInput], results: dict[Path, tuple[int | None, str]], out: Path) -> None:
    store = SqliteJobStore(out / "state" / spool.DB_NAME, readonly=True)
    try:
        jobs = {job.sop_instance_uid: job for job in store.jobs()}
        found = {job.id: store.result(job.id) for job in jobs.values()}
    finally:
        store.close()
    print()
    print(f"  {'image':<44} {'C-STORE':<8} {'job':<13} {'score':>6}  {'decision':<10} {'time':>6}  note")
    for item in inputs:
        uid = str(dcmread(item.path, stop_before_pixels=True).SOPInstanceUID)
        job = jobs.get(uid)
        code = results[item.path][0]
        shown = "----" if code is None else f"{code:04X}"
        state = f"{job.id}:{job.state}" if job else "-"
        score, decision, took, note = _outcome(job, found.get(job.id) if job else None)
        print(f"  {item.description:<44} {shown:<8} {state:<13} {score:>6}  {decision:<10} {took:>6}  {note}")
    print()


def _outcome(job: Job | None, result: StoredResult | None) -> tuple[str, str, str, str]:
    """Score, decision, turnaround and a note for one row of the table."""
    if job is None:
        return "", "", "", "not stored"
    if result is None:
        return "", "", "", job.reason or ""
    summary = result.summary
    took = f"{result.created_at - job.received_at:.1f}s"
    if summary["status"] != "analysed":
        return "", "not anal.", took, summary["reason"]
    decision = "POSITIVE" if summary["positive"] else "negative"
    return f"{summary['probability']:.3f}", decision, took, f"threshold {summary['threshold']:.2f}"
