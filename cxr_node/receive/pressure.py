"""Back-pressure: refuse new instances (0xA700, the PACS retries later) when the queue or the disk is too full.

The disk is full when its bytes *or* its inodes are used over ``storage.max_disk_percent`` (each instance is a
file: a filesystem can run out of inodes with space left), or when the store holds more jobs than ``max_jobs``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cxr_node.jobs.interfaces import JobStore
from cxr_node.jobs.states import JobState

WAITING: Final = (JobState.QUEUED, JobState.RUNNING)
"""The states that make up the queue depth."""


def disk_used_fraction(root: Path) -> float:
    """Used share of the filesystem holding ``root`` (0-1)."""
    usage = shutil.disk_usage(root)
    return (usage.total - usage.free) / usage.total if usage.total else 1.0


def inodes_used_fraction(root: Path) -> float:
    """Used share of the inodes of the filesystem holding ``root`` (0-1; 0 where it has no fixed count, as btrfs)."""
    stat = os.statvfs(root)
    return (stat.f_files - stat.f_favail) / stat.f_files if stat.f_files else 0.0


class Pressure:
    """Answers "too full?" at most once per ``ttl_s`` (a C-STORE must not wait on a COUNT query each time)."""

    def __init__(
        self,
        jobs: JobStore,
        root: Path,
        max_depth: int,
        max_disk_percent: float,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_jobs: int | None = None,
    ) -> None:
        self.jobs = jobs
        self.root = root
        self.max_depth = max_depth
        self.max_disk = max_disk_percent / 100
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._reason = ""

    def reason(self) -> str:
        """Why new instances must be refused now, or '' when they may be accepted."""
        with self._lock:
            now = self.clock()
            if now - self._checked >= self.ttl_s:
                self._reason, self._checked = self._measure(), now
            return self._reason

    def _measure(self) -> str:
        counts = self.jobs.counts()
        depth = sum(counts[state] for state in WAITING)
        if depth >= self.max_depth:
            return f"queue full ({depth} waiting, node.max_queue_depth {self.max_depth}); retry later"
        if self.max_jobs is not None and sum(counts.values()) >= self.max_jobs:
            return f"store full ({sum(counts.values())} jobs kept); retry later"
        used = disk_used_fraction(self.root)
        if used >= self.max_disk:
            return f"disk {used:.0%} full (storage.max_disk_percent {self.max_disk:.0%}); retry later"
        inodes = inodes_used_fraction(self.root)
        if inodes >= self.max_disk:
            return f"disk inodes {inodes:.0%} used (storage.max_disk_percent {self.max_disk:.0%}); retry later"
        return ""
