#!/usr/bin/env python3
"""Show the demo's results in a real PACS and two web viewers, on loopback: `make viewer` (after `make demo`).

What it does, with the Python standard library only (no package of the node is imported):

1. Gets a prebuilt OHIF viewer: the npm package ``@ohif/app`` ships its production build in ``dist/``.
   The first run fetches it with ``npm pack`` (the npm registry, about 50 MB) into ``build/ohif/``
   (git-ignored); later runs use that copy and download nothing.
2. Starts Orthanc (Debian package ``orthanc``) with the DICOMweb plugin (``orthanc-dicomweb``) and, when
   installed, the Orthanc Web Viewer plugin (``orthanc-webviewer``), inside a private network namespace
   (``unshare -n``; ``unshare -rn`` when not root). Orthanc 1.10 cannot bind to loopback only; in its own
   namespace it can reach nothing and nothing can reach it, except through a Unix socket in a private
   temporary folder, which a small relay inside the namespace joins to Orthanc's HTTP port.
3. Stores every DICOM file of the demo folder in it: the images the node received
   (``state/inbox``, ``inputs``) and everything the node wrote (``pacs/``: SR, overlay, SEG, GSPS).
4. Serves, on ``127.0.0.1:<port>`` only, one origin for everything (Orthanc sends no CORS headers):
   ``/`` OHIF (with an ``app-config.js`` that points at ``/dicom-web``), ``/dicom-web/`` Orthanc's
   DICOMweb, ``/orthanc/`` Orthanc's own UI (Orthanc Explorer, and ``/orthanc/web-viewer/`` when the
   plugin is installed). Prints a link per study, then serves until Ctrl-C; Orthanc's data is deleted
   on exit.

Usage:
    python3 tools/viewer.py [--demo-output demo-output] [--port 3000] [--ohif-version 3.13.2]
    python3 tools/viewer.py --ready-file /tmp/ready.json   # for scripts: writes the URLs when ready

Needs: orthanc, orthanc-dicomweb (apt-get install -y orthanc orthanc-dicomweb [orthanc-webviewer]),
util-linux ``unshare`` and iproute2 ``ip``, npm for the first run. Tested with Orthanc 1.10.1,
DICOMweb plugin 1.7, Web Viewer plugin 2.8, OHIF 3.13.2 (Debian 12).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import mimetypes
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ORTHANC = "/usr/sbin/Orthanc"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
PLUGINS = ("libOrthancDicomWeb.so", "libOrthancWebViewer.so")
ORTHANC_HTTP_PORT = 8042  # inside the namespace only
ORTHANC_DICOM_PORT = 4242  # inside the namespace only
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
EXTRA_TYPES = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".map": "application/json",
}

# OHIF's configuration, shared with docker/compose.yaml: one DICOMweb data source, same origin.
APP_CONFIG_FILE = REPO / "docker" / "viewer" / "app-config.js"


# --------------------------------------------------------------------------------------------------
# OHIF from the npm registry


def ensure_ohif(cache: Path, version: str) -> Path:
    """Return the folder of OHIF's production build, fetching ``@ohif/app@version`` with npm the first time."""
    dist = cache / f"app-{version}" / "dist"
    if (dist / "index.html").is_file():
        return dist
    if shutil.which("npm") is None:
        sys.exit("viewer: npm is needed once, to fetch the prebuilt OHIF (@ohif/app) from the npm registry")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"viewer: fetching @ohif/app@{version} from the npm registry (once; about 50 MB) into {cache}")
    done = subprocess.run(
        ["npm", "pack", f"@ohif/app@{version}", "--pack-destination", str(cache), "--silent"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"viewer: npm pack failed:\n{done.stderr.strip()}")
    tgz = cache / done.stdout.strip().splitlines()[-1]
    target = cache / f"app-{version}"
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len("package/") :]
        try:
            tar.extractall(target, members=members, filter="data")
        except TypeError:  # Python without extraction filters (before 3.8.17 / 3.11.4)
            tar.extractall(target, members=members)  # noqa: S202
    tgz.unlink()
    if not (dist / "index.html").is_file():
        sys.exit(f"viewer: @ohif/app@{version} has no dist/index.html; pick another --ohif-version")
    return dist


# --------------------------------------------------------------------------------------------------
# Orthanc inside a private network namespace, reached through a Unix socket


def orthanc_config(folder: Path) -> dict[str, Any]:
    plugins = [str(PLUGIN_DIR / name) for name in PLUGINS if (PLUGIN_DIR / name).exists()]
    return {
        "Name": "cxr-node viewer",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "DicomAet": "ORTHANC",
        "DicomPort": ORTHANC_DICOM_PORT,
        "HttpPort": ORTHANC_HTTP_PORT,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": plugins,
        # Our own file, not /etc/orthanc/dicomweb.json (whose "Host": "localhost" would break the links
        # the plugin writes): without "Host" the plugin writes its URLs from the request's Host header,
        # which the proxy passes through, so they point back at the proxy.
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
        "WebViewer": {"CachePath": str(folder / "webviewer-cache")},
    }


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def orthanc_request(sock: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(sock)
    try:
        conn.request(method, path, body=body, headers={"Host": "localhost"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def relay_inside(sock_path: str, config_path: str, log_path: str) -> None:
    """Inside the namespace: start Orthanc, relay the Unix socket to its HTTP port, stop it on SIGTERM."""
    with Path(log_path).open("ab") as log:
        orthanc = subprocess.Popen([ORTHANC, config_path], stdout=log, stderr=log)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    class Relay(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                upstream = socket.create_connection(("127.0.0.1", ORTHANC_HTTP_PORT), timeout=10)
            except OSError:
                return
            upstream.settimeout(None)
            back = threading.Thread(target=pipe, args=(upstream, self.request), daemon=True)
            back.start()
            pipe(self.request, upstream)
            back.join()
            upstream.close()

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    server = Server(sock_path, Relay)
    Path(sock_path).chmod(0o600)

    def stop(*_: object) -> None:
        orthanc.terminate()
        try:
            orthanc.wait(20)
        except subprocess.TimeoutExpired:
            orthanc.kill()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=lambda: (orthanc.wait(), os._exit(3)), daemon=True).start()
    server.serve_forever()


def start_orthanc(folder: Path, sock: str) -> subprocess.Popen[bytes]:
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"viewer: {tool} is not installed (util-linux, iproute2)")
    if not Path(ORTHANC).exists():
        sys.exit("viewer: Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb)")
    if not (PLUGIN_DIR / PLUGINS[0]).exists():
        sys.exit("viewer: the DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)")
    config = folder / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(folder), indent=2))
    log = str(folder / "orthanc.log")
    flags = "-n" if os.geteuid() == 0 else "-rn"
    script = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} --_relay {sock} {config} {log}"
    child = subprocess.Popen(["unshare", flags, "sh", "-c", script])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            sys.exit(f"viewer: Orthanc did not start (unshare {flags}: exit {child.returncode}); see {log}")
        try:
            status, _ = orthanc_request(sock, "GET", "/system")
            if status == 200:
                return child
        except OSError:
            pass
        time.sleep(0.3)
    child.terminate()
    sys.exit(f"viewer: Orthanc did not answer within 60 s; see {log}")


def is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def load(sock: str, demo: Path) -> int:
    files = sorted(p for p in demo.rglob("*.dcm") if p.is_file() and is_dicom(p))
    stored = 0
    for path in files:
        status, body = orthanc_request(sock, "POST", "/instances", path.read_bytes())
        if status == 200:
            stored += 1
        else:
            print(f"viewer: Orthanc refused {path}: HTTP {status} {body[:200]!r}", file=sys.stderr)
    return stored


def studies(sock: str) -> list[dict[str, Any]]:
    _, body = orthanc_request(sock, "GET", "/studies?expand")
    found = []
    for study in json.loads(body):
        series = []
        for sid in study["Series"]:
            _, sbody = orthanc_request(sock, "GET", f"/series/{sid}")
            s = json.loads(sbody)
            tags = s["MainDicomTags"]
            series.append(
                {
                    "orthanc_id": sid,
                    "modality": tags.get("Modality", ""),
                    "number": tags.get("SeriesNumber", ""),
                    "description": tags.get("SeriesDescription", ""),
                    "series_uid": tags.get("SeriesInstanceUID", ""),
                    "instances": len(s["Instances"]),
                }
            )
        found.append(
            {
                "orthanc_id": study["ID"],
                "study_uid": study["MainDicomTags"]["StudyInstanceUID"],
                "patient_id": study["PatientMainDicomTags"].get("PatientID", ""),
                "patient_name": study["PatientMainDicomTags"].get("PatientName", ""),
                "series": sorted(series, key=lambda x: int(x["number"] or 0)),
            }
        )
    return sorted(found, key=lambda s: (s["patient_id"], s["study_uid"]))


# --------------------------------------------------------------------------------------------------
# The same-origin proxy


def make_handler(dist: Path, sock: str) -> type[BaseHTTPRequestHandler]:
    root = dist.resolve()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cxr-node-viewer"

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # quiet: errors only
            if str(code).startswith(("4", "5")):
                sys.stderr.write(f"viewer: {self.requestline} -> {code}\n")

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self, path: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = UnixHTTPConnection(sock)
            try:
                conn.request(self.command, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                out = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
                self._send(response.status, data, out)
            except OSError as error:
                self._send(502, f"Orthanc unreachable: {error}\n".encode(), {"Content-Type": "text/plain"})
            finally:
                conn.close()

        def _static(self, path: str) -> None:
            if path == "/app-config.js":
                headers = {"Content-Type": "text/javascript", "Cache-Control": "no-cache"}
                self._send(200, APP_CONFIG_FILE.read_bytes(), headers)
                return
            target = (root / urllib.parse.unquote(path).lstrip("/")).resolve()
            if root not in target.parents or not target.is_file():
                target = root / "index.html"  # a client-side route of the single-page app
            ctype = EXTRA_TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            self._send(200, target.read_bytes(), {"Content-Type": ctype})

        def _route(self) -> None:
            path = self.path
            if path.startswith(("/dicom-web/", "/wado")):
                self._proxy(path)
            elif path == "/orthanc":
                self._send(302, b"", {"Location": "/orthanc/app/explorer.html"})
            elif path.startswith("/orthanc/"):
                self._proxy(path[len("/orthanc") :])
            elif self.command in ("GET", "HEAD"):
                self._static(urllib.parse.urlsplit(path).path)
            else:
                self._send(405, b"", {})

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _route

    return Handler


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--_relay":
        relay_inside(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--demo-output", type=Path, default=REPO / "demo-output", help="folder `make demo` wrote")
    parser.add_argument("--port", type=int, default=3000, help="port on 127.0.0.1 (default 3000)")
    parser.add_argument("--ohif-version", default="3.13.2", help="version of the npm package @ohif/app")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "ohif", help="where OHIF is kept")
    parser.add_argument("--ready-file", type=Path, help="write the URLs and studies here as JSON when ready")
    args = parser.parse_args()

    demo = args.demo_output
    if not (demo / "pacs").is_dir():
        sys.exit(f"viewer: {demo}/pacs not found: run `make demo` first")
    dist = ensure_ohif(args.cache, args.ohif_version)
    work = Path(tempfile.mkdtemp(prefix="cxr-viewer-"))
    work.chmod(0o700)
    sock = str(work / "orthanc.sock")
    try:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(dist, sock))
    except OSError as error:
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(f"viewer: cannot listen on 127.0.0.1:{args.port}: {error}; pick another --port")
    server.daemon_threads = True
    child = start_orthanc(work, sock)

    def shutdown(*_: object) -> None:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(work, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        stored = load(sock, demo)
        found = studies(sock)
        base = f"http://127.0.0.1:{args.port}"
        webviewer = (PLUGIN_DIR / PLUGINS[1]).exists()
        print(f"viewer: Orthanc holds {stored} instances of {demo} in {len(found)} studies")
        print(f"  OHIF {args.ohif_version}, study list   {base}/")
        print(f"  Orthanc Explorer            {base}/orthanc/app/explorer.html")
        for study in found:
            kinds = ", ".join(f"{s['modality']} {s['number']}" for s in study["series"])
            print(f"  {study['patient_id']:<14} {base}/viewer?StudyInstanceUIDs={study['study_uid']}   [{kinds}]")
        if webviewer:
            print(f"  Orthanc Web Viewer: {base}/orthanc/web-viewer/app/viewer.html?series=<Orthanc series ID>")
        print("  Ctrl-C stops Orthanc and deletes its copy of the data.")
        if args.ready_file:
            args.ready_file.write_text(
                json.dumps(
                    {
                        "base": base,
                        "ohif_version": args.ohif_version,
                        "webviewer": webviewer,
                        "studies": found,
                    },
                    indent=2,
                )
            )
        sys.stdout.flush()
        server.serve_forever()
    finally:
        shutdown()


if __name__ == "__main__":
    main()
