"""A period read from the store: the images of the model judged, grouped into studies, joined to their outcomes.

One row of :meth:`~cxr_node.jobs.interfaces.ResultStore.period` is one image. The images with a result of the
model judged (``name/version``; by default the one with the most results in the period) are kept; the others are
counted. Images are grouped into studies by accession number (the Study Instance UID when it is empty): a study
is scored by its highest probability over its analysed images and is positive when any of them was positive at
the operating point it was analysed with, as ``cxr-node calibrate`` does. Each accession's outcome is the last one
recorded (outcomes are corrected by recording a new one); ``not_assessable`` ones are counted, never scored.
Weeks are ISO weeks of the time an image was received, in UTC; a study belongs to the week of its first image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from cxr_node.jobs.interfaces import Store
from cxr_node.jobs.records import Outcome, PeriodRow

DAY_S: Final = 86400.0


@dataclass(frozen=True)
class Study:
    """One examination with an analysed image: its score, decision, where it came from and its outcome.

    ``label`` is 1 or 0 for a positive or negative outcome, None without one (or when it is not assessable);
    ``outcome`` is the last recorded outcome's label, "" without one.
    """

    key: str
    week: str
    modality: str
    calling_aet: str
    received_at: float
    score: float
    positive: bool
    threshold: float
    outcome: str = ""

    @property
    def label(self) -> int | None:
        """1 (positive), 0 (negative) or None (no outcome, or not assessable)."""
        return {"positive": 1, "negative": 0}.get(self.outcome)


@dataclass(frozen=True)
class Period:
    """The images of one model received in [since, until) and their studies (see the module docstring)."""

    since: float
    until: float
    model: str
    images: tuple[PeriodRow, ...]
    studies: tuple[Study, ...]
    other_models: dict[str, int] = field(default_factory=dict)
    without_result: int = 0
    not_analysed_studies: int = 0

    def scores(self) -> list[float]:
        """The probabilities of the analysed images (the distribution drift is measured on)."""
        return [p for p in map(probability, self.images) if p is not None]

    def outcome_counts(self) -> dict[str, int]:
        """Studies by outcome: positive, negative, not assessable, none."""
        found = Counter(study.outcome or "none" for study in self.studies)
        return {name: found.get(name, 0) for name in ("positive", "negative", "not_assessable", "none")}


def probability(row: PeriodRow) -> float | None:
    """The probability of an analysed image's result; None when it has none (no result, not analysed)."""
    summary = row.summary
    return summary.probability if summary is not None and summary.analysed else None


def iso_week(when: float) -> str:
    """The ISO week (UTC) of an epoch time, as ``2026-W03``."""
    year, week, _ = datetime.fromtimestamp(when, UTC).isocalendar()
    return f"{year}-W{week:02d}"


def weeks_between(since: float, until: float) -> list[str]:
    """Every ISO week that [since, until) touches, in order (weeks without data included)."""
    if until <= since:
        return []
    found: list[str] = []
    day = datetime.fromtimestamp(since, UTC)
    last = datetime.fromtimestamp(until - 1e-3, UTC)
    while day <= last + timedelta(days=6):
        week = iso_week(min(day, last).timestamp())
        if week not in found:
            found.append(week)
        day += timedelta(days=7)
    return found


def pick_model(rows: Iterable[PeriodRow], wanted: str | None = None) -> str:
    """The model to judge: ``wanted`` (``name/version``) or the one with the most results among ``rows``.

    Raises
    ------
    ValueError
        When no row has a result, or ``wanted`` has none (the models found are named).
    """
    found = Counter(row.summary.model_key for row in rows if row.summary is not None)
    if not found:
        raise ValueError("no image in the period has a result of any model")
    if wanted is None:
        return sorted(found.items(), key=lambda item: (-item[1], item[0]))[0][0]
    if wanted not in found:
        names = ", ".join(f"{key} ({n})" for key, n in found.most_common())
        raise ValueError(f"--model {wanted}: no result of it in the period (found: {names})")
    return wanted


def last_outcomes(outcomes: Iterable[Outcome]) -> dict[str, str]:
    """Each accession's label from the outcome recorded last (highest row id)."""
    latest: dict[str, Outcome] = {}
    for outcome in outcomes:
        seen = latest.get(outcome.accession_number)
        if seen is None or outcome.id > seen.id:
            latest[outcome.accession_number] = outcome
    return {accession: outcome.label for accession, outcome in latest.items()}


def study_key(row: PeriodRow) -> str:
    """The accession number of an image, else (an empty one) its study's UID."""
    return row.accession_number.strip() or f"study:{row.study_instance_uid}"


def group_studies(images: Sequence[PeriodRow], labels: dict[str, str]) -> tuple[list[Study], int]:
    """The studies of ``images`` that have an analysed image, and how many studies had none analysed."""
    by_key: dict[str, list[PeriodRow]] = {}
    for row in sorted(images, key=lambda r: (r.received_at, r.job_id)):
        by_key.setdefault(study_key(row), []).append(row)
    studies: list[Study] = []
    for key, rows in by_key.items():
        scored = [row.summary for row in rows if row.summary is not None and probability(row) is not None]
        if not scored:
            continue
        best = max(scored, key=lambda s: s.probability or 0.0)
        first = rows[0]
        outcome = "" if key.startswith("study:") else labels.get(key, "")
        studies.append(Study(
            key=key, week=iso_week(first.received_at), modality=first.modality or "unknown",
            calling_aet=first.calling_aet or "unknown", received_at=first.received_at,
            score=float(best.probability or 0.0), positive=any(bool(s.positive) for s in scored),
            threshold=float(best.threshold or 0.0), outcome=outcome,
        ))  # fmt: skip
    return studies, len(by_key) - len(studies)


def build_period(rows: Sequence[PeriodRow], outcomes: Iterable[Outcome], since: float, until: float,
                 model: str | None = None) -> Period:  # fmt: skip
    """The :class:`Period` of ``rows`` (read for [since, until)) for ``model`` (see :func:`pick_model`)."""
    chosen = pick_model(rows, model)
    mine = tuple(row for row in rows if row.summary is not None and row.summary.model_key == chosen)
    others = Counter(row.summary.model_key for row in rows if row.summary is not None) - Counter({chosen: len(mine)})
    studies, unanalysed = group_studies(mine, last_outcomes(outcomes))
    return Period(since, until, chosen, mine, tuple(studies), dict(others.most_common()),
                  sum(1 for row in rows if row.summary is None), unanalysed)  # fmt: skip


def read_period(store: Store, since: float, until: float, model: str | None = None) -> Period:
    """Read [since, until) from ``store`` with the outcomes of its accession numbers.

    Raises
    ------
    ValueError
        When no image was received in the period, or none has a result (of ``model``).
    """
    rows = store.results.period(since, until)
    if not rows:
        raise ValueError(f"no image received between {day_text(since)} and {day_text(until - 1)}")
    return build_period(rows, outcomes_of(store, rows), since, until, model)


def outcomes_of(store: Store, rows: Sequence[PeriodRow]) -> list[Outcome]:
    """Every outcome recorded for the accession numbers of ``rows``, whenever it was reported (a report of an
    old study, a laboratory result before the radiograph, a CSV of last year's cases all count)."""
    return store.outcomes.for_accessions(row.accession_number for row in rows)


def reference_scores(store: Store, since: float, until: float, model: str) -> list[float]:
    """The probabilities of ``model``'s analysed images received in [since, until)."""
    rows = store.results.period(since, until)
    return [p for row in rows if row.summary is not None and row.summary.model_key == model
            and (p := probability(row)) is not None]  # fmt: skip


def first_received(store: Store) -> float | None:
    """When the store's first job was received (None when it has none)."""
    first = store.jobs.query(limit=1)
    return first[0].received_at if first else None


def day_text(when: float) -> str:
    """The UTC date of an epoch time, as ``2026-01-05``."""
    return datetime.fromtimestamp(when, UTC).date().isoformat()


def day_start(when: float) -> float:
    """The epoch time of the start (00:00 UTC) of the day ``when`` falls in."""
    return float(when // DAY_S * DAY_S)
