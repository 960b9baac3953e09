"""Leases: a running job belongs to a live holder, never to a process that may be dead.

A holder is one process of one role on one host, named by host, pid and the kernel's start time of that pid
(a recycled pid has another start time). A worker claims jobs under its holder with a lease it renews while it
makes progress. When a role starts, the jobs of holders that are dead go back to the queue: on this host that is
known at once (the pid no longer runs with that start time); on another host, when the lease has expired.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxr_node.jobs.interfaces import DeliveryStore, JobStore
    from cxr_node.jobs.records import Job


@dataclass(frozen=True)
class Holder:
    """One process of one role: what owns the jobs it claims.

    Parameters
    ----------
    role : str
        ``worker`` or ``sender``.
    host : str
        The host name.
    pid : int
        The process id on that host.
    started : int
        The kernel's start time of the process (clock ticks since boot).
    """

    role: str
    host: str
    pid: int
    started: int

    @property
    def id(self) -> str:
        """``host:pid:started``, unique for as long as the host runs."""
        return f"{self.host}:{self.pid}:{self.started}"

    @classmethod
    def parse(cls, role: str, holder_id: str) -> Holder | None:
        """The holder named ``holder_id``, or None when it is not of the ``host:pid:started`` form."""
        host, _, rest = holder_id.rpartition(":")
        host, _, pid = host.rpartition(":")
        if not (host and pid.isdigit() and rest.isdigit()):
            return None
        return cls(role, host, int(pid), int(rest))


def this_process(role: str) -> Holder:
    """The holder that stands for the calling process in ``role``."""
    pid = os.getpid()
    return Holder(role, socket.gethostname(), pid, start_time(pid) or 0)


def start_time(pid: int) -> int | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), or None when it does not exist.

    A pid and its start time name one process for as long as the machine runs; a recycled pid has another.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[19])  # field 22 of stat; fields[0] here is field 3


def is_dead(holder: Holder) -> bool:
    """True when ``holder`` ran on this host and no longer does (on another host this cannot be known)."""
    if holder.host != socket.gethostname():
        return False
    return start_time(holder.pid) != holder.started


def recover_jobs(jobs: JobStore, role: str, max_attempts: int, now: float) -> list[Job]:
    """Take back the running jobs of ``role``'s holders that are gone (dead on this host, or whose leases
    expired anywhere); a job back from its last attempt ends dead. Returns the jobs moved."""
    return jobs.release(gone(jobs, role), now, max_attempts, f"its {role} stopped while it ran")


def gone(jobs: JobStore, role: str) -> list[str]:
    """Ids of ``role``'s holders known dead: those of this host whose process no longer runs."""
    return [
        state.id
        for state in jobs.holders()
        if state.role == role and (holder := Holder.parse(role, state.id)) is not None and is_dead(holder)
    ]


def recover_deliveries(jobs: JobStore, deliveries: DeliveryStore) -> int:
    """Free the deliveries that senders of this host held when they stopped (another host's are freed when
    their lease ends); return how many."""
    return deliveries.release(gone(jobs, "sender"))
