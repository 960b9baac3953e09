"""A real Orthanc as the test PACS, run inside a private network namespace (it cannot bind to loopback only).

Tests call :func:`run_in_netns` with a scenario of ``tests/netns_scenarios.py``; the scenario starts
Orthanc (and whatever else it needs) inside ``unshare -n`` with only loopback up, does its work and
prints one JSON report on its last stdout line. :class:`Orthanc` is the server itself, for scenarios.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
REPO = Path(__file__).resolve().parent.parent


def netns_available() -> str:
    """Return '' when ``unshare -n`` and Orthanc can be used here, else the reason they cannot."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip (util-linux, iproute2) are not installed"
    if not Path(ORTHANC).exists():
        return "Orthanc is not installed (Debian package orthanc)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return "" if probe.returncode == 0 else f"unshare -n is not permitted here: {probe.stderr.decode().strip()}"


def dicomweb_available() -> str:
    """Return '' when Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb) is installed, else why not."""
    return "" if Path(DICOMWEB_PLUGIN).exists() else "Orthanc's DICOMweb plugin is not installed (orthanc-dicomweb)"


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
    """One Orthanc process with its own configuration, storage folder and ports.

    Optionally with the DICOMweb plugin (``dicomweb``: STOW-RS, QIDO-RS and WADO-RS under ``/dicom-web``), HTTP
    basic authentication (``users``: name to password) and HTTPS (``ssl_pem``: its certificate followed by its
    private key; ``ca_file`` lets the REST helpers here verify it).
    """

    def __init__(
        self,
        folder: Path,
        dicom_port: int,
        http_port: int,
        aet: str = "ORTHANC",
        modalities: dict[str, list[Any]] | None = None,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
        ssl_pem: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.folder = folder
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        self.modalities = modalities or {}
        self.dicomweb = dicomweb
        self.users = users or {}
        self.ssl_pem = ssl_pem
        self.ca_file = ca_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        """The REST API's URL."""
        return f"{'https' if self.ssl_pem else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (with the plugin loaded)."""
        return f"{self.base}/dicom-web"

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.dicomweb:
            options["Plugins"] = [DICOMWEB_PLUGIN]
            # the Debian default says Host: localhost; the RetrieveURLs must name this instance
            options["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                                   "Host": f"127.0.0.1:{self.http_port}", "Ssl": self.ssl_pem is not None}  # fmt: skip
        if self.users:
            options.update(AuthenticationEnabled=True, RegisteredUsers=self.users)
        if self.ssl_pem is not None:
            options.update(SslEnabled=True, SslCertificate=str(self.ssl_pem))
        return options

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
            **self._options(),
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

    def _request(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
        request = urllib.request.Request(f"{self.base}{path}", data=data, method="POST" if data else "GET")  # noqa: S310
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        if self.users:
            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ssl_pem else None
        with urllib.request.urlopen(request, timeout=30, context=context) as response:  # noqa: S310 - loopback
            return bytes(response.read())

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        return json.loads(self._request(path))

    def post(self, path: str, body: Any) -> Any:
        """POST JSON to a REST resource and decode the JSON answer."""
        return json.loads(self._request(path, json.dumps(body).encode()))

    def wado(self, study: str, series: str, instance: str) -> bytes:
        """WADO-RS: one instance as the multipart/related answer holding its Part 10 file."""
        path = f"/dicom-web/studies/{study}/series/{series}/instances/{instance}"
        return self._request(path, headers={"Accept": 'multipart/related; type="application/dicom"'})

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance's main tags (SOPInstanceUID, SOPClassUID…) with its study and series UIDs."""
        found = []
        for instance_id in self.get("/instances"):
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            found.append(tags)
        return found


class Front:
    """A TCP relay on loopback in front of a plain HTTP server, optionally terminating TLS, that can hold answers.

    Orthanc 1.10.1 of Debian 12 crashes (segmentation fault) on its first HTTPS request with ``SslEnabled``, so
    TLS to a real Orthanc is tested through this relay (``cert``/``key``; a client certificate is required when
    ``client_ca`` is given): the client's TLS is real, what is behind it is Orthanc's own HTTP. While ``passing``
    is clear, the server's answers to POST requests (stores) are held back, though the requests reach it: a
    client then waits mid-request for an answer to an instance already stored. Other answers (probes) pass.
    """

    def __init__(
        self, target_port: int, cert: Path | None = None, key: Path | None = None, client_ca: Path | None = None
    ) -> None:
        self.target_port = target_port
        self.context: ssl.SSLContext | None = None
        if cert is not None and key is not None:
            self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.context.load_cert_chain(str(cert), str(key))
            if client_ca is not None:
                self.context.verify_mode = ssl.CERT_REQUIRED
                self.context.load_verify_locations(str(client_ca))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.handshakes_failed = 0
        self.passing = threading.Event()
        self.passing.set()

    def start(self) -> Front:
        """Accept connections in a daemon thread."""
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop accepting (open relays end with their connections)."""
        self.passing.set()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            client.settimeout(120)
            front = self.context.wrap_socket(client, server_side=True) if self.context else client
        except OSError:
            self.handshakes_failed += 1
            client.close()
            return
        try:
            backend = socket.create_connection(("127.0.0.1", self.target_port), timeout=120)
        except OSError:
            front.close()
            return
        posting = threading.Event()  # set while the last request on this connection is a POST
        threading.Thread(target=_pump, args=(backend, front, self.passing, posting), daemon=True).start()
        _pump(front, backend, None, posting)


def _pump(source: socket.socket, sink: socket.socket, gate: threading.Event | None, posting: threading.Event) -> None:
    """Copy ``source`` to ``sink`` until either ends, then close both. Requests (``gate`` None) mark ``posting``
    when they start with POST; answers wait for ``gate`` while ``posting``."""
    try:
        while data := source.recv(65536):
            if gate is None and data[:8].split(b" ")[0] in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD"):
                (posting.set if data.startswith(b"POST ") else posting.clear)()
            if gate is not None and posting.is_set():
                gate.wait(120)  # bounded: a test that forgets to let answers pass ends its relays after this
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.close()
