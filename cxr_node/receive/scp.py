"""The SCP: an Application Entity built from Settings, listening with the node's limits and TLS.

:class:`NodeServer` adds what pynetdicom's server lacks: an IP allow-list checked before any DICOM is
read, connection limits per peer address and in all, sockets whose reads are bounded in time and PDU
length (:mod:`cxr_node.receive.connections`), the TLS handshake moved off the accept loop into the
association's thread, SO_REUSEPORT so several receiver processes can share one port, associations that stream
P-DATA into the spool file and sleep on events (:mod:`cxr_node.receive.streaming`), and no full garbage
collection while associations are open.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import ipaddress
import socket
import ssl
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from cxr_node.config import NodeSettings, TLSSettings
from cxr_node.dicom.sop import scp_contexts
from cxr_node.errors import ConfigError
from cxr_node.receive.connections import (
    ConnectionLimits,
    GuardedSocket,
    GuardedSSLSocket,
    PeerSlots,
    RateLimitedLog,
    guard,
)
from cxr_node.receive.guards import install_spool, installed_spool
from cxr_node.receive.streaming import StreamingRequestHandler

log = structlog.get_logger("cxr_node.receive")

GC_EVERY_S = 10.0
"""Least time between the full garbage collections the server runs while no association is open."""


class SharedContexts(list[PresentationContext]):
    """The SCP's presentation contexts, shared by every association instead of deep-copied for each.

    pynetdicom 3.0 deep-copies the server's contexts into each accepted association (``RequestHandler.
    _create_association``) and then only reads them (``negotiate_as_acceptor``). With every storage class
    and transfer syntax that copy costs about 80 ms of CPU and 1.3 MB per connection, paid before the peer has
    sent a byte: under a flood of connections, most of the receiver's time. Pinned by a test.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with an IP allow-list, connection limits, lazy TLS, SO_REUSEPORT."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    reuse_port: bool = False
    limits: ConnectionLimits = ConnectionLimits.from_node(artim_s=10.0, network_timeout_s=60.0, max_pdu=0)
    slots: PeerSlots = PeerSlots(per_peer=16, total=128)
    refusals: RateLimitedLog = RateLimitedLog()
    # socketserver listens with a backlog of 5: a burst of connections (a flood) would make the kernel drop
    # the SYNs of a legitimate PACS, which then waits for TCP's retransmission (1 s, 3 s, 7 s...).
    request_queue_size = 256
    # The TLS handshake runs in the request thread: don't let server_close() join it (a stalled peer
    # would hold shutdown until its ARTIM deadline). Association threads are pynetdicom's own.
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)
        self.connections: weakref.WeakSet[GuardedSocket] = weakref.WeakSet()
        self._collected_at = time.monotonic()

    def service_actions(self) -> None:
        """Collect garbage only while no association is open, and at most every :data:`GC_EVERY_S`.

        pynetdicom 3.0's server runs a full ``gc.collect()`` every 60 turns of its accept loop (every 3 s at the
        node's 50 ms poll), wherever its associations are: the collection holds the GIL for tens of milliseconds
        and stalls every association of the process (a quarter of the receiver's GIL time with 4 associations,
        by py-spy). Python's own generational collection still runs; this only moves pynetdicom's extra one.
        """
        now = time.monotonic()
        if now - self._collected_at >= GC_EVERY_S and not self.active_associations:
            self._collected_at = now
            gc.collect()

    def server_close(self) -> None:
        """Stop listening, and end the connections still waiting for their A-ASSOCIATE-RQ at once.

        Their reader threads would otherwise block shutdown until the ARTIM deadline; associations already
        requested are left to finish (the receiver gives them a grace period, then aborts them).
        """
        super().server_close()
        for sock in list(self.connections):
            if sock.gate is not None and sock.gate.deadline is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

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
        """Accept a connection, wrap it for TLS without handshaking (done in its own thread), and guard it.

        The guard starts the connection's ARTIM deadline now and bounds every read pynetdicom makes.
        """
        client, address = self.listening.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return guard(client, self.limits, f"{address[0]}:{address[1]}"), address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse, before reading any PDU, addresses outside ``node.allowed_ips`` and peers over their slots."""
        peer = f"{client_address[0]}:{client_address[1]}"
        if self.allowed_networks:
            address = ipaddress.ip_address(client_address[0])
            if not any(address in network for network in self.allowed_networks):
                log.warning("assoc.refused_address", peer=peer)
                return False
        refused = self.slots.take(client_address[0])
        if refused:
            self.refusals.warning("assoc.refused_connection", client_address[0], peer=peer, reason=refused)
            return False
        if isinstance(request, GuardedSocket):
            request.when_closed(functools.partial(self.slots.give, client_address[0]))
            self.connections.add(request)
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Finish the TLS handshake in the association's thread (within the ARTIM deadline), then run it."""
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self._time_left(request))
                request.do_handshake()
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                log.warning("assoc.tls_failed", peer=f"{client_address[0]}:{client_address[1]}", error=str(exc))
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def _time_left(self, request: socket.socket) -> float:
        """Seconds left until a guarded connection's ARTIM deadline (at least a millisecond)."""
        gate = request.gate if isinstance(request, GuardedSocket) else None
        if gate is None or gate.deadline is None:
            return self.limits.artim_s
        return max(gate.deadline - time.monotonic(), 0.001)


def spool_received_into(folder: Path, max_bytes: int | None = None, flush: bool = False) -> None:
    """Make pynetdicom write each incoming data set to a file in ``folder`` as it arrives.

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom streams the data set to a ``NamedTemporaryFile`` in the
    default temporary folder; pointing that at the storage root's receiving folder (same filesystem as the
    inbox) lets the handler file an instance by renaming it, with no copy of it in memory. The files stop
    growing past ``max_bytes`` (:class:`~cxr_node.receive.guards.SpoolFiles`; :func:`start_server` sets it from
    ``node.max_instance_mb``). This sets process-wide state of pynetdicom 3.0 (pinned), as a receiver process
    owns its pynetdicom. ``flush`` starts writing each file to disk while it arrives (``storage.fsync``).
    """
    install_spool(folder, max_bytes, flush)


def build_ae(node: NodeSettings) -> AE:
    """Return the node's AE with its presentation contexts, AE checks, limits and timeouts."""
    ae = AE(ae_title=node.ae_title)
    for abstract, syntaxes in scp_contexts():
        ae.add_supported_context(abstract, list(syntaxes))
    ae.require_called_aet = node.require_called_aet
    ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu
    ae.acse_timeout = node.acse_timeout_s  # each association waits node.artim_timeout_s for its request
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    return ae


def tls_context(
    tls: TLSSettings, key: str = "node.tls", socket_class: type[ssl.SSLSocket] = GuardedSSLSocket
) -> ssl.SSLContext | None:
    """Return the server TLS context configured by ``tls`` (the config section ``key``), or None when TLS is off.

    The SCP's and the STOW-RS endpoint's: TLS 1.2 or later, and client certificates (when required) checked
    against ``ca_file`` only; ``socket_class`` bounds the decrypted reads like plain ones.

    Raises
    ------
    ConfigError
        When a certificate, key or CA file cannot be loaded.
    """
    if not tls.enabled:
        return None
    # A bare server context: client certificates are checked against ca_file only, never the system's CAs
    # (create_default_context would trust every public CA for them).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot load certificate, key or CA: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    context.sslsocket_class = socket_class
    return context


def _set_acse_timeout(event: Event, seconds: float) -> None:
    """Set the association's ACSE timeout (public pynetdicom API, read when it waits for ACSE messages)."""
    event.assoc.acse_timeout = seconds


def artim_handlers(node: NodeSettings) -> list[Any]:
    """Handlers making an association wait ``node.artim_timeout_s`` for its A-ASSOCIATE-RQ, then the ACSE timeout.

    An acceptor's thread waits for the request for its ``acse_timeout`` before ending; the socket's own ARTIM
    deadline (:class:`~cxr_node.receive.connections.PduGate`) ends the read, this ends the thread, so a stalled
    peer's slot is freed at the ARTIM deadline, not at the (longer) ACSE timeout.
    """
    return [
        (evt.EVT_CONN_OPEN, _set_acse_timeout, [node.artim_timeout_s]),
        (evt.EVT_REQUESTED, _set_acse_timeout, [node.acse_timeout_s]),
    ]


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
            "limits": ConnectionLimits.from_node(node.artim_timeout_s, node.network_timeout_s, node.max_pdu),
            # beyond twice max_associations a connection would only be rejected: refuse it before it costs threads
            "slots": PeerSlots(node.max_associations_per_peer, 2 * node.max_associations),
            "refusals": RateLimitedLog(),
        },
    )
    spool = installed_spool()
    if spool is not None:
        spool.max_bytes = node.max_instance_bytes
    try:
        server = ae.make_server(
            (node.host, node.port),
            ssl_context=tls_context(node.tls),
            evt_handlers=[*handlers, *artim_handlers(node)],
            server_class=server_class,
            request_handler=StreamingRequestHandler,
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
