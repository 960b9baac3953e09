"""One job end to end, and the worker loop that runs jobs in batches.

Each step is a named function with a typed input and output:
``claim`` (queued → running) → :func:`load_image` (file → DecodedImage) → ``Analyser.analyse`` (arrays →
Analysis) → :func:`summarise` (Analysis → JSON-able findings) → ``save_result`` (running → inferred).
An image that cannot be decoded, or whose analysis raises, ends ``quarantined`` with the reason; the
worker keeps going.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from cxr_node.config import WorkerSettings
from cxr_node.dicom.pixels import DecodedImage, decode
from cxr_node.errors import PixelDecodeError
from cxr_node.infer.engine import Analysis
from cxr_node.jobs.states import JobState
from cxr_node.jobs.store import Job, JobStore

log = structlog.get_logger("cxr_node.worker")


class Analyser(Protocol):
    """What the worker needs from inference: a model identity and a batch analysis."""

    @property
    def model(self) -> tuple[str, str]: ...

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]: ...


@dataclass(frozen=True)
class Loaded:
    """A running job with its decoded image."""

    job: Job
    image: DecodedImage


def load_image(root: Path, job: Job, max_side: int) -> DecodedImage:
    """Read and decode the job's stored instance.

    Raises
    ------
    PixelDecodeError
        When the file is missing, is not DICOM, or its pixels cannot be decoded.
    """
    if job.path is None:
        raise PixelDecodeError("the job has no stored file")
    try:
        ds = dcmread(root / job.path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise PixelDecodeError(f"stored file cannot be read: {exc}") from exc
    return decode(ds, max_side=max_side)


def summarise(image: DecodedImage, analysis: Analysis, model: tuple[str, str]) -> dict[str, Any]:
    """Return the JSON-able findings of one analysis, as recorded in the jobs store."""
    quality = analysis.quality
    return {
        "status": "analysed" if analysis.analysed else "not_analysed",
        "reason": analysis.reason,
        "model": {"name": model[0], "version": model[1]},
        "probability": analysis.probability,
        "positive": analysis.positive,
        "threshold": analysis.threshold,
        "members": analysis.member_probs,
        "lung_mask": {
            "plausible": quality.ok,
            "verdict": quality.reason,
            "area_fraction": round(quality.area_fraction, 4),
            "components": quality.components,
        },
        "image": {
            "original_shape": list(image.original_shape),
            "analysed_shape": list(image.pixels.shape),
            "pixel_spacing_mm": list(image.pixel_spacing_mm) if image.pixel_spacing_mm else None,
            "photometric": image.photometric,
        },
        "timings_ms": {key: round(value, 2) for key, value in analysis.timings_ms.items()},
    }


class Worker:
    """Takes queued jobs in batches, analyses them and records the results.

    Parameters
    ----------
    root : Path
        The storage root (job paths are relative to it).
    store : JobStore
        The jobs store.
    analyser : Analyser
        The inference engine.
    settings : WorkerSettings
        Batch size, batch wait, poll interval, decode size.
    """

    def __init__(self, root: Path, store: JobStore, analyser: Analyser, settings: WorkerSettings) -> None:
        self.root = root
        self.store = store
        self.analyser = analyser
        self.settings = settings

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; the batch in hand is finished first."""
        log.info("worker.started", model=self.analyser.model[0], version=self.analyser.model[1])
        while not stop.is_set():
            jobs = self.take_batch(stop)
            if jobs:
                self.process(jobs)
            else:
                stop.wait(self.settings.poll_interval_ms / 1000)
        log.info("worker.stopped")

    def take_batch(self, stop: threading.Event) -> list[Job]:
        """Claim up to batch_size queued jobs, waiting up to batch_wait_ms after the first to fill the batch."""
        jobs = self.store.claim(self.settings.batch_size)
        if not jobs:
            return []
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(jobs) < self.settings.batch_size and time.monotonic() < deadline and not stop.is_set():
            stop.wait(min(0.02, max(deadline - time.monotonic(), 0)))
            jobs += self.store.claim(self.settings.batch_size - len(jobs))
        return jobs

    def process(self, jobs: Sequence[Job]) -> None:
        """Decode, analyse and record one batch of running jobs; failures quarantine single jobs."""
        loaded = [item for item in (self._load(job) for job in jobs) if item is not None]
        if not loaded:
            return
        clock = time.perf_counter()
        try:
            analyses = self.analyser.analyse([item.image.pixels for item in loaded])
        except Exception:
            log.exception("worker.batch_failed", batch=len(loaded))
            analyses = [self._analyse_alone(item) for item in loaded]
        log.info("worker.batch", batch=len(loaded), seconds=round(time.perf_counter() - clock, 3))
        for item, analysis in zip(loaded, analyses, strict=True):
            if analysis is not None:
                self._record(item, analysis)

    def _load(self, job: Job) -> Loaded | None:
        try:
            return Loaded(job, load_image(self.root, job, self.settings.max_side))
        except PixelDecodeError as exc:
            self._quarantine(job, f"pixels cannot be decoded: {exc}")
            return None

    def _analyse_alone(self, item: Loaded) -> Analysis | None:
        """After a batch failure, analyse one image by itself so one bad image cannot sink the others."""
        try:
            return self.analyser.analyse([item.image.pixels])[0]
        except Exception as exc:
            self._quarantine(item.job, f"analysis failed: {type(exc).__name__}: {str(exc)[:160]}")
            return None

    def _record(self, item: Loaded, analysis: Analysis) -> None:
        model = self.analyser.model
        embedding = analysis.embedding.astype("<f4").tobytes() if analysis.embedding is not None else None
        summary = summarise(item.image, analysis, model)
        self.store.save_result(item.job.id, model, summary, embedding)
        log.info(
            "job.inferred",
            job_id=item.job.id,
            status=summary["status"],
            probability=summary["probability"],
            positive=summary["positive"],
            reason=summary["reason"] or None,
        )

    def _quarantine(self, job: Job, reason: str) -> None:
        self.store.transition(job.id, JobState.QUARANTINED, reason)
        log.warning("job.quarantined", job_id=job.id, reason=reason)
