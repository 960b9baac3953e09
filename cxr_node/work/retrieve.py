"""Retrieval as the worker sees it: the similar past cases of an image, then the image added to the index."""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import structlog

from cxr_node.config import NeighbourSettings
from cxr_node.neighbours import Neighbour, NeighbourIndex, NewCase
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
        """The ``neighbours.k`` nearest cases, as the policy allows them to be shown."""
        found = self.index.query(
            model_version,
            embedding,
            self.settings.k,
            patient_hash=case.patient_hash,
            study_instance_uid=case.study_instance_uid,
            library_only=self.settings.library_only,
        )
        return tuple(self._shown(n) for n in found)

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
        """Index ``case``; write a checkpoint of the search structure every :attr:`CHECKPOINT_EVERY_S`."""
        self.index.add(model_version, embedding, case)
        if time.monotonic() - self._checkpointed >= self.CHECKPOINT_EVERY_S:
            written = self.index.checkpoint(model_version)
            self._checkpointed = time.monotonic()
            log.info("index.checkpoint", version=model_version, vectors=written)

    def close(self) -> None:
        """Checkpoint and close the index."""
        self.index.checkpoint()
        self.index.close()
