"""HL7 v2 in: real MLLP exchanges with the receiver's listener over loopback, from python-hl7 clients.

Checks the answers (AA only after the commit, AE and AR with their reasons), the door (allow-list, TLS with
client certificates, hostile clients beside a good one) and durability (a node killed with SIGKILL while a
sender resends unacknowledged messages ends with each recorded exactly once).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cxr_node.app import Receiver, open_store
from cxr_node.config import Settings
from cxr_node.errors import ConfigError
from cxr_node.outcomes.hl7_message import Header, ack
from tests.conftest import StartNode, free_port, require_tool
from tests.integration.helpers import write_config
from tests.integration.hl7_in_helpers import END, START, connect, exchange, msa, oru, read_answer


def hl7_node(start_node: StartNode, **overrides: Any) -> Receiver:
    """A receiver with the HL7 listener on a free port."""
    return start_node(**{"hl7_in.enabled": True, "hl7_in.port": free_port(), **overrides})


def port_of(node: Receiver) -> int:
    """The HL7 listener's port."""
    assert node.hl7 is not None
    return int(node.hl7.server_address[1])


def test_ack_aa_only_after_commit(start_node: StartNode) -> None:
    """An ORU^R01 is answered AA with its control ID, and its findings are in the store when the ACK arrives."""
    node = hl7_node(start_node)
    with capture_logs() as logs, connect(port_of(node)) as client:
        ack = exchange(client, oru("MSG-1", "ACC-1", "CWE|840539006^COVID-19^SCT", "ST|SARS-CoV-2 not detected"))
        stored = node.store.outcomes.for_accession("ACC-1")  # read right after the ACK: committed before it
    assert msa(ack) == ("AA", "MSG-1", "recorded 2, repeated 0")
    assert str(ack.segment("MSH")[9]) == "ACK^R01^ACK"
    assert [(o.source, o.source_id, o.label, o.code) for o in stored] == [
        ("hl7", "MSG-1/1", "positive", "SCT|840539006"),
        ("hl7", "MSG-1/2", "negative", "words:not detected"),
    ]
    accepted = [e for e in logs if e["event"] == "hl7.accepted"]
    assert accepted and accepted[0]["recorded"] == 2
    assert not any("PAT123" in str(e) or "DOE" in str(e) for e in logs)  # no patient identifiers logged


def test_repeat_recorded_once(start_node: StartNode) -> None:
    """The same message sent again (as a sender does without an ACK) is answered AA and recorded once."""
    node = hl7_node(start_node)
    message = oru("MSG-2", "ACC-2")
    with connect(port_of(node)) as client:
        assert msa(exchange(client, message))[0] == "AA"
        raw = client.send_message(message)  # python-hl7's own send
    assert b"MSA|AA|MSG-2|recorded 0, repeated 1" in raw
    assert len(node.store.outcomes.for_accession("ACC-2")) == 1


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (oru("E-1", "", "CWE|840539006^COVID-19^SCT").replace("PLACER1", ""), "no accession number"),
        (oru("E-2", "ACC-E", "ST|cardiomegaly"), "not in the mapping"),
        (oru("E-3", "ACC-E", "CWE|12345^Something^SCT"), "code not in the mapping"),
        (oru("E-4", "ACC-E", "NM|12"), "neither coded nor text"),
    ],
)
def test_unusable_oru_answered_ae(start_node: StartNode, message: str, reason: str) -> None:
    """A readable ORU^R01 without an accession number or a mappable finding is answered AE; nothing is recorded."""
    node = hl7_node(start_node)
    with connect(port_of(node)) as client:
        ack = exchange(client, message)
    code, _, text = msa(ack)
    assert code == "AE" and reason in text
    assert str(ack.segment("ERR")[3]).startswith("207^")
    assert node.store.outcomes.query() == []


def test_preliminary_answered_aa_and_not_recorded(start_node: StartNode) -> None:
    """A preliminary result (OBR-25 P) is acknowledged but not recorded: the final report follows."""
    node = hl7_node(start_node)
    with connect(port_of(node)) as client:
        assert msa(exchange(client, oru("P-1", "ACC-P", status="P"))) == ("AA", "P-1", "not final: nothing recorded")
    assert node.store.outcomes.query() == []


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("MSH|^~\\&|ADT|H|CXR|N|20240101||ADT^A01|ADT-1|P|2.5\rPID|1||X", "only ORU^R01 is accepted, found ADT^A01"),
        ("hello, is this the lab?", "not an HL7 v2 message"),
        ("MSH|^~\\&|RIS|H|CXR|N|20240101||ORU^R01||P|2.5\rOBR|1||A", "MSH-10"),
    ],
)
def test_not_an_oru_answered_ar(start_node: StartNode, message: str, reason: str) -> None:
    """A framed message that is not an ORU^R01 (or not HL7) is answered AR; the connection stays usable."""
    node = hl7_node(start_node)
    with connect(port_of(node)) as client:
        code, _, text = msa(exchange(client, message))
        assert (code, reason in text) == ("AR", True)
        assert msa(exchange(client, oru("AFTER-AR", "ACC-OK")))[0] == "AA"


def test_bytes_outside_mllp_and_oversize_answered_ar_and_closed(start_node: StartNode) -> None:
    """Bytes outside a frame, or a message over max_message_bytes, get AR and the connection is closed."""
    node = hl7_node(start_node, **{"hl7_in.max_message_bytes": 4096})
    with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"MSA|AR||not MLLP" in read_answer(sock)
        assert sock.recv(10) == b""
    with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as sock:
        head = oru("BIG-1", "ACC-BIG").encode()
        sock.sendall(START + head + b"OBX|9|TX|X||" + b"x" * 20000)  # fits loopback buffers: sent whole
        assert b"MSA|AR|BIG-1|message larger than 4096 bytes" in read_answer(sock)
        assert sock.recv(10) == b""
    assert node.store.outcomes.query() == []


def test_allow_list_refuses_other_addresses(start_node: StartNode) -> None:
    """An address outside hl7_in.allowed_ips is closed before a byte is read; nothing is recorded."""
    node = hl7_node(start_node, **{"hl7_in.allowed_ips": ["10.0.0.0/8"]})
    with socket.create_connection(("127.0.0.1", port_of(node)), timeout=5) as sock:
        try:
            sock.sendall(START + oru("DENIED-1").encode() + END)
            closed = sock.recv(100) == b""
        except ConnectionResetError:
            closed = True
    assert closed
    assert node.store.outcomes.query() == []


def test_hostile_clients_do_not_block_a_good_one(start_node: StartNode) -> None:
    """A slowloris, a garbage sender and an oversize sender leave a good sender's exchange unaffected, and the
    stalled connection is closed at hl7_in.message_timeout_s."""
    node = hl7_node(
        start_node, **{"hl7_in.message_timeout_s": 1.0, "hl7_in.timeout_s": 2.0, "hl7_in.max_message_bytes": 4096}
    )
    port = port_of(node)
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    slow.sendall(START + b"MSH|^~\\&|")  # then nothing more
    garbage = socket.create_connection(("127.0.0.1", port), timeout=5)
    garbage.sendall(os.urandom(2048))
    greedy = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        greedy.sendall(START + b"MSH|" + b"A" * 8000)
        started = time.monotonic()
        with connect(port) as client:
            assert msa(exchange(client, oru("GOOD-1", "ACC-GOOD")))[0] == "AA"
        assert time.monotonic() - started < 1.0
        slow.settimeout(5)
        assert slow.recv(10) == b""  # closed by the node after message_timeout_s
        assert time.monotonic() - started < 4.0
    finally:
        for sock in (slow, garbage, greedy):
            sock.close()
    with connect(port) as client:  # still serving
        assert msa(exchange(client, oru("GOOD-2", "ACC-GOOD")))[0] == "AA"
    assert len(node.store.outcomes.for_accession("ACC-GOOD")) == 2


def test_connection_slots_per_peer(start_node: StartNode) -> None:
    """Connections over max_connections_per_peer are closed at once; a slot freed is usable again."""
    node = hl7_node(start_node, **{"hl7_in.max_connections_per_peer": 1})
    port = port_of(node)
    with connect(port) as first:
        assert msa(exchange(first, oru("SLOT-1", "ACC-S")))[0] == "AA"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as second:
            assert second.recv(10) == b""
    deadline = time.monotonic() + 5
    while node.hl7 is not None and node.hl7.slots.open_from("127.0.0.1") and time.monotonic() < deadline:
        time.sleep(0.02)
    with connect(port) as third:
        assert msa(exchange(third, oru("SLOT-2", "ACC-S")))[0] == "AA"


def test_bad_mapping_refuses_to_start(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A bad mapping file stops the receiver's start with one line naming the file and the entry."""
    bad = tmp_path / "mapping.yaml"
    bad.write_text("words:\n  - {phrase: covid, label: maybe}\n")
    settings = make_settings(**{"hl7_in.enabled": True, "hl7_in.port": free_port(), "outcomes.mapping": str(bad)})
    with pytest.raises(ConfigError, match=r"outcomes.mapping: .*mapping.yaml: words entry 1: label must be"):
        Receiver(settings).start()


# --- TLS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with a server certificate (localhost, 127.0.0.1) and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made with openssl for this module."""
    require_tool("openssl")
    folder = tmp_path_factory.mktemp("hl7-pki")

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=folder, check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=hl7 test CA", "-addext", "basicConstraints=critical,CA:TRUE")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (folder / f"{name}.ext").write_text(ext + "\n")
        run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days",
            "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")  # fmt: skip
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
               folder / "client.key")  # fmt: skip


def test_tls_with_client_certificate(start_node: StartNode, pki: Pki) -> None:
    """Over TLS a client with a certificate from hl7_in.tls.ca_file is answered AA; one without is refused."""
    node = hl7_node(start_node, **{
        "hl7_in.tls.enabled": True, "hl7_in.tls.cert_file": str(pki.server_cert),
        "hl7_in.tls.key_file": str(pki.server_key), "hl7_in.tls.ca_file": str(pki.ca),
        "hl7_in.tls.require_client_cert": True,
    })  # fmt: skip
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with connect(port_of(node), context) as client:
        assert msa(exchange(client, oru("TLS-1", "ACC-TLS")))[0] == "AA"
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((ssl.SSLError, OSError)), connect(port_of(node), anonymous) as client:
        exchange(client, oru("TLS-2", "ACC-TLS"))
    assert [o.source_id for o in node.store.outcomes.query()] == ["TLS-1/1"]


# --- kill -9 ----------------------------------------------------------------------------------------


def _start_serve(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`cxr-node serve receiver` in its own process group, once its HL7 listener accepts (bounded wait)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "receiver", "--config", str(config)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cxr-node serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the HL7 listener did not accept within 60 s")


def _send_until_acked(port: int, messages: list[tuple[str, str]], acked: list[str], stop_at: float) -> None:
    """Send each message, resending it (reconnecting as needed) until it is answered AA, as interface engines do."""
    client = None
    for control_id, message in messages:
        while time.monotonic() < stop_at:
            try:
                client = client or connect(port)
                if msa(exchange(client, message))[:2] == ("AA", control_id):
                    acked.append(control_id)
                    break
            except (OSError, AssertionError):
                if client is not None:
                    client.close()
                client = None
                time.sleep(0.05)
    if client is not None:
        client.close()


def test_kill_9_while_sending_loses_nothing(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """SIGKILL of the receiver while a sender resends unacknowledged messages: after a restart every message is
    acknowledged and recorded exactly once."""
    port = free_port()
    settings = make_settings(**{"hl7_in.enabled": True, "hl7_in.port": port, "node.receiver_processes": 1,
                                "logging.format": "json"})  # fmt: skip
    config = write_config(settings, tmp_path / "node.yaml")
    log = tmp_path / "serve.log"
    count = 40
    messages = [(f"K-{i}", oru(f"K-{i}", f"ACC-K{i}")) for i in range(count)]
    node = _start_serve(config, port, log)
    acked: list[str] = []
    sender = threading.Thread(target=_send_until_acked, args=(port, messages, acked, time.monotonic() + 60))
    sender.start()
    try:
        deadline = time.monotonic() + 20
        while len(acked) < count // 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(node.pid, signal.SIGKILL)  # mid-stream: some message is received and not yet answered
        node.wait(10)
        killed_after = len(acked)
        node = _start_serve(config, port, log)
        sender.join(60)
        assert not sender.is_alive()
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)
    assert 0 < killed_after < count
    assert acked == [control_id for control_id, _ in messages]
    store = open_store(settings)
    try:
        recorded = [o.source_id for o in store.outcomes.query()]
    finally:
        store.close()
    assert sorted(recorded) == sorted(f"K-{i}/1" for i in range(count))


# --- from a hostile-peer audit of the listener ------------------------------------------------------------------


def test_a_short_msh_is_refused_not_dropped(start_node: StartNode) -> None:
    """An MSH of fewer than nine fields gets AR (it crashed the handler: no answer, so the sender resent it
    for ever), and the connection serves the next message."""
    node = hl7_node(start_node)
    with connect(port_of(node)) as client:
        code, _, text = msa(exchange(client, "MSH|^~\\&|RIS|HOSP|CXR|NODE|20261204120000\rOBR|1||ACC-S"))
        assert code == "AR" and "ORU^R01" in text
        assert msa(exchange(client, oru("MSG-S1", "ACC-S")))[0] == "AA"


def test_messages_before_stray_bytes_are_answered_first(start_node: StartNode) -> None:
    """Two whole messages then stray bytes in one write: both are recorded and answered AA, then the stray bytes
    get AR (the AR alone came back, and the two messages were lost)."""
    node = hl7_node(start_node)
    with connect(port_of(node)) as client:
        frames = b"".join(START + oru(f"MSG-G{n}", f"ACC-G{n}").encode() + END for n in (1, 2))
        client.socket.sendall(frames + b"GARBAGE")
        answers = [read_answer(client.socket) for _ in range(3)]
    assert b"MSA|AA|MSG-G1" in answers[0] and b"MSA|AA|MSG-G2" in answers[1]
    assert b"MSA|AR|" in answers[2]
    assert all(node.store.outcomes.for_accession(f"ACC-G{n}") for n in (1, 2))


def test_white_space_between_frames_does_not_hold_a_connection(start_node: StartNode) -> None:
    """A peer sending a carriage return every half second, never a message, is closed at hl7_in.timeout_s (each
    byte used to restart the timer: 16 such peers held every slot)."""
    node = hl7_node(start_node, **{"hl7_in.timeout_s": 1.5})
    sock = socket.create_connection(("127.0.0.1", port_of(node)), timeout=5)
    try:
        started, closed = time.monotonic(), None
        while time.monotonic() - started < 6:
            try:
                sock.sendall(b"\r")
                sock.settimeout(0.5)
                if sock.recv(100) == b"":
                    closed = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic() - started
                break
        assert closed is not None and closed < 4.0
    finally:
        sock.close()


def test_training_and_debugging_messages_are_not_ground_truth(start_node: StartNode) -> None:
    """MSH-11 T (training) or D (debugging) is refused AR (HL7 table 0357 code 202), nothing recorded."""
    node = hl7_node(start_node)
    with connect(port_of(node)) as client:
        for processing in ("T", "D"):
            message = oru(f"MSG-{processing}", f"ACC-{processing}").replace("|P|2.5.1", f"|{processing}|2.5.1")
            ack = exchange(client, message)
            assert msa(ack)[0] == "AR" and str(ack.segment("ERR")[3]).startswith("202")
            assert node.store.outcomes.for_accession(f"ACC-{processing}") == []


def test_repeated_set_ids_and_reused_control_ids_lose_no_finding(start_node: StartNode) -> None:
    """Three OBX all numbered 1 are three findings (two were taken for repeats); another message under a control
    ID already used is AE, not AA with its findings dropped."""
    node = hl7_node(start_node)
    same_ids = oru("MSG-R1", "ACC-R1", "CWE|840539006^COVID-19^SCT", "ST|SARS-CoV-2 not detected")
    same_ids = same_ids.replace("OBX|2|", "OBX|1|")
    with connect(port_of(node)) as client:
        assert msa(exchange(client, same_ids))[:2] == ("AA", "MSG-R1")
        assert len(node.store.outcomes.for_accession("ACC-R1")) == 2
        assert msa(exchange(client, oru("MSG-R2", "ACC-R2")))[0] == "AA"
        code, _, text = msa(exchange(client, oru("MSG-R2", "ACC-R3", "ST|SARS-CoV-2 not detected")))
    assert code == "AE" and "MSH-10 already used" in text
    assert node.store.outcomes.for_accession("ACC-R3") == []


def test_an_impossible_report_date_falls_back_to_the_order_date(start_node: StartNode) -> None:
    """OBR-22 20260230 (no such day) is unreadable, not 2 March: the report time falls back to OBR-7."""
    node = hl7_node(start_node)
    message = oru("MSG-D1", "ACC-D1").replace("|20240301110000|", "|20260230110000|")
    with connect(port_of(node)) as client:
        assert msa(exchange(client, message))[0] == "AA"
    [stored] = node.store.outcomes.for_accession("ACC-D1")
    assert time.strftime("%Y%m%d%H", time.localtime(stored.reported_at)) == "2024030110"


def test_two_messages_in_one_frame_are_refused_and_an_ack_text_never_ends_mid_escape(start_node: StartNode) -> None:
    """Two MSH in one frame (one ACK cannot answer both; the second's OBX went under the first's key) get AR;
    an answer's text is cut before it is escaped, so it never ends inside an escape sequence."""
    node = hl7_node(start_node)
    two = oru("MSG-M1", "ACC-M1").rstrip("\r") + "\r" + oru("MSG-M2", "ACC-M2")
    with connect(port_of(node)) as client:
        code, control, text = msa(exchange(client, two))
        assert (code, control) == ("AR", "MSG-M1") and "one message per frame" in text
        assert node.store.outcomes.for_accession("ACC-M1") == node.store.outcomes.for_accession("ACC-M2") == []
    for cut in range(60, 90):
        said = ack(Header(control_id="C1"), "AE", "x" * cut + "|^&\\" * 20).decode().split("\r")[1].split("|", 3)[3]
        assert re.fullmatch(r"(?:[^\\]|\\[FSTRE]\\)*", said), said  # whole escape sequences only
