"""Loading a job's stored instance: its header (pixel data dropped) and its decoded image, if it decodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_node.dicom.pixels import DecodedImage, decode
from cxr_node.errors import PixelDecodeError
from cxr_node.jobs.records import Job
from cxr_node.neighbours import Label, NewCase, Source
from cxr_node.neighbours.cases import accession_problem
from cxr_node.privacy import PatientHasher

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MAX_DEPTH = 16
"""Sequences nested deeper than this are not walked (the receiver refuses deeper headers anyway)."""


@dataclass(frozen=True)
class Loaded:
    """A running job with its source header (pixel data dropped) and its decoded image, if it decodes."""

    job: Job
    header: Dataset
    image: DecodedImage | None
    reason: str = ""


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
    for keyword in _PIXEL_KEYWORDS:
        ds.pop(keyword, None)
    drop_unreadable(ds)
    return Loaded(job, ds, image, reason)


def drop_unreadable(ds: Dataset, depth: int = 0) -> int:
    """Delete the elements pydicom cannot read (an unknown VR, bytes that are no value of their VR), in ``ds``
    and in its sequences; return how many. What is left can be iterated and copied without surprises."""
    dropped = 0
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
            items = list(element.value) if element.VR == "SQ" and depth < MAX_DEPTH else []
        except Exception:  # pydicom raises many types for garbage; the element is dropped, never the job
            del ds[tag]
            dropped += 1
            continue
        dropped += sum(drop_unreadable(item, depth + 1) for item in items if isinstance(item, Dataset))
    return dropped


def study_date(header: Dataset) -> str:
    """The StudyDate as ``YYYYMMDD``, or "" when it is absent or malformed (values from the wire vary)."""
    value = str(header.get("StudyDate", "") or "").strip()
    return value if len(value) == 8 and value.isdigit() else ""


def _accession(header: Dataset) -> str:
    """The AccessionNumber when a report can write it, else "" (never cut: a cut one can name another study)."""
    value = str(header.get("AccessionNumber", "") or "").strip()
    return "" if accession_problem(value) else value


def index_case(header: Dataset, hasher: PatientHasher, label: Label | None = None, source: Source = "store") -> NewCase:
    """The neighbour index's view of an image: identifiers and a keyed hash of the patient ID, never the ID."""
    return NewCase(
        sop_instance_uid=str(header.SOPInstanceUID).strip(),
        study_instance_uid=str(header.StudyInstanceUID).strip(),
        accession_number=_accession(header),
        study_date=study_date(header),
        patient_hash=hasher(str(header.get("PatientID", "") or "")),
        label=label,
        source=source,
    )
