"""``cxr-node index``: the labelled reference library and the neighbour index, for ML staff and admins.

``import`` embeds confirmed cases (DICOM + a CSV of labels) into the index as the reference library and
keeps a copy of each file; ``label`` sets a stored study's confirmed label; ``query`` prints a file's
nearest cases; ``rebuild`` re-embeds every stored case and library file with the current model (after a
model change; embeddings of different model versions are never compared).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from cxr_node.config import Settings
from cxr_node.dicom.pixels import decode
from cxr_node.errors import CxrNodeError, PixelDecodeError
from cxr_node.jobs import spool
from cxr_node.jobs.interfaces import JobStore
from cxr_node.jobs.states import JobState
from cxr_node.neighbours import LABELS, Label, Neighbour, NeighbourIndex, NewCase, Source
from cxr_node.neighbours.cases import indexable
from cxr_node.privacy import PatientHasher
from cxr_node.work.gate import DomainGate, refusal_reason
from cxr_node.work.load import index_case
from cxr_node.work.loop import Analyser

LIBRARY: Final = "library"
"""Folder under storage.root where imported reference cases are kept (for ``rebuild``)."""
BATCH: Final = 8
ANALYSED_STATES: Final = (JobState.INFERRED, JobState.WRITTEN, JobState.DELIVERED)
"""Stored inputs in these states were analysed by the node (``rebuild`` re-embeds them)."""


@dataclass(frozen=True)
class Embedded:
    """One image, its case metadata and its embedding (None when it could not be analysed)."""

    path: Path
    case: NewCase
    embedding: np.ndarray | None
    reason: str = ""


def read_labels(csv_path: Path, folder: Path) -> list[tuple[Path, Label]]:
    """(file, label) pairs from a CSV with columns ``path`` (relative to ``folder``) and ``label``.

    Raises
    ------
    CxrNodeError
        When the CSV lacks a column, a label is not covid/non-covid, or a file is missing.
    """
    try:
        with csv_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise CxrNodeError(f"{csv_path}: cannot read the labels: {exc.strerror}") from exc
    pairs = []
    for number, row in enumerate(rows, start=2):
        if "path" not in row or "label" not in row:
            raise CxrNodeError(f"{csv_path}: needs the columns path and label (found {', '.join(row)})")
        label = _label(row["label"].strip().lower())
        if label is None:
            raise CxrNodeError(f"{csv_path}:{number}: label must be one of {', '.join(LABELS)}, found {row['label']!r}")
        path = folder / row["path"]
        if not path.is_file():
            raise CxrNodeError(f"{csv_path}:{number}: {path} not found")
        pairs.append((path, label))
    return pairs


@dataclass(frozen=True)
class Embedder:
    """What turns files into index entries: the current model, the site's patient hasher, the decode size, and
    the out-of-domain gate (an image outside the model's validated domain is never indexed)."""

    engine: Analyser
    hasher: PatientHasher
    max_side: int
    gate: DomainGate = field(default_factory=DomainGate)

    @property
    def version(self) -> str:
        """The model version embeddings are stored under."""
        return self.engine.model[1]

    def embed(
        self, items: Iterable[tuple[Path, NewCase | None, Label | None]], source: Source = "store"
    ) -> Iterator[Embedded]:
        """Decode and analyse files in batches; yield each with its case and embedding."""
        batch: list[tuple[Path, NewCase, np.ndarray]] = []
        for path, case, label in items:
            try:
                ds = dcmread(path)
                image = decode(ds, max_side=self.max_side)
            except (InvalidDicomError, OSError, PixelDecodeError, AttributeError) as exc:
                yield Embedded(path, case or NewCase("?", "?", "", "", "?"), None, f"cannot read: {exc}")
                continue
            batch.append((path, case or index_case(ds, self.hasher, label, source), image.pixels))
            if len(batch) == BATCH:
                yield from _analyse(self.engine, batch, self.gate)
                batch = []
        if batch:
            yield from _analyse(self.engine, batch, self.gate)


def _analyse(engine: Analyser, batch: list[tuple[Path, NewCase, np.ndarray]], gate: DomainGate) -> Iterator[Embedded]:
    for (path, case, _), found in zip(batch, engine.analyse([b[2] for b in batch]), strict=True):
        analysis = gate.apply(found)
        if gate.indexable(analysis) and analysis.embedding is not None:
            yield Embedded(path, case, analysis.embedding)
        else:
            outside = analysis.domain is not None and not analysis.domain.inside
            why = refusal_reason(analysis.domain) if outside and analysis.domain is not None else "not analysed"
            yield Embedded(path, case, None, analysis.reason or why)


def keep_copy(settings: Settings, path: Path, case: NewCase) -> Path:
    """Copy a library file under storage.root/library (so ``rebuild`` can re-embed it later)."""
    target = settings.storage.root / LIBRARY / f"{spool.instance_key(case.sop_instance_uid)}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target


def stored_cases(settings: Settings, jobs: JobStore | None) -> Iterator[tuple[Path, NewCase | None, Label | None]]:
    """Every stored input still on disk (as the node received it), then every library copy."""
    for job in jobs.query(limit=10**9) if jobs is not None else ():
        if job.path and job.state in ANALYSED_STATES and (settings.storage.root / job.path).is_file():
            yield settings.storage.root / job.path, None, None
    for path in sorted((settings.storage.root / LIBRARY).glob("*.dcm")):
        yield path, None, None


def format_neighbours(found: Sequence[Neighbour]) -> list[str]:
    """The neighbours as table lines."""
    lines = [
        f"{'rank':>4}  {'similarity':>10}  {'label':<9}  {'source':<7}  {'case':<10}  {'accession':<16}  "
        f"{'study date':<10}  study UID"
    ]
    for n in found:
        c = n.case
        lines.append(
            f"{n.rank:>4}  {n.similarity:>10.3f}  {c.label or '-':<9}  {c.source:<7}  {c.case_number:<10}  "
            f"{c.accession_number or '-':<16}  {c.study_date or '-':<10}  {c.study_instance_uid}"
        )
    return lines


def _label(text: str) -> Label | None:
    return "covid" if text == "covid" else "non-covid" if text == "non-covid" else None


def _library_labels(settings: Settings) -> dict[str, tuple[str, str]]:
    """The library's labels kept beside its files: SOP Instance UID → (Study Instance UID, label)."""
    path = settings.storage.root / LIBRARY / "labels.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {row["sop_instance_uid"]: (row["study_instance_uid"], row["label"]) for row in csv.DictReader(handle)}


def _remember_labels(settings: Settings, labels: dict[str, tuple[str, str]]) -> None:
    path = settings.storage.root / LIBRARY / "labels.csv"
    merged = {**_library_labels(settings), **labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sop_instance_uid", "study_instance_uid", "label"])
        writer.writerows((sop, study, label) for sop, (study, label) in sorted(merged.items()))
    tmp.replace(path)


def relabel_library(settings: Settings, study_uid: str, label: str | None) -> None:
    """Keep the library's own label list in step with ``cxr-node index label`` (used again by ``rebuild``)."""
    labels = _library_labels(settings)
    changed = {sop: (study, label or "") for sop, (study, _) in labels.items() if study == study_uid}
    if changed:
        _remember_labels(settings, changed)


def import_library(
    settings: Settings, embedder: Embedder, index: NeighbourIndex, labels_csv: Path, folder: Path
) -> tuple[int, list[str]]:
    """Embed labelled reference cases into the index as the library; return (imported, problems)."""
    pairs = read_labels(labels_csv, folder)
    version = embedder.version
    imported, problems = 0, []
    remembered: dict[str, tuple[str, str]] = {}
    items = ((path, None, label) for path, label in pairs)
    for number, item in enumerate(embedder.embed(items, source="library"), start=1):
        case, why = indexable(item.case)
        if item.embedding is None or case is None:
            problems.append(f"{item.path}: {item.reason or 'identifiers a report cannot name: ' + '; '.join(why)}")
            continue
        index.add(version, item.embedding, case)
        keep_copy(settings, item.path, case)
        remembered[case.sop_instance_uid] = (case.study_instance_uid, case.label or "")
        imported += 1
        if number % 20 == 0 or number == len(pairs):
            print(f"  {number}/{len(pairs)} embedded", flush=True)
    _remember_labels(settings, remembered)
    index.checkpoint(version)
    return imported, problems


def query_file(settings: Settings, embedder: Embedder, index: NeighbourIndex, path: Path, k: int) -> list[Neighbour]:
    """The ``k`` nearest stored cases of one DICOM file (other patients and studies only)."""
    [item] = list(embedder.embed([(path, None, None)]))
    if item.embedding is None:
        raise CxrNodeError(f"{path}: not analysed: {item.reason}")
    return index.query(
        embedder.version,
        item.embedding,
        k,
        patient_hash=item.case.patient_hash,
        study_instance_uid=item.case.study_instance_uid,
        library_only=settings.neighbours.library_only,
    )


def rebuild(
    settings: Settings, embedder: Embedder, index: NeighbourIndex, jobs: JobStore | None
) -> tuple[int, str, list[str]]:
    """Re-embed every stored input and library file with the current model; return (count, version, problems)."""
    version = embedder.version
    labels = _library_labels(settings)
    library = settings.storage.root / LIBRARY
    problems: list[str] = []

    def items() -> Iterator[tuple[NewCase, np.ndarray]]:
        for item in embedder.embed(stored_cases(settings, jobs)):
            if item.embedding is None:
                problems.append(f"{item.path}: {item.reason}")
                continue
            case = item.case
            if item.path.parent == library:
                case = NewCase(
                    case.sop_instance_uid,
                    case.study_instance_uid,
                    case.accession_number,
                    case.study_date,
                    case.patient_hash,
                    _label(labels.get(case.sop_instance_uid, ("", ""))[1]),
                    "library",
                )
            yield case, item.embedding

    count = index.rebuild(version, items())
    return count, version, problems
