"""Writing a job's outputs: rebuild its findings from the store, build every output, write them durably, record.

The writers always work from what is stored (:mod:`cxr_node.jobs.codec`), so the outputs written right after
inference and those written after a crash or a full disk are the same objects. A source value repaired or left
out, or a similar case left out, never stops the outputs: it is logged (``job.values_repaired``, attribute
names only) and listed in the SR's processing summary.

Each job's outputs are written in the go-live mode of the model version at that moment (:class:`GoLive`, read
from the jobs store): the mode is drawn and written on them, recorded with them, and in shadow mode their
deliveries to destinations not marked ``qa`` are recorded withheld, never sent.

A worklist triage destination (HL7 v2 or FHIR, docs/triage-out.md) gets one delivery per job whose result
qualifies (:meth:`TriageTarget.wants`), recorded with the outputs in the same transaction; it has no file here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

import structlog
from pydicom.dataset import Dataset
from structlog.contextvars import bound_contextvars

from cxr_node.config import ResultsSettings
from cxr_node.errors import PixelDecodeError
from cxr_node.jobs import codec
from cxr_node.jobs.interfaces import JobStore, ModeStore, ResultStore
from cxr_node.jobs.records import Job, Output
from cxr_node.jobs.spool import output_path, write_durably
from cxr_node.jobs.states import VALUES_REPAIRED, JobState
from cxr_node.results.common import OutputError
from cxr_node.results.copied import Note
from cxr_node.results.findings import Findings, Mode, Provenance, Summary
from cxr_node.results.kinds import kinds_for, options_from, send_rank
from cxr_node.results.outputs import Built, build_outputs
from cxr_node.work.load import Loaded, load

log = structlog.get_logger("cxr_node.worker")

INITIAL_SETTER: Final = "golive.initial_mode"
"""Who the first record of a model version's mode names as its setter (the configuration, not an operator)."""


@dataclass(frozen=True)
class TriageTarget:
    """A worklist triage destination as the writer sees it: its name, its delivery kind (``oru``, ``fhir``) and
    which results it gets (``positive``, or ``all``: every result, the not analysed ones included)."""

    name: str
    kind: str
    send: Literal["positive", "all"] = "positive"

    def wants(self, summary: Summary) -> bool:
        """Whether a result with ``summary`` is sent to this destination."""
        return self.send == "all" or summary.positive is True


@dataclass(frozen=True)
class GoLive:
    """Where a model version's go-live mode comes from, and which destinations are QA.

    Parameters
    ----------
    modes : ModeStore
        The recorded modes (``cxr-node mode set``).
    initial_mode : Mode
        The mode a model version with no record yet starts in (recorded at once: ``golive.initial_mode``).
    qa : sequence of str
        Destinations marked ``qa``: they get every output in every mode.
    """

    modes: ModeStore
    initial_mode: Mode = "supervised"
    qa: tuple[str, ...] = ()

    def mode_of(self, model_key: str) -> Mode:
        """The model version's mode now (its first record made from ``initial_mode`` when it has none)."""
        found = self.modes.current(model_key)
        if found is None:
            found = self.modes.ensure(model_key, self.initial_mode, INITIAL_SETTER, "first use of this model version")
        return found.mode

    def withheld(self, mode: Mode, destinations: Sequence[str]) -> list[str]:
        """The destinations an output written in ``mode`` must not reach: in shadow mode, all but the QA ones."""
        return [name for name in destinations if name not in self.qa] if mode == "shadow" else []


class OutputWriter:
    """Builds a job's DICOM outputs, writes them durably to the outbox and records them (inferred → written).

    An output that cannot be built or fails validation is never written: the job ends ``dead`` with the
    reason. A failure to write (disk full) leaves the job ``inferred``; the worker tries again later.

    Parameters
    ----------
    root : Path
        The storage root.
    jobs, results : JobStore, ResultStore
        Where the job stands and what inference found.
    provenance : Provenance
        The model and node named on every output.
    settings : ResultsSettings
        Which outputs, series numbers and descriptions.
    destinations : sequence of str
        Destination names: each written output gets a pending delivery to each.
    fsync : bool
        Whether files are fsynced before they are recorded.
    golive : GoLive or None
        The go-live mode of each model version; None writes every output live (tests of the builders alone).
    triage : sequence of TriageTarget
        Worklist triage destinations: a delivery to each that the result qualifies for.
    """

    def __init__(
        self,
        root: Path,
        jobs: JobStore,
        results: ResultStore,
        provenance: Provenance,
        settings: ResultsSettings,
        destinations: Sequence[str] = (),
        fsync: bool = True,
        golive: GoLive | None = None,
        triage: Sequence[TriageTarget] = (),
    ) -> None:
        self.root = root
        self.jobs = jobs
        self.results = results
        self.provenance = provenance
        self.settings = settings
        self.options = options_from(settings)
        self.destinations = list(destinations)
        self.fsync = fsync
        self.golive = golive
        self.triage = tuple(triage)

    def write(self, loaded: Loaded) -> bool:
        """Write and record the outputs of an ``inferred`` job from its stored result; True when ``written``."""
        with bound_contextvars(job_id=loaded.job.id):
            return self._write_stored(loaded)

    def _write_stored(self, loaded: Loaded) -> bool:
        job = loaded.job
        stored = self.results.result(job.id)
        if stored is None:
            self._requeue(job, "no stored result; analysing again")
            return False
        pixels = None if loaded.image is None else loaded.image.pixels
        mode = "live" if self.golive is None else self.golive.mode_of(self.provenance.model_key)
        try:
            findings = codec.findings(stored, pixels, replace(self.provenance, mode=mode))
        except ValueError as exc:
            self._requeue(job, f"cannot rebuild the findings ({exc}); analysing again")
            return False
        return self._write(job, loaded.header, findings)

    def finish(self, job: Job, max_side: int) -> bool:
        """Write the outputs of an ``inferred`` job left by a crash or a write failure (its image re-decoded)."""
        try:
            loaded = load(self.root, job, max_side)
        except PixelDecodeError as exc:
            with bound_contextvars(job_id=job.id):
                self._requeue(job, f"cannot rebuild the findings ({exc}); analysing again")
            return False
        return self.write(loaded)

    def _write(self, job: Job, header: Dataset, findings: Findings) -> bool:
        kinds = kinds_for(findings, self.settings)
        try:
            built = build_outputs(header, findings, self.options, kinds)
        except Exception as exc:  # OutputError, or a library failing on this one source header: this job only
            what = str(exc) if isinstance(exc, OutputError) else f"{type(exc).__name__}: {exc}"
            reason = f"output invalid, not sent: {what[:200]}"
            self.jobs.transition(job.id, JobState.DEAD, reason)
            log.error("job.dead", reason=reason)
            return False
        if built.notes:
            log.warning("job.values_repaired", attributes=repaired_attributes(built.notes))
        mode = findings.provenance.mode
        try:
            outputs = [self._write_file(job, item, mode) for item in built]
        except OSError as exc:
            log.error("job.write_failed", error=str(exc))
            return False
        repaired = f"{VALUES_REPAIRED}{', '.join(repaired_attributes(built.notes))}"[:200] if built.notes else None
        triage = [(target.name, target.kind) for target in self.triage if target.wants(findings.summary)]
        names = [*self.destinations, *(name for name, _ in triage)]
        withheld = [] if self.golive is None else self.golive.withheld(mode, names)
        self.results.save_outputs(job.id, outputs, self.destinations, repaired, withheld, triage)
        log.info(
            "job.written",
            outputs=[item.kind for item in built],
            mode=mode,
            withheld=withheld,
            triage=[name for name, _ in triage],
            analysed=findings.summary.analysed,
            repaired=len(built.notes),
        )
        return True

    def _write_file(self, job: Job, item: Built, mode: Mode) -> Output:
        relative = output_path(job.instance_key, item.kind)
        write_durably(self.root / relative, item.data, fsync=self.fsync)
        size, rank = len(item.data), send_rank(item.kind)
        return Output(item.kind, item.sop_class_uid, item.sop_instance_uid, str(relative), size, rank, mode)

    def _requeue(self, job: Job, reason: str) -> None:
        self.jobs.transition(job.id, JobState.QUEUED, reason)
        log.warning("job.requeued", reason=reason)


def repaired_attributes(notes: Sequence[Note]) -> list[str]:
    """The attributes (or ``similar case <rank>``) the notes name, in order, each once: what the log records."""
    return list(dict.fromkeys(note.attribute for note in notes))
