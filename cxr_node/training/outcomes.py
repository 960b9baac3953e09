"""A site's outcomes (accession number and positive/negative) joined to the node's stored results.

``cxr-node calibrate`` reads a CSV of outcomes as a site exports it, from a RIS, a laboratory system or a
spreadsheet: the column names and values are taken liberally (``accession_number``, ``Accession No``, ``ACC``;
``positive``, ``POS``, ``1``, ``covid``, ``detected``, ...; comma, semicolon or tab separated, with or without a
byte-order mark), and anything that cannot be read is refused in one line naming the file, the line and the value.
Each labelled accession is then joined to the node's results of one model (name and version): the model in use, or a
candidate run beside it (``models.candidates``); what cannot be used is counted by reason (:class:`Joined`), never
silently dropped.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.jobs.interfaces import Store
from cxr_node.jobs.records import Job
from cxr_node.results.findings import Summary

ACCESSION_NAMES: Final = ("accession_number", "accession", "accessionnumber", "accession_no", "accession_nr",
                          "acc", "acc_no", "accno", "acc_nr")  # fmt: skip
LABEL_NAMES: Final = ("label", "outcome", "result", "diagnosis", "truth", "ground_truth", "reference", "class",
                      "pcr", "covid", "status")  # fmt: skip
DATE_NAMES: Final = ("date", "outcome_date", "result_date", "study_date")
SOURCE_NAMES: Final = ("source", "reference_standard", "method")
POSITIVE: Final = frozenset({"1", "positive", "pos", "p", "+", "yes", "y", "true", "t", "covid", "covid-19", "covid19",
                             "detected", "present", "abnormal"})  # fmt: skip
NEGATIVE: Final = frozenset({"0", "negative", "neg", "n", "-", "no", "false", "f", "non-covid", "noncovid",
                             "non covid", "not detected", "absent", "normal"})  # fmt: skip
MAX_ROWS: Final = 1_000_000


@dataclass(frozen=True)
class Outcomes:
    """The labels of a CSV by accession number, and what was repeated or contradicted in it."""

    path: Path
    labels: dict[str, int]
    rows: int
    repeated: int = 0
    conflicting: tuple[str, ...] = ()
    sources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Joined:
    """The labelled cases that have a result of the model in use, and the others counted by reason.

    ``accessions``, ``labels`` and ``scores`` are aligned (one case per accession; an accession with several
    results is scored by its highest probability, as a study is positive when any of its images is).
    """

    accessions: tuple[str, ...]
    labels: NDArray[np.int64]
    scores: NDArray[np.float64]
    unmatched: tuple[str, ...] = ()
    not_analysed: tuple[str, ...] = ()
    other_model: tuple[str, ...] = ()
    several_results: tuple[str, ...] = ()
    stored_without_label: int = 0
    why_not_analysed: dict[str, int] = field(default_factory=dict)

    def left_out(self) -> dict[str, int]:
        """How many labelled accessions were left out, by reason (and how many used several results)."""
        return {"unmatched": len(self.unmatched), "not_analysed": len(self.not_analysed),
                "other_model": len(self.other_model), "several_results": len(self.several_results),
                "stored_without_label": self.stored_without_label}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the CSV


def parse_outcome(value: str) -> int:
    """1 or 0 for a label written in any of the accepted ways (:data:`POSITIVE`, :data:`NEGATIVE`, any case)."""
    text = " ".join(value.strip().lower().replace("_", " ").split())
    if text in POSITIVE or text.replace(" ", "-") in POSITIVE:
        return 1
    if text in NEGATIVE or text.replace(" ", "-") in NEGATIVE:
        return 0
    raise ValueError(f"label {value!r} is neither positive nor negative (e.g. positive/negative, 1/0, covid/non-covid)")


def _key(name: str) -> str:
    """A column name reduced for matching: lower case, runs of spaces, dots, dashes and '#' as one underscore."""
    return re.sub(r"[\s.\-#/]+", "_", name.strip().lower()).strip("_")


def find_column(fieldnames: Sequence[str], accepted: Sequence[str]) -> str | None:
    """The first of ``fieldnames`` whose reduced name is one of ``accepted``; else the only one with one of them as a
    word (``PCR result``, ``Accession Number (RIS)``); None when none or several are."""
    reduced = {_key(name): name for name in fieldnames}
    exact = next((reduced[name] for name in accepted if name in reduced), None)
    if exact is not None:
        return exact
    words = {name for name in accepted if "_" not in name}
    loose = [name for key, name in reduced.items() if words & set(key.split("_"))]
    return loose[0] if len(loose) == 1 else None


def read_outcomes(path: Path) -> Outcomes:
    """Read a CSV of outcomes: an accession column and a label column (any of the accepted names), optional date
    and source.

    Raises
    ------
    ValueError
        One line naming the file (and the line): not a CSV, no accession or label column, an empty accession,
        an unreadable label, no row.
    """
    text = csv_text(path)
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    fieldnames = [name for name in reader.fieldnames or () if name]
    accession = find_column(fieldnames, ACCESSION_NAMES)
    label = find_column(fieldnames, LABEL_NAMES)
    if accession is None or label is None:
        which = "an accession number" if accession is None else "a label"
        names = ACCESSION_NAMES if accession is None else LABEL_NAMES
        raise ValueError(f"{path}: no column for {which} (found: {', '.join(fieldnames) or 'none'}; "
                         f"expected one of: {', '.join(names)})")  # fmt: skip
    return _collect(path, reader, accession, label, find_column(fieldnames, SOURCE_NAMES))


def csv_text(path: Path, data: bytes | None = None) -> str:
    """The text of a CSV file (its bytes ``data`` when already read): UTF-8, a BOM dropped, Latin-1 as a last
    resort; ValueError when it is empty or binary."""
    data = path.read_bytes() if data is None else data
    if b"\x00" in data[:4096]:
        raise ValueError(f"{path}: not a CSV text file (binary content)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    if not text.strip():
        raise ValueError(f"{path}: empty file (expected a header line and one row per case)")
    return text


def _collect(path: Path, reader: Iterable[Mapping[str, str | None]], accession: str, label: str,
             source: str | None) -> Outcomes:  # fmt: skip
    labels: dict[str, int] = {}
    conflicting: set[str] = set()
    repeated, rows, sources = 0, 0, Counter[str]()
    for line, record in enumerate(reader, start=2):
        key = (record.get(accession) or "").strip()
        value = (record.get(label) or "").strip()
        if not key and not value:
            continue  # a blank line, as spreadsheets leave them
        if not key:
            raise ValueError(f"{path} line {line}: empty accession number (column {accession!r})")
        try:
            found = parse_outcome(value)
        except ValueError as exc:
            raise ValueError(f"{path} line {line}: {exc}") from exc
        rows += 1
        if rows > MAX_ROWS:
            raise ValueError(f"{path}: more than {MAX_ROWS} rows")
        sources[(record.get(source) or "").strip() if source else ""] += 1
        if key in labels:
            repeated += 1
            if labels[key] != found:
                conflicting.add(key)
            continue
        labels[key] = found
    if not rows:
        raise ValueError(f"{path}: no case (a header line and no row)")
    kept = {key: value for key, value in labels.items() if key not in conflicting}
    named = {name: count for name, count in sources.items() if name}
    return Outcomes(path, kept, rows, repeated, tuple(sorted(conflicting)), named)


# -------------------------------------------------------------------------------------------- the join


def join_results(store: Store, outcomes: Outcomes, model: tuple[str, str]) -> Joined:
    """Join each labelled accession to the stored results of ``model`` (name, version) in ``store``: the jobs' own
    results, or a candidate's results beside them."""
    jobs = store.jobs.query(limit=10_000_000)
    by_accession: dict[str, list[Job]] = {}
    for job in jobs:
        by_accession.setdefault(job.accession_number.strip(), []).append(job)
    used: list[tuple[str, int, float]] = []
    unmatched: list[str] = []
    not_analysed: list[str] = []
    other: list[str] = []
    several: list[str] = []
    why = Counter[str]()
    for accession, label in outcomes.labels.items():
        found = by_accession.get(accession)
        if not found:
            unmatched.append(accession)
            continue
        stored = [(job, _summary(store, job)) for job in found]
        every = [s for _, s in stored if s is not None]
        every += [s for job in found for s in store.results.candidate_results(job.id)]
        summaries = [s for s in every if s.analysed]
        mine = [s.probability for s in summaries if (s.model_name, s.model_version) == model]
        scores = [p for p in mine if p is not None and math.isfinite(p)]
        if not scores:
            refused = [s for s in every if (s.model_name, s.model_version) == model]
            (other if summaries and not refused else not_analysed).append(accession)
            if refused:
                why[_why(found[-1], refused[-1])] += 1
            elif not summaries:
                why[_why(*stored[-1])] += 1
            continue
        if len(scores) > 1:
            several.append(accession)
        used.append((accession, label, max(scores)))
    labelled = set(outcomes.labels)
    unlabelled = sum(len(jobs) for accession, jobs in by_accession.items() if accession not in labelled)
    return Joined(
        accessions=tuple(a for a, _, _ in used),
        labels=np.array([y for _, y, _ in used], dtype=np.int64),
        scores=np.array([p for _, _, p in used], dtype=np.float64),
        unmatched=tuple(unmatched), not_analysed=tuple(not_analysed), other_model=tuple(other),
        several_results=tuple(several), stored_without_label=unlabelled, why_not_analysed=dict(why.most_common()),
    )  # fmt: skip


def _why(job: Job, summary: Summary | None) -> str:
    """Why a stored image has no result: the result's reason, else the job's state and reason (numbers left out)."""
    reason = summary.reason if summary is not None else f"{job.state.value}: {job.reason or 'no result'}"
    return reason.split(" (")[0][:80]


def _summary(store: Store, job: Job) -> Summary | None:
    """The stored summary of ``job`` (None when it has none: skipped, quarantined, not yet analysed)."""
    stored = store.results.result(job.id)
    return None if stored is None else stored.summary
