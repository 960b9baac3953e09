"""Retention: purge finished jobs' files and rows after the configured age, or one study on request."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Final

from cxr_node.jobs.interfaces import Store
from cxr_node.jobs.states import JobState

FINISHED: Final = (JobState.DELIVERED, JobState.SKIPPED, JobState.QUARANTINED, JobState.DEAD)
"""States whose jobs retention may purge (nothing still in flight is ever purged)."""


def purge_jobs(store: Store, root: Path, job_ids: list[int]) -> int:
    """Delete the jobs' input and output files, then their rows (events, results, outputs, deliveries)."""
    for job_id in job_ids:
        job = store.jobs.get(job_id)
        paths = [job.path] if job is not None and job.path else []
        paths += [output.path for output in store.results.outputs(job_id)]
        for relative in paths:
            with contextlib.suppress(FileNotFoundError):
                (root / relative).unlink()
        _remove_empty_parents(root, [root / p for p in paths])
    return store.jobs.delete(job_ids)


def expired(store: Store, days: float, now: float | None = None) -> list[int]:
    """Finished jobs last updated more than ``days`` ago (none when ``days`` is 0: keep forever)."""
    if days <= 0:
        return []
    cutoff = (time.time() if now is None else now) - days * 86400
    return store.jobs.finished_before(cutoff, FINISHED)


def _remove_empty_parents(root: Path, paths: list[Path]) -> None:
    for path in paths:
        for parent in path.parents:
            if parent == root or root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break
