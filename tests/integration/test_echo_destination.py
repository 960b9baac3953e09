"""`cxr-node echo` reaches a destination as the deliveries do: same calling AE title, same TLS."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from cxr_node.config import Settings
from tests.conftest import free_port
from tests.integration import test_security
from tests.integration.helpers import write_config
from tests.integration.test_security import Pki

PACS_AET = "PACS"
pki = test_security.pki
"""The throwaway CA with a server certificate for 127.0.0.1 (shared with the security tests)."""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m cxr_node ARGS` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "cxr_node", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@contextmanager
def verification_scp(ssl_context: ssl.SSLContext | None = None) -> Iterator[tuple[int, list[str]]]:
    """Run a Verification SCP on a free loopback port; yield the port and the calling AE titles it has seen."""
    seen: list[str] = []

    def on_echo(event: evt.Event) -> int:
        seen.append(str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    ae = AE(ae_title=PACS_AET)
    ae.add_supported_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, on_echo)], ssl_context=ssl_context
    )
    try:
        yield port, seen
    finally:
        server.shutdown()


def config_with_pacs(make_settings: Callable[..., Settings], path: Path, port: int, **pacs: Any) -> Path:
    """Write a config whose destination ``pacs`` is the SCP on ``port`` and whose deliveries call as CXR_SENDER."""
    destination = {"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": port, **pacs}
    settings = make_settings(**{"destinations": [destination], "delivery.calling_ae_title": "CXR_SENDER"})
    return write_config(settings, path)


def test_echo_a_destination_calls_as_the_deliveries(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Echo of a destination calls as delivery.calling_ae_title; an address calls as CXR_NODE; a flag overrides."""
    with verification_scp() as (port, seen):
        config = str(config_with_pacs(make_settings, tmp_path / "node.yaml", port))
        by_name = cli("echo", "pacs", "--config", config)
        by_address = cli("echo", f"{PACS_AET}@127.0.0.1:{port}", "--config", config)
        by_flag = cli("echo", "pacs", "--config", config, "--calling-aet", "ADMIN")
    for done in (by_name, by_address, by_flag):
        assert done.returncode == 0, done.stdout + done.stderr
        assert "status 0x0000" in done.stdout
    assert f"{PACS_AET}@127.0.0.1:{port}" in by_name.stdout
    assert seen == ["CXR_SENDER", "CXR_NODE", "ADMIN"]


def test_echo_of_an_unknown_destination_names_the_configured_ones(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A name that is neither an address nor a destination is a one-line config error listing the destinations."""
    config = config_with_pacs(make_settings, tmp_path / "node.yaml", free_port())
    done = cli("echo", "archive", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"'archive' is neither AE@host:port nor a destination in {config} (pacs)" in done.stderr


def test_echo_a_tls_destination(make_settings: Callable[..., Settings], tmp_path: Path, pki: Pki) -> None:
    """A destination with tls and its CA is echoed over TLS; without TLS the same SCP cannot be reached."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    with verification_scp(server_tls) as (port, seen):
        secure = config_with_pacs(make_settings, tmp_path / "tls.yaml", port, tls=True, ca_file=str(pki.ca_cert))
        plain = config_with_pacs(make_settings, tmp_path / "plain.yaml", port)
        over_tls = cli("echo", "pacs", "--config", str(secure))
        in_clear = cli("echo", "pacs", "--config", str(plain))
    assert over_tls.returncode == 0, over_tls.stdout + over_tls.stderr
    assert f"C-ECHO {PACS_AET}@127.0.0.1:{port} (TLS): status 0x0000" in over_tls.stdout
    assert in_clear.returncode == 5
    assert seen == ["CXR_SENDER"]
