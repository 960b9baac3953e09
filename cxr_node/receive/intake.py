"""What happens to a received instance, free of pynetdicom: check, place durably, record, answer.

The order is the durability contract of DESIGN.md §6: the file is written and fsynced, renamed into
place, its job row committed, and only then is Success returned. Any failure on that path is answered
``OUT_OF_RESOURCES`` so the PACS retries; nothing unacknowledged is lost either (orphans are adopted
on the next start by :meth:`Intake.adopt_orphans`).
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.dicom.codes import MODALITY_OF_CLASS
from cxr_node.errors import RejectedInstance, StorageError
from cxr_node.jobs import spool
from cxr_node.jobs.interfaces import JobStore
from cxr_node.jobs.records import Job, NewJob
from cxr_node.jobs.states import JobState
from cxr_node.privacy import PatientHasher
from cxr_node.receive.filters import Verdict, triage
from cxr_node.receive.pressure import Pressure

log = structlog.get_logger("cxr_node.receive")

_AREA: Final = {"eligible": spool.INBOX, "malformed": spool.QUARANTINE, "skipped": spool.SKIPPED}
_STATE: Final = {"eligible": JobState.QUEUED, "malformed": JobState.QUARANTINED, "skipped": JobState.SKIPPED}
IDENTIFYING_UIDS: Final = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
"""Attributes an instance must carry as valid UIDs to be accepted: they name its files, job, study and outputs."""
DEFER_SIZE: Final = 64 * 1024
"""Elements larger than this (pixel data) are not read when a stored file's header is parsed."""
CONCURRENT_WAIT_S: Final = 10.0
"""How long a receive waits for the job of the same instance another association has just placed."""


@dataclass(frozen=True)
class Peer:
    """Who sent an instance."""

    ae_title: str
    address: str

    @classmethod
    def local(cls, reason: str) -> Peer:
        """A peer standing for the node itself (recovery, imports)."""
        return cls(ae_title="", address=reason)


@dataclass(frozen=True)
class StoreOutcome:
    """The C-STORE answer for one instance, and the job it became (if any)."""

    status: int
    comment: str = ""
    job_id: int | None = None
    state: JobState | None = None


class Intake:
    """Stores, triages and records received instances.

    Parameters
    ----------
    settings : Settings
        ``storage`` (root, fsync, keep_skipped), ``triage`` and ``node.max_instance_mb`` are used.
    jobs : JobStore
        Where jobs are recorded.
    hasher : PatientHasher
        Hashes the Patient ID kept with each job (the ID itself is never stored).
    """

    def __init__(self, settings: Settings, jobs: JobStore, hasher: PatientHasher) -> None:
        self.root = settings.storage.root
        self.fsync = settings.storage.fsync
        self.keep_skipped = settings.storage.keep_skipped
        self.rules = settings.triage
        self.max_bytes = settings.node.max_instance_bytes
        self.jobs = jobs
        self.hasher = hasher
        storage = settings.storage
        max_jobs = storage.max_jobs or None
        self.pressure = Pressure(
            jobs, self.root, settings.node.max_queue_depth, storage.max_disk_percent, max_jobs=max_jobs
        )

    def accept(self, ds: Dataset, encoded: bytes | Path, transfer_syntax: str, peer: Peer) -> StoreOutcome:
        """Handle one C-STORE data set; never raises.

        Parameters
        ----------
        ds : Dataset
            The decoded data set (elements may be parsed lazily or deferred).
        encoded : bytes or Path
            The instance in the DICOM file format (preamble, file meta, data set as received): in memory,
            or a complete file (pynetdicom's spool file) that is moved into place when kept.
        transfer_syntax : str
            The transfer syntax of the presentation context it came on.
        peer : Peer
            The sender.
        """
        try:
            return self._accept(ds, encoded, transfer_syntax, peer)
        except RejectedInstance as exc:
            log.warning("store.rejected", reason=exc.reason, status=f"0x{exc.status:04X}")
            return StoreOutcome(exc.status, status.error_comment(exc.reason))
        except (OSError, StorageError) as exc:
            log.error("store.failed", error=str(exc))
            return StoreOutcome(status.OUT_OF_RESOURCES, status.error_comment(f"cannot store: {_short(exc)}"))
        except Exception as exc:
            log.exception("store.unexpected_error")
            return StoreOutcome(
                status.UNEXPECTED_FAILURE, status.error_comment(f"internal error: {type(exc).__name__}")
            )

    def _accept(self, ds: Dataset, encoded: bytes | Path, transfer_syntax: str, peer: Peer) -> StoreOutcome:
        full = self.pressure.reason()
        if full:
            raise RejectedInstance(status.OUT_OF_RESOURCES, full)
        size = encoded.stat().st_size if isinstance(encoded, Path) else len(encoded)
        if size > self.max_bytes:  # the spool cap refuses these first; this covers orphans adopted at start-up
            raise RejectedInstance(status.INSTANCE_TOO_LARGE, f"instance of {size} bytes exceeds node.max_instance_mb")
        new = _identify(ds, transfer_syntax, peer, size, self.hasher)
        existing = self.jobs.find(new.instance_key)
        if existing is not None:
            return self._again(existing, new, ds, encoded)
        verdict = self._triage(ds)
        try:
            rel = self._place(new.instance_key, verdict, encoded)
        except FileExistsError:  # another association placed this instance since the look-up: compare with it
            return self._again(self._recorded(new.instance_key, encoded), new, ds, encoded)
        job, created = self.jobs.record(_with_path(new, rel), _STATE[verdict.kind], verdict.reason or None)
        if not created:  # recorded by another association meanwhile (its file not kept): compare with it
            placed = None if rel is None or job.path == rel else self.root / rel
            return self._again(job, new, ds, placed or encoded)
        _log_outcome(job.id, job.state, verdict, created, new)
        if verdict.kind == "malformed":
            return StoreOutcome(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS, status.error_comment(verdict.reason), job.id, job.state
            )
        return StoreOutcome(status.SUCCESS, "", job.id, job.state)

    def _again(self, existing: Job, new: NewJob, ds: Dataset, encoded: bytes | Path) -> StoreOutcome:
        """An instance whose SOP Instance UID is already known: an identical re-send keeps the first (Success);
        one with other content is refused and never stored over it.

        When the first instance's file is still kept, the two headers are compared attribute by attribute (and
        their pixel data); otherwise the identifiers recorded with its job are.
        """
        first = self._first_header(existing)
        differs = _differences(first, ds) if first is not None else _recorded_differences(existing, new)
        differs = differs or self._pixels_differ(existing, new, encoded)
        if isinstance(encoded, Path):
            encoded.unlink(missing_ok=True)
        fields = {"job_id": existing.id, "instance": new.instance_key[:16]}
        if not differs:
            log.info("store.duplicate", state=str(existing.state), **fields)
            return StoreOutcome(status.SUCCESS, "", existing.id, existing.state)
        log.warning("store.conflict", differs=differs, **fields)
        reason = f"SOP Instance UID already received with another {differs}"
        return StoreOutcome(status.INSTANCE_CONFLICT, status.error_comment(reason), existing.id, existing.state)

    def _recorded(self, key: str, encoded: bytes | Path) -> Job:
        """The job of an instance whose file another association has just placed, once it is committed (it follows
        the file within milliseconds); RejectedInstance (out of resources: the sender retries) when it is not."""
        deadline = time.monotonic() + CONCURRENT_WAIT_S
        while (job := self.jobs.find(key)) is None:
            if time.monotonic() > deadline:
                if isinstance(encoded, Path):
                    encoded.unlink(missing_ok=True)
                raise RejectedInstance(status.OUT_OF_RESOURCES, "the same instance is being stored; retry later")
            time.sleep(0.02)
        return job

    def _first_header(self, existing: Job) -> Dataset | None:
        """The header of the first instance, when its file is still kept and readable."""
        if existing.path is None:
            return None
        try:
            return dcmread(self.root / existing.path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError):
            return None

    def _pixels_differ(self, existing: Job, new: NewJob, encoded: bytes | Path) -> str:
        """'pixel data' when both files are at hand, in the same transfer syntax, and their pixel data differ."""
        if existing.path is None or existing.transfer_syntax != new.transfer_syntax:
            return ""
        try:
            first = pixel_digest(self.root / existing.path)
            second = pixel_digest(encoded)
        except (OSError, InvalidDicomError, ValueError):
            return ""
        return "pixel data" if first != second else ""

    def _triage(self, ds: Dataset) -> Verdict:
        try:
            return triage(ds, self.rules)
        except Exception as exc:  # a header pydicom cannot parse is malformed, not our crash
            return Verdict("malformed", f"header cannot be parsed: {_short(exc)}")

    def _place(self, key: str, verdict: Verdict, encoded: bytes | Path) -> str | None:
        if verdict.kind == "skipped" and not self.keep_skipped:
            return None
        rel = spool.relative_path(_AREA[verdict.kind], key)
        if isinstance(encoded, Path):  # exclusive: a concurrent receive of the same instance never replaces a file
            spool.move_durably(encoded, self.root / rel, fsync=self.fsync, exclusive=True)
        else:
            spool.write_durably(self.root / rel, encoded, fsync=self.fsync, exclusive=True)
        return str(rel)

    def adopt_orphans(self, min_age_s: float = 0.0) -> int:
        """Record every inbox/quarantine file that has no job (a crash between rename and commit).

        Parameters
        ----------
        min_age_s : float
            Only files older than this are orphans: while other hosts' receivers share the storage root, a
            younger file may be one whose job is being committed right now.

        Returns
        -------
        int
            How many files were adopted.
        """
        adopted = 0
        cutoff = time.time() - min_age_s
        for area in (spool.INBOX, spool.QUARANTINE, spool.SKIPPED):
            for path in spool.iter_spooled(self.root, area):
                if self.jobs.find(path.stem) is None and (min_age_s <= 0 or _mtime(path) < cutoff):
                    adopted += self._adopt(path)
        return adopted

    def _adopt(self, path: Path) -> int:
        try:
            ds = dcmread(path, defer_size=DEFER_SIZE)
        except (InvalidDicomError, OSError, ValueError) as exc:
            log.warning("recovery.unreadable_orphan", path=str(path), error=_short(exc))
            return 0
        outcome = self.accept(ds, path, str(ds.file_meta.TransferSyntaxUID), Peer.local("recovery"))
        job = self.jobs.get(outcome.job_id) if outcome.job_id is not None else None
        if job is None:
            return 0
        if job.path != str(path.relative_to(self.root)):
            path.unlink(missing_ok=True)  # triage placed it elsewhere (or dropped a skipped instance)
        log.info("recovery.orphan_adopted", job_id=job.id, state=str(job.state))
        return 1


def _identify(ds: Dataset, transfer_syntax: str, peer: Peer, size: int, hasher: PatientHasher) -> NewJob:
    """Read the identifying attributes; raise RejectedInstance when one is missing or not a valid UID."""
    try:
        uids = {name: str(ds.get(name, "") or "").strip("\x00 ") for name in IDENTIFYING_UIDS}
        for name, value in uids.items():
            if not value:
                raise RejectedInstance(status.IDENTIFIER_INVALID, f"{name} missing")
            if not UID(value).is_valid:
                raise RejectedInstance(status.IDENTIFIER_INVALID, f"{name} is not a valid UID")
        return NewJob(
            instance_key=spool.instance_key(uids["SOPInstanceUID"]),
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            accession_number=str(ds.get("AccessionNumber", "") or ""),
            patient_hash=hasher(str(ds.get("PatientID", "") or "")),
            modality=str(ds.get("Modality", "") or "") or MODALITY_OF_CLASS.get(uids["SOPClassUID"], ""),
            transfer_syntax=str(transfer_syntax),
            calling_aet=peer.ae_title,
            peer=peer.address,
            path=None,
            size_bytes=size,
        )
    except RejectedInstance:
        raise
    except Exception as exc:
        raise RejectedInstance(status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {_short(exc)}") from exc


IDENTITY: Final = (
    ("patient", ("PatientID", "IssuerOfPatientID")),
    ("study", ("StudyInstanceUID",)),
    ("series", ("SeriesInstanceUID",)),
    ("SOP class", ("SOPClassUID",)),
)
"""What makes two instances with one SOP Instance UID the same instance, besides their pixel data."""


def _differences(first: Dataset, again: Dataset) -> str:
    """Which identifying attributes of a re-sent instance differ from the first one's, in words ('' when none)."""

    def value(ds: Dataset, keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip("\x00 ")

    return ", ".join(name for name, keywords in IDENTITY if any(value(first, k) != value(again, k) for k in keywords))


def _recorded_differences(existing: Job, new: NewJob) -> str:
    """:func:`_differences` from what the first instance's job recorded (its file is no longer kept)."""
    pairs = (
        ("patient", existing.patient_hash, new.patient_hash),
        ("study", existing.study_instance_uid, new.study_instance_uid),
        ("series", existing.series_instance_uid, new.series_instance_uid),
        ("SOP class", existing.sop_class_uid, new.sop_class_uid),
    )
    return ", ".join(name for name, first, second in pairs if first != second)


def pixel_digest(source: Path | bytes) -> str:
    """SHA-256 of the Pixel Data value of a stored instance, as encoded (no decoding)."""
    ds = dcmread(source if isinstance(source, Path) else io.BytesIO(source), specific_tags=["PixelData"])
    value = ds.get("PixelData")
    return hashlib.sha256(value if isinstance(value, bytes) else b"").hexdigest()


def _with_path(new: NewJob, rel: str | None) -> NewJob:
    return NewJob(**{**new.__dict__, "path": rel})


def _log_outcome(job_id: int, state: JobState, verdict: Verdict, created: bool, new: NewJob) -> None:
    fields = {"job_id": job_id, "state": str(state), "instance": new.instance_key[:16]}
    if not created:
        log.info("store.duplicate", **fields)
    elif verdict.kind == "eligible":
        log.info("store.accepted", **fields, transfer_syntax=new.transfer_syntax, bytes=new.size_bytes)
    else:
        log.info(f"store.{state}", **fields, reason=verdict.reason)


def _short(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:120]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: not an orphan
