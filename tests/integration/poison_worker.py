"""A worker process whose model kills the process on one marked image (a fault injection for test_leases).

Run as ``python -m tests.integration.poison_worker CONFIG ROWS``: it builds the worker as ``serve`` does (the
real engine, store, writer and leases) around an analyser that SIGKILLs its own process when a batch holds an
image of ``ROWS`` rows, like a segfault or an out-of-memory kill, and stops once no job is queued or running.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

import numpy as np

from cxr_node.app import build_worker, load_model, open_store
from cxr_node.config import load_settings
from cxr_node.infer.engine import Analysis, Engine
from cxr_node.jobs.states import JobState


class KillsOnRows:
    """The real engine, except that an image of ``rows`` rows kills the process."""

    def __init__(self, engine: Engine, rows: int) -> None:
        self.engine = engine
        self.rows = rows

    @property
    def model(self) -> tuple[str, str]:
        """The wrapped engine's identity."""
        return self.engine.model

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]:
        """Analyse, or die like a segfault when the marked image is in the batch."""
        if any(image.shape[0] == self.rows for image in images):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.engine.analyse(images)


def main(config: str, rows: int) -> int:
    """Run the worker until nothing is queued or running."""
    settings = load_settings(config)
    manifest, engine = load_model(settings)
    store = open_store(settings)
    worker = build_worker(settings, store, KillsOnRows(engine, rows), manifest)
    stop = threading.Event()

    def stop_when_idle() -> None:
        while not stop.wait(0.2):
            counts = store.jobs.counts()
            if counts[JobState.QUEUED] + counts[JobState.RUNNING] + counts[JobState.INFERRED] == 0:
                stop.set()

    threading.Thread(target=stop_when_idle, daemon=True).start()
    worker.run(stop)
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
