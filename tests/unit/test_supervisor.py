"""The supervisor's pid file: processes named by pid and start time, leftovers killed, recycled pids spared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cxr_node.config import Settings
from cxr_node.supervisor import Stoppable, Supervisor, Wiring, start_time


def run_nothing(role: str, settings: Settings, ready: Event) -> int:
    """A role runner that never runs here (the tests spawn no child through the supervisor)."""
    ready.set()
    return 0


def recover_nothing(settings: Settings, roles: Sequence[str]) -> None:
    """A store recovery with nothing to recover."""


def start_nothing(settings: Settings, roles: Sequence[str]) -> Stoppable | None:
    """Start nothing beside the children."""
    return None


WIRING = Wiring(run_role=run_nothing, recover=recover_nothing, start_extras=start_nothing)


@pytest.fixture
def supervisor(make_settings: Callable[..., Settings]) -> Supervisor:
    """A supervisor of the worker role on a temporary storage root, not running."""
    return Supervisor(make_settings(), ["worker"], WIRING)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real child process that sleeps for a minute; killed and reaped at teardown whatever happened."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


def pids_file(supervisor: Supervisor) -> Path:
    """Return where ``supervisor`` keeps its children's pids and start times."""
    path = supervisor.settings.storage.root / "run" / "worker.pids"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def still_running(child: subprocess.Popen[bytes], wait_s: float) -> bool:
    """Return True when ``child`` has not exited within ``wait_s`` seconds."""
    try:
        child.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return True
    return False


def test_start_time_is_stable_and_none_for_no_process() -> None:
    """A live process has one integer start time, the same at every call; a pid with no process has none."""
    first = start_time(os.getpid())
    assert isinstance(first, int)
    assert start_time(os.getpid()) == first
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert start_time(pid_max + 1) is None


def test_start_time_of_a_later_process_is_not_earlier(sleeper: subprocess.Popen[bytes]) -> None:
    """A child started after this process has a start time no earlier than this process's."""
    mine, child = start_time(os.getpid()), start_time(sleeper.pid)
    assert mine is not None and child is not None
    assert child >= mine


def test_leftover_child_is_killed(supervisor: Supervisor, sleeper: subprocess.Popen[bytes]) -> None:
    """A process listed with its pid and its own start time is killed, logged, and the pid file removed."""
    path = pids_file(supervisor)
    path.write_text(f"{sleeper.pid} {start_time(sleeper.pid)}\n")
    with capture_logs() as events:
        supervisor._kill_leftovers()
    assert not still_running(sleeper, 10)
    assert sleeper.returncode == -signal.SIGKILL
    assert [e for e in events if e["event"] == "node.killed_leftover_child"] == [
        {"event": "node.killed_leftover_child", "pid": sleeper.pid, "log_level": "warning"}
    ]
    assert not path.exists()


def test_recycled_pid_is_spared(supervisor: Supervisor, sleeper: subprocess.Popen[bytes]) -> None:
    """A listed pid whose process has another start time (the pid was reused) is not killed."""
    started = start_time(sleeper.pid)
    assert started is not None
    path = pids_file(supervisor)
    path.write_text(f"{sleeper.pid} {started + 1}\n")
    with capture_logs() as events:
        supervisor._kill_leftovers()
    assert still_running(sleeper, 0.5)
    assert not [e for e in events if e["event"] == "node.killed_leftover_child"]
    assert not path.exists()


def test_old_format_line_is_ignored(supervisor: Supervisor, sleeper: subprocess.Popen[bytes]) -> None:
    """A line of the old format (pid only, no start time) kills nothing."""
    pids_file(supervisor).write_text(f"{sleeper.pid}\n")
    supervisor._kill_leftovers()
    assert still_running(sleeper, 0.5)


def test_no_pids_file_is_nothing_to_do(supervisor: Supervisor) -> None:
    """Without a pid file (a first start) nothing is killed and nothing is written."""
    supervisor._kill_leftovers()
    assert not (supervisor.settings.storage.root / "run" / "worker.pids").exists()
