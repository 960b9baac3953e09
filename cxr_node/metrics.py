"""Prometheus metrics (/metrics) and the health check (/healthz), with prometheus_client.

Two sources make one exposition, served by the supervisor: gauges measured from the durable store at each
scrape (:class:`StoreCollector`: jobs, deliveries, destinations, disk), and the worker's own metrics
(inference time per image, batches), which the worker process records with prometheus_client's multiprocess
mode in ``metrics/`` under this host's ``storage.run_dir`` (:func:`share_with_children`) and the supervisor
reads back with its ``MultiProcessCollector``. A process that never shared (a test, ``cxr-node status``)
reports its own values.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from cxr_node.config import Settings, export_metrics_dir
from cxr_node.errors import StorageError
from cxr_node.jobs.interfaces import Store
from cxr_node.jobs.leases import Holder, is_dead
from cxr_node.jobs.states import JobState
from cxr_node.receive.pressure import WAITING, disk_used_fraction

log = structlog.get_logger("cxr_node.metrics")

MULTIPROCESS_DIR: Final = "metrics"
"""The worker's multiprocess metrics folder, under this host's ``storage.run_dir``."""
SKIP_CATEGORIES: Final = (
    ("own output", "own_output"),
    ("SOP class", "sop_class"),
    ("modality", "modality"),
    ("body part", "body_part"),
    ("view position", "view_position"),
    ("NumberOfFrames", "frames"),
    ("multi-frame", "frames"),
)
"""How a skip reason (receive/filters.py) becomes a metric label: its opening words name the rule that skipped it.
A reason that matches none is ``other``, so the label set stays bounded whatever values arrive."""
SECONDS_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the per-image inference seconds histogram."""

INFERENCE_SECONDS: Final = Histogram(
    "cxr_node_inference_seconds", "Inference time per image (its share of its batch).", buckets=SECONDS_BUCKETS
)
BATCHES: Final = Gauge("cxr_node_batch_size", "Inference batches run, by size.", ["size"], multiprocess_mode="sum")
INFERENCE_BUSY: Final = Gauge(
    "cxr_node_inference_busy_seconds", "Seconds the worker spent running the networks.", multiprocess_mode="sum"
)
WORKER_LOADED: Final = Gauge(
    "cxr_node_worker_loaded_seconds",
    "Seconds the worker had claimed jobs in hand; 1 - busy / loaded is the accelerator's idle share while there was "
    "work (time spent waiting for decoding or output writing).",
    multiprocess_mode="sum",
)


MONITOR_MODE: Final = "mostrecent"
"""The monitoring gauges are set by the sender process: in multiprocess mode the last value set counts."""
MONITOR_METRICS: Final = ("sensitivity", "specificity", "ppv", "npv", "auc")
MONITOR: Final[dict[str, Gauge]] = {
    **{
        name: Gauge(f"cxr_node_monitor_{name}", f"Monitoring window: {name} of the labelled studies (value and 95% CI "
                    "bounds low, high).", ["bound"], multiprocess_mode=MONITOR_MODE)
        for name in MONITOR_METRICS
    },
    "psi": Gauge("cxr_node_monitor_psi", "Monitoring window: population stability index of the scores against the "
                 "reference.", multiprocess_mode=MONITOR_MODE),
    "ks": Gauge("cxr_node_monitor_ks", "Monitoring window: two-sample Kolmogorov-Smirnov statistic of the scores "
                "against the reference.", multiprocess_mode=MONITOR_MODE),
    "out_of_domain_rate": Gauge("cxr_node_monitor_out_of_domain_rate", "Monitoring window: share of images outside "
                                "the model's domain (refused + flagged).", multiprocess_mode=MONITOR_MODE),
    "not_analysed_rate": Gauge("cxr_node_monitor_not_analysed_rate", "Monitoring window: share of images not "
                               "analysed.", multiprocess_mode=MONITOR_MODE),
    "volume": Gauge("cxr_node_monitor_volume", "Monitoring window: images with a result of the model judged.",
                    multiprocess_mode=MONITOR_MODE),
    "labelled_cases": Gauge("cxr_node_monitor_labelled_cases", "Monitoring window: studies with a positive or "
                            "negative outcome.", multiprocess_mode=MONITOR_MODE),
    "reference_images": Gauge("cxr_node_monitor_reference_images", "Analysed images in the reference distribution.",
                              multiprocess_mode=MONITOR_MODE),
    "turnaround": Gauge("cxr_node_monitor_turnaround_seconds", "Monitoring window: seconds from receipt to the result "
                        "(to=inferred) or to the SR's delivery (to=sr), by quantile.", ["to", "quantile"],
                        multiprocess_mode=MONITOR_MODE),
    "alarm": Gauge("cxr_node_monitor_alarm", "1 while a monitoring check is in alarm (docs/monitoring.md).", ["check"],
                   multiprocess_mode=MONITOR_MODE),
    "limit": Gauge("cxr_node_monitor_limit", "The configured bound of each monitoring check.", ["check"],
                   multiprocess_mode=MONITOR_MODE),
    "last_run": Gauge("cxr_node_monitor_last_run_timestamp_seconds", "When the monitoring job last measured.",
                      multiprocess_mode=MONITOR_MODE),
}  # fmt: skip
"""The monitoring gauges (:mod:`cxr_node.monitor.watch` sets them)."""


def observe_batch(size: int, seconds: float) -> None:
    """Count one inference batch of ``size`` images that took ``seconds``."""
    per_image = seconds / max(size, 1)
    for _ in range(size):
        INFERENCE_SECONDS.observe(per_image)
    BATCHES.labels(str(size)).inc()


def observe_worker_time(busy_s: float = 0.0, loaded_s: float = 0.0) -> None:
    """Add to the worker's inference-busy and jobs-in-hand seconds (their ratio is the accelerator's use)."""
    if busy_s:
        INFERENCE_BUSY.inc(busy_s)
    if loaded_s:
        WORKER_LOADED.inc(loaded_s)


def share_with_children(run_dir: Path) -> Path:
    """Start an empty multiprocess metrics folder under this host's ``run_dir`` and point child processes at it.

    Call in the supervisor before it starts the worker: the children read the folder from their environment
    when they first import prometheus_client.
    """
    folder = run_dir / MULTIPROCESS_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    export_metrics_dir(folder)
    return folder


@dataclass(frozen=True)
class Snapshot:
    """Everything /metrics and ``cxr-node status`` show from the store, measured once.

    ``alive`` is, per role, when a process of that role last recorded itself alive (on any host sharing the
    store); ``stuck`` lists running jobs whose lease has run out (their worker stopped renewing it) as
    ``(job id, seconds since)``.
    """

    jobs: dict[str, int]
    skipped: dict[str, int]
    deliveries: dict[tuple[str, str], int]
    destinations: dict[str, Any]
    oldest_pending_s: float
    disk_used: float
    alive: dict[str, float]
    stuck: list[tuple[int, float]]

    @property
    def queue_depth(self) -> int:
        """Jobs queued or running."""
        return sum(self.jobs.get(state.value, 0) for state in WAITING)


def skip_category(reason: str) -> str:
    """The bounded label of a skip reason (one of :data:`SKIP_CATEGORIES`' labels, or ``other``)."""
    return next((label for prefix, label in SKIP_CATEGORIES if reason.startswith(prefix)), "other")


def by_category(reasons: dict[str, int]) -> dict[str, int]:
    """Skip counts by reason, summed into their bounded categories."""
    counts: dict[str, int] = {}
    for reason, count in reasons.items():
        label = skip_category(reason)
        counts[label] = counts.get(label, 0) + count
    return counts


def snapshot(settings: Settings, store: Store, now: float | None = None) -> Snapshot:
    """Measure the node now."""
    root, now = settings.storage.root, time.time() if now is None else now
    alive: dict[str, float] = {}
    for holder in store.jobs.holders():
        alive[holder.role] = max(alive.get(holder.role, 0.0), holder.renewed_at)
    running = store.jobs.query(JobState.RUNNING)
    return Snapshot(
        jobs={state.value: n for state, n in store.jobs.counts().items()},
        skipped=store.jobs.reasons(JobState.SKIPPED),
        deliveries=store.deliveries.counts(),
        destinations={name: state.__dict__ for name, state in store.deliveries.destinations().items()},
        oldest_pending_s=store.jobs.oldest_open_age(now),
        disk_used=disk_used_fraction(root) if root.exists() else 0.0,
        alive=alive,
        stuck=[(job.id, now - job.lease_until) for job in running if job.lease_until and job.lease_until < now],
    )


def _gauge(name: str, help_text: str, labels: tuple[str, ...], samples: list[tuple[tuple[str, ...], float]]) -> Metric:
    family = GaugeMetricFamily(f"cxr_node_{name}", help_text, labels=list(labels))
    for values, value in samples:
        family.add_metric([v[:200] for v in values], value)
    return family


class StoreCollector(Collector):
    """The gauges measured from the durable store at each scrape."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def collect(self) -> Iterator[Metric]:
        """Measure the store and yield one metric family per gauge."""
        snap = snapshot(self.settings, self.store)
        limits = (self.settings.node.max_queue_depth, self.settings.storage.max_disk_percent / 100)
        destinations = snap.destinations.items()
        yield _gauge("jobs", "Jobs by state.", ("state",), [((s,), n) for s, n in snap.jobs.items()])
        yield _gauge("received", "Instances received and kept in the store.", (), [((), sum(snap.jobs.values()))])
        yield _gauge(
            "skipped", "Skipped instances by reason.", ("reason",), [((r,), n) for r, n in snap.skipped.items()]
        )
        yield _gauge("quarantined", "Quarantined instances.", (), [((), snap.jobs.get("quarantined", 0))])
        yield _gauge("queue_depth", "Jobs queued or running.", (), [((), snap.queue_depth)])
        yield _gauge("queue_limit", "node.max_queue_depth.", (), [((), limits[0])])
        yield _gauge(
            "oldest_pending_seconds", "Age of the oldest job not yet delivered.", (), [((), snap.oldest_pending_s)]
        )
        yield _gauge("disk_used_ratio", "Used share of the storage filesystem.", (), [((), round(snap.disk_used, 4))])
        yield _gauge("disk_limit_ratio", "storage.max_disk_percent / 100.", (), [((), limits[1])])
        yield _gauge(
            "deliveries",
            "Deliveries by destination and outcome.",
            ("destination", "outcome"),
            [((d, s), n) for (d, s), n in snap.deliveries.items()],
        )
        yield _gauge(
            "destination_up",
            "1 when the last association with the destination worked.",
            ("destination",),
            [((name,), float(state["reachable"])) for name, state in destinations],
        )
        yield _gauge(
            "destination_unmet",
            "Output kinds the destination refuses (an alarm).",
            ("destination",),
            [((name,), len(state["refused"])) for name, state in destinations],
        )


def registry(settings: Settings, store: Store) -> CollectorRegistry:
    """The node's whole exposition: the store's gauges and the worker's metrics (shared or this process's)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(StoreCollector(settings, store))
    shared = settings.storage.run_dir / MULTIPROCESS_DIR
    if shared.is_dir():
        MultiProcessCollector(found, str(shared))  # type: ignore[no-untyped-call]  # unannotated __init__
    else:
        found.register(INFERENCE_SECONDS)
        found.register(BATCHES)
        for gauge in MONITOR.values():
            found.register(gauge)
    return found


def health(settings: Settings, snap: Snapshot, now: float | None = None) -> list[str]:
    """What is wrong with the node ([] when healthy): SCP not listening, worker or sender gone, jobs stuck
    (the whole node, as ``cxr-node status`` and a supervisor of every role judge it; see :func:`role_health`)."""
    now = time.time() if now is None else now
    problems = []
    if not _listening(settings):
        problems.append(f"the DICOM SCP is not listening on port {settings.node.port}")
    stale = settings.metrics.stuck_after_s
    if snap.queue_depth and now - snap.alive.get("worker", float("-inf")) > stale:
        problems.append(f"{snap.queue_depth} jobs wait but no worker has been alive for {stale:g} s")
    if settings.destinations and now - snap.alive.get("sender", float("-inf")) > stale:
        problems.append(f"the sender has not run for {stale:g} s")
    stuck = [job_id for job_id, seconds in snap.stuck if seconds > stale]
    if stuck:
        shown = ", ".join(map(str, stuck[:10])) + (" ..." if len(stuck) > 10 else "")
        problems.append(f"{len(stuck)} running jobs have had no live worker for over {stale:g} s: {shown}")
    return problems


def role_health(settings: Settings, store: Store, roles: Sequence[str], now: float | None = None) -> list[str]:
    """The health of this host's ``roles`` alone, as cheaply as a probe should be: a receiver's SCP answering
    (no database read), and this host's worker or sender having renewed its holder entry (one small read; a
    store it cannot read is a problem of that role, not of a receiver)."""
    now = time.time() if now is None else now
    problems = []
    if "receiver" in roles and not _listening(settings):
        problems.append(f"the DICOM SCP is not listening on port {settings.node.port}")
    judged = [role for role in ("worker", "sender") if role in roles]
    if not judged:
        return problems
    try:
        holders = store.jobs.holders()
    except StorageError as exc:
        return [*problems, f"the store cannot be read: {exc}"]
    here = socket.gethostname()
    stale = settings.metrics.stuck_after_s
    for role in judged:
        renewed = [
            h.renewed_at
            for h in holders
            if h.role == role
            and (parsed := Holder.parse(role, h.id)) is not None
            and parsed.host == here
            and not is_dead(parsed)  # a predecessor's last renewal is not this process being alive
        ]
        if now - max(renewed, default=float("-inf")) > stale:
            problems.append(f"this host's {role} has not been alive for {stale:g} s")
    return problems


def _listening(settings: Settings) -> bool:
    host = "127.0.0.1" if settings.node.host in ("0.0.0.0", "::", "") else settings.node.host  # noqa: S104
    try:
        with socket.create_connection((host, settings.node.port), timeout=2):
            return True
    except OSError:
        return False


class MetricsServer:
    """/metrics and /healthz over HTTP on ``metrics.host:metrics.port`` (loopback by default), in a thread."""

    def __init__(self, settings: Settings, store: Store, roles: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.roles = roles  # /healthz judges these roles of this host (None: the whole node on one host)
        self.registry = registry(settings, store)
        self.httpd = ThreadingHTTPServer((settings.metrics.host, settings.metrics.port), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> MetricsServer:
        """Serve in the background."""
        self.thread.start()
        log.info("metrics.listening", host=self.settings.metrics.host, port=self.httpd.server_address[1])
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    code, body, kind = server.respond(self.path)
                except Exception as exc:  # a broken scrape must not kill the supervisor
                    log.exception("metrics.failed", path=self.path[:100])
                    code, body, kind = 500, f"error: {type(exc).__name__}\n".encode(), "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        return Handler

    def respond(self, path: str) -> tuple[int, bytes, str]:
        """(HTTP status, body, content type) for a GET of ``path``."""
        if path.startswith("/metrics"):
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path.startswith("/healthz"):
            if self.roles is None:
                problems = health(self.settings, snapshot(self.settings, self.store))
            else:
                problems = role_health(self.settings, self.store, self.roles)
            text = "\n".join(problems) + "\n" if problems else "ok\n"
            return (503 if problems else 200), text.encode(), "text/plain"
        return 404, b"try /metrics or /healthz\n", "text/plain"
