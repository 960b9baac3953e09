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
from cxr_node.privacy import PatientHasher

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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
    return Loaded(job, ds, image, reason)


def study_date(header: Dataset) -> str:
    """The StudyDate as ``YYYYMMDD``, or "" when it is absent or malformed (values from the wire vary)."""
    value = str(header.get("StudyDate", "") or "").strip()
    return value if len(value) == 8 and value.isdigit() else ""


def index_case(
    header: Dataset, hasher: PatientHasher, label: Label | None = None, source: Source = "store"
) -> NewCase:
    """The neighbour index's view of an image: identifiers and a keyed hash of the patient ID, never the ID."""
    return NewCase(
        sop_instance_uid=str(header.SOPInstanceUID).strip(),
        study_instance_uid=str(header.StudyInstanceUID).strip(),
        accession_number=str(header.get("AccessionNumber", "") or "")[:64],
        study_date=study_date(header),
        patient_hash=hasher(str(header.get("PatientID", "") or "")),
        label=label,
        source=source,
    )
