"""The durable store as the stages see it: one Protocol per concern, each implemented by every backend.

A backend (:mod:`cxr_node.jobs.sqlite`, embedded; :mod:`cxr_node.jobs.postgres`, shared by many hosts; both
written once in :mod:`cxr_node.jobs.sql`) provides a :class:`Store` whose ``jobs``, ``results`` and
``deliveries`` satisfy these Protocols. Every state change goes through the state machines of
:mod:`cxr_node.jobs.states`; a move they do not allow raises :class:`~cxr_node.errors.InvalidTransition` and
changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from cxr_node.jobs.leases import Holder
from cxr_node.jobs.records import (
    DestinationState,
    Due,
    HolderState,
    Job,
    ModeRecord,
    NewJob,
    NewOutcome,
    Outcome,
    Output,
    PeriodRow,
    StoredResult,
)
from cxr_node.jobs.states import DeliveryState, JobState
from cxr_node.jobs.wakeup import Listener, Topic
from cxr_node.results.findings import Findings, Mode, Summary


class JobStore(Protocol):
    """Jobs: one per received instance, one committed write per state change."""

    def record(self, new: NewJob, state: JobState, reason: str | None = None) -> tuple[Job, bool]:
        """Insert a triaged job (``received`` then ``state``); an existing one is returned with False."""
        ...

    def transition(self, job_id: int, target: JobState, reason: str | None = None) -> Job:
        """Move one job to ``target`` if its state allows it."""
        ...

    def claim(self, limit: int, holder: Holder, lease_s: float, retries: bool = True) -> list[Job]:
        """Move up to ``limit`` of the oldest queued jobs to running under ``holder``'s lease and return them
        (a job on a later attempt alone; none of those with ``retries=False``)."""
        ...

    def claim_inferred(self, limit: int, holder: Holder, lease_s: float) -> list[Job]:
        """Take up to ``limit`` inferred jobs nobody is writing, to write their outputs under ``holder``'s lease."""
        ...

    def renew(self, holder: Holder, lease_s: float) -> int:
        """Extend the leases of ``holder``'s running jobs and record it alive; return how many jobs."""
        ...

    def release(self, holders: Sequence[str] | None, now: float, max_attempts: int, reason: str) -> list[Job]:
        """Take back running jobs from gone holders (all when None) and expired leases; dead after the last
        attempt."""
        ...

    def held(self) -> dict[str, tuple[int, float]]:
        """Running jobs by holder: how many, and when the first of their leases ends."""
        ...

    def throughput(self, since: float) -> dict[str, int]:
        """Jobs each holder finished inferring since ``since``."""
        ...

    def holders(self) -> list[HolderState]:
        """Every process that holds or held jobs, with when it last renewed."""
        ...

    def get(self, job_id: int) -> Job | None:
        """The job ``job_id``, or None."""
        ...

    def find(self, instance_key: str) -> Job | None:
        """The job of the instance ``instance_key``, or None."""
        ...

    def query(self, state: JobState | None = None, limit: int = 1000) -> list[Job]:
        """Up to ``limit`` jobs, oldest first, optionally only those in ``state``."""
        ...

    def history(self, job_id: int) -> list[tuple[str | None, str, str | None]]:
        """A job's transitions, oldest first, as ``(from, to, reason)``."""
        ...

    def counts(self) -> dict[JobState, int]:
        """The number of jobs in every state (zero included)."""
        ...

    def reasons(self, state: JobState) -> dict[str, int]:
        """Jobs in ``state`` counted by reason."""
        ...

    def moves(self, target: JobState, reason_prefix: str) -> int:
        """How many jobs ever moved to ``target`` with a reason starting ``reason_prefix``."""
        ...

    def oldest_open_age(self, now: float) -> float:
        """Seconds since the oldest job still in flight was received (0 when none is)."""
        ...

    def finished_before(self, cutoff: float, states: Sequence[JobState]) -> list[int]:
        """Ids of jobs in ``states`` last updated before ``cutoff``."""
        ...

    def study_jobs(self, study_instance_uid: str) -> list[int]:
        """Ids of every job of one study."""
        ...

    def delete(self, job_ids: Sequence[int]) -> int:
        """Delete jobs and everything recorded about them; return how many jobs were deleted."""
        ...


class ResultStore(Protocol):
    """Inference results and the outputs written from them."""

    def save_result(self, job_id: int, findings: Findings, embedding: bytes | None) -> Job:
        """Store a running job's findings (and its arrays, for the writers) and move it to inferred."""
        ...

    def result(self, job_id: int) -> StoredResult | None:
        """The stored result of ``job_id``, or None."""
        ...

    def save_candidate(self, job_id: int, summary: Summary) -> None:
        """Store (or replace) what a candidate model found on ``job_id``'s image; the job's state is not touched."""
        ...

    def candidate_results(self, job_id: int) -> list[Summary]:
        """What the candidate models found on ``job_id``'s image."""
        ...

    def beside(self, model_key: str, since: float = 0.0) -> list[tuple[int, Summary, Summary | None]]:
        """Each job candidate ``model_key`` ran on since ``since``: its summary and the job's own (or None)."""
        ...

    def period(self, since: float, until: float) -> list[PeriodRow]:
        """Every job received in [since, until), with its result's summary, when it was inferred and when its SR
        was first delivered (monitoring)."""
        ...

    def save_outputs(
        self,
        job_id: int,
        outputs: Sequence[Output],
        destinations: Sequence[str],
        reason: str | None = None,
        withheld: Sequence[str] = (),
        triage: Sequence[tuple[str, str]] = (),
    ) -> Job:
        """Record an inferred job's written outputs and a pending delivery per destination and output (a withheld
        one for the destinations in ``withheld``: shadow mode), and one per ``(destination, kind)`` in ``triage``
        (a worklist triage message, no output file: withheld too when its destination is in ``withheld``); move it
        to written (with ``reason``, e.g. the source values repaired); drop the arrays."""
        ...

    def outputs(self, job_id: int) -> list[Output]:
        """The outputs written for ``job_id``, in send order."""
        ...


class DeliveryStore(Protocol):
    """Deliveries of outputs to destinations, and what each destination accepts."""

    def due(
        self, destination: str, now: float, max_jobs: int, holder: Holder | None = None, lease_s: float = 0.0
    ) -> list[Due]:
        """Outputs due for ``destination``, oldest job first and in send order, for at most ``max_jobs`` jobs;
        with a ``holder``, claimed by it for ``lease_s`` (jobs another sender holds are passed over)."""
        ...

    def record(
        self,
        job_id: int,
        destination: str,
        kind: str,
        state: DeliveryState,
        status: int | None,
        error: str | None,
        next_attempt_at: float = 0.0,
        count_attempt: bool = True,
    ) -> JobState | None:
        """Record one send outcome; return the job's new state when it finished (delivered or dead)."""
        ...

    def settle_written(self) -> int:
        """Finish written jobs that have nothing left to send; return how many."""
        ...

    def refuse(self, destination: str, kinds: Sequence[str]) -> int:
        """Mark open deliveries of ``kinds`` to ``destination`` refused; return how many."""
        ...

    def expire(self, max_age_s: float) -> int:
        """Give up on open deliveries of outputs older than ``max_age_s``; return how many."""
        ...

    def resend(self, job_id: int | None = None, dead: bool = False) -> list[int]:
        """Re-queue the deliveries of one job, or of every dead job; return the job ids."""
        ...

    def renew(self, holder: Holder, lease_s: float) -> int:
        """Extend the leases of the open deliveries ``holder`` claimed; return how many."""
        ...

    def release(self, holders: Sequence[str]) -> int:
        """Free the deliveries leased to senders that are gone and forget them; return how many were freed."""
        ...

    def counts(self) -> dict[tuple[str, str], int]:
        """Deliveries by (destination, state)."""
        ...

    def save_destination(self, state: DestinationState) -> None:
        """Record a destination's probe result and backoff."""
        ...

    def destinations(self) -> dict[str, DestinationState]:
        """Every destination's last recorded state, by name."""
        ...


class ModeStore(Protocol):
    """The go-live mode of each model version (``Provenance.model_key``), with the history of who set it when."""

    def current(self, model_key: str) -> ModeRecord | None:
        """The model version's mode as last set, or None when it has no record yet."""
        ...

    def ensure(self, model_key: str, mode: Mode, set_by: str, reason: str | None = None) -> ModeRecord:
        """The model version's mode; when it has no record yet, ``mode`` is recorded first (an existing record
        is never changed: a restart or an upgrade keeps the mode)."""
        ...

    def set(self, model_key: str, mode: Mode, set_by: str, reason: str | None = None) -> ModeRecord:
        """Record an operator's setting of the model version's mode (and its history row)."""
        ...

    def all(self) -> list[ModeRecord]:
        """Every model version's current mode, by model key."""
        ...

    def history(self, model_key: str | None = None) -> list[ModeRecord]:
        """Every setting, oldest first, of one model version or of all."""
        ...


class OutcomeStore(Protocol):
    """The sites' final findings (ground truth), by accession number, from every route they arrive by."""

    def record(self, new: NewOutcome) -> tuple[Outcome, bool]:
        """Record an outcome durably (committed on return); a repeat of one already recorded (same source and
        source_id) is not recorded again. Returns the stored outcome and whether it was new."""
        ...

    def query(self, since: float = 0.0, until: float | None = None) -> list[Outcome]:
        """Outcomes reported (else received) in [since, until), oldest first."""
        ...

    def for_accession(self, accession_number: str) -> list[Outcome]:
        """Every outcome recorded for one accession number, oldest first (the last one supersedes)."""
        ...

    def for_accessions(self, accessions: Iterable[str]) -> list[Outcome]:
        """Every outcome of these accession numbers, whenever reported, in the order recorded."""
        ...

    def after(self, outcome_id: int, limit: int = 1000) -> list[Outcome]:
        """Up to ``limit`` outcomes recorded after the one with id ``outcome_id``, in the order recorded."""
        ...

    def studies(self, outcome: Outcome) -> list[str]:
        """The studies an outcome is about: its own Study Instance UID, else those stored under its accession."""
        ...


class Store(Protocol):
    """One open store: its parts, sharing one database."""

    @property
    def migrated_from(self) -> int | None:
        """The schema version this open found and migrated (0: created it), or None when it was current."""
        ...

    @property
    def jobs(self) -> JobStore:
        """The jobs."""
        ...

    @property
    def results(self) -> ResultStore:
        """Results and outputs."""
        ...

    @property
    def deliveries(self) -> DeliveryStore:
        """Deliveries and destinations."""
        ...

    @property
    def modes(self) -> ModeStore:
        """The go-live mode of each model version."""
        ...

    @property
    def outcomes(self) -> OutcomeStore:
        """The sites' final findings (ground truth)."""
        ...

    def listen(self, topic: Topic) -> Listener:
        """A consumer's end of ``topic``: it wakes when a commit of any process (any host, on PostgreSQL)
        queued a job or wrote outputs."""
        ...

    def close(self) -> None:
        """Release the connection(s)."""
        ...
