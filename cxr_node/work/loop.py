"""The worker loop: claim queued jobs in batches, analyse them, retrieve similar cases, record, write.

Each step is a named function with a typed input and output: ``claim`` (queued → running) →
:func:`~cxr_node.work.load.load` (file → header + DecodedImage) → ``Analyser.analyse`` (arrays → Analysis)
→ ``Retriever.similar`` / ``add`` → :func:`summary_of` (Analysis → Summary) → ``save_result`` (running →
inferred) → :class:`~cxr_node.work.write.OutputWriter` (inferred → written). An image whose pixels cannot be
decoded is recorded as not analysed (it gets a short SR); a file that cannot be read, or an analysis that
raises, ends ``quarantined`` with the reason. The worker keeps going. Each analysis passes the out-of-domain
gate (:class:`~cxr_node.work.gate.DomainGate`, ``domain.gate``) before it is recorded: an image outside the
model's validated domain is refused or flagged, and never added to the neighbour index. Candidate models
(``models.candidates``) then analyse the same images; their results are recorded apart
(:mod:`cxr_node.work.candidates`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import structlog
from pydicom.dataset import Dataset
from structlog.contextvars import bound_contextvars

from cxr_node import metrics
from cxr_node.config import DomainSettings, WorkerSettings
from cxr_node.dicom.pixels import DecodedImage
from cxr_node.errors import PixelDecodeError
from cxr_node.infer.domain import DomainDescription
from cxr_node.infer.engine import Analysis
from cxr_node.jobs.interfaces import JobStore, ResultStore
from cxr_node.jobs.leases import Holder, recover_jobs, this_process
from cxr_node.jobs.records import Job
from cxr_node.jobs.states import JobState
from cxr_node.jobs.wakeup import Listener
from cxr_node.neighbours import NewCase
from cxr_node.privacy import PatientHasher
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, SiteOperatingPoint, Summary
from cxr_node.work.candidates import Candidate, run_candidates
from cxr_node.work.feedback import Feedback
from cxr_node.work.gate import DomainGate
from cxr_node.work.load import Loaded, index_case
from cxr_node.work.pool import BrokenProcessPool, StepPool, finish_step, load_step, write_step
from cxr_node.work.retrieve import NoRetrieval, Retriever
from cxr_node.work.write import OutputWriter

log = structlog.get_logger("cxr_node.worker")

T = TypeVar("T")

REASON_LIMIT = 300
"""Characters of a "not analysed" reason that are kept."""

WRITE_POLL_S = 0.05
"""How often an otherwise idle worker looks at the writes still running in its pool."""

STOP_SLICE_S = 0.25
"""The longest an idle worker waits before it looks whether it was asked to stop."""
FINISH_AT_ONCE = 64
"""Inferred jobs left by a stopped worker that one idle turn takes to write (the rest at the next turn)."""


@dataclass(frozen=True)
class Batch:
    """Claimed jobs whose decodes were submitted to the pool (futures of :class:`Loaded`)."""

    loads: list[tuple[Job, Future[Loaded]]]

    @property
    def retried(self) -> bool:
        """Whether a job of the batch is on a later attempt (claimed alone: it may be what killed a worker)."""
        return any(job.attempts > 1 for job, _ in self.loads)


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
    image: DecodedImage,
    analysis: Analysis,
    model: tuple[str, str],
    similar: Sequence[SimilarCase],
    site: SiteOperatingPoint | None = None,
) -> Summary:
    """What one analysis found, as it is kept: judged at the ``site`` calibration's operating point when there is
    one (``models.calibration``), else at the model's (the manifest's threshold, as the analyser applied it)."""
    quality = analysis.quality
    threshold = site.threshold if site is not None and analysis.threshold is not None else analysis.threshold
    return Summary(
        model_name=model[0],
        model_version=model[1],
        analysed=analysis.analysed,
        source_shape=image.original_shape,
        reason=analysis.reason,
        probability=analysis.probability,
        threshold=threshold,
        members=tuple(sorted(analysis.member_probs.items())),
        lung_mask=MaskVerdict(quality.ok, quality.reason, quality.area_fraction, quality.components),
        analysed_shape=(int(image.pixels.shape[0]), int(image.pixels.shape[1])),
        pixel_spacing_mm=image.pixel_spacing_mm,
        photometric=image.photometric,
        similar=tuple(similar),
        timings_ms=tuple(analysis.timings_ms.items()),
        domain_score=None if analysis.domain is None else analysis.domain.score,
        domain_bound=None if analysis.domain is None else analysis.domain.bound,
    )


def model_domain(analyser: Analyser) -> DomainDescription | None:
    """The analyser's domain description (the engine's ``domain``), or None when it has none."""
    found = getattr(analyser, "domain", None)
    return found if isinstance(found, DomainDescription) else None


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
    listener : Listener or None
        Wakes the idle worker when a job is queued (otherwise it finds it at its next poll).
    pool : StepPool or None
        Where decoding and output writing run (inline in this thread by default; in processes, they overlap
        inference: the next batch decodes and the last one is written while this one is analysed).
    domain : DomainSettings or None
        The out-of-domain gate (``domain``; refuse by default); off when the analyser has no domain description.
    candidates : sequence of Candidate
        Candidate models (``models.candidates``) run on each batch after the configured model's results are
        recorded; their results are recorded apart (:mod:`cxr_node.work.candidates`).
    feedback : Feedback or None
        Applies the sites' outcomes to the neighbour index when the worker is idle (:mod:`cxr_node.work.feedback`).
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
        listener: Listener | None = None,
        pool: StepPool | None = None,
        domain: DomainSettings | None = None,
        candidates: Sequence[Candidate] = (),
        feedback: Feedback | None = None,
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
        self.listener = listener or Listener(None)
        self.pool = pool or StepPool(0)
        self.domain = domain or DomainSettings()
        description = model_domain(analyser)
        self.described = description is not None
        self.gate = DomainGate.for_model(self.domain.gate, description, self.domain.pass_rate)
        self.candidates = tuple(candidates)
        self.feedback = feedback
        keys = [candidate.key for candidate in self.candidates]
        if provenance.model_key in keys or len(set(keys)) != len(keys):
            raise ValueError(f"candidates {keys} must differ from each other and from {provenance.model_key}")
        self._writes: dict[int, tuple[Job, Future[bool]]] = {}
        self._crashes: dict[int, int] = {}
        self.busy_s = 0.0
        self.loaded_s = 0.0
        self._progress = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; the batch in hand is finished first.

        A thread renews the leases of the jobs in hand while the loop makes progress; jobs of workers that are
        gone are taken back at start and whenever the worker is idle.
        """
        log.info("worker.started", model=self.provenance.model_name, version=self.provenance.model_version,
                 domain_gate=self.gate.mode, candidates=[c.key for c in self.candidates])  # fmt: skip
        if not self.described:
            log.warning("domain.no_description", model=self.provenance.algorithm,
                        detail="the manifest has no domain description: images are not checked against the "
                        "model's validated domain (cxr-node domain fit)")  # fmt: skip
        self.jobs.renew(self.holder, self.settings.lease_s)
        renewer = threading.Thread(target=self._renew_leases, args=(stop,), name="leases", daemon=True)
        renewer.start()
        self.pool.warm()
        self.recover()
        self.finish_inferred()
        recovered = time.monotonic()
        pending: Batch | None = None
        while not stop.is_set():
            self._progress = clock = time.monotonic()
            self.reap_writes(block=len(self._writes) >= self.max_writes_in_flight)
            # with a pool, the next batch decodes while ``pending`` is analysed (inline, that would only delay
            # ``pending``); never beside a job on a later attempt (it may be what killed the last worker: nobody
            # else's attempt is spent on it), and only first attempts beside another batch
            prefetch = pending is None or (not self.pool.inline and not pending.retried)
            jobs = self.take_batch(stop, retries=pending is None) if prefetch else []
            upcoming = self.start(jobs) if jobs else None
            finished, pending = pending, upcoming
            if finished is not None:
                self.finish(finished)
            if finished is not None or upcoming is not None:  # jobs were in hand all this turn
                self.loaded_s += time.monotonic() - clock
                metrics.observe_worker_time(loaded_s=time.monotonic() - clock)
                continue  # more may be queued: look again before idling
            if self._writes:
                self.reap_writes(block=False)
                self._idle(stop, WRITE_POLL_S)
                continue
            if time.monotonic() - recovered >= self.settings.lease_s:
                self.recover()
                recovered = time.monotonic()
            self.finish_inferred()
            if self.feedback is not None:
                self.feedback.turn()
            self._idle(stop, self.settings.poll_interval_ms / 1000)
        if pending is not None:
            self.finish(pending)
        self.reap_writes(block=True, everything=True)
        renewer.join(5)
        log.info("worker.stopped")

    def _idle(self, stop: threading.Event, seconds: float) -> None:
        """Wait up to ``seconds`` for a job to be queued (a wake-up call), noticing ``stop`` within STOP_SLICE_S."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self.listener.wait(min(left, STOP_SLICE_S)):
                return

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
        """Finish the writes in flight, stop the pool, persist and release the neighbour index, stop listening."""
        self.reap_writes(block=True, everything=True)
        self.pool.close()
        self.retriever.close()
        self.listener.close()

    @property
    def max_writes_in_flight(self) -> int:
        """Writes queued to the pool before the worker waits for one (bounds the images held in memory)."""
        return max(2, 2 * self.pool.size) * self.settings.batch_size

    def finish_inferred(self) -> int:
        """Write the outputs of jobs left ``inferred`` (a crash or a full disk); return how many got written."""
        writer = self.writer
        if writer is None or self._writes:
            return 0
        side = self.settings.max_side
        left = self.jobs.claim_inferred(FINISH_AT_ONCE, self.holder, self.settings.lease_s)  # none another writes
        if self.pool.inline:
            return sum(bool(self._guarded(job, partial(writer.finish, job, side))) for job in left)
        for job in left:
            self._writes[job.id] = (job, self.pool.submit(finish_step, job, side))
        return self.reap_writes(block=True, everything=True)

    def take_batch(self, stop: threading.Event, retries: bool = True) -> list[Job]:
        """Claim up to batch_size queued jobs, waiting up to batch_wait_ms after the first to fill the batch.

        A job on a later attempt comes alone and is processed alone; ``retries=False`` claims first attempts only.
        """
        size, lease = self.settings.batch_size, self.settings.lease_s
        jobs = self.jobs.claim(size, self.holder, lease, retries=retries)
        if not jobs or jobs[0].attempts > 1:
            return jobs
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(jobs) < size and time.monotonic() < deadline and not stop.is_set():
            stop.wait(min(0.02, max(deadline - time.monotonic(), 0)))
            jobs += self.jobs.claim(size - len(jobs), self.holder, lease, retries=False)
        return jobs

    def process(self, jobs: Sequence[Job]) -> None:
        """Decode, analyse, record and write one batch of running jobs, all done on return; failures end single
        jobs only."""
        self.finish(self.start(jobs))
        self.reap_writes(block=True, everything=True)

    def start(self, jobs: Sequence[Job]) -> Batch:
        """Submit the batch's reads and decodes to the pool (done at once when the pool is inline)."""
        root, side = self.root, self.settings.max_side
        return Batch([(job, self.pool.submit(load_step, root, job, side)) for job in jobs])

    def finish(self, batch: Batch) -> None:
        """Wait for the batch's decodes, analyse the images together, record each result and submit its writing."""
        clock = time.perf_counter()
        loaded = self._gather(batch)
        decoded = [(item, item.image) for item in loaded if item.image is not None]
        for item in loaded:
            if item.image is None:
                self._guarded(item.job, partial(self._not_decodable, item))
        waited = time.perf_counter() - clock
        if not decoded:
            return
        clock = time.perf_counter()
        try:
            analyses: list[Analysis | None] = list(self.analyser.analyse([image.pixels for _, image in decoded]))
        except Exception:
            log.exception("worker.batch_failed", batch=len(decoded))
            analyses = [self._analyse_alone(item, image) for item, image in decoded]
        seconds = time.perf_counter() - clock
        self.busy_s += seconds
        idle = 1 - self.busy_s / self.loaded_s if self.loaded_s > self.busy_s else 0.0
        log.info("worker.batch", batch=len(decoded), seconds=round(seconds, 3), waited_s=round(waited, 3),
                 idle_share=round(idle, 3))  # fmt: skip
        metrics.observe_batch(len(decoded), seconds)
        metrics.observe_worker_time(busy_s=seconds)
        for (item, image), analysis in zip(decoded, analyses, strict=True):
            if analysis is not None:
                self._guarded(item.job, partial(self._record, item, image, analysis))
        if self.candidates:
            analysed = [(item.job, image) for (item, image), a in zip(decoded, analyses, strict=True) if a is not None]
            if analysed:
                self._progress = time.monotonic()
                run_candidates(self.candidates, analysed, self.results)

    def _gather(self, batch: Batch) -> list[Loaded]:
        """The batch's decoded jobs; a job whose file cannot be read is quarantined. When a pool child died,
        each job it had is decoded again alone: the one that kills a child by itself is quarantined."""
        loaded: list[Loaded] = []
        crashed: list[Job] = []
        for job, future in batch.loads:
            try:
                loaded.append(future.result())
            except BrokenProcessPool:
                crashed.append(job)
            except Exception as exc:
                self._load_failed(job, exc)
        if crashed:
            self.pool.restart()
        for job in crashed:
            try:
                loaded.append(self.pool.submit(load_step, self.root, job, self.settings.max_side).result())
            except BrokenProcessPool:
                self.pool.restart()
                self._quarantine(job, "stored file cannot be read: the decoder's process died on this image")
            except Exception as exc:
                self._load_failed(job, exc)
        return loaded

    def _load_failed(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, PixelDecodeError):
            self._quarantine(job, f"stored file cannot be read: {exc}")
            return
        log.error("job.failed", job_id=job.id, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        self._quarantine(job, f"stored file cannot be read: {type(exc).__name__}: {str(exc)[:160]}")

    def _submit_write(self, item: Loaded) -> None:
        """Write an inferred job's outputs: now (inline pool) or in a pool child while the worker goes on."""
        if self.writer is None:
            return
        if self.pool.inline:
            self.writer.write(item)
            return
        self._writes[item.job.id] = (item.job, self.pool.submit(write_step, item))

    def reap_writes(self, block: bool, everything: bool = False) -> int:
        """Collect the pool's finished writes (with ``block``, wait for the oldest, or for all with
        ``everything``); a write that raised ends its job like any failed step. Returns how many were written."""
        written = 0
        for job_id, (job, future) in list(self._writes.items()):
            if not future.done() and not block:
                continue
            try:
                written += bool(future.result())
            except BrokenProcessPool:
                self._write_crashed(job)
            except Exception as exc:
                with bound_contextvars(job_id=job.id):
                    log.error("job.failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
                    self._failed(job, exc)
            del self._writes[job_id]
            if block and not everything:
                block = False
        return written

    def _write_crashed(self, job: Job) -> None:
        """A pool child died while this job was being written: it stays inferred and is written again later,
        unless it was the second time (then it ends dead: its outputs cannot be written)."""
        self.pool.restart()
        self._crashes[job.id] = crashes = self._crashes.get(job.id, 0) + 1
        if crashes >= 2:
            self._failed(job, RuntimeError("the output writer's process died twice on this job"))

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
        analysis = self.gate.apply(analysis)
        case = self._case(item) if analysis.analysed and analysis.embedding is not None else None
        if case is not None and analysis.embedding is not None:
            similar = self.retriever.similar(case, analysis.embedding, model[1])
            if self.gate.indexable(analysis):
                self.retriever.add(case, analysis.embedding, model[1])
        summary = summary_of(image, analysis, model, similar, self.provenance.site_operating_point)
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
            domain_score=None if summary.domain_score is None else round(summary.domain_score, 2),
            outside_domain=summary.outside_domain,
        )
        self._submit_write(item)

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
            self._submit_write(item)

    def _guarded(self, job: Job, step: Callable[[], T]) -> T | None:
        """Run one job's step; an unexpected error ends that job (with the reason), never the worker or the batch."""
        try:
            return step()
        except Exception as exc:
            log.exception("job.failed", job_id=job.id)
            self._failed(job, exc)
            return None

    def _failed(self, job: Job, exc: BaseException) -> None:
        """End a job whose step raised: quarantined while running, dead once inferred (outputs unwritable)."""
        reason = f"processing failed: {type(exc).__name__}: {str(exc)[:160]}"
        current = self.jobs.get(job.id)
        if current is not None and current.state is JobState.RUNNING:
            self._quarantine(job, reason)
        elif current is not None and current.state is JobState.INFERRED:
            self.jobs.transition(job.id, JobState.DEAD, reason)

    def _quarantine(self, job: Job, reason: str) -> None:
        with bound_contextvars(job_id=job.id):
            self.jobs.transition(job.id, JobState.QUARANTINED, reason)
            log.warning("job.quarantined", reason=reason)
