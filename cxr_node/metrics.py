"""Prometheus metrics (/metrics) and the health check (/healthz), read from the durable store and run files.

Every process writes what it knows where the others can read it (the jobs store; the worker's stats file;
heartbeat files), so one endpoint in the supervisor reports the whole node.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import structlog

from cxr_node.config import Settings
from cxr_node.jobs.states import JobState
from cxr_node.jobs.store import SqliteJobStore
from cxr_node.receive.pressure import WAITING, disk_used_fraction

log = structlog.get_logger("cxr_node.metrics")

WORKER_STATS: Final = Path("run/worker.stats.json")
WORKER_HEARTBEAT: Final = Path("run/worker.heartbeat")
SENDER_HEARTBEAT: Final = Path("run/sender.heartbeat")
"""Run files, relative to ``storage.root``, that the worker and sender write and /metrics, /healthz read."""
SECONDS_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the per-image inference seconds histogram (the worker counts into these)."""


@dataclass(frozen=True)
class Snapshot:
    """Everything /metrics and ``cxr-node status`` show, measured once."""

    jobs: dict[str, int]
    skipped: dict[str, int]
    deliveries: dict[tuple[str, str], int]
    destinations: dict[str, Any]
    oldest_pending_s: float
    disk_used: float
    worker: dict[str, Any]

    @property
    def queue_depth(self) -> int:
        """Jobs queued or running."""
        return sum(self.jobs.get(state.value, 0) for state in WAITING)


def snapshot(settings: Settings, store: SqliteJobStore) -> Snapshot:
    """Measure the node now."""
    root = settings.storage.root
    return Snapshot(
        jobs={state.value: n for state, n in store.counts().items()},
        skipped=dict(store.iter_reasons(JobState.SKIPPED)),
        deliveries=store.delivery_counts(),
        destinations={name: state.__dict__ for name, state in store.destinations().items()},
        oldest_pending_s=store.oldest_open_age(time.time()),
        disk_used=disk_used_fraction(root) if root.exists() else 0.0,
        worker=read_worker_stats(root),
    )


def read_worker_stats(root: Path) -> dict[str, Any]:
    """The worker's cumulative stats (inference seconds histogram, batch sizes), or {} before its first batch."""
    try:
        return json.loads((root / WORKER_STATS).read_text())
    except (OSError, ValueError):
        return {}


def render(settings: Settings, snap: Snapshot) -> str:
    """The Prometheus text exposition (format 0.0.4) of a snapshot."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP cxr_node_{name} {help_text}")
        out.append(f"# TYPE cxr_node_{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"cxr_node_{name}{{{text}}} {value:g}" if text else f"cxr_node_{name} {value:g}")

    metric("jobs", "gauge", "Jobs by state.", [({"state": s}, n) for s, n in snap.jobs.items()])
    metric("received", "gauge", "Instances received and kept in the store.", [({}, sum(snap.jobs.values()))])
    metric("skipped", "gauge", "Skipped instances by reason.", [({"reason": r}, n) for r, n in snap.skipped.items()])
    metric("quarantined", "gauge", "Quarantined instances.", [({}, snap.jobs.get("quarantined", 0))])
    metric("queue_depth", "gauge", "Jobs queued or running.", [({}, snap.queue_depth)])
    metric("queue_limit", "gauge", "node.max_queue_depth.", [({}, settings.node.max_queue_depth)])
    metric("oldest_pending_seconds", "gauge", "Age of the oldest job not yet delivered.", [({}, snap.oldest_pending_s)])
    metric("disk_used_ratio", "gauge", "Used share of the storage filesystem.", [({}, round(snap.disk_used, 4))])
    metric(
        "disk_limit_ratio", "gauge", "storage.max_disk_percent / 100.", [({}, settings.storage.max_disk_percent / 100)]
    )
    metric(
        "deliveries",
        "gauge",
        "Deliveries by destination and outcome.",
        [({"destination": d, "outcome": s}, n) for (d, s), n in snap.deliveries.items()],
    )
    metric(
        "destination_up",
        "gauge",
        "1 when the last association with the destination worked.",
        [({"destination": name}, float(state["reachable"])) for name, state in snap.destinations.items()],
    )
    metric(
        "destination_unmet",
        "gauge",
        "Output kinds the destination refuses (an alarm).",
        [({"destination": name}, len(state["refused"])) for name, state in snap.destinations.items()],
    )
    _histogram(out, snap.worker)
    batches = snap.worker.get("batch_sizes", {})
    metric("batch_size", "gauge", "Inference batches run, by size.", [({"size": k}, n) for k, n in batches.items()])
    return "\n".join(out) + "\n"


def _histogram(out: list[str], worker: dict[str, Any]) -> None:
    counts = worker.get("seconds_buckets", [0] * (len(SECONDS_BUCKETS) + 1))
    out.append("# HELP cxr_node_inference_seconds Inference time per image (its share of its batch).")
    out.append("# TYPE cxr_node_inference_seconds histogram")
    running = 0
    for bound, count in zip((*SECONDS_BUCKETS, float("inf")), counts, strict=False):
        running += count
        out.append(f'cxr_node_inference_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {running}')
    out.append(f"cxr_node_inference_seconds_sum {worker.get('seconds_sum', 0.0):g}")
    out.append(f"cxr_node_inference_seconds_count {running}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")[:200]


def health(settings: Settings, snap: Snapshot, now: float | None = None) -> list[str]:
    """What is wrong with the node ([] when healthy): SCP not listening, worker or sender stuck."""
    now = time.time() if now is None else now
    problems = []
    if not _listening(settings):
        problems.append(f"the DICOM SCP is not listening on port {settings.node.port}")
    stale = settings.metrics.stuck_after_s
    root = settings.storage.root
    if snap.queue_depth and _age(root / WORKER_HEARTBEAT, now) > stale:
        problems.append(f"{snap.queue_depth} jobs wait but the worker has made no progress for {stale:g} s")
    if settings.destinations and _age(root / SENDER_HEARTBEAT, now) > stale:
        problems.append(f"the sender has not run for {stale:g} s")
    return problems


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return float("inf")


def _listening(settings: Settings) -> bool:
    host = "127.0.0.1" if settings.node.host in ("0.0.0.0", "::", "") else settings.node.host  # noqa: S104
    try:
        with socket.create_connection((host, settings.node.port), timeout=2):
            return True
    except OSError:
        return False


class MetricsServer:
    """/metrics and /healthz over HTTP on ``metrics.host:metrics.port`` (loopback by default), in a thread."""

    def __init__(self, settings: Settings, store: SqliteJobStore) -> None:
        self.settings = settings
        self.store = store
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
                    code, body, kind = 500, f"error: {type(exc).__name__}: {exc}\n", "text/plain"
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return None

        return Handler

    def respond(self, path: str) -> tuple[int, str, str]:
        """(HTTP status, body, content type) for a GET of ``path``."""
        snap = snapshot(self.settings, self.store)
        if path.startswith("/metrics"):
            return 200, render(self.settings, snap), "text/plain; version=0.0.4"
        if path.startswith("/healthz"):
            problems = health(self.settings, snap)
            return (503, "\n".join(problems) + "\n", "text/plain") if problems else (200, "ok\n", "text/plain")
        return 404, "try /metrics or /healthz\n", "text/plain"
