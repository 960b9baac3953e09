"""The records the durable store keeps and hands out: jobs, stored results, outputs, deliveries, destinations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from cxr_node.jobs.states import JobState
from cxr_node.results.findings import Mode, Summary


@dataclass(frozen=True)
class NewJob:
    """What the receiver knows about an instance when it records it. No patient identifier in clear."""

    instance_key: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    patient_hash: str
    modality: str
    transfer_syntax: str
    calling_aet: str
    peer: str
    path: str | None
    size_bytes: int


@dataclass(frozen=True)
class Job(NewJob):
    """A job as stored: the instance, where its file is, and where it stands."""

    id: int
    state: JobState
    reason: str | None
    attempts: int
    received_at: float
    updated_at: float
    holder: str | None = None
    lease_until: float | None = None


@dataclass(frozen=True)
class StoredResult:
    """What inference found for a job (typed), the retrieval embedding (float32 bytes) and, until the outputs
    are written, the arrays the writers need (see :mod:`cxr_node.jobs.codec`)."""

    job_id: int
    created_at: float
    summary: Summary
    embedding: bytes | None
    arrays: bytes | None = None


@dataclass(frozen=True)
class Output:
    """One DICOM object written for a job, in the outbox (path relative to the storage root).

    ``send_order`` ranks it among the job's outputs (0 is sent first; :mod:`cxr_node.results.kinds`); ``mode`` is
    the go-live mode it was written in (kept with it: a later change of mode does not rewrite history).
    """

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    size_bytes: int
    send_order: int = 0
    mode: Mode = "live"


@dataclass(frozen=True)
class Due:
    """One output of one job that is due to be sent to one destination."""

    job_id: int
    kind: str
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int
    mode: Mode = "live"


@dataclass(frozen=True)
class ModeRecord:
    """One setting of a model version's go-live mode: which model (``name/version``), the mode, who set it (an
    operator's name, or ``golive.initial_mode`` for the first record), when (epoch seconds) and why."""

    model_key: str
    mode: Mode
    set_by: str
    set_at: float
    reason: str | None = None


@dataclass(frozen=True)
class DestinationState:
    """What the last probe found and whether the destination is backing off."""

    name: str
    reachable: bool
    accepted: list[str]
    refused: list[str]
    error: str | None
    probed_at: float
    down_since: float | None
    retry_at: float
    failures: int


@dataclass(frozen=True)
class HolderState:
    """A process that holds (or held) jobs, as the store last heard of it."""

    id: str
    role: str
    renewed_at: float


OutcomeLabel = Literal["positive", "negative", "not_assessable"]
OUTCOME_LABELS: Final[tuple[OutcomeLabel, ...]] = ("positive", "negative", "not_assessable")


@dataclass(frozen=True)
class NewOutcome:
    """A radiologist's (or a laboratory's) final finding for one examination, as it arrived.

    ``source`` is the route (``csv``, ``hl7``, ``fhir``); ``source_id`` names it uniquely within that route (an HL7
    message control ID and the OBX it came from, a FHIR resource's id and version, a CSV file's SHA-256 and line):
    the same message or resource arriving twice is recorded once. ``code`` is what was mapped (a code, its system,
    the words), ``reported_at`` when the finding was made (epoch seconds), if the source says.
    """

    source: str
    source_id: str
    accession_number: str
    label: OutcomeLabel
    study_instance_uid: str = ""
    code: str = ""
    reported_at: float | None = None


@dataclass(frozen=True)
class Outcome(NewOutcome):
    """An outcome as stored: its row id and when the node received it (epoch seconds)."""

    id: int = 0
    received_at: float = 0.0


@dataclass(frozen=True)
class PeriodRow:
    """One job received in a period, as monitoring reads it: where it came from, where it stands, what the model
    in use found (None: no result) and when it was received, inferred and its SR first delivered (epoch seconds)."""

    job_id: int
    accession_number: str
    study_instance_uid: str
    modality: str
    calling_aet: str
    state: JobState
    received_at: float
    summary: Summary | None
    inferred_at: float | None
    sr_delivered_at: float | None
