"""A real Orthanc as the test PACS, run inside a private network namespace (it cannot bind to loopback only).

Tests call :func:`run_in_netns` with a scenario of ``tests/netns_scenarios.py``; the scenario starts
Orthanc (and whatever else it needs) inside ``unshare -n`` with only loopback up, does its work and
prints one JSON report on its last stdout line. :class:`Orthanc` is the server itself, for scenarios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC = "/usr/sbin/Orthanc"
REPO = Path(__file__).resolve().parent.parent


def netns_available() -> str:
    """Return '' when ``unshare -n`` and Orthanc can be used here, else the reason they cannot."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip (util-linux, iproute2) are not installed"
    if not Path(ORTHANC).exists():
        return "Orthanc is not installed (Debian package orthanc)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return "" if probe.returncode == 0 else f"unshare -n is not permitted here: {probe.stderr.decode().strip()}"


def run_in_netns(scenario: str, *args: str, timeout: float = 240) -> dict[str, Any]:
    """Run ``scenario`` of tests/netns_scenarios.py in a private network namespace; return its JSON report."""
    script = f"ip link set lo up && exec {sys.executable} -m tests.netns_scenarios {scenario} " + " ".join(
        f"'{arg}'" for arg in args
    )
    done = subprocess.run(
        ["unshare", "-n", "bash", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise AssertionError(
            f"scenario {scenario} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


class Orthanc:
    """One Orthanc process with its own configuration, storage folder and ports."""

    def __init__(
        self,
        folder: Path,
        dicom_port: int,
        http_port: int,
        aet: str = "ORTHANC",
        modalities: dict[str, list[Any]] | None = None,
    ) -> None:
        self.folder = folder
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        self.modalities = modalities or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Orthanc:
        """Start Orthanc and wait until its REST API answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxr-node-test-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "StableAge": 1,
            "DicomCheckCalledAet": False,
            "HttpServerEnabled": True,
            "OverwriteInstances": False,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start in {timeout} s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 20 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        """POST JSON to a REST resource and decode the JSON answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - a fixed http URL on loopback
            return json.loads(response.read())

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance's main tags (SOPInstanceUID, SOPClassUID…) with its study and series UIDs."""
        found = []
        for instance_id in self.get("/instances"):
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            found.append(tags)
        return found
