"""Scenarios run inside a private network namespace (see tests/orthanc.py); each prints a JSON report last.

Usage: ``python -m tests.netns_scenarios SCENARIO ARGS...`` (only from :func:`tests.orthanc.run_in_netns`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.orthanc import Front, Orthanc


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


def _status(config: Path) -> dict[str, Any]:
    """``cxr-node status --json`` (empty when it failed)."""
    done = subprocess.run(
        [sys.executable, "-m", "cxr_node", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    return dict(json.loads(done.stdout)) if done.returncode == 0 else {}


def _until(config: Path, done: Callable[[dict[str, int]], bool], limit_s: float) -> dict[str, int]:
    """Poll the node's job counts (bounded by ``limit_s``) until ``done(jobs)``; return the last counts."""
    deadline, jobs = time.monotonic() + limit_s, _jobs(config)
    while not done(jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
        jobs = _jobs(config)
    return jobs


def _finished(n: int) -> Callable[[dict[str, int]], bool]:
    return lambda jobs: jobs.get("delivered", 0) + jobs.get("dead", 0) >= n


def _wado_back(orthanc: Orthanc) -> list[dict[str, str]]:
    """Every stored instance read back through WADO-RS: its SOP class and study, from the file itself."""
    import io

    from pydicom import dcmread

    found = []
    for tags in orthanc.instances():
        answer = orthanc.wado(tags["StudyInstanceUID"], tags["SeriesInstanceUID"], tags["SOPInstanceUID"])
        delimiter = b"\r\n" + answer.split(b"\r\n", 1)[0]  # the one part: from its headers' end to the delimiter
        part = answer[answer.index(b"\r\n\r\n") + 4 : answer.rindex(delimiter)]
        ds = dcmread(io.BytesIO(part), stop_before_pixels=True)
        found.append({"sop_class": str(ds.SOPClassUID), "study": str(ds.StudyInstanceUID), "modality": ds.Modality})
    return found


def _dicomweb_destination(base: Path, orthanc: Orthanc, tls: Path | None) -> tuple[dict[str, Any], Front]:
    """The node's destination for ``orthanc`` with basic auth (password file 0600), through a :class:`Front`
    relay: HTTPS with a client certificate when ``tls`` names a folder holding the test PKI (ca.pem,
    server.pem/key, client.pem/key), else plain HTTP."""
    user, password = next(iter(orthanc.users.items()))
    password_file = base / "orthanc.password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    destination: dict[str, Any] = {"name": "web", "protocol": "dicomweb", "url": orthanc.dicomweb_url,
                                   "auth": "basic", "username": user, "password_file": str(password_file)}  # fmt: skip
    if tls is None:
        front = Front(orthanc.http_port).start()
        destination.update(url=f"http://127.0.0.1:{front.port}/dicom-web")
        return destination, front
    front = Front(orthanc.http_port, tls / "server.pem", tls / "server.key", client_ca=tls / "ca.pem").start()
    destination.update(url=f"https://127.0.0.1:{front.port}/dicom-web", ca_file=str(tls / "ca.pem"),
                       cert_file=str(tls / "client.pem"), key_file=str(tls / "client.key"))  # fmt: skip
    return destination, front


def dicomweb_out(folder: str, mode: str, count: str, tls: str = "") -> dict[str, Any]:
    """``cxr-node serve`` delivers the results of ``count`` phantom chest images (sent by DCMTK storescu) to a real
    Orthanc over STOW-RS with basic auth (and HTTPS with client certificates through :class:`TlsFront` when ``tls``
    names the test PKI folder), through a relay that can hold Orthanc's answers. ``mode``: ``plain``; ``outage``
    (Orthanc starts only once every result is written); ``kill`` (Orthanc's answers are held, so the sender waits
    mid-delivery once Orthanc has stored a first output; the service is then killed with SIGKILL, and restarted).
    Report the jobs, what Orthanc holds per source study, what WADO-RS gives back, and whether the password was
    ever logged."""
    base, n = Path(folder), int(count)
    users = {"cxr-node": "pw-" + secrets.token_hex(12)}
    orthanc = Orthanc(base / "orthanc", free_port(), free_port(), dicomweb=True, users=users)
    if mode != "outage":
        orthanc.start()
    destination, front = _dicomweb_destination(base, orthanc, Path(tls) if tls else None)
    if mode == "kill":
        front.passing.clear()
    images = base / "images"
    subprocess.run([sys.executable, "-m", "cxr_node", "phantoms", "--n", str(n), "--out", str(images), "--size",
                    "256", "--seed", "11"], check=True, capture_output=True)  # fmt: skip
    root, port, config = base / "state", free_port(), base / "node.yaml"
    config.write_text(json.dumps({
        "node": {"host": "127.0.0.1", "port": port, "receiver_processes": 1},
        "storage": {"root": str(root)},
        "destinations": [destination],
        "delivery": {"backoff_initial_s": 0.5, "backoff_max_s": 2, "poll_interval_ms": 200,
                     "jobs_per_association": 1},
        "worker": {"batch_size": 2, "batch_wait_ms": 0},
        "metrics": {"enabled": False},
        "logging": {"format": "json", "level": "debug"},
    }))  # fmt: skip
    log = base / "serve.log"
    node = _serve(config, root, log)
    started = time.monotonic()
    sent = subprocess.run(["storescu", "-aec", "CXR_NODE", "-aet", "PACS", "+sd", "+r", "127.0.0.1", str(port),
                           str(images / "images")], capture_output=True, timeout=120, check=False)  # fmt: skip
    report: dict[str, Any] = {"storescu_rc": sent.returncode}
    if mode == "outage":
        report["before_up"] = _until(config, lambda jobs: jobs.get("written", 0) >= n, 120)
        report["destination_before_up"] = _status(config).get("destinations", {}).get("web", {})
        orthanc.start()
    if mode == "kill":
        deadline = time.monotonic() + 120
        while not orthanc.get("/instances") and time.monotonic() < deadline:
            time.sleep(0.2)
        report["at_kill"] = {"stored": len(orthanc.get("/instances")), "deliveries": _status(config)["deliveries"]}
        _kill(node)
        front.passing.set()
        node = _serve(config, root, log)
    report["jobs"] = _until(config, _finished(n), 180)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["destination"] = _status(config).get("destinations", {}).get("web", {})
    report["deliveries"] = _status(config).get("deliveries", {})
    node.send_signal(signal.SIGTERM)
    node.wait(60)
    per_study: dict[str, dict[str, int]] = {}
    for tags in orthanc.instances():
        counts = per_study.setdefault(tags["StudyInstanceUID"], {})
        counts[tags.get("Modality", "")] = counts.get(tags.get("Modality", ""), 0) + 1
    report.update(per_study=per_study, wado=_wado_back(orthanc), sources=_studies(images),
                  password_logged=users["cxr-node"] in log.read_text(errors="replace"),
                  tls_handshakes_failed=front.handshakes_failed)  # fmt: skip
    orthanc.stop()
    front.stop()
    return report


def _studies(images: Path) -> list[str]:
    """The Study Instance UIDs of the source images."""
    from pydicom import dcmread

    return sorted({str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in images.glob("images/*.dcm")})


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "store": store,
    "e2e": e2e,
    "scale_out": scale_out,
    "dicomweb_out": dicomweb_out,
}

if __name__ == "__main__":
    report = SCENARIOS[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(report))
