"""The CSV route: a site's export of final findings, each row mapped and recorded (``cxr-node outcomes import``).

Columns are found as ``cxr-node calibrate`` finds them (:func:`cxr_node.training.outcomes.find_column`): an
accession number and a finding (required), a date and a coding system (optional). Each row's finding goes
through the mapping (as a coding when a system column is given, and as words); a row that cannot be used is
counted by reason, never silently dropped. ``source_id`` is the first 16 hex digits of the file's SHA-256 and
the line number, so importing the same file again records nothing new.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from cxr_node.jobs.interfaces import OutcomeStore
from cxr_node.jobs.records import NewOutcome
from cxr_node.outcomes.mapping import Coding, Finding, Mapping, Match
from cxr_node.training.outcomes import ACCESSION_NAMES, DATE_NAMES, LABEL_NAMES, MAX_ROWS, csv_text, find_column

FINDING_NAMES: Final = (*LABEL_NAMES, "finding", "findings", "impression", "conclusion", "code")
SYSTEM_NAMES: Final = ("system", "coding_system", "code_system", "codesystem", "scheme")
DATE_FORMATS: Final = ("%Y-%m-%d", "%Y%m%d", "%d.%m.%Y", "%d/%m/%Y", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S")
MAX_ACCESSION: Final = 64


@dataclass(frozen=True)
class Imported:
    """What an import did: outcomes recorded, already recorded (repeated), and rows left out by reason."""

    path: Path
    recorded: int = 0
    repeated: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, int] = field(default_factory=dict)


def read_rows(path: Path, mapping: Mapping) -> tuple[list[NewOutcome], Counter[str]]:
    """The outcomes of a CSV file, and its rows that map to none, counted by reason.

    Raises
    ------
    ValueError
        In one line naming the file: unreadable, no accession or finding column, too many rows.
    """
    data = path.read_bytes()
    text = csv_text(path, data)
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    names = [name for name in reader.fieldnames or () if name]
    accession, finding = find_column(names, ACCESSION_NAMES), find_column(names, FINDING_NAMES)
    if accession is None or finding is None:
        which, expected = (
            ("an accession number", ACCESSION_NAMES) if accession is None else ("a finding", FINDING_NAMES)
        )
        raise ValueError(f"{path}: no column for {which} (found: {', '.join(names) or 'none'}; "
                         f"expected one of: {', '.join(expected)})")  # fmt: skip
    date, system = find_column(names, DATE_NAMES), find_column(names, SYSTEM_NAMES)
    prefix = hashlib.sha256(data).hexdigest()[:16]
    outcomes: list[NewOutcome] = []
    unmapped = Counter[str]()
    for line, row in enumerate(reader, start=2):
        if line > MAX_ROWS + 1:
            raise ValueError(f"{path}: more than {MAX_ROWS} rows")
        cells = {key: (row.get(key) or "").strip() if key else "" for key in (accession, finding, date, system)}
        if not any(cells.values()):
            continue  # a blank line, as spreadsheets leave them
        made = _outcome(cells, (accession, finding, date, system), mapping, f"{prefix}:{line}")
        if isinstance(made, str):
            unmapped[made] += 1
        else:
            outcomes.append(made)
    return outcomes, unmapped


def _outcome(cells: dict[str | None, str], columns: tuple[str, str, str | None, str | None], mapping: Mapping,
             source_id: str) -> NewOutcome | str:  # fmt: skip
    accession, finding, date, system = columns
    if not cells[accession]:
        return "empty accession number"
    if len(cells[accession]) > MAX_ACCESSION:
        return "accession number too long"
    codings = (Coding(cells[system], cells[finding]),) if system and cells[system] else ()
    found = mapping.classify(Finding(codings, cells[finding]))
    if not isinstance(found, Match):
        return found.reason
    reported = parse_date(cells[date]) if date and cells[date] else None
    if date and cells[date] and reported is None:
        return "unreadable date"
    return NewOutcome(source="csv", source_id=source_id, accession_number=cells[accession], label=found.label,
                      code=found.code, reported_at=reported)  # fmt: skip


def parse_date(value: str) -> float | None:
    """A date (or date and time, local) as a site writes it, as epoch seconds; None when unreadable."""
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        pass
    for pattern in DATE_FORMATS:
        try:
            return datetime.strptime(value, pattern).timestamp()
        except ValueError:
            continue
    return None


def import_csv(path: Path, mapping: Mapping, store: OutcomeStore) -> Imported:
    """Record every mappable row of ``path`` (each committed as it is recorded); see :func:`read_rows`."""
    outcomes, unmapped = read_rows(path, mapping)
    recorded, labels = 0, Counter[str]()
    for new in outcomes:
        recorded += store.record(new)[1]
        labels[new.label] += 1
    return Imported(path, recorded, len(outcomes) - recorded, dict(labels), dict(unmapped))
