"""The SCP: an Application Entity built from Settings, listening with the node's limits and TLS.

:class:`NodeServer` adds what pynetdicom's server lacks: an IP allow-list checked before any DICOM is
read, the TLS handshake moved off the accept loop into the association's thread, and SO_REUSEPORT so
several receiver processes can share one port.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.transport import ThreadedAssociationServer

from cxr_node.config import NodeSettings, TLSSettings
from cxr_node.dicom.sop import scp_contexts
from cxr_node.errors import ConfigError

log = structlog.get_logger("cxr_node.receive")


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with an IP allow-list, lazy TLS and SO_REUSEPORT."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    reuse_port: bool = False
    handshake_timeout: float = 30.0
    # The TLS handshake runs in the request thread: don't let server_close() join it (a stalled peer
    # would hold shutdown for handshake_timeout). Association threads are pynetdicom's own.
    daemon_threads = True
    block_on_close = False

    @property
    def listening(self) -> socket.socket:
        """The listening socket (pynetdicom types it optional; it exists from construction on)."""
        if self.socket is None:
            raise RuntimeError("the SCP has no listening socket")
        return self.socket

    def server_bind(self) -> None:
        """Bind, sharing the port with sibling receiver processes when ``reuse_port`` is set."""
        if self.reuse_port:
            self.listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; wrap it for TLS without handshaking (that happens in its own thread)."""
        client, address = self.listening.accept()
        if self.ssl_context:
            client.settimeout(self.handshake_timeout)
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse connections from addresses outside ``node.allowed_ips`` before reading any PDU."""
        if not self.allowed_networks:
            return True
        address = ipaddress.ip_address(client_address[0])
        if any(address in network for network in self.allowed_networks):
            return True
        log.warning("assoc.refused_address", peer=f"{client_address[0]}:{client_address[1]}")
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Finish the TLS handshake in the association's thread, then run the association."""
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                log.warning("assoc.tls_failed", peer=f"{client_address[0]}:{client_address[1]}", error=str(exc))
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def spool_received_into(folder: Path) -> None:
    """Make pynetdicom write each incoming data set to a file in ``folder`` as it arrives.

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom streams the data set to a ``NamedTemporaryFile`` in the
    default temporary folder; pointing that at the storage root's receiving folder (same filesystem as the
    inbox) lets the handler file an instance by renaming it, with no copy of it in memory. This sets
    process-wide state of pynetdicom 3.0 (pinned), as a receiver process owns its pynetdicom.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    setattr(dimse_messages, "NamedTemporaryFile", functools.partial(tempfile.NamedTemporaryFile, dir=folder))  # noqa: B010


def build_ae(node: NodeSettings) -> AE:
    """Return the node's AE with its presentation contexts, AE checks, limits and timeouts."""
    ae = AE(ae_title=node.ae_title)
    for abstract, syntaxes in scp_contexts():
        ae.add_supported_context(abstract, list(syntaxes))
    ae.require_called_aet = node.require_called_aet
    ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    return ae


def tls_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """Return the server TLS context configured by ``tls``, or None when TLS is off.

    Raises
    ------
    ConfigError
        When a certificate, key or CA file cannot be loaded.
    """
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificate, key or CA: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


def start_server(node: NodeSettings, handlers: list[Any], reuse_port: bool = False) -> NodeServer:
    """Start listening on ``node.host:node.port`` in a background thread and return the server.

    Raises
    ------
    ConfigError
        When the address cannot be bound (in use, not permitted) or TLS files are bad.
    """
    ae = build_ae(node)
    server_class = type(
        "ConfiguredNodeServer",
        (NodeServer,),
        {
            "allowed_networks": tuple(ipaddress.ip_network(n, strict=False) for n in node.allowed_ips),
            "reuse_port": reuse_port,
            "handshake_timeout": node.acse_timeout_s,
        },
    )
    try:
        server = ae.make_server(
            (node.host, node.port), ssl_context=tls_context(node.tls), evt_handlers=handlers, server_class=server_class
        )
    except OSError as exc:
        raise ConfigError(f"node.host/node.port: cannot listen on {node.host}:{node.port}: {exc.strerror}") from exc
    if not isinstance(server, NodeServer):
        raise TypeError(f"pynetdicom built a {type(server).__name__}, not the NodeServer asked for")
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="scp-accept", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() stops it, as with ae.start_server
    host, port = server.server_address[:2]
    log.info("scp.listening", ae_title=node.ae_title, host=host, port=port, tls=node.tls.enabled)
    return server
