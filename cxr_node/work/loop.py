"""The worker loop: claim queued jobs in batches, analyse them, retrieve similar cases, record, write.

Each step is a named function with a typed input and output: ``claim`` (queued → running) →
:func:`~cxr_node.work.load.load` (file → header + DecodedImage) → ``Analyser.analyse`` (arrays → Analysis)
→ ``Retriever.similar`` / ``add`` → :func:`summary_of` (Analysis → Summary) → ``save_result`` (running →
inferred) → :class:`~cxr_node.work.write.OutputWriter` (inferred → written). An image whose pixels cannot be
decoded is recorded as not analysed (it gets a short SR); a file that cannot be read, or an analysis that
raises, ends ``quarantined`` with the reason. The worker keeps going.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import structlog
from pydicom.dataset import Dataset
from structlog.contextvars import bound_contextvars

from cxr_node import metrics
from cxr_node.config import WorkerSettings
from cxr_node.dicom.pixels import DecodedImage
from cxr_node.errors import PixelDecodeError
from cxr_node.infer.engine import Analysis
from cxr_node.jobs.interfaces import JobStore, ResultStore
from cxr_node.jobs.leases import Holder, recover_jobs, this_process
from cxr_node.jobs.records import Job
from cxr_node.jobs.states import JobState
from cxr_node.neighbours import NewCase
from cxr_node.privacy import PatientHasher
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, Summary
from cxr_node.work.load import Loaded, index_case, load
from cxr_node.work.retrieve import NoRetrieval, Retriever
from cxr_node.work.write import OutputWriter

log = structlog.get_logger("cxr_node.worker")

T = TypeVar("T")

REASON_LIMIT = 300
"""Characters of a "not analysed" reason that are kept."""


class Analyser(Protocol):
    """What the worker needs from inference: a model identity and a batch analysis."""

    @property
    def model(self) -> tuple[str, str]:
        """The model's (name, version)."""
        ...

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]:
        """One Analysis per float32 (H, W) image in [0, 1]."""
        ...


def summary_of(
    image: DecodedImage, analysis: Analysis, model: tuple[str, str], similar: Sequence[SimilarCase]
) -> Summary:
    """What one analysis found, as it is kept."""
    quality = analysis.quality
    return Summary(
        model_name=model[0],
        model_version=model[1],
        analysed=analysis.analysed,
        source_shape=image.original_shape,
        reason=analysis.reason,
        probability=analysis.probability,
        threshold=analysis.threshold,
        members=tuple(sorted(analysis.member_probs.items())),
        lung_mask=MaskVerdict(quality.ok, quality.reason, quality.area_fraction, quality.components),
        analysed_shape=(int(image.pixels.shape[0]), int(image.pixels.shape[1])),
        pixel_spacing_mm=image.pixel_spacing_mm,
        photometric=image.photometric,
        similar=tuple(similar),
        timings_ms=tuple(analysis.timings_ms.items()),
    )


def undecodable_summary(header: Dataset, reason: str, model: tuple[str, str]) -> Summary:
    """The summary of an image whose pixels cannot be decoded: not analysed, and why."""
    return Summary(
        model_name=model[0],
        model_version=model[1],
        analysed=False,
        source_shape=(int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)),
        reason=reason[:REASON_LIMIT],
        photometric=str(header.get("PhotometricInterpretation", "")),
    )


class Worker:
    """Takes queued jobs in batches, analyses them, records the results and writes the outputs.

    Parameters
    ----------
    root : Path
        The storage root (job paths are relative to it).
    jobs, results : JobStore, ResultStore
        Where jobs stand and where results go.
    analyser : Analyser
        The inference engine.
    provenance : Provenance
        The model and node; its model must be the analyser's.
    settings : WorkerSettings
        Batch size, batch wait, poll interval, decode size.
    writer : OutputWriter or None
        Writes each result's DICOM outputs (inferred → written); None stops at ``inferred``.
    retriever : Retriever or None
        The neighbour index; None turns retrieval off.
    holder : Holder or None
        Who claims the jobs (this process by default); its leases are renewed while :meth:`run` runs.
    hasher : PatientHasher or None
        Hashes patient IDs for the neighbour index (needed with a retriever).
    """

    def __init__(
        self,
        root: Path,
        jobs: JobStore,
        results: ResultStore,
        analyser: Analyser,
        provenance: Provenance,
        settings: WorkerSettings,
        writer: OutputWriter | None = None,
        retriever: Retriever | None = None,
        holder: Holder | None = None,
        hasher: PatientHasher | None = None,
    ) -> None:
        if tuple(analyser.model) != (provenance.model_name, provenance.model_version):
            raise ValueError(f"the analyser runs {analyser.model}, but the provenance names {provenance.algorithm}")
        self.root = root
        self.jobs = jobs
        self.results = results
        self.analyser = analyser
        self.provenance = provenance
        self.settings = settings
        self.writer = writer
        self.retriever: Retriever = retriever or NoRetrieval()
        self.holder = holder or this_process("worker")
        if retriever is not None and hasher is None:
            raise ValueError("a worker with a retriever needs the site's patient hasher")
        self.hasher = hasher
        self._progress = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; the batch in hand is finished first.

        A thread renews the leases of the jobs in hand while the loop makes progress; jobs of workers that are
        gone are taken back at start and whenever the worker is idle.
        """
        log.info("worker.started", model=self.provenance.model_name, version=self.provenance.model_version)
        self.jobs.renew(self.holder, self.settings.lease_s)
        renewer = threading.Thread(target=self._renew_leases, args=(stop,), name="leases", daemon=True)
        renewer.start()
        self.recover()
        self.finish_inferred()
        recovered = time.monotonic()
        while not stop.is_set():
            self._progress = time.monotonic()
            jobs = self.take_batch(stop)
            if jobs:
                self.process(jobs)
                continue
            if time.monotonic() - recovered >= self.settings.lease_s:
                self.recover()
                recovered = time.monotonic()
            self.finish_inferred()
            stop.wait(self.settings.poll_interval_ms / 1000)
        renewer.join(5)
        log.info("worker.stopped")

    def _renew_leases(self, stop: threading.Event) -> None:
        """Renew this worker's leases every third of a lease, while the loop has moved within the last lease."""
        lease = self.settings.lease_s
        while not stop.wait(lease / 3):
            if time.monotonic() - self._progress < lease:
                self.jobs.renew(self.holder, lease)

    def recover(self) -> list[Job]:
        """Take back the jobs of workers that are gone; log each, and raise the alarm for those given up."""
        moved = recover_jobs(self.jobs, "worker", self.settings.max_attempts, time.time())
        for job in moved:
            with bound_contextvars(job_id=job.id):
                if job.state is JobState.DEAD:
                    log.error("job.gave_up", attempts=job.attempts, reason=job.reason)
                else:
                    log.warning("job.requeued", attempts=job.attempts, reason=job.reason)
        return moved

    def close(self) -> None:
        """Persist and release the neighbour index."""
        self.retriever.close()

    def finish_inferred(self) -> int:
        """Write the outputs of jobs left ``inferred`` (a crash or a full disk); return how many got written."""
        writer = self.writer
        if writer is None:
            return 0
        side = self.settings.max_side
        return sum(
            bool(self._guarded(job, partial(writer.finish, job, side))) for job in self.jobs.query(JobState.INFERRED)
        )

    def take_batch(self, stop: threading.Event) -> list[Job]:
        """Claim up to batch_size queued jobs, waiting up to batch_wait_ms after the first to fill the batch.

        A job on a later attempt comes alone and is processed alone.
        """
        size, lease = self.settings.batch_size, self.settings.lease_s
        jobs = self.jobs.claim(size, self.holder, lease)
        if not jobs or jobs[0].attempts > 1:
            return jobs
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(jobs) < size and time.monotonic() < deadline and not stop.is_set():
            stop.wait(min(0.02, max(deadline - time.monotonic(), 0)))
            jobs += self.jobs.claim(size - len(jobs), self.holder, lease, retries=False)
        return jobs

    def process(self, jobs: Sequence[Job]) -> None:
        """Decode, analyse, record and write one batch of running jobs; failures end single jobs only."""
        loaded = [item for item in (self._load(job) for job in jobs) if item is not None]
        decoded = [(item, item.image) for item in loaded if item.image is not None]
        for item in loaded:
            if item.image is None:
                self._guarded(item.job, partial(self._not_decodable, item))
        if not decoded:
            return
        clock = time.perf_counter()
        try:
            analyses: list[Analysis | None] = list(self.analyser.analyse([image.pixels for _, image in decoded]))
        except Exception:
            log.exception("worker.batch_failed", batch=len(decoded))
            analyses = [self._analyse_alone(item, image) for item, image in decoded]
        seconds = time.perf_counter() - clock
        log.info("worker.batch", batch=len(decoded), seconds=round(seconds, 3))
        metrics.observe_batch(len(decoded), seconds)
        for (item, image), analysis in zip(decoded, analyses, strict=True):
            if analysis is not None:
                self._guarded(item.job, partial(self._record, item, image, analysis))

    def _load(self, job: Job) -> Loaded | None:
        try:
            return load(self.root, job, self.settings.max_side)
        except PixelDecodeError as exc:
            self._quarantine(job, f"stored file cannot be read: {exc}")
        except Exception as exc:  # a header pydicom chokes on: this job only
            log.exception("job.failed", job_id=job.id)
            self._quarantine(job, f"stored file cannot be read: {type(exc).__name__}: {str(exc)[:160]}")
        return None

    def _analyse_alone(self, item: Loaded, image: DecodedImage) -> Analysis | None:
        """After a batch failure, analyse one image by itself so one bad image cannot sink the others."""
        try:
            return self.analyser.analyse([image.pixels])[0]
        except Exception as exc:
            self._quarantine(item.job, f"analysis failed: {type(exc).__name__}: {str(exc)[:160]}")
            return None

    def _record(self, item: Loaded, image: DecodedImage, analysis: Analysis) -> None:
        self._progress = time.monotonic()
        with bound_contextvars(job_id=item.job.id):
            self._record_bound(item, image, analysis)

    def _record_bound(self, item: Loaded, image: DecodedImage, analysis: Analysis) -> None:
        model = (self.provenance.model_name, self.provenance.model_version)
        similar: tuple[SimilarCase, ...] = ()
        case = self._case(item) if analysis.analysed and analysis.embedding is not None else None
        if case is not None and analysis.embedding is not None:
            similar = self.retriever.similar(case, analysis.embedding, model[1])
            self.retriever.add(case, analysis.embedding, model[1])
        summary = summary_of(image, analysis, model, similar)
        findings = Findings(
            self.provenance, summary, image=image.pixels, lung_mask=analysis.lung_mask, heatmap=analysis.heatmap
        )
        embedding = analysis.embedding.astype("<f4").tobytes() if analysis.embedding is not None else None
        self.results.save_result(item.job.id, findings, embedding)
        log.info(
            "job.inferred",
            status="analysed" if summary.analysed else "not_analysed",
            probability=summary.probability,
            positive=summary.positive,
            reason=summary.reason or None,
            similar=len(similar),
        )
        if self.writer is not None:
            self.writer.write(item)

    def _case(self, item: Loaded) -> NewCase | None:
        """The image as the neighbour index sees it, or None (no retrieval, or identifiers it cannot hold)."""
        if self.hasher is None:
            return None
        try:
            return index_case(item.header, self.hasher)
        except ValueError as exc:
            log.warning("index.case_skipped", reason=str(exc)[:200])
            return None

    def _not_decodable(self, item: Loaded) -> None:
        """An image whose pixels cannot be decoded is recorded as not analysed (the site gets a short SR)."""
        self._progress = time.monotonic()
        summary = undecodable_summary(item.header, item.reason, self.analyser.model)
        with bound_contextvars(job_id=item.job.id):
            self.results.save_result(item.job.id, Findings(self.provenance, summary), None)
            log.warning("job.inferred", status="not_analysed", reason=item.reason)
            if self.writer is not None:
                self.writer.write(item)

    def _guarded(self, job: Job, step: Callable[[], T]) -> T | None:
        """Run one job's step; an unexpected error ends that job (with the reason), never the worker or the batch."""
        try:
            return step()
        except Exception as exc:
            log.exception("job.failed", job_id=job.id)
            reason = f"processing failed: {type(exc).__name__}: {str(exc)[:160]}"
            current = self.jobs.get(job.id)
            if current is not None and current.state is JobState.RUNNING:
                self._quarantine(job, reason)
            elif current is not None and current.state is JobState.INFERRED:
                self.jobs.transition(job.id, JobState.DEAD, reason)
            return None

    def _quarantine(self, job: Job, reason: str) -> None:
        with bound_contextvars(job_id=job.id):
            self.jobs.transition(job.id, JobState.QUARANTINED, reason)
            log.warning("job.quarantined", reason=reason)
