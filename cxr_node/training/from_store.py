"""A labelled set built from the node's own store: stored images plus a labels CSV keyed by accession number.

A site that has run the node for a while holds its chest radiographs in ``storage.root`` and knows, from
PCR results or reports, which studies were COVID-19. ``cxr-node dataset from-store`` joins the two: every
stored frontal chest image whose Accession Number has a label becomes a row of a labelled set CSV
(path, label, patient_id, sop_instance_uid, study_uid, accession_number), with the patient given as the
node's hash of the Patient ID (so a split by patient works without the ID in clear).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cxr_node.jobs.interfaces import Store
from cxr_node.jobs.records import Job
from cxr_node.jobs.spool import DB_NAME
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from cxr_node.training.datasets import parse_label

COLUMNS: Final = ("path", "label", "patient_id", "sop_instance_uid", "study_uid", "accession_number")
USABLE: Final = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.WRITTEN, JobState.DELIVERED})
"""Jobs whose stored file is a frontal chest image the node accepted for analysis."""


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build_from_store` wrote and left out."""

    csv: Path
    rows: int
    positives: int
    unlabelled: int
    labels_without_image: int


def read_accession_labels(path: Path) -> dict[str, int]:
    """Read ``accession_number,label`` rows (label as covid/non-covid, 1/0 or positive/negative).

    Raises
    ------
    ValueError
        A column is missing, a label is unreadable, or an accession number has two different labels.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"accession_number", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        labels: dict[str, int] = {}
        for line, record in enumerate(reader, start=2):
            accession = (record["accession_number"] or "").strip()
            try:
                label = parse_label(record["label"] or "")
            except ValueError as exc:
                raise ValueError(f"{path} line {line}: {exc}") from exc
            if labels.setdefault(accession, label) != label:
                raise ValueError(f"{path} line {line}: accession {accession!r} has two different labels")
    return labels


def build_from_store(root: Path, labels_csv: Path, out_csv: Path, store: Store | None = None) -> BuildReport:
    """Write a labelled set CSV of the stored images of ``root`` whose accession numbers are labelled.

    ``store`` is the node's store (the SQLite file under ``root`` when None, opened read-only). Paths in the
    CSV are absolute (the images stay where the node keeps them).
    """
    labels = read_accession_labels(labels_csv)
    source = store or SqliteStore(root / DB_NAME, readonly=True)
    try:
        jobs = [job for job in source.jobs.query(limit=10_000_000) if job.state in USABLE and job.path]
    finally:
        if store is None:
            source.close()
    rows = [_row(root, job, labels[job.accession_number]) for job in jobs if job.accession_number in labels]
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    used = Counter(row["accession_number"] for row in rows)
    return BuildReport(
        csv=out_csv,
        rows=len(rows),
        positives=sum(row["label"] == "covid" for row in rows),
        unlabelled=len(jobs) - len(rows),
        labels_without_image=sum(1 for accession in labels if accession not in used),
    )


def _row(root: Path, job: Job, label: int) -> dict[str, str]:
    return {
        "path": str((root / str(job.path)).resolve()),
        "label": "covid" if label else "non-covid",
        "patient_id": job.patient_hash,
        "sop_instance_uid": job.sop_instance_uid,
        "study_uid": job.study_instance_uid,
        "accession_number": job.accession_number,
    }
