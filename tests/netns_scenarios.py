"""Scenarios run inside a private network namespace (see tests/orthanc.py); each prints a JSON report last.

Usage: ``python -m tests.netns_scenarios SCENARIO ARGS...`` (only from :func:`tests.orthanc.run_in_netns`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.orthanc import Orthanc


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store(folder: str, *files: str) -> dict[str, Any]:
    """Start Orthanc, C-STORE ``files`` to it with the node's SCU, and list what Orthanc kept."""
    from cxr_node.send.scu import PeerAddress, send_files

    orthanc = Orthanc(Path(folder), free_port(), free_port()).start()
    try:
        results = send_files([Path(f) for f in files], PeerAddress("ORTHANC", "127.0.0.1", orthanc.dicom_port))
        stored = [
            {
                key: tags.get(key)
                for key in (
                    "SOPInstanceUID",
                    "SOPClassUID",
                    "StudyInstanceUID",
                    "Modality",
                    "SeriesDescription",
                    "PatientName",
                )
            }
            for tags in orthanc.instances()
        ]
        return {"statuses": [result.status for result in results], "stored": stored}
    finally:
        orthanc.stop()


def _serve(config: Path, root: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``cxr-node serve`` in its own process group and wait (bounded) until it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cxr-node serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        if (root / "run/receiver+worker+sender.ready").exists():
            return proc
        time.sleep(0.2)
    raise RuntimeError("cxr-node serve not ready in 90 s")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.5)  # children die with their parent (PR_SET_PDEATHSIG)


def _jobs(config: Path) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-m", "cxr_node", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(done.stdout)["jobs"] if done.returncode == 0 else {}


def _real_chest() -> Path | None:
    try:
        import data_store
    except ImportError:
        return None
    return Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"


def e2e(folder: str, count: str, kills: str) -> dict[str, Any]:
    """DCMTK storescu sends ``count`` phantom chest images to ``cxr-node serve``, whose destination is a real
    Orthanc; the service is killed with SIGKILL ``kills`` times while it works and restarted, and Orthanc is
    stopped for a while and restarted. Report what Orthanc holds per source study."""
    base, n = Path(folder), int(count)
    orthanc = Orthanc(base / "orthanc", free_port(), free_port()).start()
    images = base / "images"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_node",
            "phantoms",
            "--n",
            str(n),
            "--out",
            str(images),
            "--size",
            "384",
            "--seed",
            "7",
        ],
        check=True,
        capture_output=True,
    )
    real = _real_chest()
    if real is not None:  # a real CR chest PA (NEMA WG04) besides the phantoms
        shutil.copy(real, images / "real-cr-chest.dcm")
        n += 1
    root, port = base / "state", free_port()
    config = base / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "node": {"host": "127.0.0.1", "port": port, "receiver_processes": 1},
                "storage": {"root": str(root)},
                "destinations": [
                    {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
                ],
                "delivery": {"backoff_initial_s": 0.5, "backoff_max_s": 2, "poll_interval_ms": 200},
                "worker": {"batch_size": 4, "batch_wait_ms": 50},
                "metrics": {"enabled": False},
                "logging": {"format": "json"},
            }
        )
    )
    log = base / "serve.log"
    node = _serve(config, root, log)
    sender = subprocess.Popen(
        ["storescu", "-aec", "CXR_NODE", "-aet", "PACS", "+sd", "+r", "127.0.0.1", str(port), str(images)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started, kill_log = time.monotonic(), []
    for k in range(int(kills)):
        time.sleep(2.0 + k)
        _kill(node)
        kill_log.append({"after_s": round(time.monotonic() - started, 1), "jobs": _jobs(config)})
        node = _serve(config, root, log)
    sender.wait(120)
    # a PACS re-sends what failed; here everything again: duplicates must not make second results
    resent = subprocess.run(
        ["storescu", "-aec", "CXR_NODE", "-aet", "PACS", "+sd", "+r", "127.0.0.1", str(port), str(images)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    # the PACS goes down for a while; the backlog waits and is delivered when it is back
    orthanc.stop()
    outage = _jobs(config)
    time.sleep(4)
    orthanc.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        jobs = _jobs(config)
        if jobs.get("delivered", 0) + jobs.get("dead", 0) + jobs.get("skipped", 0) >= n and not any(
            jobs.get(s, 0) for s in ("queued", "running", "inferred", "written")
        ):
            break
        time.sleep(1)
    node.send_signal(signal.SIGTERM)
    node.wait(60)
    per_study: dict[str, dict[str, int]] = {}
    for tags in orthanc.instances():
        modality = tags.get("Modality", "")
        counts = per_study.setdefault(tags["StudyInstanceUID"], {})
        counts[modality] = counts.get(modality, 0) + 1
    orthanc.stop()
    return {
        "jobs": _jobs(config),
        "kills": kill_log,
        "during_outage": outage,
        "per_study": per_study,
        "storescu_rc": [sender.returncode, resent.returncode],
        "elapsed_s": round(time.monotonic() - started, 1),
        "sources": len(list(images.rglob("*.dcm"))),
    }


def scale_out(folder: str, count: str) -> dict[str, Any]:
    """Six hosts on one PostgreSQL and one shared storage root, two of them killed (tests/scale_out_scenario.py)."""
    from tests.scale_out_scenario import scale_out as run

    return run(folder, count)


SCENARIOS = {"store": store, "e2e": e2e, "scale_out": scale_out}

if __name__ == "__main__":
    report = SCENARIOS[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(report))
