"""Worker metrics recorded in other processes reach /metrics through prometheus_client's multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxr_node.app import open_store
from cxr_node.config import Settings
from cxr_node.metrics import MULTIPROCESS_DIR, MetricsServer

WORKER_SCRIPT = "from cxr_node import metrics\nfor _ in range({calls}):\n    metrics.observe_batch(4, 2.0)\n"
"""What a worker records: ``calls`` batches of 4 images taking 2 s each (0.5 s per image)."""


def run_worker(folder: Path, calls: int) -> None:
    """Run a separate Python process that records ``calls`` batches into the multiprocess folder ``folder``."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SCRIPT.format(calls=calls)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics on 127.0.0.1:``port``; return every sample by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize(("processes", "calls"), [(1, 2), (2, 1)], ids=["one-worker", "worker-restarted"])
def test_worker_batches_reach_metrics(
    make_settings: Callable[..., Settings], tmp_path: Path, processes: int, calls: int
) -> None:
    """Two batches of 4 recorded by workers show as 8 images, 4.0 s in all, and 2 batches of size 4."""
    settings = make_settings(**{"storage.root": str(tmp_path / "node")})
    folder = settings.storage.run_dir / MULTIPROCESS_DIR
    folder.mkdir(parents=True)
    for _ in range(processes):
        run_worker(folder, calls)
    store = open_store(settings)
    server = MetricsServer(settings, store).start()
    try:
        samples = scrape(server.httpd.server_address[1])
    finally:
        server.stop()
        store.close()
    assert samples[("cxr_node_inference_seconds_count", ())] == 8
    assert samples[("cxr_node_inference_seconds_sum", ())] == pytest.approx(4.0)
    assert samples[("cxr_node_inference_seconds_bucket", (("le", "0.25"),))] == 0
    assert samples[("cxr_node_inference_seconds_bucket", (("le", "0.5"),))] == 8
    assert samples[("cxr_node_batch_size", (("size", "4"),))] == 2
    assert samples[("cxr_node_jobs", (("state", "queued"),))] == 0
