"""Composition root: Settings → objects → wiring; start, stop, and the process supervisor of ``serve``.

``cxr-node serve`` runs a supervisor that owns one child process per role (``node.receiver_processes``
receivers sharing the port with SO_REUSEPORT; the inference worker joins when a model manifest is
configured). Children die with the supervisor (PR_SET_PDEATHSIG) and a restarted supervisor kills any
child a previous run left behind, so nothing stale keeps the port or the queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Final

import structlog

from cxr_node import logs
from cxr_node.config import Settings
from cxr_node.errors import CxrNodeError, StorageError
from cxr_node.jobs import spool
from cxr_node.jobs.store import SqliteJobStore
from cxr_node.receive.handlers import event_handlers
from cxr_node.receive.intake import Intake
from cxr_node.receive.scp import NodeServer, start_server

log = structlog.get_logger("cxr_node.app")

PIDS_FILE: Final = "run/children.pids"
STOP_GRACE_S: Final = 30.0
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


def recover(settings: Settings) -> None:
    """Bring the store to a consistent state after any stop: partial files, orphans, running jobs."""
    store = open_store(settings)
    try:
        removed = spool.remove_partials(settings.storage.root)
        adopted = Intake(settings, store).adopt_orphans()
        requeued = store.requeue_running("re-queued at start-up")
        log.info("recovery.done", partial_files_removed=removed, orphans_adopted=adopted, jobs_requeued=requeued)
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


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _child_main(role: str, settings: Settings, ready: Any) -> None:
    """Entry point of a child process (spawned: a fresh interpreter that imports no torch here)."""
    _die_with_parent()
    logs.configure(settings.logging.level, settings.logging.format)
    structlog.contextvars.bind_contextvars(role=role, pid=os.getpid())
    try:
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

    def run(self) -> int:
        """Recover, start every child, restart crashed ones, stop all on SIGTERM; return the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stopping.set())
        self._kill_leftovers()
        recover(self.settings)
        for name in self._names():
            self._spawn(name)
        self._write_pids()
        log.info("node.ready", children=len(self.children), port=self.settings.node.port)
        while not self.stopping.wait(0.5):
            self._restart_dead()
        return self._stop_all()

    def _names(self) -> list[str]:
        count = self.settings.node.receiver_processes
        return [f"receiver-{i}" for i in range(count)] if "receiver" in self.roles else []

    def _spawn(self, name: str) -> None:
        ready = self.ctx.Event()
        child = self.ctx.Process(target=_child_main, args=("receiver", self.settings, ready), name=name, daemon=False)
        child.start()
        if not ready.wait(timeout=60) and child.exitcode is not None:
            raise CxrNodeError(f"{name} exited with code {child.exitcode} at start-up; see the log above")
        self.children[name] = child

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
            self._write_pids()

    def _stop_all(self) -> int:
        log.info("node.stopping")
        for child in self.children.values():
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        for child in self.children.values():
            child.join(STOP_GRACE_S + 5)
            if child.is_alive():
                child.kill()
        (self.settings.storage.root / PIDS_FILE).unlink(missing_ok=True)
        log.info("node.stopped")
        return 0

    def _write_pids(self) -> None:
        path = self.settings.storage.root / PIDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{c.pid}\n" for c in self.children.values()))

    def _kill_leftovers(self) -> None:
        """Kill children a previous supervisor left running (they would hold the port or the queue)."""
        path = self.settings.storage.root / PIDS_FILE
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
    """Run the node in the foreground: ``all`` (supervised children) or one role in this process."""
    if role == "receiver":
        recover(settings)
        return run_receiver(settings)
    return Supervisor(settings, ["receiver"]).run()
