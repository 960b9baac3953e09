"""The node's door over real associations: AE and IP allow-lists, association and size limits, DICOM TLS.

Every refusal is checked from the peer's side (pynetdicom's association state and A-ASSOCIATE-RJ fields,
DCMTK's printed output), on the node's side (nothing stored, the log event) and by a normal echo
afterwards: the service stays up.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from structlog.testing import capture_logs

from cxr_node.app import Receiver
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.errors import ConfigError
from cxr_node.jobs import spool
from cxr_node.jobs.states import JobState
from tests.conftest import require_tool
from tests.integration.helpers import wait_for

StartNode = Callable[..., Receiver]

HOST: Final = "127.0.0.1"
OTHER_LOOPBACK: Final = "127.0.0.2"
"""A second client source address on the loopback interface (all of 127.0.0.0/8 is local on Linux)."""
NODE_AET: Final = "CXR_NODE"
PACS_AET: Final = "PACS"
TIMEOUT_S: Final = 10.0
"""Bound on every client-side connect, ACSE, DIMSE and network wait, and on every DCMTK run."""
DCMTK_TIMEOUTS: Final = ("-to", "10", "-ta", "10", "-td", "10")

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): result, source, reason/diag.
REJECTED_PERMANENT: Final = 0x01
REJECTED_TRANSIENT: Final = 0x02
SOURCE_SERVICE_USER: Final = 0x01
SOURCE_PROVIDER_PRESENTATION: Final = 0x03
DIAG_CALLING_AET_NOT_RECOGNISED: Final = 0x03
DIAG_CALLED_AET_NOT_RECOGNISED: Final = 0x07
DIAG_LOCAL_LIMIT_EXCEEDED: Final = 0x02


# --- fixtures --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway certificate authority with a server and a client certificate, all PEM."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(folder: Path, command: str, *args: str) -> None:
    """Run ``openssl`` in ``folder`` with the space-separated ``command`` words, then ``args``."""
    argv = ["openssl", *command.split(), *args]
    subprocess.run(argv, cwd=folder, check=True, capture_output=True, timeout=30)


def _issue(folder: Path, name: str, subject: str, extensions: str) -> None:
    """Create ``name.key`` and ``name.pem``, a leaf certificate signed by ``ca``."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(folder, f"req -new -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj", subject)
    _openssl(
        folder,
        f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2"
        f" -out {name}.pem -extfile {name}.ext",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate (CN localhost, SAN 127.0.0.1) and a client certificate (CN PACS)."""
    require_tool("openssl")
    folder = tmp_path_factory.mktemp("pki")
    _openssl(
        folder,
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2"
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -subj",
        "/CN=cxr-node test CA",
    )
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    server = "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    _issue(folder, "server", "/CN=localhost", leaf + server)
    _issue(folder, "client", f"/CN={PACS_AET}", leaf + "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca_cert=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )


@pytest.fixture(scope="module")
def small_cr(tmp_path_factory: pytest.TempPathFactory, chest_cr: Path) -> Path:
    """The chest CR's header with a 64x64 image: a valid radiograph of about 10 kB."""
    ds = dcmread(chest_cr)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["cxr-node test_security small_cr"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = 64
    ds.PixelData = np.full((64, 64), 1000, dtype=np.uint16).tobytes()
    path = tmp_path_factory.mktemp("small") / "small_cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def start_node(make_settings: Callable[..., Settings]) -> Iterator[StartNode]:
    """Return a factory starting a receiver with dotted-key overrides; every one is stopped at teardown."""
    nodes: list[Receiver] = []

    def factory(**overrides: Any) -> Receiver:
        node = Receiver(make_settings(**{"node.acse_timeout_s": 5.0, **overrides})).start()
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.stop(grace_s=5)


def tls_overrides(pki: Pki, require_client_cert: bool = False) -> dict[str, Any]:
    """Return the settings overrides that turn TLS on with the test PKI."""
    return {
        "node.tls.enabled": True,
        "node.tls.cert_file": str(pki.server_cert),
        "node.tls.key_file": str(pki.server_key),
        "node.tls.ca_file": str(pki.ca_cert),
        "node.tls.require_client_cert": require_client_cert,
    }


def client_tls(pki: Pki, with_cert: bool = False) -> tuple[ssl.SSLContext, str]:
    """Return pynetdicom ``tls_args`` trusting the test CA, presenting the client cert if asked."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    if with_cert:
        context.load_cert_chain(certfile=str(pki.client_cert), keyfile=str(pki.client_key))
    return context, HOST


# --- pynetdicom and DCMTK peers -------------------------------------------------------------------


def peer_ae(calling: str = PACS_AET) -> AE:
    """Return an SCU proposing Verification and CR storage, with every wait bounded."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    return ae


@contextmanager
def associated(
    node: Receiver, calling: str = PACS_AET, called: str = NODE_AET, tls: Any = None, source: str = HOST
) -> Iterator[Association]:
    """Request an association with ``node`` from the loopback address ``source``; release it on exit."""
    assoc = peer_ae(calling).associate(HOST, node.port, ae_title=called, tls_args=tls, bind_address=(source, 0))
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def echo(node: Receiver, **kwargs: Any) -> int | None:
    """Return the C-ECHO status, or None when no association was established."""
    with associated(node, **kwargs) as assoc:
        if not assoc.is_established:
            return None
        return int(assoc.send_c_echo().Status)


def store(node: Receiver, path: Path, **kwargs: Any) -> Dataset | None:
    """Return the C-STORE response of ``path``, or None when no association was established."""
    with associated(node, **kwargs) as assoc:
        if not assoc.is_established:
            return None
        return assoc.send_c_store(path)


def dcmtk(tool: str, node: Receiver, *options: str, files: tuple[str, ...] = (), calling: str = PACS_AET) -> str:
    """Run a DCMTK SCU (verbose, every timeout bounded) against ``node``; return its stdout and stderr."""
    command = [require_tool(tool), "-v", *DCMTK_TIMEOUTS, "-aet", calling, "-aec", NODE_AET, *options]
    done = subprocess.run(
        [*command, HOST, str(node.port), *files],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S * 3,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout + done.stderr


def dcmtk_has_tls() -> bool:
    """Return True when the installed DCMTK was built with OpenSSL (its SCUs offer ``+tls``)."""
    try:
        helptext = subprocess.run(["echoscu", "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--enable-tls" in helptext


def rejection(assoc: Association) -> tuple[int, int, int]:
    """Return (result, source, diagnostic) of the A-ASSOCIATE-RJ ``assoc`` received."""
    primitive = assoc.acceptor.primitive
    assert primitive is not None, "no A-ASSOCIATE response was received"
    return int(primitive.result), int(primitive.result_source), int(primitive.diagnostic)


def job_count(node: Receiver) -> int:
    """Return how many jobs the node's store holds, in any state."""
    return sum(node.store.jobs.counts().values())


def spooled_files(node: Receiver) -> list[Path]:
    """Return every file in the node's inbox, quarantine and skipped areas."""
    root = node.settings.storage.root
    areas = (spool.INBOX, spool.QUARANTINE, spool.SKIPPED)
    return [path for area in areas for path in (root / area).rglob("*") if path.is_file()]


def wait_until_idle(node: Receiver, timeout_s: float = 5.0) -> None:
    """Wait (bounded) until the node has no association open."""
    assert node.server is not None
    deadline = time.monotonic() + timeout_s
    while node.server.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not node.server.ae.active_associations, "associations still open after their release"


def events(logs: list[dict[str, Any]]) -> list[str]:
    """Return the event names of captured log entries."""
    return [entry["event"] for entry in logs]


# --- AE titles ------------------------------------------------------------------------------------


def test_unknown_calling_aet_is_rejected_and_nothing_stored(start_node: StartNode, chest_cr: Path) -> None:
    """A calling AE outside node.allowed_calling_aets is rejected permanently and stores nothing."""
    node = start_node(**{"node.allowed_calling_aets": [PACS_AET]})
    with associated(node, calling="INTRUDER") as assoc:
        assert assoc.is_rejected
        assert rejection(assoc) == (REJECTED_PERMANENT, SOURCE_SERVICE_USER, DIAG_CALLING_AET_NOT_RECOGNISED)
    assert job_count(node) == 0
    assert spooled_files(node) == []
    response = store(node, chest_cr)
    assert response is not None
    assert response.Status == status.SUCCESS
    assert job_count(node) == 1


def test_dcmtk_unknown_calling_aet_is_rejected(start_node: StartNode, small_cr: Path) -> None:
    """DCMTK echoscu and storescu from an unlisted AE print Association Rejected; the allowed AE stores."""
    node = start_node(**{"node.allowed_calling_aets": [PACS_AET]})
    assert "Association Rejected" in dcmtk("echoscu", node, calling="INTRUDER")
    assert "Association Rejected" in dcmtk("storescu", node, files=(str(small_cr),), calling="INTRUDER")
    assert job_count(node) == 0
    assert spooled_files(node) == []
    assert "Received Store Response (Success)" in dcmtk("storescu", node, files=(str(small_cr),))
    assert node.store.jobs.counts()[JobState.QUEUED] == 1


def test_wrong_called_aet_is_rejected(start_node: StartNode) -> None:
    """With node.require_called_aet, an association addressed to another AE title is rejected, and the log
    names the AE title the peer called (what the admin must fix)."""
    node = start_node(**{"node.require_called_aet": True})
    with capture_logs() as logs:
        with associated(node, called="NOT_THE_NODE") as assoc:
            assert assoc.is_rejected
            assert rejection(assoc) == (REJECTED_PERMANENT, SOURCE_SERVICE_USER, DIAG_CALLED_AET_NOT_RECOGNISED)
        # pynetdicom's rejection event (the log line) fires after the reject PDU is sent: the peer may see it first
        wait_for(lambda: any(e["event"] == "assoc.rejected" for e in logs), 5.0)
    assert [e["called_aet"] for e in logs if e["event"] == "assoc.rejected"] == ["NOT_THE_NODE"]
    assert echo(node) == status.SUCCESS


# --- IP allow-list --------------------------------------------------------------------------------


def test_address_outside_allowed_ips_is_refused_before_association(start_node: StartNode) -> None:
    """A peer is disconnected before any association when node.allowed_ips excludes its address."""
    node = start_node(**{"node.allowed_ips": ["10.0.0.0/8", f"{OTHER_LOOPBACK}/32"]})
    with capture_logs() as logs, associated(node) as assoc:
        assert not assoc.is_established
        assert not assoc.is_rejected  # the connection is closed; no A-ASSOCIATE-RJ is ever sent
    assert "assoc.refused_address" in events(logs)
    assert "assoc.opened" not in events(logs)
    assert echo(node, source=OTHER_LOOPBACK) == status.SUCCESS  # a listed address is still served


def test_address_inside_allowed_ips_is_accepted(start_node: StartNode) -> None:
    """A loopback peer associates when node.allowed_ips includes 127.0.0.0/8."""
    node = start_node(**{"node.allowed_ips": ["127.0.0.0/8"]})
    with capture_logs() as logs:
        assert echo(node) == status.SUCCESS
    assert "assoc.refused_address" not in events(logs)


# --- association and size limits ------------------------------------------------------------------


def test_association_over_max_associations_is_rejected_transiently(start_node: StartNode) -> None:
    """The association past node.max_associations is rejected (transient, local limit) until one ends."""
    node = start_node(**{"node.max_associations": 2})
    with associated(node) as first, associated(node) as second:
        assert first.is_established
        assert second.is_established
        with associated(node) as third:
            assert third.is_rejected
            expected = (REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, DIAG_LOCAL_LIMIT_EXCEEDED)
            assert rejection(third) == expected
            assert third.acceptor.primitive.reason_str == "Local limit exceeded"
        assert first.send_c_echo().Status == status.SUCCESS  # the open ones are unaffected
    wait_until_idle(node)
    assert echo(node) == status.SUCCESS


def test_instance_over_max_instance_mb_is_refused_and_not_stored(
    start_node: StartNode, chest_cr: Path, small_cr: Path
) -> None:
    """An instance over node.max_instance_mb gets 0xCB01 (no endless retries) and an ErrorComment, leaving no job
    and no file."""
    node = start_node(**{"node.max_instance_mb": 1})
    response = store(node, chest_cr)
    assert response is not None
    assert response.Status == status.INSTANCE_TOO_LARGE
    assert "max_instance_mb" in response.ErrorComment
    assert job_count(node) == 0
    assert spooled_files(node) == []
    response = store(node, small_cr)
    assert response is not None
    assert response.Status == status.SUCCESS
    assert node.store.jobs.counts()[JobState.QUEUED] == 1
    assert len(spooled_files(node)) == 1


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_echo_and_store(start_node: StartNode, pki: Pki, chest_cr: Path) -> None:
    """A peer trusting the node's CA echoes and stores the chest CR over TLS; the job is queued."""
    node = start_node(**tls_overrides(pki))
    tls = client_tls(pki)
    assert echo(node, tls=tls) == status.SUCCESS
    response = store(node, chest_cr, tls=tls)
    assert response is not None
    assert response.Status == status.SUCCESS
    assert node.store.jobs.counts()[JobState.QUEUED] == 1


def test_plain_association_to_tls_port_fails_and_service_stays_up(start_node: StartNode, pki: Pki) -> None:
    """A peer speaking plain DICOM to the TLS port gets no association and the next TLS peer is served."""
    node = start_node(**tls_overrides(pki))
    with capture_logs() as logs:
        assert echo(node) is None
    assert "assoc.tls_failed" in events(logs)
    assert echo(node, tls=client_tls(pki)) == status.SUCCESS


def test_peer_not_trusting_node_certificate_fails(start_node: StartNode, pki: Pki) -> None:
    """A TLS peer that does not trust the node's CA refuses the connection; the node keeps serving."""
    node = start_node(**tls_overrides(pki))
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # system CAs only
    assert echo(node, tls=(untrusting, HOST)) is None
    assert echo(node, tls=client_tls(pki)) == status.SUCCESS


def test_silent_connection_does_not_block_tls_accept_loop(start_node: StartNode, pki: Pki) -> None:
    """A TCP client that never starts its TLS handshake does not stop other peers from associating."""
    node = start_node(**tls_overrides(pki))
    with socket.create_connection((HOST, node.port), timeout=TIMEOUT_S):
        started = time.monotonic()
        assert echo(node, tls=client_tls(pki)) == status.SUCCESS
        assert time.monotonic() - started < 3.0


def test_stop_is_not_held_by_a_stalled_tls_handshake(start_node: StartNode, pki: Pki) -> None:
    """Stopping the receiver returns promptly while a TCP client sits in an unfinished TLS handshake."""
    node = start_node(**tls_overrides(pki), **{"node.acse_timeout_s": 20.0})
    with socket.create_connection((HOST, node.port), timeout=TIMEOUT_S):
        assert echo(node, tls=client_tls(pki)) == status.SUCCESS  # the stalled one has been accepted by now
        started = time.monotonic()
        node.stop(grace_s=1)
        assert time.monotonic() - started < 5.0


def test_client_certificate_required(start_node: StartNode, pki: Pki) -> None:
    """With node.tls.require_client_cert a TLS peer fails without a certificate and succeeds with one."""
    node = start_node(**tls_overrides(pki, require_client_cert=True))
    with capture_logs() as logs:
        assert echo(node, tls=client_tls(pki)) is None
    assert "assoc.opened" not in events(logs)
    assert echo(node, tls=client_tls(pki, with_cert=True)) == status.SUCCESS


def test_client_certificates_are_checked_against_ca_file_only(
    start_node: StartNode, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client certificate from a CA the system trusts (SSL_CERT_FILE) but node.tls.ca_file does not name is
    refused: the system's CAs, public ones included, never vouch for a DICOM peer."""
    other = tmp_path / "system-ca"
    other.mkdir()
    _openssl(
        other,
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2"
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -subj",
        "/CN=some public CA",
    )
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    _issue(other, "client", f"/CN={PACS_AET}", leaf + "extendedKeyUsage=clientAuth\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(other / "ca.pem"))  # what OpenSSL's default trust store reads
    node = start_node(**tls_overrides(pki, require_client_cert=True))
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    context.load_cert_chain(certfile=str(other / "client.pem"), keyfile=str(other / "client.key"))
    assert echo(node, tls=(context, "localhost")) is None
    assert echo(node, tls=client_tls(pki, with_cert=True)) == status.SUCCESS


@pytest.mark.skipif(not dcmtk_has_tls(), reason="this DCMTK build has no TLS support")
def test_dcmtk_echoscu_and_storescu_over_tls(start_node: StartNode, pki: Pki, small_cr: Path) -> None:
    """DCMTK echoscu and storescu with +tls, the client certificate and the test CA talk to the TLS node."""
    node = start_node(**tls_overrides(pki, require_client_cert=True))
    tls = ("+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca_cert))
    echoed = dcmtk("echoscu", node, *tls)
    assert "Received Echo Response (Success)" in echoed, echoed
    stored = dcmtk("storescu", node, *tls, files=(str(small_cr),))
    assert "Received Store Response (Success)" in stored, stored
    assert node.store.jobs.counts()[JobState.QUEUED] == 1
    assert "Received Echo Response" not in dcmtk("echoscu", node)  # plain DICOM to the TLS port
    assert echo(node, tls=client_tls(pki, with_cert=True)) == status.SUCCESS


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("node.tls.cert_file", "missing"),
        ("node.tls.key_file", "not_a_key"),
        ("node.tls.ca_file", "missing"),
    ],
)
def test_bad_tls_file_is_a_config_error(
    make_settings: Callable[..., Settings], pki: Pki, tmp_path: Path, key: str, bad: str
) -> None:
    """A TLS certificate, key or CA file that cannot be loaded makes start() fail naming node.tls."""
    value = tmp_path / "no-such.pem" if bad == "missing" else pki.ca_cert  # a certificate is not a key
    node = Receiver(make_settings(**{**tls_overrides(pki), key: str(value)}))
    try:
        with pytest.raises(ConfigError, match=r"node\.tls"):
            node.start()
        assert node.server is None
    finally:
        node.store.close()
