"""Back-pressure: over the queue depth or the disk limit, C-STOREs get 0xA700 and nothing is written."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from cxr_node.app import Receiver
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.receive.pressure import disk_used_fraction
from tests.integration.helpers import small_cr, store_all


def test_a_full_queue_answers_out_of_resources(make_settings: Callable[..., Settings], chest_cr: Path) -> None:
    """With node.max_queue_depth 2 and two images waiting, the next one gets 0xA700 and is not recorded."""
    node = Receiver(make_settings(**{"node.max_queue_depth": 2})).start()
    try:
        assert store_all(node.port, [small_cr(chest_cr, f"q{i}") for i in range(2)]) == [status.SUCCESS] * 2
        time.sleep(1.1)  # the limit is measured at most once a second
        assert store_all(node.port, [small_cr(chest_cr, "q-over")]) == [status.OUT_OF_RESOURCES]
        assert sum(node.store.jobs.counts().values()) == 2
    finally:
        node.stop(grace_s=5)


def test_a_full_disk_answers_out_of_resources(make_settings: Callable[..., Settings], chest_cr: Path) -> None:
    """A disk limit below the current use refuses every instance with 0xA700."""
    settings = make_settings()
    settings.storage.root.mkdir(parents=True, exist_ok=True)
    used = disk_used_fraction(settings.storage.root) * 100
    node = Receiver(settings.with_overrides({"storage.max_disk_percent": max(used - 1, 0.5)})).start()
    try:
        assert store_all(node.port, [small_cr(chest_cr, "disk")]) == [status.OUT_OF_RESOURCES]
        assert sum(node.store.jobs.counts().values()) == 0
    finally:
        node.stop(grace_s=5)


def test_a_store_holding_max_jobs_answers_out_of_resources(
    make_settings: Callable[..., Settings], chest_cr: Path
) -> None:
    """With storage.max_jobs 2 and two jobs kept (skipped ones count too), the next instance gets 0xA700."""
    node = Receiver(make_settings(**{"storage.max_jobs": 2})).start()
    try:
        images = [small_cr(chest_cr, "rows-0"), small_cr(chest_cr, "rows-1", ViewPosition="LL")]
        assert store_all(node.port, images) == [status.SUCCESS] * 2
        time.sleep(1.1)  # the limit is measured at most once a second
        assert store_all(node.port, [small_cr(chest_cr, "rows-over")]) == [status.OUT_OF_RESOURCES]
        assert sum(node.store.jobs.counts().values()) == 2
    finally:
        node.stop(grace_s=5)
