"""DICOMweb in: STOW-RS into a real node over HTTP(S), with dicomweb-client, curl and raw sockets.

Checks the answers (DICOM JSON, HTTP and per-instance statuses), the door (content types, sizes, tokens, TLS,
slow and greedy clients), durability (what is listed stored is committed; nothing half-written stays) and the
whole path (results of a pushed phantom reach the test PACS).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cxr_node.app import Receiver
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.errors import ConfigError
from cxr_node.jobs import spool
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset
from tests.conftest import StartNode, free_port, require_tool
from tests.integration.helpers import small_cr, wait_for, write_config
from tests.integration.pacs import Pacs

TOKEN = "s3cret-token-for-tests-0123456789"  # noqa: S105 - a test token
BOUNDARY = "cxr-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
FAILED, REFERENCED, REASON = "00081198", "00081199", "00081197"


# ------------------------------------------------------------------------------------------- helpers


def encoded(ds: Dataset) -> bytes:
    """``ds`` in the DICOM file format."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(parts: list[bytes], kinds: list[str] | None = None) -> bytes:
    """A multipart/related body of ``parts`` (application/dicom unless ``kinds`` says otherwise)."""
    kinds = kinds or ["application/dicom"] * len(parts)
    out = b""
    for part, kind in zip(parts, kinds, strict=True):
        out += f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def post(
    port: int,
    body: bytes,
    path: str = "/dicomweb/studies",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` to the node; return the status, the headers (lower-case names) and the body."""
    sent = {"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}", **(headers or {})}
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={k: v for k, v in sent.items() if v})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def reasons(body: bytes) -> list[int]:
    """The FailureReason of each failed instance of a DICOM JSON answer."""
    answer = json.loads(body)
    return [item[REASON]["Value"][0] for item in answer.get(FAILED, {}).get("Value", [])]


def referenced(body: bytes) -> list[str]:
    """The SOP Instance UIDs listed as stored in a DICOM JSON answer."""
    answer = json.loads(body)
    return [item["00081155"]["Value"][0] for item in answer.get(REFERENCED, {}).get("Value", [])]


def leftovers(settings: Settings) -> list[Path]:
    """Files in the receiving folder (a rejected or finished part must leave none)."""
    folder = settings.storage.root / spool.RECEIVING
    return [p for p in folder.glob("*") if p.is_file()] if folder.exists() else []


def token_file(folder: Path, mode: int = 0o600) -> Path:
    """A token file with ``mode``."""
    path = folder / "stow.token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


def stow_overrides(tmp_path: Path, **more: Any) -> dict[str, Any]:
    """Settings overrides turning STOW-RS on at a free port with a bearer token."""
    return {
        "stow.enabled": True,
        "stow.port": free_port(),
        "stow.token_file": str(token_file(tmp_path)),
        **more,
    }


@pytest.fixture
def node(start_node: StartNode, tmp_path: Path) -> Receiver:
    """A running receiver with STOW-RS on loopback and a bearer token."""
    return start_node(**stow_overrides(tmp_path))


def cr(chest_cr: Path, name: str, size: int = 128, **changes: object) -> Dataset:
    """A small real chest CR with its own SOP Instance UID."""
    return small_cr(chest_cr, name, size=size, **changes)


# ------------------------------------------------------------------------------------------- in-process node


def test_dicomweb_client_stores_instances(node: Receiver, chest_cr: Path) -> None:
    """dicomweb-client's store_instances (chunked over 1 MB) gets every instance listed stored and queued."""
    datasets = [cr(chest_cr, "dwc-1", size=1024), cr(chest_cr, "dwc-2")]
    client = DICOMwebClient(
        url=f"http://127.0.0.1:{node.settings.stow.port}/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    answer = client.store_instances(datasets)
    stored = [str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence]
    assert stored == [str(ds.SOPInstanceUID) for ds in datasets]
    assert "FailedSOPSequence" not in answer
    assert node.store.jobs.counts()["queued"] == 2
    assert leftovers(node.settings) == []


def test_curl_posts_a_hand_built_multipart_body(node: Receiver, chest_cr: Path, tmp_path: Path) -> None:
    """curl posting a multipart/related body built by hand (Expect: 100-continue) gets 200 and the DICOM JSON."""
    curl = require_tool("curl")
    ds = cr(chest_cr, "curl-1", size=1024)
    body = tmp_path / "body.bin"
    body.write_bytes(multipart([encoded(ds)]))
    url = f"http://127.0.0.1:{node.settings.stow.port}/dicomweb/studies/{ds.StudyInstanceUID}"
    result = subprocess.run(
        [curl, "-sS", "-X", "POST", "-H", f"Content-Type: {CONTENT_TYPE}", "-H", f"Authorization: Bearer {TOKEN}",
         "-H", "Expect: 100-continue", "--data-binary", f"@{body}", "-w", "\n%{http_code} %{content_type}", url],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    answer, _, last = result.stdout.rpartition(b"\n")
    assert last.decode().split() == ["200", "application/dicom+json"]
    assert referenced(answer) == [str(ds.SOPInstanceUID)]


def test_a_mix_of_good_and_bad_parts_is_202_with_a_reason_each(node: Receiver, chest_cr: Path) -> None:
    """Good instances are stored; each bad part gets the status the SCP would have answered."""
    good = cr(chest_cr, "mix-good")
    no_uid = cr(chest_cr, "mix-nouid")
    del no_uid.SOPInstanceUID
    parts = [encoded(good), b"not dicom at all", b"plain text", encoded(no_uid)]
    kinds = ["application/dicom", "application/dicom", "text/plain", "application/dicom"]
    code, headers, body = post(node.settings.stow.port, multipart(parts, kinds))
    assert code == 202
    assert headers["content-type"] == "application/dicom+json"
    assert referenced(body) == [str(good.SOPInstanceUID)]
    assert reasons(body) == [status.CANNOT_UNDERSTAND, status.CANNOT_UNDERSTAND, status.IDENTIFIER_INVALID]
    assert "warning" in headers
    assert node.store.jobs.counts()["queued"] == 1
    assert leftovers(node.settings) == []


def test_all_bad_is_409_and_another_study_is_refused(node: Receiver, chest_cr: Path) -> None:
    """Every part failing is 409; an instance of another study than the target's is not stored."""
    ds = cr(chest_cr, "other-study")
    path = f"/dicomweb/studies/{generate_uid()}"
    code, _, body = post(node.settings.stow.port, multipart([encoded(ds)]), path=path)
    assert code == 409
    assert reasons(body) == [status.IDENTIFIER_INVALID]
    assert sum(node.store.jobs.counts().values()) == 0


def test_same_instance_again_is_success_and_a_conflict_is_refused(node: Receiver, chest_cr: Path) -> None:
    """An identical re-send is listed stored; the same SOP Instance UID with other pixels is 0xC002."""
    ds = cr(chest_cr, "again")
    assert post(node.settings.stow.port, multipart([encoded(ds)]))[0] == 200
    assert post(node.settings.stow.port, multipart([encoded(ds)]))[0] == 200
    ds.PixelData = bytes(len(ds.PixelData))
    code, _, body = post(node.settings.stow.port, multipart([encoded(ds)]))
    assert (code, reasons(body)) == (409, [status.INSTANCE_CONFLICT])


@pytest.mark.parametrize(
    "content_type",
    ["application/dicom", "application/json", 'multipart/related; type="application/dicom+json"; boundary=x'],
)
def test_wrong_content_type_is_415(node: Receiver, chest_cr: Path, content_type: str) -> None:
    """Anything but multipart/related of application/dicom is 415, and nothing is stored."""
    code, _, _ = post(node.settings.stow.port, encoded(cr(chest_cr, "ct")), headers={"Content-Type": content_type})
    assert code == 415
    assert sum(node.store.jobs.counts().values()) == 0


def test_malformed_bodies_are_400_and_leave_nothing(node: Receiver, chest_cr: Path) -> None:
    """A truncated multipart body, a bad boundary and an empty body are 400; no spool file stays."""
    port = node.settings.stow.port
    whole = multipart([encoded(cr(chest_cr, "trunc"))])
    assert post(port, whole[: len(whole) // 2])[0] == 400
    assert post(port, whole, headers={"Content-Type": 'multipart/related; type="application/dicom"'})[0] == 400
    assert post(port, f"--{BOUNDARY}--\r\n".encode())[0] == 400
    assert post(port, whole, path="/dicomweb/studies/not-a-uid")[0] == 400
    assert post(port, whole, path="/elsewhere")[0] == 404
    assert sum(node.store.jobs.counts().values()) == 0
    assert leftovers(node.settings) == []


def test_missing_or_wrong_token_is_401(node: Receiver, chest_cr: Path) -> None:
    """No token or a wrong one is 401 with a Bearer challenge; nothing is stored."""
    body = multipart([encoded(cr(chest_cr, "tok"))])
    code, headers, _ = post(node.settings.stow.port, body, headers={"Authorization": ""})
    assert code == 401
    assert headers["www-authenticate"].startswith("Bearer")
    code, headers, _ = post(node.settings.stow.port, body, headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert code == 401
    assert "invalid_token" in headers["www-authenticate"]
    assert sum(node.store.jobs.counts().values()) == 0


def test_a_token_file_others_can_read_refuses_to_start(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A token file readable by others stops the receiver at start-up with one line naming the key."""
    overrides = stow_overrides(tmp_path)
    token_file(tmp_path, mode=0o644)
    with pytest.raises(ConfigError, match=r"stow.token_file .*chmod 600"):
        Receiver(make_settings(**overrides)).start()


def test_an_address_outside_the_allow_list_is_403(start_node: StartNode, tmp_path: Path, chest_cr: Path) -> None:
    """A client outside stow.allowed_ips is refused with 403."""
    node = start_node(**stow_overrides(tmp_path, **{"stow.allowed_ips": ["10.0.0.0/8"]}))
    assert post(node.settings.stow.port, multipart([encoded(cr(chest_cr, "ip"))]))[0] == 403


def test_oversized_bodies_are_413(start_node: StartNode, tmp_path: Path, chest_cr: Path) -> None:
    """A Content-Length over stow.max_body_mb, a chunked body growing over it, and more parts than
    stow.max_instances are 413; an instance over node.max_instance_mb is failed with 0xCB01."""
    node = start_node(**stow_overrides(tmp_path, **{"stow.max_body_mb": 1, "stow.max_instances": 2}))
    port = node.settings.stow.port
    big = multipart([encoded(cr(chest_cr, "big", size=1024))])
    assert post(port, big)[0] == 413
    chunked = DICOMwebClient(url=f"http://127.0.0.1:{port}/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(Exception, match="413"):
        chunked.store_instances([cr(chest_cr, "big-chunked", size=1024)])
    three = multipart([encoded(cr(chest_cr, f"n{i}", size=64)) for i in range(3)])
    code, _, body = post(port, three)
    assert code == 413
    assert len(referenced(body)) == 2  # stored and committed before the third part was seen: listed
    assert leftovers(node.settings) == []


def test_instance_over_max_instance_mb_fails_alone(start_node: StartNode, tmp_path: Path, chest_cr: Path) -> None:
    """A part over node.max_instance_mb is failed with INSTANCE_TOO_LARGE; the others are stored."""
    node = start_node(**stow_overrides(tmp_path, **{"node.max_instance_mb": 0.5}))
    small, large = cr(chest_cr, "small"), cr(chest_cr, "large", size=1024)
    code, _, body = post(node.settings.stow.port, multipart([encoded(small), encoded(large)]))
    assert code == 202
    assert reasons(body) == [status.INSTANCE_TOO_LARGE]
    assert leftovers(node.settings) == []


def test_store_down_is_503_with_0xa700_and_nothing_half_written(node: Receiver, chest_cr: Path) -> None:
    """When the inbox cannot be written, every instance fails with 0xA700, the answer is 503 with Retry-After,
    no job and no spool file stays; once the store is back the same request is stored."""
    root = node.settings.storage.root
    inbox = root / spool.INBOX
    inbox.mkdir(parents=True, exist_ok=True)
    inbox.rmdir()
    inbox.write_text("not a folder")  # every move into the inbox fails, as on a broken disk
    body = multipart([encoded(cr(chest_cr, "down-1")), encoded(cr(chest_cr, "down-2"))])
    code, headers, answer = post(node.settings.stow.port, body)
    assert code == 503
    assert headers["retry-after"]
    assert reasons(answer) == [status.OUT_OF_RESOURCES] * 2
    assert sum(node.store.jobs.counts().values()) == 0
    assert leftovers(node.settings) == []
    inbox.unlink()
    assert post(node.settings.stow.port, body)[0] == 200


def test_full_store_is_503_before_the_body_is_read(start_node: StartNode, tmp_path: Path, chest_cr: Path) -> None:
    """With the disk over storage.max_disk_percent the request is refused with 503 at once."""
    node = start_node(**stow_overrides(tmp_path, **{"storage.max_disk_percent": 0.001}))
    code, headers, _ = post(node.settings.stow.port, multipart([encoded(cr(chest_cr, "full"))]))
    assert (code, "retry-after" in headers) == (503, True)


def test_slow_and_greedy_clients_cost_a_timeout_not_the_server(
    start_node: StartNode, tmp_path: Path, chest_cr: Path
) -> None:
    """A client stalling in its headers or body is cut off at its deadline; connections over the per-peer limit
    are refused with 503; the server keeps storing for others."""
    more = {"stow.header_timeout_s": 3, "stow.idle_timeout_s": 3, "stow.max_connections_per_peer": 2}
    node = start_node(**stow_overrides(tmp_path, **more))
    port = node.settings.stow.port
    stalled_headers = socket.create_connection(("127.0.0.1", port), timeout=30)
    stalled_headers.sendall(b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n")
    stalled_body = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\n"
    head += f"Authorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n--{BOUNDARY}\r\n\r\nDICM"
    stalled_body.sendall(head.encode())
    extra = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert extra.recv(1024).startswith(b"HTTP/1.1 503")  # over max_connections_per_peer while both stall
    extra.close()
    assert stalled_headers.recv(1024) == b""  # closed by the server at the header deadline (bounded by 30 s)
    assert stalled_body.recv(1024) == b""  # closed at the idle deadline, no answer owed
    stalled_headers.close()
    stalled_body.close()
    assert wait_for(lambda: leftovers(node.settings) == [], 10)
    flood = socket.create_connection(("127.0.0.1", port), timeout=30)
    with contextlib.suppress(ConnectionError):  # the server drops it past 64 kB of headers, maybe mid-send
        flood.sendall(b"POST /dicomweb/studies HTTP/1.1\r\n")
        for _ in range(200):
            flood.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    with contextlib.suppress(ConnectionError):
        assert flood.recv(1024) == b""  # dropped without an answer
    flood.close()
    assert post(port, multipart([encoded(cr(chest_cr, "after-slow"))]))[0] == 200


def make_cert(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    openssl = require_tool("openssl")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_with_a_client_certificate(start_node: StartNode, tmp_path: Path, chest_cr: Path) -> None:
    """Over TLS with mutual authentication: a client with its certificate stores; one without cannot connect;
    a plain-HTTP client is refused."""
    server_cert, server_key = make_cert(tmp_path, "server")
    client_cert, client_key = make_cert(tmp_path, "client")
    tls = {"enabled": True, "cert_file": str(server_cert), "key_file": str(server_key)}
    tls |= {"ca_file": str(client_cert), "require_client_cert": True}
    node = start_node(**stow_overrides(tmp_path, **{"stow.tls": tls}))
    port = node.settings.stow.port
    context = ssl.create_default_context(cafile=str(server_cert))
    context.load_cert_chain(str(client_cert), str(client_key))
    ds = cr(chest_cr, "tls-1")
    code, _, body = post(port, multipart([encoded(ds)]), context=context)
    assert (code, referenced(body)) == (200, [str(ds.SOPInstanceUID)])
    anonymous = ssl.create_default_context(cafile=str(server_cert))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        post(port, multipart([encoded(cr(chest_cr, "tls-2"))]), context=anonymous)
    stranger_cert, stranger_key = make_cert(tmp_path, "stranger")
    stranger = ssl.create_default_context(cafile=str(server_cert))
    stranger.load_cert_chain(str(stranger_cert), str(stranger_key))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        post(port, multipart([encoded(cr(chest_cr, "tls-4"))]), context=stranger)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        post(port, multipart([encoded(cr(chest_cr, "tls-3"))]))
    assert node.store.jobs.counts()["queued"] == 1


def test_nothing_logged_holds_the_token_or_patient_data(node: Receiver, chest_cr: Path) -> None:
    """The log of accepted, refused and failed requests holds neither the token nor patient names or UIDs."""
    from structlog.testing import capture_logs

    ds = cr(chest_cr, "logs", PatientName="Secret^Patient")
    with capture_logs() as logs:
        post(node.settings.stow.port, multipart([encoded(ds)]))
        post(node.settings.stow.port, multipart([encoded(ds)]), headers={"Authorization": "Bearer " + TOKEN[::-1]})
        post(node.settings.stow.port, multipart([b"junk"]), path=f"/dicomweb/studies/{ds.StudyInstanceUID}")
    text = repr(logs)
    assert "stow.request" in text
    for secret in (TOKEN, TOKEN[::-1], "Secret", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)):
        assert secret not in text


# ------------------------------------------------------------------------------------------- cxr-node serve


def serve(config: Path, log: Path, ready_file: Path, role: str = "all") -> subprocess.Popen[bytes]:
    """Start ``cxr-node serve`` in its own process group; wait (bounded) until every child is up."""
    args = [sys.executable, "-m", "cxr_node", "serve", *([role] if role != "all" else []), "--config", str(config)]
    proc = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cxr-node serve exited with {proc.returncode}: {log.read_text()[-3000:]}")
        if ready_file.exists():
            return proc
        time.sleep(0.2)
    raise AssertionError("cxr-node serve did not become ready within 120 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a served node and its children."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    """The PACS the results go to."""
    server = Pacs(tmp_path / "pacs").start()
    yield server
    server.stop()


def phantom(seed: int) -> Dataset:
    """A realistic CR chest phantom (PA, MONOCHROME1, 10 bits) in its own study."""
    return phantom_to_dataset(
        make_phantom(seed, label=seed % 2, size=512),
        modality="CR",
        photometric="MONOCHROME1",
        bits_stored=10,
        patient_id=f"STOW{seed}",
        patient_name="Stow^Test",
    )


def test_pushed_phantoms_results_reach_the_pacs(
    make_settings: Callable[..., Settings], tmp_path: Path, pacs: Pacs
) -> None:
    """Two CR phantoms pushed over STOW-RS, one with dicomweb-client and one with curl, come back to the PACS as
    one SR and one SC each, in their own studies."""
    curl = require_tool("curl")
    destination = {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
    settings = make_settings(
        **stow_overrides(tmp_path), destinations=[destination], **{"delivery.poll_interval_ms": 100}
    )
    proc = serve(write_config(settings, tmp_path / "node.yaml"), tmp_path / "serve.log", ready(settings))
    try:
        first, second = phantom(71_001), phantom(71_002)
        base = f"http://127.0.0.1:{settings.stow.port}/dicomweb"
        client = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {TOKEN}"})
        assert len(client.store_instances([first]).ReferencedSOPSequence) == 1
        body = tmp_path / "second.bin"
        body.write_bytes(multipart([encoded(second)]))
        out = subprocess.run(
            [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Content-Type: {CONTENT_TYPE}",
             "-H", f"Authorization: Bearer {TOKEN}", "--data-binary", f"@{body}", f"{base}/studies"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        assert out.stdout == b"200"
        studies = {str(first.StudyInstanceUID), str(second.StudyInstanceUID)}

        def arrived() -> bool:
            got = [(str(ds.StudyInstanceUID), str(ds.Modality)) for ds in list(pacs.received)]
            return all(sum(1 for s, m in got if s == study and m == "SR") == 1 for study in studies) and all(
                sum(1 for s, m in got if s == study and m == "OT") == 1 for study in studies
            )

        assert wait_for(arrived, 240, every=0.5), (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        stop(proc)


def ready(settings: Settings, roles: str = "receiver+worker+sender") -> Path:
    """The file a served node writes once every child is up."""
    return settings.storage.root / f"run/{roles}.ready"


def committed(settings: Settings) -> set[str]:
    """SOP Instance UIDs with a committed job, read from the jobs database as another process would."""
    db = settings.storage.root / spool.DB_NAME
    if not db.exists():
        return set()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return {row[0] for row in conn.execute("SELECT sop_instance_uid FROM jobs")}


@pytest.mark.slow  # two start-ups of the service: about 25-40 s here
def test_kill_9_between_receiving_and_answering_loses_nothing_stored(
    make_settings: Callable[..., Settings], tmp_path: Path, chest_cr: Path
) -> None:
    """SIGKILL of the receivers after some parts of a request were stored but before any answer: those instances
    and an earlier answered request are on disk with their jobs after a restart, no spool file is left, and the
    client's retry of the whole request is answered 200."""
    settings = make_settings(**stow_overrides(tmp_path), **{"node.receiver_processes": 1})
    config = write_config(settings, tmp_path / "node.yaml")
    proc = serve(config, tmp_path / "serve.log", ready(settings, "receiver"), role="receiver")
    port = settings.stow.port
    try:
        answered = [cr(chest_cr, "kill-a")]
        assert post(port, multipart([encoded(ds) for ds in answered]))[0] == 200
        pending = [cr(chest_cr, f"kill-b{i}", size=256) for i in range(4)]
        body = multipart([encoded(ds) for ds in pending])
        cut = body.index(encoded(pending[3])) + 4096  # three whole parts, the fourth begun
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\n"
        head += f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body[:cut])
        uids = {str(ds.SOPInstanceUID) for ds in pending[:3]}
        assert wait_for(lambda: uids <= committed(settings) and leftovers(settings) != [], 60)
        os.killpg(proc.pid, signal.SIGKILL)  # no answer was sent: three parts stored, one half-received
        proc.wait(10)
        sock.close()
        every = uids | {str(answered[0].SOPInstanceUID)}
        assert every <= committed(settings)
        ready(settings, "receiver").unlink()  # left by the killed supervisor
        proc = serve(config, tmp_path / "serve.log", ready(settings, "receiver"), role="receiver")
        assert leftovers(settings) == []  # the half-received part's spool file is removed at start-up
        for ds in [*answered, *pending[:3]]:
            key = spool.instance_key(str(ds.SOPInstanceUID))
            stored = settings.storage.root / spool.relative_path(spool.INBOX, key)
            assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
        code, _, answer = post(port, body)  # the client's retry
        assert (code, set(referenced(answer))) == (200, {str(ds.SOPInstanceUID) for ds in pending})
    finally:
        stop(proc)


def test_hostile_requests_never_take_the_server_down(node: Receiver, chest_cr: Path) -> None:
    """Garbage request lines, broken chunked framing, random bodies and resets leave the server answering."""
    port = node.settings.stow.port
    auth = f"Authorization: Bearer {TOKEN}\r\nContent-Type: {CONTENT_TYPE}\r\n"
    rng = random.Random(5)
    attempts = [
        b"\x16\x03\x01garbage\r\n\r\n",
        b"POST /dicomweb/studies HTTP/9.9\r\n\r\n",
        f"POST /dicomweb/studies HTTP/1.1\r\n{auth}Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode(),
        f"POST /dicomweb/studies HTTP/1.1\r\n{auth}Transfer-Encoding: gzip\r\n\r\n".encode(),
        f"POST /dicomweb/studies HTTP/1.1\r\n{auth}Content-Length: -5\r\n\r\n".encode(),
        f"POST /dicomweb/studies HTTP/1.1\r\n{auth}\r\n".encode(),
        *(
            f"POST /dicomweb/studies HTTP/1.1\r\n{auth}Content-Length: 4000\r\n\r\n".encode() + rng.randbytes(4000)
            for _ in range(5)
        ),
    ]
    for raw in attempts:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, contextlib.suppress(ConnectionError):
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    assert post(port, multipart([encoded(cr(chest_cr, "after-hostile"))]))[0] == 200
    assert leftovers(node.settings) == []


def _raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is; return what the node answers before it closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if len(answer) > 1 << 20:
                break
        return answer


def test_two_content_lengths_are_400_and_an_unknown_method_405(node: Receiver, chest_cr: Path) -> None:
    """Two different Content-Length headers (which one frames the body is ambiguous: RFC 9112 6.3) are 400, nothing
    stored (the first one was used); a method http.server has no handler for is 405 with Allow, not an HTML 501."""
    body = multipart([encoded(cr(chest_cr, "two-lengths"))])
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\nContent-Length: {10 * len(body)}\r\n\r\n"
    ).encode()
    answer = _raw(node.settings.stow.port, head + body)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Content-Length given twice" in answer
    assert sum(node.store.jobs.counts().values()) == 0
    for method in (b"BREW", b"OPTIONS"):
        request = method + f" /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        answer = _raw(node.settings.stow.port, request)
        assert answer.startswith(b"HTTP/1.1 ") and b"Allow: POST" in answer, answer[:80]
        assert b"<html" not in answer.lower()
