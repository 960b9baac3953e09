"""Composition root: Settings → objects → wiring; start, stop, and the process supervisor of ``serve``.

``cxr-node serve`` runs a supervisor that owns one child process per role (``node.receiver_processes``
receivers sharing the port with SO_REUSEPORT, and one inference worker). Children die with the supervisor
(PR_SET_PDEATHSIG) and a restarted supervisor kills any child a previous run left behind, so nothing stale
keeps the port or the queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from cxr_node import logs
from cxr_node.config import Settings, systemd_environment
from cxr_node.errors import ConfigError, CxrNodeError, StorageError
from cxr_node.jobs import spool
from cxr_node.jobs.store import SqliteJobStore
from cxr_node.notify import Notifier
from cxr_node.receive.handlers import event_handlers
from cxr_node.receive.intake import Intake
from cxr_node.receive.scp import NodeServer, spool_received_into, start_server

log = structlog.get_logger("cxr_node.app")

PIDS_FILE: Final = "run/{roles}.pids"
STOP_GRACE_S: Final = 30.0
START_TIMEOUT_S: Final = 300.0
RESTART_BACKOFF_S: Final = (1.0, 2.0, 5.0, 10.0, 30.0)


def open_store(settings: Settings, readonly: bool = False) -> SqliteJobStore:
    """Open the jobs database under ``storage.root``, creating the root when writable.

    Raises
    ------
    StorageError
        With the path and what to do, when the root cannot be created or the database opened.
    """
    root = settings.storage.root
    if readonly and not (root / spool.DB_NAME).exists():
        raise StorageError(f"{root / spool.DB_NAME}: no jobs database yet (has the node run with this storage.root?)")
    if not readonly:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"storage.root {root}: cannot create it ({exc.strerror}); set storage.root in {settings.source}"
            ) from exc
        if not os.access(root, os.W_OK):
            raise StorageError(f"storage.root {root}: not writable by this user; set storage.root in {settings.source}")
    return SqliteJobStore(root / spool.DB_NAME, fsync=settings.storage.fsync, readonly=readonly)


def recover(settings: Settings, roles: Sequence[str] = ("receiver", "worker")) -> None:
    """Bring the store to a consistent state after any stop, for the roles about to start.

    Receiving: partial and half-received files are removed, stored files without a job are adopted.
    Working: jobs left running are re-queued. Each is safe only while no process of that role runs.
    """
    store = open_store(settings)
    try:
        if "receiver" in roles:
            removed = spool.remove_partials(settings.storage.root)
            adopted = Intake(settings, store).adopt_orphans()
            log.info("recovery.receiving", partial_files_removed=removed, orphans_adopted=adopted)
        if "worker" in roles:
            log.info("recovery.jobs", jobs_requeued=store.requeue_running("re-queued at start-up"))
    finally:
        store.close()


class Receiver:
    """The receiver role: the SCP and the intake writing to the durable store."""

    def __init__(self, settings: Settings, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.store = open_store(settings)
        self.intake = Intake(settings, self.store)
        self.server: NodeServer | None = None

    @property
    def port(self) -> int:
        """The port the SCP listens on (useful when configured as 0)."""
        if self.server is None:
            raise RuntimeError("the receiver is not started")
        return int(self.server.server_address[1])

    def start(self) -> Receiver:
        """Start accepting associations."""
        spool_received_into(self.settings.storage.root / spool.RECEIVING)
        self.server = start_server(self.settings.node, event_handlers(self.intake), reuse_port=self.reuse_port)
        return self

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, let open associations finish (up to ``grace_s``), then close the store."""
        if self.server is not None:
            ae = self.server.ae
            self.server.shutdown()
            deadline = time.monotonic() + grace_s
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in ae.active_associations:
                assoc.abort()
            self.server = None
        self.store.close()
        log.info("receiver.stopped")


def run_receiver(settings: Settings, reuse_port: bool = False, ready: Any = None) -> int:
    """Run the receiver in this process until SIGTERM or SIGINT; return the exit code."""
    stop = _stop_event()
    receiver = Receiver(settings, reuse_port=reuse_port).start()
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("receiver.stopping")
    receiver.stop()
    return 0


def run_worker(settings: Settings, ready: Any = None) -> int:
    """Run the inference worker in this process until SIGTERM or SIGINT; return the exit code.

    torch is imported here, in the worker process only.

    Raises
    ------
    ModelError
        When the manifest or its weights cannot be loaded (missing, wrong checksum, no CUDA device).
    """
    from cxr_node.infer.classify import RuntimeOptions
    from cxr_node.infer.device import resolve_device
    from cxr_node.infer.engine import Engine
    from cxr_node.infer.registry import load_manifest
    from cxr_node.pipeline import IndexRetriever, OutputWriter, Worker

    stop = _stop_event()
    options = RuntimeOptions(
        device=resolve_device(settings.compute.device),
        channels_last=settings.worker.channels_last,
        precision=settings.worker.precision,
    )
    manifest = load_manifest(settings.models.manifest)
    engine = Engine.from_manifest(manifest, options)
    log.info("worker.model_loaded", model=engine.model[0], version=engine.model[1], device=str(options.device))
    store = open_store(settings)
    writer = OutputWriter(
        settings.storage.root,
        store,
        provenance(settings, manifest),
        settings.results,
        destinations=[destination.name for destination in settings.destinations],
        fsync=settings.storage.fsync,
    )
    index = open_index(settings) if settings.neighbours.k else None
    retriever = IndexRetriever(index, settings.neighbours) if index is not None else None
    if ready is not None:
        ready.set()
    try:
        Worker(settings.storage.root, store, engine, settings.worker, writer=writer, retriever=retriever).run(stop)
    finally:
        store.close()
        if index is not None:
            index.checkpoint()
            index.close()
    return 0


def open_index(settings: Settings) -> Any:
    """The persistent neighbour index under ``storage.root/index``."""
    from cxr_node.neighbours import SqliteNeighbourIndex

    return SqliteNeighbourIndex(settings.storage.root / "index", fsync=settings.storage.fsync)


def purge_index(settings: Settings, studies: Sequence[str]) -> int:
    """Remove studies from the neighbour index (retention, ``cxr-node purge``); return the entries removed."""
    if not (settings.storage.root / "index").exists():
        return 0
    index = open_index(settings)
    try:
        return sum(index.purge_study(study) for study in studies)
    finally:
        index.close()


def run_sender(settings: Settings, ready: Any = None) -> int:
    """Run the sender (deliveries to the destinations, probes, retention) until SIGTERM or SIGINT."""
    from cxr_node.metrics import SENDER_HEARTBEAT
    from cxr_node.scheduler import run_sender as run

    stop = _stop_event()
    store = open_store(settings)
    if ready is not None:
        ready.set()
    try:
        run(
            settings,
            store,
            stop,
            heartbeat=settings.storage.root / SENDER_HEARTBEAT,
            on_purge=lambda studies: purge_index(settings, studies),
        )
    finally:
        store.close()
    return 0


def provenance(settings: Settings, manifest: Any) -> Any:
    """Who makes the outputs: the manifest's model and this node (name, version, intended use, device UID)."""
    from cxr_node import __version__
    from cxr_node.dicom.uids import device_uid
    from cxr_node.results.findings import Provenance

    return Provenance(
        model_name=manifest.name,
        model_version=manifest.version,
        intended_use=manifest.intended_use,
        members=tuple(member.name for member in manifest.classifier.members),
        software_version=__version__,
        device_uid=device_uid(settings.node.ae_title),
    )


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _child_main(role: str, settings: Settings, ready: Any, parent: int) -> None:
    """Entry point of a child process (spawned: a fresh interpreter; only the worker imports torch)."""
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before the request above could take effect
        os._exit(1)
    logs.configure(settings.logging.level, settings.logging.format)
    structlog.contextvars.bind_contextvars(role=role, pid=os.getpid())
    try:
        if role == "worker":
            code = run_worker(settings, ready=ready)
        elif role == "sender":
            code = run_sender(settings, ready=ready)
        else:
            code = run_receiver(settings, reuse_port=True, ready=ready)
    except CxrNodeError as exc:
        log.error("child.failed", error=str(exc))
        code = exc.exit_code
    os._exit(code)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies (even by kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts, watches and stops the child processes of ``cxr-node serve``."""

    def __init__(self, settings: Settings, roles: list[str]) -> None:
        self.settings = settings
        self.roles = roles
        self.ctx = mp.get_context("spawn")
        self.children: dict[str, Any] = {}
        self.restarts: dict[str, int] = {}
        self.stopping = threading.Event()
        self.notifier = Notifier.from_environ(systemd_environment())
        self._last_watchdog = 0.0

    def _watchdog(self) -> None:
        """Ping systemd's watchdog (``WatchdogSec=``) every half interval while the supervisor loop runs."""
        interval = self.notifier.watchdog_interval()
        if interval is not None and time.monotonic() - self._last_watchdog >= interval:
            self.notifier.watchdog()
            self._last_watchdog = time.monotonic()

    def run(self) -> int:
        """Recover, start every child, restart crashed ones, stop all on SIGTERM; return the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stopping.set())
        if "worker" in self.roles and not self.settings.models.manifest.is_file():
            raise ConfigError(
                f"{self.settings.source}: models.manifest: {self.settings.models.manifest} not found "
                f"(relative paths are read from {Path.cwd()})"
            )
        self._kill_leftovers()
        recover(self.settings, self.roles)
        metrics = self._start_metrics()
        try:
            for name in self._names():
                self._spawn(name)
        except CxrNodeError:
            if metrics is not None:
                metrics.stop()
            self._stop_all()
            raise
        self._ready_file.write_text(f"{os.getpid()}\n")
        log.info("node.ready", children=len(self.children), port=self.settings.node.port)
        self.notifier.ready(
            f"{self.settings.node.ae_title} on port {self.settings.node.port}; {', '.join(self.children)}"
        )
        while not self.stopping.wait(0.5):
            self._restart_dead()
            self._watchdog()
        self.notifier.stopping("stopping: finishing work in hand")
        if metrics is not None:
            metrics.stop()
        return self._stop_all()

    def _start_metrics(self) -> Any:
        """The /metrics and /healthz endpoint (when enabled and this supervisor runs the receivers or all)."""
        if not self.settings.metrics.enabled or "receiver" not in self.roles:
            return None
        from cxr_node.metrics import MetricsServer

        try:
            return MetricsServer(self.settings, open_store(self.settings)).start()
        except OSError as exc:
            raise ConfigError(
                f"{self.settings.source}: metrics.port: cannot listen on {self.settings.metrics.host}:"
                f"{self.settings.metrics.port}: {exc.strerror}"
            ) from exc

    @property
    def _pids_file(self) -> Path:
        return self.settings.storage.root / PIDS_FILE.format(roles="+".join(self.roles))

    @property
    def _ready_file(self) -> Path:
        """Exists while every child is up (written after the last one reported ready, removed at stop)."""
        return self._pids_file.with_suffix(".ready")

    def _names(self) -> list[str]:
        count = self.settings.node.receiver_processes
        names = [f"receiver-{i}" for i in range(count)] if "receiver" in self.roles else []
        return names + [role for role in ("worker", "sender") if role in self.roles]

    def _spawn(self, name: str) -> None:
        role = name.split("-")[0]
        ready = self.ctx.Event()
        child = self.ctx.Process(
            target=_child_main, args=(role, self.settings, ready, os.getpid()), name=name, daemon=False
        )
        child.start()
        self.children[name] = child
        self._write_pids()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(timeout=0.2) and time.monotonic() < deadline:
            if child.exitcode is not None:
                raise CxrNodeError(f"{name} exited with code {child.exitcode} at start-up; see the log above")

    def _restart_dead(self) -> None:
        for name, child in list(self.children.items()):
            if child.is_alive() or self.stopping.is_set():
                continue
            count = self.restarts.get(name, 0)
            delay = RESTART_BACKOFF_S[min(count, len(RESTART_BACKOFF_S) - 1)]
            log.error("child.died", child=name, exitcode=child.exitcode, restart_in_s=delay)
            if self.stopping.wait(delay):
                return
            self.restarts[name] = count + 1
            self._spawn(name)

    def _stop_all(self) -> int:
        log.info("node.stopping")
        for child in self.children.values():
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        for child in self.children.values():
            child.join(STOP_GRACE_S + 5)
            if child.is_alive():
                child.kill()
        self._pids_file.unlink(missing_ok=True)
        self._ready_file.unlink(missing_ok=True)
        log.info("node.stopped")
        return 0

    def _write_pids(self) -> None:
        path = self._pids_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{c.pid}\n" for c in self.children.values()))

    def _kill_leftovers(self) -> None:
        """Kill children a previous supervisor left running (they would hold the port or the queue)."""
        path = self._pids_file
        if not path.exists():
            return
        for line in path.read_text().split():
            if _is_our_process(int(line)):
                log.warning("node.killed_leftover_child", pid=int(line))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line), signal.SIGKILL)
        path.unlink(missing_ok=True)


def _is_our_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"multiprocessing" in cmdline and pid != os.getpid()


def serve(settings: Settings, role: str = "all") -> int:
    """Run the node in the foreground: every role (``all``) or one, as supervised child processes.

    ``receiver`` runs ``node.receiver_processes`` receivers; ``worker`` the inference worker; ``sender``
    the deliveries and housekeeping. One unit per role makes a split deployment on one storage root.
    """
    roles = ["receiver", "worker", "sender"] if role == "all" else [role]
    return Supervisor(settings, roles).run()
