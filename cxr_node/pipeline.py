"""One job end to end, and the worker loop that runs jobs in batches.

Each step is a named function with a typed input and output:
``claim`` (queued → running) → :func:`load` (file → header + DecodedImage) → ``Analyser.analyse`` (arrays →
Analysis) → ``Retriever.similar`` / ``add`` (neighbours) → :func:`summarise` (Analysis → JSON-able findings)
→ ``save_result`` (running → inferred) → :class:`OutputWriter` (inferred → written).
An image whose pixels cannot be decoded is recorded as not analysed (it gets a short SR); a file that cannot
be read, or an analysis that raises, ends ``quarantined`` with the reason. The worker keeps going.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_node.config import NeighbourSettings, ResultsSettings, WorkerSettings
from cxr_node.dicom.pixels import DecodedImage, decode
from cxr_node.errors import PixelDecodeError
from cxr_node.infer import preprocess
from cxr_node.infer.engine import Analysis
from cxr_node.jobs.spool import output_path, write_durably
from cxr_node.jobs.states import JobState
from cxr_node.jobs.store import Job, JobStore, Output
from cxr_node.metrics import SECONDS_BUCKETS, WORKER_HEARTBEAT, WORKER_STATS
from cxr_node.neighbours import Neighbour, NeighbourIndex, NewCase
from cxr_node.results.common import OutputError
from cxr_node.results.findings import Findings, Provenance, SimilarCase
from cxr_node.results.kinds import kinds_for, options_from
from cxr_node.results.outputs import Built, build_outputs

log = structlog.get_logger("cxr_node.worker")


class Analyser(Protocol):
    """What the worker needs from inference: a model identity and a batch analysis."""

    @property
    def model(self) -> tuple[str, str]: ...

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]: ...


class Retriever(Protocol):
    """The neighbours stage as the worker sees it: query the similar past cases, then add this one."""

    def similar(self, case: CaseInfo, embedding: np.ndarray, model_version: str) -> tuple[SimilarCase, ...]: ...

    def add(self, case: CaseInfo, embedding: np.ndarray, model_version: str) -> None: ...


@dataclass(frozen=True)
class CaseInfo:
    """What the neighbour index keeps about an image: identifiers, never a patient name or ID in clear."""

    sop_instance_uid: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    patient_hash: str


class NoRetrieval:
    """Retrieval turned off (``neighbours.k: 0``): no similar cases, nothing indexed."""

    def similar(self, case: CaseInfo, embedding: np.ndarray, model_version: str) -> tuple[SimilarCase, ...]:
        return ()

    def add(self, case: CaseInfo, embedding: np.ndarray, model_version: str) -> None:
        return None


class IndexRetriever:
    """The persistent neighbour index as the worker's retriever, with the site's identifier policy.

    ``identifiers="uids"`` names each neighbour's Study/SOP Instance UID, accession number and study date;
    ``"case_number"`` only its de-identified case number (for sites that forbid other patients' identifiers).
    """

    CHECKPOINT_EVERY_S = 900.0
    """How often the in-memory search structure is written out (start-up then loads it instead of rebuilding)."""

    def __init__(self, index: NeighbourIndex, settings: NeighbourSettings) -> None:
        self.index = index
        self.settings = settings
        self._checkpointed = time.monotonic()

    def similar(self, case: CaseInfo, embedding: np.ndarray, model_version: str) -> tuple[SimilarCase, ...]:
        found = self.index.query(
            model_version,
            embedding,
            self.settings.k,
            patient_hash=case.patient_hash,
            study_instance_uid=case.study_instance_uid,
            library_only=self.settings.library_only,
        )
        return tuple(self._shown(n) for n in found)

    def _shown(self, neighbour: Neighbour) -> SimilarCase:
        case = neighbour.case
        similarity = float(min(1.0, max(-1.0, neighbour.similarity)))
        if self.settings.identifiers == "case_number":
            return SimilarCase(neighbour.rank, similarity, case.case_number, case.label)
        return SimilarCase(
            neighbour.rank,
            similarity,
            case.case_number,
            case.label,
            case.study_instance_uid,
            case.sop_instance_uid,
            case.accession_number or None,
            case.study_date or None,
        )

    def add(self, case: CaseInfo, embedding: np.ndarray, model_version: str) -> None:
        self._add(case, embedding, model_version)
        if time.monotonic() - self._checkpointed >= self.CHECKPOINT_EVERY_S:
            written = self.index.checkpoint(model_version)
            self._checkpointed = time.monotonic()
            log.info("index.checkpoint", version=model_version, vectors=written)

    def _add(self, case: CaseInfo, embedding: np.ndarray, model_version: str) -> None:
        self.index.add(
            model_version,
            embedding,
            NewCase(
                case.sop_instance_uid,
                case.study_instance_uid,
                case.accession_number[:64],
                case.study_date,
                case.patient_hash,
            ),
        )


@dataclass(frozen=True)
class Loaded:
    """A running job with its source header (pixel data dropped) and its decoded image, if it decodes."""

    job: Job
    header: Dataset
    image: DecodedImage | None
    reason: str = ""

    @property
    def case(self) -> CaseInfo:
        """The neighbour index's view of this image."""
        return CaseInfo(
            sop_instance_uid=self.job.sop_instance_uid,
            study_instance_uid=self.job.study_instance_uid,
            accession_number=self.job.accession_number,
            study_date=_study_date(self.header),
            patient_hash=self.job.patient_hash,
        )


def _study_date(header: Dataset) -> str:
    """The StudyDate as ``YYYYMMDD``, or "" when it is absent or malformed (values from the wire vary)."""
    value = str(header.get("StudyDate", "") or "").strip()
    return value if len(value) == 8 and value.isdigit() else ""


def read_header(root: Path, job: Job) -> Dataset:
    """Read the job's stored instance.

    Raises
    ------
    PixelDecodeError
        When the file is missing or is not DICOM.
    """
    if job.path is None:
        raise PixelDecodeError("the job has no stored file")
    try:
        return dcmread(root / job.path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise PixelDecodeError(f"stored file cannot be read: {exc}") from exc


def load(root: Path, job: Job, max_side: int) -> Loaded:
    """Read the job's instance and decode its pixels; an image that does not decode comes back without one.

    Raises
    ------
    PixelDecodeError
        When the file cannot be read at all.
    """
    ds = read_header(root, job)
    try:
        image, reason = decode(ds, max_side=max_side), ""
    except PixelDecodeError as exc:
        image, reason = None, f"pixels cannot be decoded: {exc}"
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        ds.pop(keyword, None)
    return Loaded(job, ds, image, reason)


def summarise(
    image: DecodedImage, analysis: Analysis, model: tuple[str, str], similar: Sequence[SimilarCase] = ()
) -> dict[str, Any]:
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
        "similar": [asdict(case) for case in similar],
        "timings_ms": {key: round(value, 2) for key, value in analysis.timings_ms.items()},
    }


def undecodable_summary(header: Dataset, reason: str, model: tuple[str, str]) -> dict[str, Any]:
    """The findings of an image whose pixels cannot be decoded: not analysed, and why."""
    shape = [int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)]
    return {
        "status": "not_analysed",
        "reason": reason[:300],
        "model": {"name": model[0], "version": model[1]},
        "probability": None,
        "positive": None,
        "threshold": None,
        "members": {},
        "lung_mask": None,
        "image": {
            "original_shape": shape,
            "analysed_shape": None,
            "pixel_spacing_mm": None,
            "photometric": str(header.get("PhotometricInterpretation", "")),
        },
        "similar": [],
        "timings_ms": {},
    }


HEATMAP_STORED_SIDE = 256
"""The heatmap is kept at most this many pixels a side until the outputs are written (Grad-CAM is coarse)."""


def pack_arrays(analysis: Analysis) -> bytes:
    """The lung mask (bit-packed) and the heatmap (uint8, reduced) of an analysis, as compressed npz bytes."""
    mask = analysis.lung_mask
    arrays: dict[str, np.ndarray] = {"mask_shape": np.asarray(mask.shape), "mask": np.packbits(mask)}
    if analysis.heatmap is not None:
        scale = min(1.0, HEATMAP_STORED_SIDE / max(mask.shape))
        shape = (max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale)))
        small = preprocess.resize(analysis.heatmap.astype(np.float32), shape)
        arrays["heatmap"] = np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of :func:`pack_arrays`: (bool mask, float32 heatmap at the mask's shape or None)."""
    with np.load(io.BytesIO(data)) as arrays:
        shape = tuple(int(n) for n in arrays["mask_shape"])
        mask = np.unpackbits(arrays["mask"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
        heatmap = None
        if "heatmap" in arrays:
            heatmap = preprocess.resize(arrays["heatmap"].astype(np.float32) / 255.0, shape).astype(np.float32)
    return mask, heatmap


def findings_from(
    summary: dict[str, Any], arrays: bytes | None, image: DecodedImage | None, provenance: Provenance
) -> Findings:
    """Rebuild the writers' :class:`Findings` from a stored result (and the re-decoded image)."""
    analysed = summary["status"] == "analysed"
    mask, heatmap = unpack_arrays(arrays) if arrays and analysed else (None, None)
    if analysed and (image is None or mask is None or mask.shape != image.pixels.shape):
        raise OutputError("the stored lung mask does not match the decoded image")
    shape = tuple(summary["image"]["original_shape"]) if image is None else image.original_shape
    quality = summary.get("lung_mask") or {}
    return Findings(
        provenance=provenance,
        analysed=analysed,
        source_shape=(int(shape[0]), int(shape[1])),
        reason=summary.get("reason") or "",
        probability=summary.get("probability"),
        threshold=summary.get("threshold") if summary.get("threshold") is not None else 0.5,
        members=tuple(sorted((summary.get("members") or {}).items())),
        mask_plausible=quality.get("plausible"),
        mask_verdict=quality.get("verdict", ""),
        similar=tuple(SimilarCase(**case) for case in summary.get("similar") or ()),
        image=None if image is None else image.pixels,
        lung_mask=mask,
        heatmap=heatmap,
    )


class OutputWriter:
    """Builds a job's DICOM outputs, writes them durably to the outbox and records them (inferred → written).

    An output that cannot be built or fails validation is never written: the job ends ``dead`` with the
    reason. A failure to write (disk full) leaves the job ``inferred``; the worker tries again later.
    """

    def __init__(
        self,
        root: Path,
        store: JobStore,
        provenance: Provenance,
        results: ResultsSettings,
        destinations: Sequence[str] = (),
        fsync: bool = True,
    ) -> None:
        self.root = root
        self.store = store
        self.provenance = provenance
        self.results = results
        self.options = options_from(results)
        self.destinations = list(destinations)
        self.fsync = fsync

    def write(self, job: Job, header: Dataset, findings: Findings) -> bool:
        """Write and record ``job``'s outputs; return True when the job is now ``written``."""
        kinds = kinds_for(findings, self.results)
        try:
            built = build_outputs(header, findings, self.options, kinds)
        except OutputError as exc:
            reason = f"output invalid, not sent: {str(exc)[:200]}"
            self.store.transition(job.id, JobState.DEAD, reason)
            log.error("job.dead", job_id=job.id, reason=reason)
            return False
        try:
            outputs = [self._write_file(job, item) for item in built]
        except OSError as exc:
            log.error("job.write_failed", job_id=job.id, error=str(exc))
            return False
        self.store.save_outputs(job.id, outputs, self.destinations)
        log.info("job.written", job_id=job.id, outputs=[item.kind for item in built], analysed=findings.analysed)
        return True

    def _write_file(self, job: Job, item: Built) -> Output:
        relative = output_path(job.instance_key, item.kind)
        write_durably(self.root / relative, item.data, fsync=self.fsync)
        return Output(item.kind, item.sop_class_uid, item.sop_instance_uid, str(relative), len(item.data))

    def finish(self, job: Job, max_side: int) -> bool:
        """Write the outputs of an ``inferred`` job from its stored result (after a crash or a write failure)."""
        stored = self.store.result(job.id)
        if stored is None:
            self.store.transition(job.id, JobState.QUEUED, "no stored result; analysing again")
            return False
        try:
            loaded = load(self.root, job, max_side)
            findings = findings_from(stored.summary, stored.arrays, loaded.image, self.provenance)
        except (PixelDecodeError, OutputError) as exc:
            self.store.transition(job.id, JobState.QUEUED, f"cannot rebuild the findings ({exc}); analysing again")
            return False
        return self.write(job, loaded.header, findings)


class WorkerStats:
    """Cumulative inference timings and batch sizes, and a heartbeat, written where /metrics reads them."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.buckets = [0] * (len(SECONDS_BUCKETS) + 1)
        self.seconds_sum = 0.0
        self.batch_sizes: dict[str, int] = {}

    def beat(self) -> None:
        """Touch the heartbeat file (the worker loop is alive)."""
        with contextlib.suppress(OSError):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / WORKER_HEARTBEAT.name).touch()

    def batch(self, size: int, seconds: float) -> None:
        """Count one batch of ``size`` images that took ``seconds``, and publish the totals."""
        per_image = seconds / max(size, 1)
        index = next((i for i, bound in enumerate(SECONDS_BUCKETS) if per_image <= bound), len(SECONDS_BUCKETS))
        self.buckets[index] += size
        self.seconds_sum += seconds
        self.batch_sizes[str(size)] = self.batch_sizes.get(str(size), 0) + 1
        data = {
            "seconds_buckets": self.buckets,
            "seconds_sum": round(self.seconds_sum, 3),
            "batch_sizes": self.batch_sizes,
        }
        with contextlib.suppress(OSError):
            target = self.run_dir / WORKER_STATS.name
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(target)


class Worker:
    """Takes queued jobs in batches, analyses them, records the results and writes the outputs.

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
    writer : OutputWriter or None
        Writes each result's DICOM outputs (inferred → written); None stops at ``inferred``.
    retriever : Retriever or None
        The neighbour index; None turns retrieval off.
    """

    def __init__(
        self,
        root: Path,
        store: JobStore,
        analyser: Analyser,
        settings: WorkerSettings,
        writer: OutputWriter | None = None,
        retriever: Retriever | None = None,
    ) -> None:
        self.root = root
        self.store = store
        self.analyser = analyser
        self.settings = settings
        self.writer = writer
        self.retriever = retriever or NoRetrieval()
        self.stats = WorkerStats(root / "run")

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; the batch in hand is finished first."""
        log.info("worker.started", model=self.analyser.model[0], version=self.analyser.model[1])
        self.finish_inferred()
        while not stop.is_set():
            self.stats.beat()
            jobs = self.take_batch(stop)
            if jobs:
                self.process(jobs)
            else:
                self.finish_inferred()
                stop.wait(self.settings.poll_interval_ms / 1000)
        log.info("worker.stopped")

    def finish_inferred(self) -> int:
        """Write the outputs of jobs left ``inferred`` (a crash or a full disk); return how many got written."""
        if self.writer is None:
            return 0
        return sum(self.writer.finish(job, self.settings.max_side) for job in self.store.jobs(JobState.INFERRED))

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
        """Decode, analyse, record and write one batch of running jobs; failures end single jobs only."""
        loaded = [item for item in (self._load(job) for job in jobs) if item is not None]
        decoded = [item for item in loaded if item.image is not None]
        for item in loaded:
            if item.image is None:
                self._not_decodable(item)
        if not decoded:
            return
        clock = time.perf_counter()
        try:
            analyses = self.analyser.analyse([item.image.pixels for item in decoded])  # type: ignore[union-attr]
        except Exception:
            log.exception("worker.batch_failed", batch=len(decoded))
            analyses = [self._analyse_alone(item) for item in decoded]
        seconds = time.perf_counter() - clock
        log.info("worker.batch", batch=len(decoded), seconds=round(seconds, 3))
        self.stats.batch(len(decoded), seconds)
        for item, analysis in zip(decoded, analyses, strict=True):
            if analysis is not None:
                self._record(item, analysis)

    def _load(self, job: Job) -> Loaded | None:
        try:
            return load(self.root, job, self.settings.max_side)
        except PixelDecodeError as exc:
            self._quarantine(job, f"stored file cannot be read: {exc}")
            return None

    def _analyse_alone(self, item: Loaded) -> Analysis | None:
        """After a batch failure, analyse one image by itself so one bad image cannot sink the others."""
        try:
            return self.analyser.analyse([item.image.pixels])[0]  # type: ignore[union-attr]
        except Exception as exc:
            self._quarantine(item.job, f"analysis failed: {type(exc).__name__}: {str(exc)[:160]}")
            return None

    def _record(self, item: Loaded, analysis: Analysis) -> None:
        model = self.analyser.model
        assert item.image is not None
        similar: tuple[SimilarCase, ...] = ()
        if analysis.analysed and analysis.embedding is not None:
            similar = self.retriever.similar(item.case, analysis.embedding, model[1])
            self.retriever.add(item.case, analysis.embedding, model[1])
        embedding = analysis.embedding.astype("<f4").tobytes() if analysis.embedding is not None else None
        summary = summarise(item.image, analysis, model, similar)
        arrays = pack_arrays(analysis) if self.writer is not None and analysis.analysed else None
        self.store.save_result(item.job.id, model, summary, embedding, arrays)
        log.info(
            "job.inferred",
            job_id=item.job.id,
            status=summary["status"],
            probability=summary["probability"],
            positive=summary["positive"],
            reason=summary["reason"] or None,
            similar=len(similar),
        )
        if self.writer is not None:
            self._write(item, summary, arrays)

    def _not_decodable(self, item: Loaded) -> None:
        """An image whose pixels cannot be decoded is recorded as not analysed (the site gets a short SR)."""
        summary = undecodable_summary(item.header, item.reason, self.analyser.model)
        self.store.save_result(item.job.id, self.analyser.model, summary, None, None)
        log.warning("job.inferred", job_id=item.job.id, status="not_analysed", reason=item.reason)
        if self.writer is not None:
            self._write(item, summary, None)

    def _write(self, item: Loaded, summary: dict[str, Any], arrays: bytes | None) -> None:
        assert self.writer is not None
        job = self.store.get(item.job.id) or item.job
        try:
            findings = findings_from(summary, arrays, item.image, self.writer.provenance)
        except (OutputError, ValueError, TypeError) as exc:
            reason = f"findings cannot be built: {str(exc)[:200]}"
            self.store.transition(job.id, JobState.DEAD, reason)
            log.error("job.dead", job_id=job.id, reason=reason)
            return
        self.writer.write(job, item.header, findings)

    def _quarantine(self, job: Job, reason: str) -> None:
        self.store.transition(job.id, JobState.QUARANTINED, reason)
        log.warning("job.quarantined", job_id=job.id, reason=reason)
