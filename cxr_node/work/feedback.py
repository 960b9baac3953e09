"""The loop back from the radiologists' reports to the neighbour index: confirmed outcomes become case labels.

The sites' final findings arrive in the jobs store's ``outcomes`` (CSV, HL7 v2, FHIR: :mod:`cxr_node.outcomes`).
The worker, which holds the neighbour index, applies each new outcome to the cases of the studies it is about
(its Study Instance UID, else the studies stored under its accession number): positive → ``covid``, negative →
``non-covid``, not assessable → no label. Outcomes are applied in the order they were recorded, so a corrected
report supersedes the first. The similar cases shown to the next radiologist then carry the confirmed label, and
the outputs say it is confirmed (:func:`cxr_node.results.findings.SimilarCase.label_text`).

Idempotent: after a restart the worker applies every outcome again from the first (a label set twice is the
same label). A failure (the store or the index unavailable) is logged and retried at the next turn; it never
stops the worker.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

import structlog

from cxr_node.jobs.interfaces import OutcomeStore
from cxr_node.jobs.records import Outcome, OutcomeLabel
from cxr_node.neighbours import Label

log = structlog.get_logger("cxr_node.worker")

EVERY_S: Final = 10.0
"""How often an idle worker looks for new outcomes."""
BATCH: Final = 500
"""Outcomes applied per look (the rest at the next one)."""
INDEX_LABELS: Final[dict[OutcomeLabel, Label | None]] = {
    "positive": "covid",
    "negative": "non-covid",
    "not_assessable": None,
}


class Labeller(Protocol):
    """What feedback needs from the neighbour index."""

    def label(self, study_uid: str, label: Label | None) -> int:
        """Set (or clear) the confirmed label of every case of a study; return how many cases."""
        ...


class Feedback:
    """Applies new outcomes to the neighbour index, at most every :data:`EVERY_S` seconds.

    Parameters
    ----------
    outcomes : OutcomeStore
        Where the outcomes are recorded.
    index : Labeller
        The neighbour index.
    """

    def __init__(self, outcomes: OutcomeStore, index: Labeller) -> None:
        self.outcomes = outcomes
        self.index = index
        self.applied = 0  # the id of the last outcome applied
        self._last = -EVERY_S

    def turn(self, now: float | None = None) -> int:
        """Apply what arrived since the last turn, if :data:`EVERY_S` have passed; return the cases labelled."""
        clock = time.monotonic() if now is None else now
        if clock - self._last < EVERY_S:
            return 0
        self._last = clock
        try:
            return self.apply()
        except Exception as exc:  # the store or the index unavailable: the next turn tries again
            log.warning("feedback.failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            return 0

    def apply(self, limit: int = BATCH) -> int:
        """Apply up to ``limit`` outcomes recorded since the last applied; return the cases whose label was set."""
        labelled = 0
        for outcome in self.outcomes.after(self.applied, limit):
            labelled += self._apply(outcome)
            self.applied = outcome.id
        return labelled

    def _apply(self, outcome: Outcome) -> int:
        label = INDEX_LABELS[outcome.label]
        studies = self.outcomes.studies(outcome)
        count = sum(self.index.label(study, label) for study in studies)
        if count:
            log.info("feedback.labelled", outcome=outcome.id, source=outcome.source, label=label or "none",
                     studies=len(studies), cases=count)  # fmt: skip
        return count
