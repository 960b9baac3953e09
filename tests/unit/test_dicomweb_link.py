"""The STOW-RS link's HTTP behaviour against a raw socket server: kept-alive connections the server closed."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from cxr_node.send import stow
from cxr_node.send.dicomweb import Credentials, DicomwebTransport

INSTANCE = UID("2.25.4242")


def answer(uid: str) -> bytes:
    """An HTTP/1.1 200 whose DICOM JSON lists ``uid`` as stored; it does not announce that the server closes."""
    body = json.dumps({stow.REFERENCED_SOP_SEQUENCE: {"vr": "SQ", "Value": [
        {stow.REFERENCED_SOP_INSTANCE_UID: {"vr": "UI", "Value": [uid]}}]}}).encode()  # fmt: skip
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {stow.DICOM_JSON}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class OneShotServer:
    """Answers the first request of each connection, then closes it; ``silent`` connections get no answer."""

    def __init__(self, silent: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests = 0
        self.silent = silent

    def serve(self, count: int) -> None:
        """Serve ``count`` connections (bounded), then stop."""
        for _ in range(count):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                conn.settimeout(10)
                if self._read_request(conn) and self.connections > self.silent:
                    self.requests += 1
                    conn.sendall(answer(INSTANCE))

    @staticmethod
    def _read_request(conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        while len(body) < length:
            body += conn.recv(65536)
        return True


@pytest.fixture
def output(tmp_path: Path) -> Path:
    """A small Part 10 file with the SOP Instance UID :data:`INSTANCE`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = INSTANCE
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = INSTANCE
    path = tmp_path / "out.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def serving() -> Iterator[Callable[..., OneShotServer]]:
    """Start a :class:`OneShotServer` in a thread; close it afterwards."""
    servers: list[OneShotServer] = []

    def start(connections: int, silent: int = 0) -> OneShotServer:
        server = OneShotServer(silent)
        threading.Thread(target=server.serve, args=(connections,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.listener.close()


def test_a_connection_the_server_closed_is_reopened_once(serving: Callable[..., OneShotServer], output: Path) -> None:
    """The second store on a kept-alive connection the server closed is sent again on a new one: both stored."""
    server = serving(2)
    link = DicomwebTransport(f"http://127.0.0.1:{server.port}/dicom-web", Credentials(), 10).open([])
    try:
        results = [link.send(output), link.send(output)]
    finally:
        link.close()
    assert [(r.status, r.ok) for r in results] == [(0, True), (0, True)] and link.alive
    assert (server.connections, server.requests) == (2, 2)


def test_a_fresh_connection_dropped_is_the_destination_down(
    serving: Callable[..., OneShotServer], output: Path
) -> None:
    """A server that drops a new connection without answering is not asked again in the round: the link is down."""
    server = serving(1, silent=1)
    link = DicomwebTransport(f"http://127.0.0.1:{server.port}/dicom-web", Credentials(), 10).open([])
    result = link.send(output)
    link.close()
    assert result.status is None and not link.alive and "could not be reached" in result.comment
    assert server.connections == 1
