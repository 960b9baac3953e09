"""Candidate models run beside the configured one, on the same decoded images (model change control).

A site that receives a new model version runs it as a candidate (``models.candidates``) before it replaces the
one in use: the worker analyses each batch with the configured model first (its results are recorded and its
outputs written as always), then with each candidate. A candidate's result is judged by its own out-of-domain gate
and at its own operating point (its site calibration, else its manifest's threshold), recorded apart
(``candidate_results``), never indexed, never written as DICOM and never delivered: it cannot reach a radiologist.
``cxr-node compare`` reports how it differs from the model in use (:mod:`cxr_node.training.compare`).

A candidate that fails costs only its own results: the configured model's results are recorded before it runs, and
its errors are logged (``candidate.failed``), never moved to the job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from structlog.contextvars import bound_contextvars

from cxr_node.dicom.pixels import DecodedImage
from cxr_node.jobs.interfaces import ResultStore
from cxr_node.jobs.records import Job
from cxr_node.results.findings import SiteOperatingPoint
from cxr_node.work.gate import DomainGate

if TYPE_CHECKING:
    from cxr_node.work.loop import Analyser

log = structlog.get_logger("cxr_node.worker")


@dataclass(frozen=True)
class Candidate:
    """A candidate model as the worker runs it: its engine, its gate and its operating point.

    Parameters
    ----------
    analyser : Analyser
        The candidate's engine (its own manifest and weights).
    gate : DomainGate
        Its out-of-domain gate (``domain.gate`` applied to its own domain description).
    site : SiteOperatingPoint or None
        Its site calibration's operating point (``models.candidates[].calibration``); None: its manifest's.
    """

    analyser: Analyser
    gate: DomainGate
    site: SiteOperatingPoint | None = None

    @property
    def key(self) -> str:
        """The candidate as ``name/version``."""
        name, version = self.analyser.model
        return f"{name}/{version}"


def run_candidates(
    candidates: Sequence[Candidate], images: Sequence[tuple[Job, DecodedImage]], results: ResultStore
) -> int:
    """Analyse ``images`` with each candidate and record what each found; return how many results were recorded.

    Never raises for a candidate's failure (a batch that fails, a result that cannot be recorded): it is logged.
    """
    from cxr_node.work.loop import summary_of

    recorded = 0
    for candidate in candidates:
        clock = time.perf_counter()
        try:
            analyses = candidate.analyser.analyse([image.pixels for _, image in images])
        except Exception as exc:
            log.error("candidate.failed", model=candidate.key, batch=len(images),
                      error=f"{type(exc).__name__}: {str(exc)[:200]}")  # fmt: skip
            continue
        for (job, image), analysis in zip(images, analyses, strict=True):
            with bound_contextvars(job_id=job.id):
                try:
                    summary = summary_of(image, candidate.gate.apply(analysis), candidate.analyser.model, (),
                                         candidate.site)  # fmt: skip
                    results.save_candidate(job.id, summary)
                except Exception as exc:
                    log.error("candidate.failed", model=candidate.key,
                              error=f"{type(exc).__name__}: {str(exc)[:200]}")  # fmt: skip
                    continue
            recorded += 1
        log.info("candidate.batch", model=candidate.key, batch=len(images),
                 seconds=round(time.perf_counter() - clock, 3))  # fmt: skip
    return recorded
