"""No polling timer on the way: a received image wakes the worker, written outputs wake the sender."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from cxr_node.app import Receiver, build_sender, build_worker, open_store
from cxr_node.config import Settings
from cxr_node.dicom import status
from tests.integration.helpers import small_cr, store_all, wait_for
from tests.integration.pacs import Pacs

SLOW_POLL_MS = 60_000
"""Both consumers poll only once a minute here: anything faster is a wake-up call."""


def test_an_image_reaches_the_pacs_without_waiting_for_any_poll(
    make_settings: Callable[..., Settings], chest_cr: Path, tmp_path: Path
) -> None:
    pacs = Pacs(tmp_path / "pacs").start()
    settings = make_settings(
        **{
            "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
            "worker.poll_interval_ms": SLOW_POLL_MS,
            "delivery.poll_interval_ms": SLOW_POLL_MS,
        }
    )
    receiver = Receiver(settings).start()
    stop = threading.Event()
    worker_store, sender_store = open_store(settings), open_store(settings)
    worker = build_worker(settings, worker_store)
    sender = build_sender(settings, sender_store)
    threads = [threading.Thread(target=role.run, args=(stop,), daemon=True) for role in (worker, sender)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # both idle: the worker waits on its queue, the sender's first round is a minute away
        image = small_cr(chest_cr, "wake", size=256)
        sent = time.monotonic()
        assert store_all(receiver.port, [image]) == [status.SUCCESS]
        assert wait_for(lambda: any(ds.Modality == "SR" for ds in pacs.received), 30)
        assert time.monotonic() - sent < SLOW_POLL_MS / 1000 / 2
        referenced = {
            str(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for ds in pacs.received if ds.Modality == "SR"
        }  # fmt: skip
        assert referenced == {str(image.SOPInstanceUID)}
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        worker.close()
        worker_store.close()
        sender_store.close()
        receiver.stop(grace_s=5)
        pacs.stop()
