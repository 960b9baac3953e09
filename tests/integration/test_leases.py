"""Leases and poison jobs: a worker that dies alone gives its jobs back; a job that kills its worker ends dead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.jobs.leases import Holder
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from tests.integration.helpers import echo, small_cr, store_all, wait_for, write_config
from tests.integration.test_crash import start_node

REPO = Path(__file__).resolve().parents[2]
DONE = (JobState.WRITTEN, JobState.DELIVERED)


def test_a_worker_killed_alone_gives_its_jobs_back_when_it_restarts(
    settings: Settings, chest_cr: Path, tmp_path: Path
) -> None:
    """SIGKILL of the worker child while it holds a job: the supervisor restarts it, the new worker takes the job
    back at once (its holder is dead on this host), and every image is written; the node answers all along."""
    settings = settings.with_overrides({"worker.batch_wait_ms": 4000, "worker.batch_size": 8})
    config = write_config(settings, tmp_path / "node.yaml")
    node = start_node(config, settings, tmp_path / "serve.log")
    store = SqliteStore(settings.storage.root / "jobs.sqlite3")
    try:
        assert store_all(settings.node.port, [small_cr(chest_cr, f"lease-{i}") for i in range(3)]) == [0] * 3
        assert wait_for(lambda: store.jobs.counts()[JobState.RUNNING] > 0, 20)
        [running] = [h for h in store.jobs.holders() if h.role == "worker"]
        holder = Holder.parse("worker", running.id)
        assert holder is not None
        os.kill(holder.pid, signal.SIGKILL)  # the worker alone, with jobs in hand (it waits to fill its batch)
        assert echo(settings.node.port) == status.SUCCESS
        assert wait_for(lambda: sum(store.jobs.counts()[s] for s in DONE) == 3, 90), store.jobs.counts()
        histories = [store.jobs.history(job.id) for job in store.jobs.query()]
        assert any(("running", "queued", "its worker stopped while it ran") in h for h in histories)
        assert store.jobs.counts()[JobState.RUNNING] == 0
    finally:
        store.close()
        node.send_signal(signal.SIGTERM)
        node.wait(60)


def test_a_job_that_kills_its_worker_ends_dead_and_harms_no_other(
    settings: Settings, chest_cr: Path, tmp_path: Path
) -> None:
    """A model that kills its process on one image: after worker.max_attempts deaths that job ends dead with the
    reason, and every other job of its first batch is retried alone and written."""
    settings = settings.with_overrides({"worker.max_attempts": 3, "worker.batch_wait_ms": 300})
    config = write_config(settings, tmp_path / "node.yaml")
    receiver = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "receiver", "--config", str(config)],
        stdout=(tmp_path / "receiver.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert wait_for(lambda: echo(settings.node.port) == status.SUCCESS, 60)
        images = [small_cr(chest_cr, "poison", size=200)] + [small_cr(chest_cr, f"ok-{i}") for i in range(4)]
        assert store_all(settings.node.port, images) == [status.SUCCESS] * 5
        runs = []
        for _ in range(6):
            run = subprocess.run(
                [sys.executable, "-m", "tests.integration.poison_worker", str(config), "200"],
                cwd=REPO,
                capture_output=True,
                timeout=120,
                check=False,
            )
            runs.append(run.returncode)
            if run.returncode == 0:
                break
        store = SqliteStore(settings.storage.root / "jobs.sqlite3", readonly=True)
        try:
            jobs = {job.sop_instance_uid: job for job in store.jobs.query()}
        finally:
            store.close()
        poison = jobs[str(images[0].SOPInstanceUID)]
        assert runs == [-signal.SIGKILL] * 3 + [0]
        assert poison.state is JobState.DEAD and poison.reason is not None
        assert poison.reason.startswith("gave up after 3 attempts: its worker stopped while it ran")
        others = [jobs[str(ds.SOPInstanceUID)] for ds in images[1:]]
        assert [job.state for job in others] == [JobState.WRITTEN] * 4
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(60)
