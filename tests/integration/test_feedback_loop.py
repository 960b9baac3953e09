"""The feedback loop end to end: a site's outcome for one study reaches the neighbour index through the running
worker, and the next radiologist's SR and overlay show that case as confirmed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from cxr_node.app import Receiver, build_worker, provenance
from cxr_node.dicom import status
from cxr_node.infer.registry import load_manifest
from cxr_node.jobs.records import NewOutcome
from cxr_node.jobs.states import JobState
from cxr_node.results.findings import Findings
from cxr_node.results.sc import banner
from cxr_node.training.phantoms import write_phantom_set
from tests.integration.helpers import store_all
from tests.integration.test_calibrate import DEMO, settings_for


def wait_for(done: Callable[[], bool], seconds: float = 60.0) -> None:
    """Poll ``done`` every 0.1 s for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.1)


def test_a_confirmed_outcome_labels_the_case_shown_to_the_next_radiologist(tmp_path: Path) -> None:
    """Image A is analysed and indexed; its study's outcome (positive) is recorded; the idle worker applies it;
    image B of another patient gets A as a similar case, named "confirmed covid" in its SR and overlay."""
    labels = write_phantom_set(tmp_path / "phantoms", n=2, seed=31, size=320, positive_fraction=1.0)
    rows = [line.split(",") for line in labels.read_text().splitlines()[1:]]
    settings = settings_for(tmp_path / "state", **{"neighbours.k": 5})
    node = Receiver(settings).start()
    stop = threading.Event()
    worker = build_worker(settings, node.store)
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert store_all(node.port, [labels.parent / rows[0][0]]) == [status.SUCCESS]
        wait_for(lambda: node.store.jobs.counts()[JobState.WRITTEN] == 1)
        node.store.outcomes.record(NewOutcome("hl7", "MSG-1/1", rows[0][5], "positive", code="840539006"))
        assert worker.feedback is not None
        wait_for(lambda: worker.feedback is not None and worker.feedback.applied > 0, seconds=30)
        assert store_all(node.port, [labels.parent / rows[1][0]]) == [status.SUCCESS]
        wait_for(lambda: node.store.jobs.counts()[JobState.WRITTEN] == 2)
        second = max(job.id for job in node.store.jobs.query(JobState.WRITTEN))
        outputs = {o.kind: o for o in node.store.results.outputs(second)}
        stored = node.store.results.result(second)
    finally:
        stop.set()
        runner.join(30)
        worker.close()
        node.stop(grace_s=2)
    sr = dcmread(settings.storage.root / outputs["sr"].path)
    titles = [str(item.get("TextValue", "")) for item in _items(sr)]
    assert any(t.startswith("Similar case 1: ") and t.endswith("confirmed covid") for t in titles), titles
    assert stored is not None and stored.summary.similar[0].label == "covid"
    shape = stored.summary.analysed_shape or (8, 8)
    findings = Findings(provenance(settings, load_manifest(DEMO)), stored.summary, image=np.zeros(shape, np.float32),
                        lung_mask=np.zeros(shape, bool))  # fmt: skip
    assert any(line.startswith("similar cases: ") and "confirmed covid" in line for line in banner(findings).lines)


def _items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in getattr(ds, "ContentSequence", ()):
        yield item
        yield from _items(item)
