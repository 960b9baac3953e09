"""What a worklist triage message says, read from the store: the stored result and the source's header, checked.

A triage destination (``protocol: hl7`` or ``fhir``, docs/triage-out.md) gets one message per job, built when it
is sent from what the store holds: the result's :class:`~cxr_node.results.findings.Summary` (decoded by
:mod:`cxr_node.jobs.codec`), the go-live mode the job's outputs were written in, and the patient and study values
of the stored source file, each checked as the DICOM outputs check them (:func:`cxr_node.results.copied.checked`):
repaired where the repair is unambiguous, otherwise left out. A header that cannot be read leaves the patient
out (the study UID and accession number come from the job record then); only a job with no stored result cannot
be told, and its delivery is dead at once. The same job always gives the same :class:`TriageFacts`, so a message
sent again is the same message (:attr:`TriageFacts.control_id`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_node.errors import SendError
from cxr_node.jobs.interfaces import JobStore, ResultStore
from cxr_node.jobs.records import Job
from cxr_node.results.copied import checked
from cxr_node.results.findings import MANIFEST_SOURCE, MODES, Mode, SiteOperatingPoint, Summary

log = structlog.get_logger("cxr_node.send")

CONTROL_PREFIX: Final = "CXRN"
"""How every message control ID (MSH-10) and FHIR identifier the node derives begins."""
CONTROL_ID_LENGTH: Final = 20
"""The longest MSH-10 HL7 v2.5 allows (ST, 20)."""
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
HEADER_KEYWORDS: Final = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
)
"""The source values a triage message may carry."""


class TriageError(SendError):
    """A triage message cannot be made for this job (no stored result): a retry cannot help."""


@dataclass(frozen=True)
class SourceValues:
    """The patient and study as the source names them, checked; an empty string: unknown or left out.
    ``patient_name`` is DICOM PN (``^`` between family, given, middle, prefix and suffix)."""

    patient_id: str = ""
    issuer: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class TriageFacts:
    """Everything a triage message says about one job.

    Parameters
    ----------
    job_id : int
        The job; with ``instance_key`` it makes the control ID.
    instance_key : str
        The received instance's key (stable for the job's life, distinct between two stores).
    summary : Summary
        What the model found, or why it could not analyse the image.
    mode : Mode
        The go-live mode the job's outputs were written in.
    result_time : float
        When the result was stored (epoch seconds): the message's date/time, the same on every resend.
    operating_point_source : str
        Where the operating point came from (the model manifest, or a site calibration); "" when not analysed.
    source : SourceValues
        The patient and study.
    left_out : tuple of str
        The attributes repaired or left out (names only, never values), for the log.
    """

    job_id: int
    instance_key: str
    summary: Summary
    mode: Mode
    result_time: float
    operating_point_source: str
    source: SourceValues = SourceValues()
    left_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.job_id < 1:
            raise ValueError(f"job_id must be >= 1, found {self.job_id}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, found {self.mode!r}")

    @property
    def control_id(self) -> str:
        """The message control ID: ``CXRN<job id>.<hash>`` (20 characters at most), the hash of the job's
        instance key, so the same job always gives the same ID and another store's job of the same number does
        not."""
        stem = f"{CONTROL_PREFIX}{self.job_id}."
        room = max(4, min(8, CONTROL_ID_LENGTH - len(stem)))
        return stem + hashlib.sha256(self.instance_key.encode()).hexdigest()[:room].upper()

    @property
    def priority(self) -> str:
        """``S`` (stat) for a positive result, ``R`` (routine) otherwise."""
        return "S" if self.summary.positive else "R"


class TriageReader:
    """Reads :class:`TriageFacts` from the jobs store and the stored source files under ``root``.

    Parameters
    ----------
    root : Path
        The storage root.
    jobs, results : JobStore, ResultStore
        The job records and their stored results.
    site : SiteOperatingPoint or None
        The configured site calibration: a result whose threshold is its threshold names its source.
    """

    def __init__(
        self, root: Path, jobs: JobStore, results: ResultStore, site: SiteOperatingPoint | None = None
    ) -> None:
        self.root = root
        self.jobs = jobs
        self.results = results
        self.site = site

    def read(self, job_id: int, mode: Mode) -> TriageFacts:
        """The facts of ``job_id`` whose outputs were written in ``mode``.

        Raises
        ------
        TriageError
            When the job or its stored result is gone (or the result cannot be decoded).
        """
        job = self.jobs.get(job_id)
        try:
            stored = self.results.result(job_id)
        except ValueError as exc:
            raise TriageError(f"the stored result cannot be decoded: {exc}") from exc
        if job is None or stored is None:
            raise TriageError(f"job {job_id} has no stored result to report")
        header = self._header(job)
        values, left_out = header_values(header) if header is not None else ({}, ())
        if header is None:  # the patient is left out; the study is still named by the job record
            values["accession_number"] = _clean(job.accession_number)
        values["study_instance_uid"] = _clean(job.study_instance_uid)
        summary = stored.summary
        return TriageFacts(
            job.id, job.instance_key, summary, mode, stored.created_at, self.source_of(summary),
            SourceValues(**values), left_out,
        )  # fmt: skip

    def source_of(self, summary: Summary) -> str:
        """Where the result's operating point came from: the site calibration when its threshold is the one
        configured, else the model manifest; "" for a result not analysed."""
        if summary.threshold is None:
            return ""
        if self.site is not None and abs(self.site.threshold - summary.threshold) < 1e-9:
            return self.site.source
        return MANIFEST_SOURCE

    def _header(self, job: Job) -> Dataset | None:
        if job.path is None:
            log.warning("triage.header_unreadable", error="the job has no stored file")
            return None
        try:
            return dcmread(self.root / job.path, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
        except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            log.warning("triage.header_unreadable", error=type(exc).__name__)
            return None


_FIELDS: Final = {
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer",
    "PatientName": "patient_name",
    "PatientBirthDate": "birth_date",
    "PatientSex": "sex",
    "AccessionNumber": "accession_number",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyDescription": "study_description",
}


def header_values(header: Dataset) -> tuple[dict[str, str], tuple[str, ...]]:
    """The triage values of ``header`` by :class:`SourceValues` field, each checked against its VR (repaired or
    left out, never failing), and the keywords repaired or left out."""
    values: dict[str, str] = {}
    changed: list[str] = []
    for keyword, name in _FIELDS.items():
        value, why = _checked_value(header, keyword)
        if why:
            changed.append(keyword)
        if value:
            values[name] = value
    return values, tuple(changed)


def _checked_value(header: Dataset, keyword: str) -> tuple[str, str]:
    try:
        element = header.data_element(keyword)
        if not isinstance(element, DataElement) or element.value in (None, ""):
            return "", ""
        kept, why = checked(element)
        if kept is None:
            return "", why or "left out"
        text = str(kept.value)
    except Exception as exc:
        return "", type(exc).__name__
    clean = _clean(text)
    return clean, why or ("control characters" if clean != text.strip() else "")


def _clean(value: str) -> str:
    """``value`` with control characters removed and surrounding spaces stripped."""
    return _CONTROL.sub("", value).strip()
