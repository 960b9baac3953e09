"""The sender's monitoring job: the report's figures over a rolling window, as gauges, with alarms.

Every ``monitoring.interval_minutes`` the sender (:mod:`cxr_node.scheduler`) calls :meth:`Monitor.run`: it reads
the images received in the last ``monitoring.window_days`` days and their outcomes, computes the window's figures
(:func:`cxr_node.monitor.figures.group`), sets the ``cxr_node_monitor_*`` gauges (:data:`cxr_node.metrics.MONITOR`)
and judges each check (:func:`judge`). A check that goes into alarm logs ``monitor.alarm`` (check, value, bound) and
sets ``cxr_node_monitor_alarm{check}`` to 1; one that recovers logs ``monitor.cleared`` and sets it back to 0. A
check that cannot be judged (too few images or labelled studies, no reference) keeps its state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Final

import structlog

from cxr_node.config import MonitoringSettings
from cxr_node.jobs.interfaces import Store
from cxr_node.metrics import MONITOR, MONITOR_METRICS
from cxr_node.monitor.cases import DAY_S, build_period, outcomes_of
from cxr_node.monitor.figures import QUANTILES, Group, Reference, group, read_reference

log = structlog.get_logger("cxr_node.monitor")

CHECKS: Final = ("psi", "ks", "sensitivity", "specificity", "auc", "out_of_domain_rate", "not_analysed_rate")
"""Every check, as the ``check`` label of ``cxr_node_monitor_alarm`` names it."""


@dataclass(frozen=True)
class Verdict:
    """One check of one run: the value judged, its bound, and whether it is in alarm (None: cannot be judged).

    For a metric the value is the upper bound of its 95% interval (the alarm says the whole interval lies below the
    bound); for drift and rates it is the figure itself (the alarm says it lies above).
    """

    check: str
    value: float
    bound: float
    alarm: bool | None


@dataclass(frozen=True)
class Watch:
    """What one run measured: the model, the window's figures (None: nothing received) and the verdicts."""

    model: str | None
    window: Group | None
    verdicts: dict[str, Verdict]


def _above(check: str, value: float, bound: float, judged: bool) -> Verdict:
    return Verdict(check, value, bound, value > bound if judged and math.isfinite(value) else None)


def judge(window: Group, settings: MonitoringSettings) -> dict[str, Verdict]:
    """Every check of :data:`CHECKS` on the window's figures (see :class:`Verdict`)."""
    ops, d, perf = window.operations, window.drift, window.performance
    enough = ops.images >= settings.min_images
    ood, na = settings.max_out_of_domain_rate, settings.max_not_analysed_rate
    found = {
        "psi": _above("psi", d.psi, settings.psi_max, enough),
        "ks": _above("ks", d.ks, settings.ks_max, enough),
        "out_of_domain_rate": _above("out_of_domain_rate", ops.out_of_domain_rate, ood, enough and ood < 1),
        "not_analysed_rate": _above("not_analysed_rate", ops.not_analysed_rate, na, enough and na < 1),
    }
    labelled = perf.studies >= settings.min_labelled_cases
    for check, bound in (("sensitivity", settings.min_sensitivity), ("specificity", settings.min_specificity),
                         ("auc", settings.min_auc)):  # fmt: skip
        high = perf.intervals[check].high
        judged = labelled and bound > 0 and math.isfinite(high)
        found[check] = Verdict(check, high, bound, high < bound if judged else None)
    return {check: found[check] for check in CHECKS}


def limits(settings: MonitoringSettings) -> dict[str, float]:
    """The configured bound of each check."""
    return {"psi": settings.psi_max, "ks": settings.ks_max, "sensitivity": settings.min_sensitivity,
            "specificity": settings.min_specificity, "auc": settings.min_auc,
            "out_of_domain_rate": settings.max_out_of_domain_rate,
            "not_analysed_rate": settings.max_not_analysed_rate}  # fmt: skip


def publish(window: Group | None, reference: Reference | None, now: float) -> None:
    """Set the figure gauges of :data:`cxr_node.metrics.MONITOR` (nan where a figure cannot be had)."""
    nan = math.nan
    for name in MONITOR_METRICS:
        interval = window.performance.intervals[name] if window is not None else None
        for bound in ("value", "low", "high"):
            MONITOR[name].labels(bound).set(nan if interval is None else getattr(interval, bound))
    ops = window.operations if window is not None else None
    MONITOR["psi"].set(window.drift.psi if window is not None else nan)
    MONITOR["ks"].set(window.drift.ks if window is not None else nan)
    MONITOR["out_of_domain_rate"].set(ops.out_of_domain_rate if ops is not None else nan)
    MONITOR["not_analysed_rate"].set(ops.not_analysed_rate if ops is not None else nan)
    MONITOR["volume"].set(ops.images if ops is not None else 0)
    MONITOR["labelled_cases"].set(window.performance.studies if window is not None else 0)
    MONITOR["reference_images"].set(reference.scores.size if reference is not None else 0)
    for to in ("inferred", "sr"):
        for k, q in enumerate(QUANTILES):
            MONITOR["turnaround"].labels(to, f"{q:g}").set(ops.turnaround[to][k] if ops is not None else nan)
    MONITOR["last_run"].set(now)


class Monitor:
    """The monitoring job's state between runs: which checks are in alarm, and the reference once it is complete.

    Parameters
    ----------
    settings : MonitoringSettings
        ``monitoring``.
    store : Store
        The node's store (read only).
    """

    def __init__(self, settings: MonitoringSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.alarms: dict[str, bool] = dict.fromkeys(CHECKS, False)
        self._reference: tuple[str, Reference] | None = None
        for check, bound in limits(settings).items():
            MONITOR["limit"].labels(check).set(bound)
            MONITOR["alarm"].labels(check).set(0)

    def run(self, now: float | None = None) -> Watch:
        """Measure the window ending ``now`` (default: the present), set the gauges and raise or clear alarms."""
        now = time.time() if now is None else now
        since = now - self.settings.window_days * DAY_S
        rows = self.store.results.period(since, now)
        if not any(row.summary is not None for row in rows):
            publish(None, None, now)
            log.info("monitor.measured", images=0, window_days=self.settings.window_days)
            return Watch(None, None, {})
        period = build_period(rows, outcomes_of(self.store, rows), since, now, self.settings.model)
        reference = self.reference(period.model, now)
        window = group("window", period.images, period.studies, reference, resamples=self.settings.resamples,
                       seed=0, bins=self.settings.bins, minimum=self.settings.min_reference_images)  # fmt: skip
        publish(window, reference, now)
        verdicts = judge(window, self.settings)
        self.update(verdicts, period.model)
        log.info("monitor.measured", model=period.model, images=window.operations.images,
                 labelled=window.performance.studies, psi=_round(window.drift.psi), ks=_round(window.drift.ks),
                 sensitivity=_round(window.performance.intervals["sensitivity"].value),
                 alarms=sorted(c for c, on in self.alarms.items() if on))  # fmt: skip
        return Watch(period.model, window, verdicts)

    def reference(self, model: str, now: float) -> Reference | None:
        """The reference distribution of ``model``, kept once its window has passed (it cannot change after)."""
        if self._reference is not None and self._reference[0] == model:
            return self._reference[1]
        found = read_reference(self.settings, self.store, model)
        if found is not None and found.until <= now:
            self._reference = (model, found)
        return found

    def update(self, verdicts: dict[str, Verdict], model: str) -> None:
        """Raise (``monitor.alarm``) or clear (``monitor.cleared``) each judged check whose state changed."""
        for check, verdict in verdicts.items():
            if verdict.alarm is None or verdict.alarm == self.alarms[check]:
                continue
            self.alarms[check] = verdict.alarm
            MONITOR["alarm"].labels(check).set(1 if verdict.alarm else 0)
            event = "monitor.alarm" if verdict.alarm else "monitor.cleared"
            emit = log.warning if verdict.alarm else log.info
            emit(event, check=check, value=_round(verdict.value), bound=verdict.bound, model=model,
                 window_days=self.settings.window_days)  # fmt: skip


def _round(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None
