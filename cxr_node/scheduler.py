"""The sender process's timetable (the only apscheduler importer): deliveries, probes, retention, reports.

Each job is a thin call of a plain method; apscheduler runs one instance of each at a time and
coalesces missed runs, so a slow PACS never piles up delivery rounds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from cxr_node.config import Settings
from cxr_node.jobs import retention, spool
from cxr_node.jobs.interfaces import JobStore, Store
from cxr_node.jobs.leases import recover_deliveries
from cxr_node.jobs.states import JobState
from cxr_node.jobs.wakeup import Listener
from cxr_node.monitor.watch import Monitor
from cxr_node.send.deliver import Dispatcher

log = structlog.get_logger("cxr_node.scheduler")

ALIVE_EVERY_S = 1.0
"""How often the sender records that it is alive."""

DELIVER_JOB: Final = "deliver"
"""The timetable's delivery round."""
MONITOR_JOB: Final = "monitor"
"""The timetable's monitoring job (:mod:`cxr_node.monitor.watch`)."""
PARTIAL_MIN_AGE_S: Final = 600.0
"""The least age of a receiving file :meth:`Housekeeper.sweep_partials` removes."""
MONITOR_FIRST_RUN_S: Final = 30.0
"""How long after the sender starts the monitoring job first runs (then every ``monitoring.interval_minutes``)."""


class Housekeeper:
    """Retention, delivery age limits and the dead-letter report, as plain methods."""

    def __init__(self, settings: Settings, store: Store, on_purge: Callable[[list[str]], Any] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.on_purge = on_purge

    def settle(self) -> None:
        """Give up on deliveries past the age limit; finish written jobs with nothing left to send."""
        expired = self.store.deliveries.expire(self.settings.delivery.max_age_hours * 3600)
        settled = self.store.deliveries.settle_written()
        if expired or settled:
            log.info("housekeeping.settled", expired_deliveries=expired, finished_jobs=settled)

    def sweep_partials(self) -> int:
        """Delete the files of receives that ended without a data set (an A-ABORT or a dropped connection in the
        middle of a C-STORE) and temporaries a crash left, once untouched for :meth:`partial_age_s`; return how
        many. Without it they stayed until the next start, each up to ``node.max_instance_mb``."""
        removed = spool.remove_partials(self.settings.storage.root, min_age_s=self.partial_age_s())
        if removed:
            log.info("housekeeping.partials_removed", files=removed)
        return removed

    def partial_age_s(self) -> float:
        """How long a receiving file must be untouched before it counts as left over: a live receive writes to
        it at least every ``node.network_timeout_s`` (or is aborted), so three times that, and at least 10
        minutes."""
        return max(PARTIAL_MIN_AGE_S, 3 * self.settings.node.network_timeout_s)

    def purge(self) -> int:
        """Purge finished jobs older than ``storage.retention_days`` (files, rows, index entries)."""
        ids = retention.expired(self.store, self.settings.storage.retention_days)
        if not ids:
            return 0
        studies = sorted({job.study_instance_uid for job in map(self.store.jobs.get, ids) if job is not None})
        count = retention.purge_jobs(self.store, self.settings.storage.root, ids)
        if self.on_purge is not None:
            self.on_purge(studies)
        log.info(
            "housekeeping.purged", jobs=count, studies=len(studies), retention_days=self.settings.storage.retention_days
        )
        return count

    def dead_letter_report(self) -> int:
        """Log the dead jobs (reason counts) so they are seen; ``cxr-node resend --dead`` re-queues them."""
        reasons = self.store.jobs.reasons(JobState.DEAD)
        if reasons:
            log.warning(
                "housekeeping.dead_letters",
                total=sum(reasons.values()),
                reasons={reason[:80]: n for reason, n in reasons.items()},
            )
        return sum(reasons.values())


class SkippedRuns(logging.Filter):
    """Drop apscheduler's warning that a run was skipped because the previous one still runs: one at a time is
    this timetable's design (a delivery round to a slow PACS outlasts its interval), not a fault to report."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for the skipped-run warning, True for every other record."""
        return "maximum number of running instances reached" not in record.getMessage()


def timetable(
    settings: Settings,
    dispatcher: Dispatcher,
    housekeeper: Housekeeper,
    extra: Sequence[tuple[Callable[[], Any], float, str]] = (),
) -> BackgroundScheduler:
    """The sender's scheduler, not started: delivery rounds, probes, settling, retention, dead-letter report."""
    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60}
    )
    apscheduler_log = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(existing, SkippedRuns) for existing in apscheduler_log.filters):
        apscheduler_log.addFilter(SkippedRuns())
    delivery = settings.delivery
    jobs: list[tuple[Callable[[], Any], float, str]] = [
        (dispatcher.round, delivery.poll_interval_ms / 1000, DELIVER_JOB),
        (lambda: [dispatcher.probe(d) for d in dispatcher.destinations], delivery.probe_interval_s, "probe"),
        (housekeeper.settle, 30.0, "settle"),
        (housekeeper.purge, 3600.0, "retention"),
        (housekeeper.sweep_partials, 300.0, "partials"),
        (housekeeper.dead_letter_report, 3600.0, "dead_letters"),
        *extra,
    ]
    for function, seconds, name in jobs:
        scheduler.add_job(_logged(function, name), "interval", seconds=seconds, id=name, name=name)
    if settings.monitoring.enabled:  # performance over time (docs/monitoring.md); the first run soon after start
        monitor = Monitor(settings.monitoring, housekeeper.store)
        first = datetime.now(UTC) + timedelta(seconds=MONITOR_FIRST_RUN_S)
        scheduler.add_job(_logged(monitor.run, MONITOR_JOB), "interval", minutes=settings.monitoring.interval_minutes,
                          id=MONITOR_JOB, name=MONITOR_JOB, next_run_time=first)  # fmt: skip
    return scheduler


def _logged(function: Callable[[], Any], name: str) -> Callable[[], None]:
    """A job that logs its exceptions and never lets one stop the scheduler."""

    def run() -> None:
        try:
            function()
        except Exception:
            log.exception("scheduler.job_failed", job=name)

    return run


class Sender:
    """The sender role: first probes and settling, then the timetable until stopped, renewing its holder entry
    (how /healthz knows the sender is alive). A wake-up call (outputs written, deliveries re-queued) starts a
    delivery round at once instead of at the next ``delivery.poll_interval_ms``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        housekeeper: Housekeeper,
        scheduler: BackgroundScheduler,
        jobs: JobStore,
        listener: Listener | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.housekeeper = housekeeper
        self.scheduler = scheduler
        self.jobs = jobs
        self.listener = listener or Listener(None)
        self.holder = dispatcher.holder

    def run(self, stop: threading.Event) -> None:
        """Run deliveries and housekeeping until ``stop`` is set; the round in hand is finished first."""
        self.jobs.renew(self.holder, ALIVE_EVERY_S)
        freed = recover_deliveries(self.jobs, self.dispatcher.store)  # a sender before this one died on this host
        if freed:
            log.info("sender.recovered", deliveries_freed=freed)
        for destination in self.dispatcher.destinations:
            self.dispatcher.probe(destination)
        self.housekeeper.settle()
        self.scheduler.start()
        log.info("sender.started", destinations=[d.name for d in self.dispatcher.destinations])
        renewed = time.monotonic()
        try:
            while not stop.is_set():
                if self.listener.wait(max(0.0, renewed + ALIVE_EVERY_S - time.monotonic())):
                    self.deliver_now()
                if time.monotonic() - renewed >= ALIVE_EVERY_S:
                    self.jobs.renew(self.holder, ALIVE_EVERY_S)
                    renewed = time.monotonic()
        finally:
            self.scheduler.shutdown(wait=True)
            self.listener.close()
            log.info("sender.stopped")

    def deliver_now(self) -> None:
        """Run the delivery round now (or right after the one running: apscheduler runs one at a time)."""
        self.scheduler.modify_job(DELIVER_JOB, next_run_time=datetime.now(UTC))
