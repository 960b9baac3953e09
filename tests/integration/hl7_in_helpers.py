"""Helpers for the HL7 v2 tests: ORU^R01 messages, an MLLP client built on python-hl7 with bounded waits."""

from __future__ import annotations

import socket
import ssl
import time

import hl7
from hl7.client import MLLPClient

START, END = b"\x0b", b"\x1c\x0d"
WAIT_S = 5.0


def oru(control_id: str, accession: str = "ACC1", *observations: str, status: str = "F", extra: str = "") -> str:
    """An ORU^R01 with ``observations`` (OBX-2 type, OBX-5 value pairs as ``TYPE|value``), checked by python-hl7."""
    observations = observations or ("CWE|840539006^COVID-19^SCT",)
    segments = [
        f"MSH|^~\\&|RIS|HOSP|CXR|NODE|20240301120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        "PID|1||PAT123^^^HOSP||DOE^JANE",
        f"OBR|1|PLACER1|{accession}|XR^Chest X-ray|||20240301100000|||||||||||||||20240301110000|||{status}",
        *(
            f"OBX|{n}|{kind}|DX^Diagnosis^L||{value}||||||F"
            for n, (kind, value) in enumerate((o.split("|", 1) for o in observations), start=1)
        ),
        *([extra] if extra else []),
    ]
    message = hl7.parse("\r".join(segments))
    return str(message)


def connect(port: int, context: ssl.SSLContext | None = None) -> MLLPClient:
    """A python-hl7 MLLP client on 127.0.0.1:``port`` (over TLS with ``context``), every wait bounded."""
    client = MLLPClient("127.0.0.1", port)
    client.socket.settimeout(WAIT_S)
    if context is not None:
        client.socket = context.wrap_socket(client.socket, server_hostname="localhost")
    return client


def read_answer(sock: socket.socket, seconds: float = WAIT_S) -> bytes:
    """One MLLP-framed answer (without its frame); b'' when the connection closed first."""
    buffer = b""
    deadline = time.monotonic() + seconds
    while END not in buffer:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            return b""
        buffer += data
    return buffer[buffer.index(START) + 1 : buffer.index(END)]


def exchange(client: MLLPClient, message: str | bytes) -> hl7.Message:
    """Send ``message`` framed, return the parsed ACK."""
    data = message.encode() if isinstance(message, str) else message
    client.socket.sendall(START + data + END)
    answer = read_answer(client.socket)
    assert answer, "the node closed the connection without an answer"
    return hl7.parse(answer.decode())


def msa(ack: hl7.Message) -> tuple[str, str, str]:
    """MSA-1 (AA, AE, AR), MSA-2 (the control ID) and MSA-3 (the text) of an ACK."""
    segment = ack.segment("MSA")
    return str(segment[1]), str(segment[2]), ack.unescape(str(segment[3])) if len(segment) > 3 else ""
