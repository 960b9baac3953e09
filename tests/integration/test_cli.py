"""The admin commands against a real node: echo, send, status, config check, phantoms and the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from cxr_node.app import Receiver
from cxr_node.jobs.states import JobState
from tests.conftest import free_port
from tests.integration.helpers import write_config


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python -m cxr_node ARGS` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "cxr_node", *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def test_echo_a_running_node_and_an_absent_one(receiver: Receiver) -> None:
    """`cxr-node echo` prints the status; an unreachable peer is one line on stderr and a non-zero exit."""
    ok = cli("echo", f"CXR_NODE@127.0.0.1:{receiver.port}")
    assert ok.returncode == 0
    assert "status 0x0000" in ok.stdout
    down = cli("echo", f"CXR_NODE@127.0.0.1:{free_port()}")
    assert down.returncode == 5
    assert down.stderr.count("\n") == 1
    assert "association with CXR_NODE@127.0.0.1" in down.stderr
    assert "Traceback" not in down.stderr


def test_send_folder_with_compressed_and_non_dicom_files(receiver: Receiver, wg04: Path, tmp_path: Path) -> None:
    """`cxr-node send` stores every DICOM file of a folder in its own syntax and reports a stray file."""
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        shutil.copy(wg04 / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = cli("send", str(folder), "--to", f"CXR_NODE@127.0.0.1:{receiver.port}", "--calling-aet", "PACS")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "2 sent, 1 failed" in out.stdout
    assert "not a readable DICOM file" in out.stdout
    syntaxes = sorted(job.transfer_syntax for job in receiver.store.jobs.query())
    assert syntaxes == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"]


def test_send_decompresses_for_a_peer_without_compression(wg04: Path, tmp_path: Path) -> None:
    """A JPEG 2000 file goes to a peer that accepts only uncompressed syntaxes, decompressed, pixels intact."""
    received = []
    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])

    def keep(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    handler = (evt.EVT_C_STORE, keep)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[handler])
    try:
        out = cli("send", str(wg04 / "RG1_J2KR.dcm"), "--to", f"PLAIN@127.0.0.1:{port}")
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stdout + out.stderr
    assert (received[0].pixel_array == dcmread(wg04 / "RG1_UNCR.dcm").pixel_array).all()


def test_status_and_config_check(receiver: Receiver, tmp_path: Path) -> None:
    """`config check` validates a file; `status` prints the counts by state."""
    config = write_config(receiver.settings, tmp_path / "node.yaml")
    check = cli("config", "check", "--config", str(config))
    assert check.returncode == 0
    assert "OK" in check.stdout
    status = cli("status", "--config", str(config))
    assert status.returncode == 0
    assert all(state.value in status.stdout for state in JobState)
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: eleven}\n")
    failed = cli("config", "check", "--config", str(bad))
    assert failed.returncode == 2
    assert failed.stderr.strip() == (
        f"cxr-node: error: {bad}: node.port: Input should be a valid integer, unable to parse string as an integer "
        "(found 'eleven')"
    )


def test_phantoms_command_writes_a_labelled_set(tmp_path: Path) -> None:
    """`cxr-node phantoms` writes DICOM files and labels.csv; a bad size is a one-line error."""
    out = cli("phantoms", "--n", "3", "--out", str(tmp_path / "ph"), "--size", "128")
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "ph" / "images").glob("*.dcm"))) == 3
    assert (tmp_path / "ph" / "labels.csv").read_text().count("\n") == 4
    bad = cli("phantoms", "--n", "3", "--out", str(tmp_path / "ph2"), "--size", "5")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "cxr-node: error: size: expected an int in [64, 2048], found 5"


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`cxr-node demo` starts the node, sends phantoms and real radiographs, plays the RIS and the reporting system
    over HL7, writes the report, and stops the node cleanly."""
    out = cli("demo", "--out", str(tmp_path / "demo"), "--phantoms", "2", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "node stopped cleanly" in out.stdout
    assert "view position LL is not frontal" in out.stdout
    assert "no answer" not in out.stdout
    assert "worklist triage: the demo RIS received" in out.stdout
    assert "ACKs: AA 2" in out.stdout  # both phantoms' findings recorded by the node's HL7 listener
    assert "2 labelled" in out.stdout and (tmp_path / "demo" / "report" / "report.html").is_file()


def test_dataset_preview_writes_a_png(tmp_path: Path) -> None:
    """`cxr-node dataset preview` draws the augmented images of a labelled set into one PNG."""
    assert cli("phantoms", "--n", "4", "--out", str(tmp_path / "ph"), "--size", "96").returncode == 0
    out = cli("dataset", "preview", "--data", str(tmp_path / "ph" / "labels.csv"), "--out", str(tmp_path / "g.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
