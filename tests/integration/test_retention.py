"""Retention and purge: finished jobs' files and rows go, in-flight ones stay; `cxr-node purge` removes a study
from the store, the outbox and the neighbour index; `cxr-node resend` re-queues dead jobs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from cxr_node.app import open_index, open_store
from cxr_node.cli import main
from cxr_node.jobs import retention, spool
from cxr_node.jobs.states import JobState
from cxr_node.neighbours import NewCase
from cxr_node.scheduler import Housekeeper
from tests.integration.helpers import write_config
from tests.integration.test_delivery import written_node


def test_retention_purges_finished_jobs_only(make_settings, chest_cr: Path, tiny_manifest: Path) -> None:
    """A delivered job older than retention_days loses its input, outputs and rows; a written one is kept."""
    node = written_node(make_settings, chest_cr, tiny_manifest, 2, **{"storage.retention_days": 1})
    try:
        store, root = node.store, node.settings.storage.root
        first, second = store.jobs.query()
        store.jobs.transition(first.id, JobState.DELIVERED)
        files = [root / first.path, *(root / o.path for o in store.results.outputs(first.id))]
        assert all(path.is_file() for path in files)
        assert retention.expired(store, 1, now=time.time() + 2 * 86400) == [first.id]
        assert retention.purge_jobs(store, root, [first.id]) == 1
        assert not any(path.exists() for path in files)
        assert store.jobs.get(first.id) is None and store.jobs.get(second.id).state is JobState.WRITTEN
        assert Housekeeper(node.settings, store).purge() == 0  # nothing else is old enough
    finally:
        node.stop(grace_s=5)


def test_purge_removes_a_study_everywhere(make_settings, chest_cr, tiny_manifest, tmp_path, capsys) -> None:
    """`cxr-node purge --study` deletes the study's jobs, files and neighbour-index entries."""
    node = written_node(make_settings, chest_cr, tiny_manifest, 1)
    settings = node.settings
    job = node.store.jobs.query()[0]
    node.stop(grace_s=5)
    index = open_index(settings)
    index.add("v1", np.ones(8, np.float32), NewCase(job.sop_instance_uid, job.study_instance_uid, "", "", "p"))
    index.close()
    config = write_config(settings, tmp_path / "node.yaml")
    assert main(["purge", "--config", str(config), "--study", job.study_instance_uid]) == 0
    assert "1 job(s), 1 index entry" in capsys.readouterr().out
    assert not (settings.storage.root / job.path).exists()
    index = open_index(settings)
    assert index.size("v1") == 0
    index.close()


def test_resend_cli(make_settings, chest_cr, tiny_manifest, tmp_path, capsys) -> None:
    """`cxr-node resend --dead` re-queues dead jobs; a job that is not dead or written is a one-line error."""
    node = written_node(make_settings, chest_cr, tiny_manifest, 2)
    first, second = node.store.jobs.query()
    node.store.jobs.transition(first.id, JobState.DEAD, "not delivered: test")
    node.store.jobs.transition(second.id, JobState.DELIVERED)
    node.stop(grace_s=5)
    config = write_config(node.settings, tmp_path / "node.yaml")
    assert main(["resend", "--config", str(config), "--dead"]) == 0
    assert f"re-queued 1 job(s): {first.id}" in capsys.readouterr().out
    assert main(["resend", "--config", str(config), "--job", str(second.id)]) == 1
    assert "only dead or written jobs can be re-sent" in capsys.readouterr().err


@pytest.mark.parametrize("days", [0])
def test_zero_retention_keeps_everything(make_settings, days: float) -> None:
    """retention_days 0 means keep forever."""
    assert retention.expired(None, days) == []  # type: ignore[arg-type]


def test_files_of_receives_that_never_ended_are_swept(make_settings) -> None:
    """A receive that ended without its data set (an A-ABORT or a dropped connection mid C-STORE) left its file in
    the receiving folder until the next start; the sender's housekeeping removes it once untouched for three
    network timeouts (at least 10 minutes), and leaves a receive still being written alone."""
    settings = make_settings(**{"node.network_timeout_s": 300})
    store = open_store(settings)
    try:
        keeper = Housekeeper(settings, store)
        assert keeper.partial_age_s() == 900
        receiving = settings.storage.root / spool.RECEIVING
        receiving.mkdir(parents=True, exist_ok=True)
        old, live = receiving / "abandoned", receiving / "being-received"
        old.write_bytes(b"\0" * 1024)
        live.write_bytes(b"\0" * 1024)
        long_ago = time.time() - 901
        os.utime(old, (long_ago, long_ago))
        assert keeper.sweep_partials() == 1
        assert not old.exists() and live.exists()
    finally:
        store.close()
