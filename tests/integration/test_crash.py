"""Crash safety of the real service: `cxr-node serve` killed with SIGKILL right after Success answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.jobs import spool
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from tests.integration.helpers import echo, small_cr, store_all, write_config


def start_node(config: Path, settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """Start `cxr-node serve` in its own process group; wait (bounded) until every child is up and it echoes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"cxr-node serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        ready = (settings.storage.root / "run/receiver+worker+sender.ready").exists()
        if ready and echo(settings.node.port) == status.SUCCESS:
            return proc
        time.sleep(0.2)
    raise AssertionError("cxr-node serve did not answer C-ECHO within 60 s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_kill_9_after_success_loses_nothing(settings: Settings, chest_cr: Path, tmp_path: Path) -> None:
    """Every instance answered Success is on disk with its job after SIGKILL of the whole service and a restart."""
    config = write_config(settings.with_overrides({"logging.format": "json"}), tmp_path / "node.yaml")
    log = tmp_path / "serve.log"
    node = start_node(config, settings, log)
    pids = (settings.storage.root / "run/receiver+worker+sender.pids").read_text().splitlines()
    children = [int(line.split()[0]) for line in pids]
    datasets = [small_cr(chest_cr, f"kill-{i}", size=256) for i in range(20)]
    assert store_all(settings.node.port, datasets) == [status.SUCCESS] * 20
    os.killpg(node.pid, signal.SIGKILL)  # the whole process group, right after the last Success
    node.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)

    store = SqliteStore(settings.storage.root / spool.DB_NAME, readonly=True)
    jobs = {j.sop_instance_uid: j for j in store.jobs.query()}
    store.close()
    for ds in datasets:
        job = jobs[str(ds.SOPInstanceUID)]
        assert job.state in (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED)  # the worker may have begun
        assert (settings.storage.root / job.path).stat().st_size > 256 * 256 * 2

    node = start_node(config, settings, log)  # restarts cleanly on the same port and state
    try:
        assert store_all(settings.node.port, [small_cr(chest_cr, "after-restart", size=256)]) == [status.SUCCESS]
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0
    assert '"event": "node.stopped"' in log.read_text()


def test_children_die_with_a_killed_supervisor(settings: Settings, tmp_path: Path) -> None:
    """SIGKILL of the supervisor alone takes its receiver children down, so no stale process keeps the port."""
    config = write_config(settings, tmp_path / "node.yaml")
    node = start_node(config, settings, tmp_path / "serve.log")
    pids = (settings.storage.root / "run/receiver+worker+sender.pids").read_text().splitlines()
    children = [int(line.split()[0]) for line in pids]
    node.kill()
    node.wait(10)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children if _alive(pid)]
    assert survivors == []
    node = start_node(config, settings, tmp_path / "serve.log")
    node.send_signal(signal.SIGTERM)
    assert node.wait(30) == 0
