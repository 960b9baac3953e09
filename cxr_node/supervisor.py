"""The process supervisor of ``cxr-node serve``: one child process per role, restarted when it dies.

Children are spawned (fresh interpreters: only the worker imports torch), die with the supervisor
(PR_SET_PDEATHSIG) and are listed in a pid file with their start times, so a restarted supervisor kills a child
a previous run left behind, and only that process, never one that has since reused its pid. What each role runs,
how the store is recovered and the metrics endpoint come from the composition root (:mod:`cxr_node.app`).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Final, Protocol

import structlog

from cxr_node import logs
from cxr_node.config import Settings, systemd_environment
from cxr_node.errors import ConfigError, CxrNodeError
from cxr_node.jobs.leases import start_time
from cxr_node.notify import Notifier

log = structlog.get_logger("cxr_node.supervisor")

PIDS_FILE: Final = "{roles}.pids"
"""Under this host's ``storage.run_dir``."""
STOP_GRACE_S: Final = 30.0
START_TIMEOUT_S: Final = 300.0
RESTART_BACKOFF_S: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
ROLES: Final = ("receiver", "worker", "sender")

RoleRunner = Callable[[str, Settings, Event], int]
"""Runs one role in a child process until SIGTERM: (role, settings, ready event) → exit code. Must be a
module-level function (spawned children receive it by reference)."""


class Stoppable(Protocol):
    """Something the supervisor starts beside its children and stops with them (the metrics endpoint)."""

    def stop(self) -> None:
        """Stop it."""
        ...


@dataclass(frozen=True)
class Wiring:
    """What the composition root gives the supervisor.

    Parameters
    ----------
    run_role : RoleRunner
        The entry point of every child.
    recover : callable
        Brings the store to a consistent state for the roles about to start (no child of them runs yet).
    start_extras : callable
        Starts what runs in the supervisor process itself (the metrics endpoint) and returns it, or None.
    """

    run_role: RoleRunner
    recover: Callable[[Settings, Sequence[str]], None]
    start_extras: Callable[[Settings, Sequence[str]], Stoppable | None]


def _child_main(run_role: RoleRunner, role: str, settings: Settings, ready: Event, parent: int) -> None:
    """Entry point of a child process."""
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before the request above could take effect
        os._exit(1)
    logs.configure(settings.logging.level, settings.logging.format)
    structlog.contextvars.bind_contextvars(role=role, pid=os.getpid())
    try:
        code = run_role(role, settings, ready)
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

    def __init__(self, settings: Settings, roles: Sequence[str], wiring: Wiring) -> None:
        unknown = [role for role in roles if role not in ROLES]
        if unknown:
            raise ValueError(f"roles must be among {ROLES}, found {unknown}")
        self.settings = settings
        self.roles = list(roles)
        self.wiring = wiring
        self.ctx = mp.get_context("spawn")
        self.children: dict[str, BaseProcess] = {}
        self.restarts: dict[str, int] = {}
        self.stopping = threading.Event()
        self.notifier = Notifier.from_environ(systemd_environment())
        self._last_watchdog = 0.0

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
        self.wiring.recover(self.settings, self.roles)
        extras = self.wiring.start_extras(self.settings, self.roles)
        try:
            for name in self._names():
                self._spawn(name)
        except CxrNodeError:
            if extras is not None:
                extras.stop()
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
        if extras is not None:
            extras.stop()
        return self._stop_all()

    def _watchdog(self) -> None:
        """Ping systemd's watchdog (``WatchdogSec=``) every half interval while the supervisor loop runs."""
        interval = self.notifier.watchdog_interval()
        if interval is not None and time.monotonic() - self._last_watchdog >= interval:
            self.notifier.watchdog()
            self._last_watchdog = time.monotonic()

    @property
    def _pids_file(self) -> Path:
        return self.settings.storage.run_dir / PIDS_FILE.format(roles="+".join(self.roles))

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
            target=_child_main,
            args=(self.wiring.run_role, role, self.settings, ready, os.getpid()),
            name=name,
            daemon=False,
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
            try:
                self._spawn(name)
            except CxrNodeError as exc:  # the other roles keep running; the next loop tries again, later
                log.error("child.failed", child=name, error=str(exc))

    def _stop_all(self) -> int:
        log.info("node.stopping")
        for child in self.children.values():
            if child.is_alive() and child.pid is not None:
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
        lines = [f"{c.pid} {start_time(c.pid)}\n" for c in self.children.values() if c.pid is not None]
        path.write_text("".join(lines))

    def _kill_leftovers(self) -> None:
        """Kill children a previous supervisor left running (they would hold the port or the queue).

        A line names a process by pid and start time; a pid now used by another process is left alone.
        """
        path = self._pids_file
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            pid, _, started = line.partition(" ")
            if not pid.isdigit() or int(pid) == os.getpid() or str(start_time(int(pid))) != started.strip():
                continue
            log.warning("node.killed_leftover_child", pid=int(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        path.unlink(missing_ok=True)
