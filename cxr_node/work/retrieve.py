"""Retrieval as the worker sees it: the similar past cases of an image, then the image added to the index.

Retrieval never costs an image its result: a query that fails gives no similar cases, a neighbour whose
identifiers no report could write is left out, and an image whose own identifiers cannot be written is not
indexed (an accession number or date that cannot be written is indexed empty). Each is logged with the
field names and case numbers only, never the values.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import structlog

from cxr_node.config import NeighbourSettings
from cxr_node.neighbours import Neighbour, NeighbourIndex, NewCase
from cxr_node.neighbours.cases import identifier_problems, indexable
from cxr_node.results.findings import SimilarCase

log = structlog.get_logger("cxr_node.worker")


class Retriever(Protocol):
    """The neighbours stage as the worker sees it: query the similar past cases, then add this one."""

    def similar(self, case: NewCase, embedding: np.ndarray, model_version: str) -> tuple[SimilarCase, ...]:
        """The nearest past cases of ``case`` (other patients and studies), best first."""
        ...

    def add(self, case: NewCase, embedding: np.ndarray, model_version: str) -> None:
        """Index ``case`` so later images can find it."""
        ...

    def close(self) -> None:
        """Persist what is in memory and release the index."""
        ...


class NoRetrieval:
    """Retrieval turned off (``neighbours.k: 0``): no similar cases, nothing indexed."""

    def similar(self, case: NewCase, embedding: np.ndarray, model_version: str) -> tuple[SimilarCase, ...]:
        """No similar cases."""
        return ()

    def add(self, case: NewCase, embedding: np.ndarray, model_version: str) -> None:
        """Nothing is indexed."""

    def close(self) -> None:
        """Nothing to release."""


class IndexRetriever:
    """The persistent neighbour index as the worker's retriever, with the site's identifier policy.

    ``identifiers="uids"`` names each neighbour's Study/SOP Instance UID, accession number and study date;
    ``"case_number"`` only its de-identified case number (for sites that forbid other patients' identifiers).
    """

    CHECKPOINT_EVERY_S = 900.0
    """How often the in-memory search structure is written out (start-up then loads it instead of rebuilding)."""

    def __init__(self, index: NeighbourIndex, settings: NeighbourSettings) -> None:
        self.index = index
        self.settings = settings
        self._checkpointed = time.monotonic()

    def similar(self, case: NewCase, embedding: np.ndarray, model_version: str) -> tuple[SimilarCase, ...]:
        """The ``neighbours.k`` nearest cases with writable identifiers, as the policy allows them to be shown."""
        try:
            found = self.index.query(
                model_version,
                embedding,
                self.settings.k,
                patient_hash=case.patient_hash,
                study_instance_uid=case.study_instance_uid,
                library_only=self.settings.library_only,
            )
        except ValueError as exc:
            log.warning("index.query_failed", argument=_argument(exc))
            return ()
        return tuple(self._shown(n) for n in found if self._writable(n))

    @staticmethod
    def _writable(neighbour: Neighbour) -> bool:
        problems = identifier_problems(neighbour.case)
        if problems:
            fields = sorted({problem.split(":")[0] for problem in problems})
            log.warning("index.neighbour_left_out", case=neighbour.case.case_number, fields=fields)
        return not problems

    def _shown(self, neighbour: Neighbour) -> SimilarCase:
        case = neighbour.case
        similarity = float(min(1.0, max(-1.0, neighbour.similarity)))
        if self.settings.identifiers == "case_number":
            return SimilarCase(neighbour.rank, similarity, case.case_number, case.label)
        return SimilarCase(
            neighbour.rank,
            similarity,
            case.case_number,
            case.label,
            case.study_instance_uid,
            case.sop_instance_uid,
            case.accession_number or None,
            case.study_date or None,
        )

    def add(self, case: NewCase, embedding: np.ndarray, model_version: str) -> None:
        """Index ``case`` when its identifiers can be written; write a checkpoint of the search structure every
        :attr:`CHECKPOINT_EVERY_S`. Never raises for a bad case or embedding: it is logged and left out."""
        kept, problems = indexable(case)
        fields = sorted({problem.split(":")[0] for problem in problems})
        if kept is None:
            log.warning("index.case_skipped", fields=fields)
            return
        if problems:
            log.warning("index.case_cleared", fields=fields)
        try:
            self.index.add(model_version, embedding, kept)
        except ValueError as exc:
            log.warning("index.case_skipped", argument=_argument(exc))
            return
        if time.monotonic() - self._checkpointed >= self.CHECKPOINT_EVERY_S:
            written = self.index.checkpoint(model_version)
            self._checkpointed = time.monotonic()
            log.info("index.checkpoint", version=model_version, vectors=written)

    def close(self) -> None:
        """Checkpoint and close the index."""
        self.index.checkpoint()
        self.index.close()


def _argument(exc: ValueError) -> str:
    """The argument a ValueError of the index names (its first word): logged instead of the message, which
    may quote a value."""
    return str(exc).split(" ", 1)[0][:40]
