"""Scale-out on one PostgreSQL: the queue's own cost per job with 1-8 worker processes, PostgreSQL's added latency
against SQLite per transaction, and images/min end to end with one and two worker hosts.

Three measurements in one run, on a throw-away PostgreSQL on loopback with its durability on (fsync, synchronous
commit, full page writes: ``tests.postgres.PostgresServer(durable=True)``) and, for comparison, an SQLite file with
``synchronous=FULL`` (the node's default, ``storage.fsync``) on the same disk:

1. **Queue overhead.** Worker processes (multiprocessing, each with its own store connection, as separate hosts
   would have) take ``--jobs`` jobs through the store's whole per-image path with no model: recorded as the
   receiver does, claimed (batches of 1 or of 8), a small real result saved (an analysed summary, a 64 x 64 mask
   and heatmap, a 2 KB embedding), two outputs saved with one delivery each (SR + SC to one destination), the
   deliveries claimed as a sender does (``due`` with a holder and a lease) and their two outcomes recorded. Each
   process records its share and claims whatever is queued (``FOR UPDATE SKIP LOCKED`` on PostgreSQL). Then the
   database is checked: every job delivered, claimed by exactly one process exactly once, six events each, two
   deliveries delivered each, no delivery recorded twice.
2. **PostgreSQL against SQLite**: the same sequence, one job at a time in one process, latency per transaction.
3. **End to end**: ``cxr-node serve receiver``, ``serve sender`` and one or two ``serve worker`` hosts (each its own
   supervisor, run folder and, where ``unshare -u`` is allowed, host name), all on one PostgreSQL and one storage
   root, the demo models, a pynetdicom Storage SCP as the PACS; bursts of ``--n`` phantoms (384 px) in one
   association, in the order 1, 2, 2, 1 worker hosts (``--rounds`` times). Turnaround: from the job's
   ``received_at`` (the last byte on disk and committed) to its ``delivered`` event (the SR and the SC both
   acknowledged by the PACS); images/min over each burst, from its first C-STORE to its last delivery.

Bounded: a job count and a deadline per queue run, ``--timeout`` per burst; servers on 127.0.0.1 only; every
process and temporary folder is removed in ``finally`` blocks.

    .venv/bin/python bench/scale.py [--jobs 128] [--repeat 2] [--n 40] [--rounds 1] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import psycopg
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_node.errors import InvalidTransition, StorageError
from cxr_node.jobs import spool
from cxr_node.jobs.leases import Holder, start_time
from cxr_node.jobs.postgres import PgCursor, PostgresStore
from cxr_node.jobs.records import Job, NewJob, Output
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import DeliveryState, JobState
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, Summary
from tests.integration.helpers import wait_for
from tests.postgres import APP_ROLE, PostgresServer

REPO: Final = Path(__file__).resolve().parents[1]
DEMO_MANIFEST: Final = REPO / "models" / "demo" / "manifest.yaml"
BENCHMARKS: Final = REPO / "docs" / "benchmarks.md"
SCALE_OUT: Final = REPO / "docs" / "scale-out.md"
BEGIN, END = "<!-- bench/scale.py: begin -->", "<!-- bench/scale.py: end -->"
PLACEHOLDER: Final = "<!-- bench/scale.py -->"
SECTION: Final = "## Scale-out: the queue on PostgreSQL (`bench/scale.py`)"

WORKERS: Final = (1, 2, 4, 8)
BATCHES: Final = (1, 8)
BACKENDS: Final = ("postgresql", "sqlite")
NAMES: Final = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
DESTINATION: Final = "pacs"
LEASE_S: Final = 300.0
RUN_TIMEOUT_S: Final = 90.0
READY_TIMEOUT_S: Final = 60.0
HOST_READY_S: Final = 180.0
STOP_WAIT_S: Final = 60.0
WARM_UP_JOBS: Final = 5
TARGET_MS: Final = 5.0
FAULTS: Final = ("lost", "claimed_twice", "sent_twice", "failed")
MAX_FAILED: Final = 20
EVENTS_PER_JOB: Final = ("received", "queued", "running", "inferred", "written", "delivered")

PROVENANCE: Final = Provenance("bench", "1", "benchmark only", ("a", "b"), "0.1.0", "2.25.1")
SUMMARY: Final = Summary(
    "bench", "1", True, (1955, 1841), probability=0.7, threshold=0.5, members=(("a", 0.6), ("b", 0.8)),
    lung_mask=MaskVerdict(True, "plausible", 0.31, 2), analysed_shape=(64, 64), photometric="MONOCHROME2",
)  # fmt: skip
_YX: Final = np.mgrid[0:64, 0:64]
FINDINGS: Final = Findings(
    PROVENANCE,
    SUMMARY,
    image=np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64),
    lung_mask=(_YX[0] - 32) ** 2 + (_YX[1] - 20) ** 2 < 200,
    heatmap=np.exp(-((_YX[0] - 30.0) ** 2 + (_YX[1] - 40.0) ** 2) / 200).astype(np.float32),
)
"""A small real result: what save_result stores for an analysed image (summary JSON, packed mask and heatmap)."""
EMBEDDING: Final = (np.ones(512, np.float32) / math.sqrt(512)).tobytes()
"""An L2-normalised 512-float32 retrieval embedding, 2 KB."""

T = TypeVar("T")
AnyStore = SqliteStore | PostgresStore


# --- where a run's store lives -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Db:
    """One run's database: an SQLite file (``synchronous=FULL``) or a PostgreSQL URL with its password apart."""

    backend: str
    path: str = ""
    url: str = ""
    password: str = ""

    def open(self) -> AnyStore:
        """A new store (a new connection) on this database."""
        if self.backend == "sqlite":
            return SqliteStore(Path(self.path), fsync=True)
        return PostgresStore(self.url, password=self.password)


@dataclass
class Databases:
    """Fresh databases on demand: SQLite files in a temporary folder, PostgreSQL databases on one server."""

    server: PostgresServer
    folder: Path
    made: int = 0

    @staticmethod
    def cpu(db: Db) -> Callable[[], float]:
        """A reading of the CPU seconds of the server's backends for ``db`` (none for the embedded SQLite: its work
        is in the clients). They are read while the clients are connected: a backend that ended is not counted."""
        name = db.url.rsplit("/", 1)[-1]
        return (lambda: 0.0) if db.backend == "sqlite" else (lambda: backends_cpu_s(name))

    def fresh(self, backend: str) -> Db:
        """A new, empty database of ``backend`` with the node's schema."""
        self.made += 1
        if backend == "sqlite":
            db = Db("sqlite", path=str(self.folder / f"run{self.made}" / spool.DB_NAME))
        else:
            url = self.server.create_database(f"bench_{self.made}")
            db = Db("postgresql", url=url, password=self.server.password)
        db.open().close()  # creates the schema before any worker starts
        return db


def backends_cpu_s(database: str) -> float:
    """CPU seconds used so far by the live PostgreSQL backends serving ``database`` to the role ``cxr`` (the
    server's work for the clients; its background writers and autovacuum apart)."""
    title = f"postgres: {APP_ROLE} {database} ".encode()
    ticks = 0
    for folder in Path("/proc").glob("[0-9]*"):
        try:
            if not (folder / "cmdline").read_bytes().startswith(title):
                continue
            text = (folder / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 of proc(5)
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


# --- what each process does per job ------------------------------------------------------------------------


@dataclass
class Clock:
    """Wall seconds of every store call, by operation (and, while :func:`counting` is on, statements sent)."""

    calls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statements: Counter[str] = field(default_factory=Counter)
    current: str = ""

    def time(self, name: str, call: Callable[..., T], *args: Any) -> T:
        """Run ``call(*args)`` and add its wall time to ``name``."""
        self.current = name
        began = time.perf_counter()
        result = call(*args)
        self.calls[name].append(time.perf_counter() - began)
        return result


@contextmanager
def counting(clock: Clock) -> Iterator[None]:
    """Count the statements the store sends PostgreSQL, by the clock's current operation (its own SQL only: the
    BEGIN and COMMIT of each transaction come on top). This process only."""
    execute, executemany = PgCursor.execute, PgCursor.executemany

    def counted_execute(cursor: PgCursor, sql: str, args: Sequence[Any] = (), /) -> Any:
        clock.statements[clock.current] += 1
        return execute(cursor, sql, args)

    def counted_executemany(cursor: PgCursor, sql: str, rows: Any, /) -> Any:
        clock.statements[clock.current] += 1  # pipelined by psycopg: one round trip
        return executemany(cursor, sql, rows)

    PgCursor.execute, PgCursor.executemany = counted_execute, counted_executemany  # type: ignore[method-assign]
    try:
        yield
    finally:
        PgCursor.execute, PgCursor.executemany = execute, executemany  # type: ignore[method-assign]


def new_job(uid: str) -> NewJob:
    """What a receiver records for a newly stored instance ``uid``."""
    return NewJob(
        instance_key=spool.instance_key(uid), sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid=f"{uid}.1", series_instance_uid=f"{uid}.2", accession_number="A1", patient_hash="ab" * 8,
        modality="CR", transfer_syntax="1.2.840.10008.1.2.1", calling_aet="PACS", peer="127.0.0.1:104",
        path=f"inbox/{uid}.dcm", size_bytes=7_200_000,
    )  # fmt: skip


def outputs_of(job: Job) -> list[Output]:
    """The SR and SC a worker writes for ``job``, in send order."""
    uid, folder = job.sop_instance_uid, f"outbox/{job.id}"
    return [
        Output("sr", str(ComprehensiveSRStorage), f"{uid}.91", f"{folder}/sr.dcm", 16_000, 0),
        Output("sc", str(SecondaryCaptureImageStorage), f"{uid}.92", f"{folder}/sc.dcm", 3_700_000, 1),
    ]


def holders(index: int) -> tuple[Holder, Holder]:
    """This process as a worker and as a sender (two host names: two holders)."""
    pid = os.getpid()
    started = start_time(pid) or 0
    return Holder("worker", f"bench-w{index}", pid, started), Holder("sender", f"bench-s{index}", pid, started)


def record(store: AnyStore, clock: Clock, uids: Sequence[str]) -> None:
    """The receiver's commits: one job per instance, queued."""
    for uid in uids:
        clock.time("record", store.jobs.record, new_job(uid), JobState.QUEUED)


def work(store: AnyStore, clock: Clock, worker: Holder, batch: int) -> list[int]:
    """The worker's commits: claim up to ``batch`` jobs, save each one's result, then its outputs; return their ids."""
    jobs = clock.time("claim", store.jobs.claim, batch, worker, LEASE_S)
    if jobs:
        clock.calls["claim (jobs)"].append(clock.calls["claim"][-1])
    for job in jobs:
        clock.time("save_result", store.results.save_result, job.id, FINDINGS, EMBEDDING)
        clock.time("save_outputs", store.results.save_outputs, job.id, outputs_of(job), [DESTINATION])
    return [job.id for job in jobs]


def send(store: AnyStore, clock: Clock, sender: Holder, max_jobs: int) -> list[tuple[int, str, bool]]:
    """The sender's commits: claim the deliveries due, record each as delivered; return (job id, kind, recorded)
    of each: not recorded when another sender had delivered it already (it would have been sent twice)."""
    due = clock.time("due", store.deliveries.due, DESTINATION, time.time(), max_jobs, sender, LEASE_S)
    return [(item.job_id, item.kind, deliver(store, clock, item.job_id, item.kind)) for item in due]


def deliver(store: AnyStore, clock: Clock, job_id: int, kind: str) -> bool:
    """Record one output as delivered; False when its delivery was no longer open (another sender's)."""
    try:
        clock.time("delivery", store.deliveries.record, job_id, DESTINATION, kind, DeliveryState.DELIVERED, 0, None)
    except InvalidTransition:
        return False
    return True


@dataclass(frozen=True)
class Plan:
    """One worker process's part of a queue run."""

    index: int
    quota: int
    batch: int
    deadline: float


@dataclass
class Tally:
    """What one process did: the jobs it claimed, the outputs it delivered, those another sender had delivered
    first, and the transactions that failed (a deadlock: rolled back, tried again in the next round)."""

    claimed: list[int] = field(default_factory=list)
    sent: list[tuple[int, str]] = field(default_factory=list)
    twice: list[tuple[int, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def round(self, store: AnyStore, clock: Clock, worker: Holder, sender: Holder, batch: int) -> bool:
        """One round of the worker's and the sender's work; True when there was any."""
        try:
            jobs = work(store, clock, worker, batch)
            self.claimed += jobs
            done = send(store, clock, sender, batch)
        except StorageError as exc:
            self.failed.append(str(exc).rsplit(": ", 1)[-1])
            return len(self.failed) <= MAX_FAILED
        self.sent += [(job_id, kind) for job_id, kind, recorded in done if recorded]
        self.twice += [(job_id, kind) for job_id, kind, recorded in done if not recorded]
        return bool(jobs or done)


def drive(store: AnyStore, plan: Plan) -> dict[str, Any]:
    """Record this process's quota a batch at a time, and work and send whatever is there, until nothing is left."""
    worker, sender = holders(plan.index)
    clock, tally, recorded = Clock(), Tally(), 0
    began, cpu = time.time(), time.process_time()
    while time.time() < plan.deadline:
        if recorded < plan.quota:
            count = min(plan.batch, plan.quota - recorded)
            record(store, clock, [f"2.25.{plan.index + 1}{i:07d}" for i in range(recorded, recorded + count)])
            recorded += count
        if not tally.round(store, clock, worker, sender, plan.batch) and recorded >= plan.quota:
            break
    return {
        "index": plan.index, "began": began, "ended": time.time(), "cpu_s": time.process_time() - cpu,
        "calls": dict(clock.calls), "claimed": tally.claimed, "sent": tally.sent, "twice": tally.twice,
        "failed": tally.failed, "recorded": recorded,
    }  # fmt: skip


@dataclass(frozen=True)
class Signals:
    """How the parent starts the worker processes together and hears from them (multiprocessing objects)."""

    ready: Any  # each process puts its index once connected (or failed)
    go: Any  # set: start
    out: Any  # each process puts its figures, or {"error": ...}
    done: Any  # set: the server's CPU was read; close the connections


def queue_process(db: Db, plan: Plan, signals: Signals) -> None:
    """One worker process: its own store connection, started together with the others, its figures to ``out``;
    connected until the parent has read the server backends' CPU (a backend that ended is not counted)."""
    try:
        store = db.open()
    except Exception as exc:  # reported to the parent, which fails the run with it
        signals.out.put({"index": plan.index, "error": f"{type(exc).__name__}: {exc}"})
        signals.ready.put(plan.index)
        return
    try:
        signals.ready.put(plan.index)
        if not signals.go.wait(READY_TIMEOUT_S):
            raise TimeoutError("never told to start")
        signals.out.put(drive(store, plan))
        signals.done.wait(READY_TIMEOUT_S)
    except Exception as exc:
        signals.out.put({"index": plan.index, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        store.close()


# --- 1. queue overhead ---------------------------------------------------------------------------------------


def run_queue(db: Db, workers: int, batch: int, jobs: int, server_cpu: Callable[[], float]) -> dict[str, Any]:
    """``workers`` processes take ``jobs`` jobs through the store; their pooled figures, the server backends' CPU
    seconds from the start to the last report (``server_cpu``: a reading of their clock) and the database check."""
    context = multiprocessing.get_context("forkserver")
    signals = Signals(context.Queue(), context.Event(), context.Queue(), context.Event())
    deadline = time.time() + READY_TIMEOUT_S + RUN_TIMEOUT_S
    plans = [Plan(i, jobs // workers + (i < jobs % workers), batch, deadline) for i in range(workers)]
    processes = [context.Process(target=queue_process, args=(db, plan, signals)) for plan in plans]
    reports: list[dict[str, Any]] = []
    try:
        for process in processes:
            process.start()
        for _ in processes:
            signals.ready.get(timeout=READY_TIMEOUT_S)
        cpu = server_cpu()
        signals.go.set()
        reports = [signals.out.get(timeout=READY_TIMEOUT_S + RUN_TIMEOUT_S + 30) for _ in processes]
        cpu = server_cpu() - cpu
    finally:
        signals.done.set()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"{db.backend}, {workers} workers: {errors}")
    return pooled(reports, jobs) | {"server_cpu_ms_per_job": 1000 * cpu / jobs, "check": check(db, reports, jobs)}


def pooled(reports: list[dict[str, Any]], jobs: int) -> dict[str, Any]:
    """Throughput over the run and DB time per job, from every process's figures."""
    wall = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    calls: dict[str, list[float]] = defaultdict(list)
    for report in reports:
        for name, seconds in report["calls"].items():
            calls[name] += seconds
    total = {name: sum(seconds) for name, seconds in calls.items()}
    worker_part = sum(total.get(name, 0.0) for name in ("claim", "save_result", "save_outputs"))
    return {
        "jobs_per_s": jobs / wall,
        "db_ms_per_job": 1000 * sum(v for k, v in total.items() if k != "claim (jobs)") / jobs,
        "worker_ms_per_job": 1000 * worker_part / jobs,
        "client_cpu_ms_per_job": 1000 * sum(r["cpu_s"] for r in reports) / jobs,
        "claims": calls["claim (jobs)"],
        "wall_s": wall,
    }


def check(db: Db, reports: list[dict[str, Any]], jobs: int) -> dict[str, Any]:
    """What the database and the processes say happened: states, events, deliveries, claims and sends."""
    claimed = [job_id for r in reports for job_id in r["claimed"]]
    sent = [tuple(pair) for r in reports for pair in r["sent"]]
    states, events, ran_twice, delivered = database_counts(db)
    found = {
        "lost": jobs - states.get(JobState.DELIVERED.value, 0),
        "claimed_twice": ran_twice + len(claimed) - len(set(claimed)),
        # an output claimed by a second sender while the first delivered it: it would have been sent twice
        "sent_twice": sum(len(r["twice"]) for r in reports) + len(sent) - len(set(sent)),
        "failed": sum(len(r["failed"]) for r in reports),
    }
    events_right = all(events.get(state) == jobs for state in EVENTS_PER_JOB) and sum(events.values()) == 6 * jobs
    right = not any(found.values()) and len(set(claimed)) == jobs and delivered == 2 * jobs and events_right
    errors = sorted({error for r in reports for error in r["failed"]})
    return found | {"states": states, "events": events, "deliveries_delivered": delivered, "errors": errors,
                    "claimed_distinct": len(set(claimed)), "ok": right}  # fmt: skip


def database_counts(db: Db) -> tuple[dict[str, int], dict[str, int], int, int]:
    """Jobs by state, events by target state, jobs that went to running more than once, deliveries delivered."""
    store = db.open()
    try:
        with store.db.read() as cursor:
            states = dict(cursor.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            events = dict(cursor.execute("SELECT to_state, COUNT(*) FROM job_events GROUP BY to_state").fetchall())
            ran_twice = cursor.execute(
                "SELECT COUNT(*) FROM (SELECT job_id FROM job_events WHERE to_state = ? GROUP BY job_id"
                " HAVING COUNT(*) > 1) t",
                (JobState.RUNNING.value,),
            ).fetchone()[0]
            delivered = cursor.execute(
                "SELECT COUNT(*) FROM deliveries WHERE state = ?", (DeliveryState.DELIVERED.value,)
            ).fetchone()[0]
    finally:
        store.close()
    return states, events, int(ran_twice), int(delivered)


def queue_overhead(dbs: Databases, jobs: int, repeat: int) -> list[dict[str, Any]]:
    """Every (backend, workers, batch) ``repeat`` times, interleaved; one row each."""
    rows = []
    for round_ in range(repeat):
        for backend in BACKENDS:
            for workers in WORKERS:
                for batch in BATCHES:
                    db = dbs.fresh(backend)
                    result = run_queue(db, workers, batch, jobs, dbs.cpu(db))
                    rows.append({"backend": backend, "workers": workers, "batch": batch, "round": round_} | result)
                    print(progress(rows[-1]), flush=True)
    return rows


def progress(row: dict[str, Any]) -> str:
    """One line per queue run, as it finishes."""
    check = row["check"]
    verdict = "ok" if check["ok"] else "CHECK FAILED " + json.dumps(check)
    return (
        f"  queue {row['backend']:<10} workers {row['workers']} batch {row['batch']}: {row['jobs_per_s']:6.0f} jobs/s,"
        f" CPU {row['client_cpu_ms_per_job']:4.1f} + {row['server_cpu_ms_per_job']:4.1f} ms/job,"
        f" DB wait {row['db_ms_per_job']:5.1f} ms/job (worker {row['worker_ms_per_job']:4.1f}), {verdict}"
    )


# --- 2. PostgreSQL against SQLite, per transaction ---------------------------------------------------------------


def latency_run(db: Db, jobs: int, server_cpu: Callable[[], float]) -> dict[str, list[float]]:
    """One job at a time through every transaction of its path, in this process: seconds per call by operation,
    per job (the sum of its calls), CPU seconds per job (this process and the server) and, on PostgreSQL,
    statements per call; after a few jobs that warm the connections and caches up."""
    store = db.open()
    worker, sender = holders(0)
    clock, per_job = Clock(), []
    try:
        for i in range(WARM_UP_JOBS):
            job_through(store, Clock(), worker, sender, f"2.25.8{i:07d}")
        server, mine = server_cpu(), time.process_time()
        with counting(clock) if db.backend == "postgresql" else contextlib.nullcontext():
            for i in range(jobs):
                began = time.perf_counter()
                job_through(store, clock, worker, sender, f"2.25.9{i:07d}")
                per_job.append(time.perf_counter() - began)
        mine = time.process_time() - mine
        server = server_cpu() - server
    finally:
        store.close()
    statements = {f"statements {name}": [count / len(clock.calls[name])] for name, count in clock.statements.items()}
    statements["statements per job"] = [sum(clock.statements.values()) / jobs]
    return dict(clock.calls) | statements | {"per job": per_job, "cpu per job": [(mine + server) / jobs]}


def job_through(store: AnyStore, clock: Clock, worker: Holder, sender: Holder, uid: str) -> None:
    """One new job through the receiver's, the worker's and the sender's transactions."""
    record(store, clock, [uid])
    claimed, sent = work(store, clock, worker, 1), send(store, clock, sender, 1)
    if len(claimed) != 1 or len(sent) != 2 or not all(done for _, _, done in sent):
        raise RuntimeError(f"job {uid} did not go through the queue")


def latencies(dbs: Databases, jobs: int, repeat: int) -> dict[str, dict[str, list[float]]]:
    """:func:`latency_run` on both backends, interleaved ``repeat`` times; seconds pooled per backend."""
    pooled_calls: dict[str, dict[str, list[float]]] = {backend: defaultdict(list) for backend in BACKENDS}
    for _ in range(repeat):
        for backend in BACKENDS:
            db = dbs.fresh(backend)
            for name, seconds in latency_run(db, jobs, dbs.cpu(db)).items():
                pooled_calls[backend][name] += seconds
        print(f"  latency round done: per job p50 {median_ms(pooled_calls['sqlite']['per job']):.1f} ms SQLite,"
              f" {median_ms(pooled_calls['postgresql']['per job']):.1f} ms PostgreSQL", flush=True)  # fmt: skip
    return pooled_calls


# --- 3. end to end ---------------------------------------------------------------------------------------------


def can_rename_host() -> bool:
    """True when a process can get a host name of its own here (``unshare -u``)."""
    try:
        done = subprocess.run(["unshare", "-u", "hostname", "probe"], capture_output=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Host:
    """One ``cxr-node serve <role>`` supervisor standing for one host: its own config (the shared database and
    storage root), run folder, log and, when ``rename``, host name."""

    def __init__(self, name: str, role: str, base: Path, config: dict[str, Any], env: dict[str, str]) -> None:
        self.name, self.role, self.env = name, role, env
        self.folder = base / name
        self.folder.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(config))
        config["storage"]["runtime_dir"] = str(self.folder / "run")
        self.config = self.folder / "node.yaml"
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, rename: bool) -> Host:
        """Start the supervisor in a session of its own (and a UTS namespace named after the host)."""
        serve = [sys.executable, "-m", "cxr_node", "serve", self.role, "--config", str(self.config)]
        if rename:
            serve = ["unshare", "-u", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh", *serve]
        with (self.folder / "serve.log").open("ab") as log:
            self.process = subprocess.Popen(
                serve, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env, cwd=REPO
            )
        return self

    def ready(self) -> bool:
        """True once its supervisor reported every child up; raises when it exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = (self.folder / "serve.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"host {self.name} exited with {self.process.returncode}:\n{tail}")
        return (self.folder / "run" / f"{self.role}.ready").exists()

    def stop(self) -> None:
        """SIGTERM its supervisor and wait; SIGKILL the whole session when it does not stop."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def host_env(worker: bool) -> dict[str, str]:
    """The environment of a host: this one without the node's own variables; one inference thread per worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE_")}
    if worker:
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return env


def host_config(shared: Path, url: str, password_file: Path, port: int, pacs_port: int) -> dict[str, Any]:
    """What every host shares: database, storage root, models, the PACS; each role's port and run folder apart."""
    return {
        "node": {"ae_title": "CXR_NODE", "host": "127.0.0.1", "port": port, "receiver_processes": 1},
        "storage": {"root": str(shared), "database": url, "database_password_file": str(password_file)},
        "models": {"manifest": str(DEMO_MANIFEST)},
        "destinations": [{"name": DESTINATION, "ae_title": "DEMO_PACS", "host": "127.0.0.1", "port": pacs_port}],
        "delivery": {"poll_interval_ms": 200},
        "worker": {"cpu_processes": 0},
        "metrics": {"enabled": False},
        "logging": {"level": "info", "format": "json"},
    }


class CountingPacs:
    """The PACS: the demo's Storage SCP (pynetdicom, loopback), counting the C-STOREs of each SOP instance."""

    def __init__(self, folder: Path, port: int) -> None:
        from cxr_node.demo import DemoPacs

        self.pacs = DemoPacs(folder, port)
        self.stores: Counter[str] = Counter()
        self._lock = threading.Lock()
        keep = self.pacs._store  # the demo SCP's handler: writes the file, notes when each SR came

        def counted(event: Any) -> int:
            with self._lock:
                self.stores[str(event.request.AffectedSOPInstanceUID)] += 1
            return keep(event)

        self.pacs._store = counted  # type: ignore[method-assign]  # wrapped before the server starts

    def start(self) -> CountingPacs:
        """Listen on 127.0.0.1."""
        self.pacs.start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        self.pacs.stop()


@dataclass
class Site:
    """The end-to-end set-up: the hosts, the PACS and a connection to the shared database to watch the jobs."""

    base: Path
    receiver_port: int
    pacs: CountingPacs
    rename: bool
    hosts: dict[str, Host] = field(default_factory=dict)
    conn: psycopg.Connection[Any] | None = None

    def start_host(self, name: str, role: str, config: dict[str, Any]) -> None:
        """Start one host and wait (bounded) until it is ready."""
        host = Host(name, role, self.base / "hosts", config, host_env(role == "worker")).start(self.rename)
        self.hosts[name] = host
        if not wait_for(host.ready, HOST_READY_S, 0.3):
            raise RuntimeError(f"host {name} not ready within {HOST_READY_S:.0f} s; see {host.folder / 'serve.log'}")

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of one read on the shared database."""
        assert self.conn is not None  # opened by e2e_site
        return self.conn.execute(sql, args or None).fetchall()

    def stop(self) -> None:
        """Stop every host, the PACS and the watching connection."""
        for host in self.hosts.values():
            host.stop()
        self.pacs.stop()
        if self.conn is not None:
            self.conn.close()


@contextmanager
def e2e_site(server: PostgresServer, base: Path) -> Iterator[tuple[Site, dict[str, Any]]]:
    """A fresh database with the schema, a shared root, the PACS, a receiver and a sender running; the hosts'
    common config to start workers with. Everything stopped on exit."""
    url = server.create_database("bench_e2e")
    password_file = server.write_password_file(base / "db-password")
    port, pacs_port = free_port(), free_port()
    config = host_config(base / "shared", url, password_file, port, pacs_port)
    pacs = CountingPacs(base / "pacs", pacs_port).start()
    site = Site(base, port, pacs, can_rename_host())
    try:
        setup = Host("setup", "db", base / "hosts", config, host_env(False))
        subprocess.run([sys.executable, "-m", "cxr_node", "db", "upgrade", "--config", str(setup.config)],
                       check=True, capture_output=True, timeout=120, env=setup.env)  # fmt: skip
        site.conn = psycopg.connect(url, password=server.password, autocommit=True)
        site.start_host("receiver", "receiver", config)
        site.start_host("sender", "sender", config | {"node": config["node"] | {"port": 0}})
        yield site, config | {"node": config["node"] | {"port": 0}}
    finally:
        site.stop()


def phantoms(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` phantom chest radiographs of 384 px (``cxr-node phantoms --size 384``), seeded."""
    from cxr_node.training.phantoms import write_phantom_set

    labels = write_phantom_set(folder, n=n, seed=seed, size=384)
    return sorted(labels.parent.rglob("*.dcm"))


def burst(site: Site, files: list[Path], timeout: float) -> dict[str, Any]:
    """Send ``files`` in one association, wait (bounded) until every job is finished; turnaround and rate."""
    from pydicom import dcmread

    from cxr_node.send.scu import PeerAddress, send_files

    uids = [str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files]
    began = time.time()
    results = send_files(files, PeerAddress("CXR_NODE", "127.0.0.1", site.receiver_port), calling_aet="BENCH")
    refused = [r.comment for r in results if not r.ok]
    open_states = [s.value for s in (JobState.RECEIVED, JobState.QUEUED, JobState.RUNNING, JobState.INFERRED,
                                     JobState.WRITTEN)]  # fmt: skip
    unfinished = "SELECT COUNT(*) FROM jobs WHERE sop_instance_uid = ANY(%s) AND NOT state = ANY(%s)"
    finished = wait_for(lambda: site.query(unfinished, uids, open_states)[0][0] == len(uids) - len(refused),
                        timeout, 0.25)  # fmt: skip
    rows = site.query(
        "SELECT j.received_at, e.at, e2.holder FROM jobs j JOIN job_events e ON e.job_id = j.id AND e.to_state ="
        " 'delivered' JOIN job_events e2 ON e2.job_id = j.id AND e2.to_state = 'inferred'"
        " WHERE j.sop_instance_uid = ANY(%s)",
        uids,
    )
    seconds = sorted(at - received for received, at, _ in rows)
    by_holder = Counter(holder for _, _, holder in rows)
    return {"images": len(files), "delivered": len(rows), "refused": len(refused), "finished": finished,
            "turnaround": seconds, "images_per_min": 60 * len(rows) / (max(at for _, at, _ in rows) - began)
            if rows else 0.0, "by_worker": sorted(by_holder.values(), reverse=True)}  # fmt: skip


def end_to_end(server: PostgresServer, n: int, rounds: int, timeout: float) -> dict[str, Any]:
    """Bursts with 1, 2, 2, 1 worker hosts (``rounds`` times) after a warm-up burst; every burst's figures and the
    C-STOREs the PACS received per SOP instance."""
    base = Path(tempfile.mkdtemp(prefix="cxr-bench-scale-"))
    try:
        with e2e_site(server, base) as (site, config):
            site.start_host("worker-a", "worker", config)
            warm = burst(site, phantoms(base / "inputs" / "warm", 4, 500), timeout)  # models loaded and warm
            bursts = [burst_with(site, config, workers, phantoms(base / "inputs" / str(seed), n, seed), timeout)
                      for seed, workers in enumerate((1, 2, 2, 1) * rounds, start=501)]  # fmt: skip
            return {"bursts": bursts, "warm_up": warm, "stores": dict(site.pacs.stores), "renamed": site.rename}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def burst_with(site: Site, config: dict[str, Any], workers: int, files: list[Path], timeout: float) -> dict[str, Any]:
    """Start or stop the second worker host so that ``workers`` run, then send one burst."""
    if workers == 2 and "worker-b" not in site.hosts:
        site.start_host("worker-b", "worker", config)
    if workers == 1 and "worker-b" in site.hosts:
        site.hosts.pop("worker-b").stop()
    result = {"workers": workers} | burst(site, files, timeout)
    print(f"  e2e {workers} worker host(s): {result['delivered']}/{len(files)} delivered,"
          f" {result['images_per_min']:.0f} images/min, by worker {result['by_worker']}", flush=True)  # fmt: skip
    return result


# --- report ------------------------------------------------------------------------------------------------------


def median_ms(seconds: Sequence[float]) -> float:
    """The median in milliseconds (0 for none)."""
    return 1000 * statistics.median(seconds) if seconds else 0.0


def p95_ms(seconds: Sequence[float]) -> float:
    """The 95th percentile in milliseconds (nearest rank; 0 for none)."""
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)] if ordered else 0.0


def queue_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (backend, workers, batch): medians over the rounds, claims pooled."""
    lines = [
        "| backend | worker processes | claim batch | jobs/s | CPU per job, clients / server (ms)"
        " | the worker's DB wait per job (ms) | all roles' DB wait per job (ms) | claim p50 / p95 (ms)"
        " | PostgreSQL ÷ SQLite jobs/s | jobs lost / jobs claimed twice / outputs sent twice / transactions failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["backend"], row["workers"], row["batch"])].append(row)
    for (backend, workers, batch), group in groups.items():
        claims = [s for r in group for s in r["claims"]]
        ratio = f"{same_run_ratio(rows, workers, batch):.2f}" if backend == "postgresql" else ""
        lines.append(
            f"| {NAMES[backend]} | {workers} | {batch} | {rate(rows, backend, workers, batch):.0f}"
            f" | {median_of(group, 'client_cpu_ms_per_job'):.1f} / {median_of(group, 'server_cpu_ms_per_job'):.1f}"
            f" | {median_of(group, 'worker_ms_per_job'):.1f}"
            f" | {median_of(group, 'db_ms_per_job'):.1f} | {median_ms(claims):.1f} / {p95_ms(claims):.1f} | {ratio}"
            f" | {' / '.join(str(sum(r['check'][key] for r in group)) for key in FAULTS)} |"
        )
    return lines


def median_of(group: list[dict[str, Any]], key: str) -> float:
    """The median of one figure over the rounds."""
    return float(statistics.median(r[key] for r in group))


def rate(rows: list[dict[str, Any]], backend: str, workers: int, batch: int) -> float:
    """Median jobs/s over the rounds of one configuration."""
    return median_of(
        [r for r in rows if (r["backend"], r["workers"], r["batch"]) == (backend, workers, batch)], "jobs_per_s"
    )


def same_run_ratio(rows: list[dict[str, Any]], workers: int, batch: int) -> float:
    """Median over the rounds of PostgreSQL's jobs/s over SQLite's in the same round."""
    rates = {
        (r["backend"], r["round"]): r["jobs_per_s"] for r in rows if (r["workers"], r["batch"]) == (workers, batch)
    }
    rounds = sorted({round_ for _, round_ in rates})
    return float(statistics.median(rates[("postgresql", r)] / rates[("sqlite", r)] for r in rounds))


TRANSACTIONS: Final = ("record", "claim", "save_result", "save_outputs", "due", "delivery")
LATENCY_ROWS: Final = (
    ("record", "record (receiver: insert + 2 events)"),
    ("claim", "claim, 1 job (worker)"),
    ("save_result", "save_result (worker)"),
    ("save_outputs", "save_outputs: 2 outputs, 1 destination (worker)"),
    ("due", "due: claim the deliveries (sender)"),
    ("delivery", "delivery outcome, each of 2 (sender)"),
    ("per job", "**per job: all of the above, 2 delivery outcomes**"),
)


def latency_table(calls: dict[str, dict[str, list[float]]]) -> list[str]:
    """p50 and p95 per transaction on each backend, what PostgreSQL adds, and the statements it is sent."""
    lines = [
        "| transaction | SQLite p50 / p95 (ms) | PostgreSQL p50 / p95 (ms) | PostgreSQL adds, p50 (ms)"
        " | statements sent to PostgreSQL (+ BEGIN and COMMIT) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in LATENCY_ROWS:
        lite, pg = calls["sqlite"][key], calls["postgresql"][key]
        statements = calls["postgresql"].get(f"statements {key}", [])
        lines.append(
            f"| {label} | {median_ms(lite):.2f} / {p95_ms(lite):.2f} | {median_ms(pg):.2f} / {p95_ms(pg):.2f}"
            f" | {median_ms(pg) - median_ms(lite):+.2f} | {median_ms(statements) / 1000:.0f} |"
        )
    cpu = {backend: median_ms(calls[backend]["cpu per job"]) for backend in BACKENDS}
    lines.append(
        f"| CPU per job, client + server (median, rounds) | {cpu['sqlite']:.2f} | {cpu['postgresql']:.2f}"
        f" | {cpu['postgresql'] - cpu['sqlite']:+.2f} | |"
    )
    return lines


def e2e_table(result: dict[str, Any]) -> list[str]:
    """Per worker count: turnaround pooled over its bursts, images/min per burst."""
    lines = [
        "| worker hosts | bursts x images | delivered | turnaround median (s) | p95 (s) | max (s) "
        "| images/min, each burst | jobs per worker host |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for workers in (1, 2):
        group = [b for b in result["bursts"] if b["workers"] == workers]
        seconds = sorted(s for b in group for s in b["turnaround"])
        rates = ", ".join(f"{b['images_per_min']:.0f}" for b in group)
        split = "; ".join(" + ".join(str(c) for c in b["by_worker"]) for b in group)
        lines.append(
            f"| {workers} | {len(group)} x {group[0]['images']} | {sum(b['delivered'] for b in group)}"
            f" | {median_ms(seconds) / 1000:.1f} | {p95_ms(seconds) / 1000:.1f} | {seconds[-1]:.1f} | {rates}"
            f" | {split} |"
        )
    return lines


def e2e_ratio(result: dict[str, Any]) -> float:
    """Images/min with two worker hosts over one, median over the bursts."""
    by = {w: statistics.median(b["images_per_min"] for b in result["bursts"] if b["workers"] == w) for w in (1, 2)}
    return float(by[2] / by[1])


def wait_of(rows: list[dict[str, Any]], workers: int, batch: int) -> float:
    """The worker's DB wait per job on PostgreSQL, median over the rounds (ms)."""
    return median_of([r for r in rows if (r["backend"], r["workers"], r["batch"]) == ("postgresql", workers, batch)],
                     "worker_ms_per_job")  # fmt: skip


def cores_busy(rows: list[dict[str, Any]], workers: int, batch: int) -> float:
    """Cores the clients and the server kept busy on PostgreSQL: jobs/s x CPU seconds per job (median rounds)."""
    group = [r for r in rows if (r["backend"], r["workers"], r["batch"]) == ("postgresql", workers, batch)]
    cpu = median_of(group, "client_cpu_ms_per_job") + median_of(group, "server_cpu_ms_per_job")
    return rate(rows, "postgresql", workers, batch) * cpu / 1000


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 15's targets, from the PostgreSQL rows: the queue's overhead per job, and nothing lost or done twice."""
    most, batch = max(WORKERS), max(BATCHES)
    default, single = wait_of(rows, 1, batch), wait_of(rows, 1, 1)
    at_most = [r["check"] for r in rows if r["backend"] == "postgresql" and r["workers"] == most]
    clean = all(c["ok"] for c in at_most)
    cores = len(os.sched_getaffinity(0))
    return [
        f"- **Queue overhead <= {TARGET_MS:g} ms per job: {'met' if default <= TARGET_MS else 'not met'}.** One"
        f" worker process waits **{default:.1f} ms** per job on the durable PostgreSQL store (its claim, save_result"
        f" and save_outputs) with claims of {batch} (`worker.batch_size`'s default), {single:.1f} ms claiming one"
        f" job at a time. With more processes than the {cores} cores the wait includes waiting for a core: at"
        f" {most} processes, batch {batch}, it is {wait_of(rows, most, batch):.1f} ms per job while the clients and"
        f" the server keep {cores_busy(rows, most, batch):.1f} of the {cores} cores busy (jobs/s x CPU per job). On"
        " hosts of their own the workers do not share cores; the database server is what they share.",
        f"- **No lost or duplicated work at {most} workers: {'met' if clean else 'NOT MET'}.** {len(at_most)}"
        f" runs of {sum(at_most[0]['states'].values())} jobs: " + (faults(at_most) if not clean else "every job"
        " delivered, claimed once by one process (the claim ids of all processes compared), "
        f"{len(EVENTS_PER_JOB)} events each ({', '.join(EVENTS_PER_JOB)}), 2 deliveries delivered each, no"
        " delivery claimed by two senders."),
    ]  # fmt: skip


def faults(checks: list[dict[str, Any]]) -> str:
    """What went wrong in the runs checked, in words."""
    lost, claimed, sent, failed = (sum(c[key] for c in checks) for key in FAULTS)
    errors = ", ".join(sorted({error for c in checks for error in c["errors"]}))
    found = [
        f"jobs not delivered: {lost}" if lost else "",
        f"jobs claimed twice: {claimed}" if claimed else "",
        f"outputs claimed by a second sender while the first was delivering them: {sent} (each would reach the"
        " PACS twice; the second record of it is refused: InvalidTransition)" if sent else "",
        f"transactions failed: {failed} ({errors}; rolled back, retried in the next round)" if failed else "",
    ]  # fmt: skip
    return "; ".join(part for part in found if part) + "."


def report(rows: list[dict[str, Any]], calls: dict[str, dict[str, list[float]]], e2e: dict[str, Any] | None,
           args: argparse.Namespace, facts: str) -> str:  # fmt: skip
    """The Markdown written to the terminal and, with --write-docs, into docs/benchmarks.md."""
    lines = [
        f"**Queue overhead** ({args.jobs} jobs per run, {args.repeat} rounds interleaved, medians; PostgreSQL"
        " durable: fsync, synchronous_commit and full_page_writes on; SQLite: WAL, `synchronous=FULL`). Each job:"
        " recorded (receiver), claimed, result saved, 2 outputs + 1 delivery each saved (worker), deliveries"
        " claimed and 2 outcomes recorded (sender); every process does every role, with its own connection."
        " *CPU*: the processes' own and, for PostgreSQL, its backends' (background writers and autovacuum apart)."
        " *DB wait*: the wall time of the store"
        f" calls, summed over the processes, per job; with more processes than the {cores()} cores it includes"
        " waiting for a core. *The worker's*: claim + save_result + save_outputs.",
        "",
        *queue_table(rows),
        "",
        *verdict(rows),
        *race_note(rows),
        "",
        f"**PostgreSQL against SQLite per transaction** (one process, one job at a time, {args.latency_jobs} jobs"
        f" x {args.repeat} rounds per backend after {WARM_UP_JOBS} warm-up jobs):",
        "",
        *latency_table(calls),
        "",
        why(rows, calls),
    ]
    if e2e is not None:
        lines += ["", *e2e_notes(e2e, args)]
    return "\n".join([*lines, "", facts])


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def server_ms(rows: list[dict[str, Any]]) -> float:
    """PostgreSQL's own CPU per job with the most worker processes and the biggest claims (ms, median rounds)."""
    busiest = ("postgresql", max(WORKERS), max(BATCHES))
    return median_of([r for r in rows if (r["backend"], r["workers"], r["batch"]) == busiest], "server_cpu_ms_per_job")


def why(rows: list[dict[str, Any]], calls: dict[str, dict[str, list[float]]]) -> str:
    """Where PostgreSQL's time goes, and what its server's CPU per job means for sizing."""
    statements = median_ms(calls["postgresql"]["statements per job"]) / 1000
    transactions = sum(len(calls["postgresql"][key]) for key in TRANSACTIONS) / len(calls["postgresql"]["per job"])
    pg, lite, server = (
        median_ms(calls["postgresql"]["cpu per job"]),
        median_ms(calls["sqlite"]["cpu per job"]),
        server_ms(rows),
    )
    return (
        f"- Where the time goes: a job sends PostgreSQL {statements:.0f} statements in {transactions:.0f} transactions,"
        " each of which adds a BEGIN and a COMMIT (and, for a connection idle over 5 s, the pool's check): every one"
        " a round trip to another"
        f" process. That costs {pg:.1f} ms of CPU per job (client and server) against {lite:.1f} ms for SQLite in"
        f" the process. The server's share is {server:.1f} ms per job (the busiest runs: {max(WORKERS)} worker"
        f" processes, claims of {max(BATCHES)}): one core of the database server carries the queue of about"
        f" {1000 / server:.0f} images/s."
    )  # fmt: skip


def race_note(rows: list[dict[str, Any]]) -> list[str]:
    """Why outputs were claimed twice or transactions deadlocked on PostgreSQL, when they were."""
    pg = [r["check"] for r in rows if r["backend"] == "postgresql"]
    sent, failed = sum(c["sent_twice"] for c in pg), sum(c["failed"] for c in pg)
    if not sent and not failed:
        return []
    return [
        f"- On PostgreSQL, all runs: outputs claimed by two senders {sent}, transactions failed {failed}. The senders'"
        " claim (`SqlDeliveries.due` with a holder) locks the *job* rows `FOR UPDATE SKIP LOCKED` but decides"
        " which deliveries are free from the rows its statement read before taking the lock; a sender that"
        " committed its claim in between is not seen (the job row it locked did not change, so PostgreSQL does"
        " not re-check), and the second sender takes the same deliveries over. When the first is recording an"
        " outcome at that moment (delivery row locked, waiting for the job row) the two deadlock. SQLite, one"
        " writer at a time, shows neither."
    ]


def e2e_notes(e2e: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The end-to-end table with what it can and cannot show on this machine."""
    return [
        f"**End to end** on PostgreSQL: one receiver, one sender and 1 or 2 worker hosts (`cxr-node serve <role>`,"
        f" each its own supervisor and run folder{', host name (`unshare -u`)' if e2e['renamed'] else ''}), one"
        f" storage root, demo models (one inference thread per worker), SR + SC to a pynetdicom Storage SCP; bursts"
        f" of {args.n} phantoms (384 px) in one association, in the order 1, 2, 2, 1 worker hosts ({args.rounds} x),"
        " after a 4-image warm-up. Turnaround: the job's received_at (last byte on disk, committed) to its"
        " delivered event (SR and SC acknowledged by the PACS).",
        "",
        *e2e_table(e2e),
        "",
        f"- Two worker hosts give **{e2e_ratio(e2e):.2f} x** the images/min of one (same run, median over the"
        f" bursts). This machine has {cores()} cores for everything: the receiver, the sender, PostgreSQL, the"
        " PACS and this script share them with the workers, so a second worker cannot double anything here; what"
        " the figure shows is that the work is shared (jobs per worker host) with nothing lost. On separate hosts"
        " each worker brings its own cores or GPU.",
        f"- {pacs_verdict(e2e)[0].upper()}{pacs_verdict(e2e)[1:]}.",
    ]


def pacs_verdict(e2e: dict[str, Any]) -> str:
    """What the PACS received against what it should have: one SR and one SC per image."""
    stores = e2e["stores"]
    images = e2e["warm_up"]["delivered"] + sum(b["delivered"] for b in e2e["bursts"])
    once = max(stores.values(), default=0) == 1 and len(stores) == 2 * images
    verdict = "each SR and SC exactly once" if once else "**not exactly one SR and one SC each**"
    return (
        f"the PACS received {sum(stores.values())} C-STOREs of {len(stores)} SOP instances for {images} images"
        f" (warm-up included): {verdict}"
    )


def machine_line() -> str:
    """Date, CPU model, cores available, Python, PostgreSQL and SQLite versions."""
    import sqlite3

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")  # fmt: skip
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"{date}, {model}, {len(os.sched_getaffinity(0))} cores available, Python {platform.python_version()},"
            f" SQLite {sqlite3.sqlite_version}, psycopg {psycopg.__version__}")  # fmt: skip


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what stands between ``begin`` and ``end`` replaced by ``body``."""
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def wrapped(text: str) -> str:
    """Markdown prose wrapped at 118 columns as the docs are (bullets hanging), tables and blank lines as they are."""
    lines = []
    for line in text.splitlines():
        if not line or line.startswith("|"):
            lines.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        kept = re.sub(r" ([-+*]) ", "\u00a0\\1 ", line)  # no wrapped line may start with "+ ": a list
        text = textwrap.fill(kept, 118, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
        lines.append(text.replace("\u00a0", " "))
    return "\n".join(lines)


def write_docs(text: str, short: str) -> None:
    """The full report into docs/benchmarks.md (its section appended when missing); the short one into
    docs/scale-out.md, section "Measured" (its placeholder and the paragraph after it replaced the first time)."""
    doc = BENCHMARKS.read_text()
    if BEGIN not in doc:
        doc = doc.rstrip("\n") + f"\n\n{SECTION}\n\n{BEGIN}\n{END}\n"
    BENCHMARKS.write_text(replace_between(doc, BEGIN, END, wrapped(text)))
    doc = SCALE_OUT.read_text()
    if BEGIN not in doc:
        head, rest = doc.split(PLACEHOLDER, 1)
        paragraph_end = rest.find("\n\n")
        tail = "" if paragraph_end < 0 else rest[paragraph_end:]
        doc = f"{head}{BEGIN}\n{END}{tail if tail else chr(10)}"
    SCALE_OUT.write_text(replace_between(doc, BEGIN, END, wrapped(short)))


def short_report(rows: list[dict[str, Any]], calls: dict[str, dict[str, list[float]]], e2e: dict[str, Any] | None,
                 facts: str) -> str:  # fmt: skip
    """The pointer and the headline figures for docs/scale-out.md."""
    rates = ", ".join(f"{w}: {rate(rows, 'postgresql', w, max(BATCHES)):.0f}" for w in WORKERS)
    lite, pg = median_ms(calls["sqlite"]["per job"]), median_ms(calls["postgresql"]["per job"])
    lines = [
        "Measured with `bench/scale.py` (tables, method and command: docs/benchmarks.md, section \"Scale-out: the"
        f" queue on PostgreSQL\"); PostgreSQL durable (fsync on), on loopback, one machine with {cores()} cores:",
        "",
        *verdict(rows),
        *race_note(rows),
        f"- Queue throughput (every role's transactions, no model, claims of {max(BATCHES)}), jobs/s by worker"
        f" processes: {rates}. One {cores()}-core machine runs the clients and the server, so this is a floor.",
        f"- PostgreSQL adds **{pg - lite:.1f} ms** per job against SQLite (p50, one process, the whole path: {lite:.1f}"
        f" ms SQLite, {pg:.1f} ms PostgreSQL); the node's own CPU per image is about 124 ms (section 6).",
        f"- Database load per image (section 6): the server's CPU is **{server_ms(rows):.1f} ms per job**, so one"
        f" core of the database server carries about {1000 / server_ms(rows):.0f} images/s of queue work.",
    ]  # fmt: skip
    if e2e is not None:
        lines.append(
            f"- End to end with the demo models, 2 worker hosts give {e2e_ratio(e2e):.2f} x the images/min of 1 here"
            f" (everything shares the {cores()} cores, so no doubling is possible); the jobs are shared between the"
            f" worker hosts, and {pacs_verdict(e2e)}."
        )
    return "\n".join([*lines, "", facts])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=128, help="jobs per queue run (default 128)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds of the queue and latency runs")
    parser.add_argument("--latency-jobs", type=int, default=80, help="jobs per latency run (default 80)")
    parser.add_argument("--n", type=int, default=40, help="images per end-to-end burst (default 40)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="end-to-end rounds of 1, 2, 2, 1 worker hosts (default 1)"
    )
    parser.add_argument("--timeout", type=float, default=180, help="seconds a burst may take to be delivered")
    parser.add_argument("--no-e2e", action="store_true", help="only the queue and latency measurements")
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/ (see the docstring)")
    args = parser.parse_args()
    if not (8 <= args.jobs <= 5000 and 1 <= args.repeat <= 5 and 10 <= args.latency_jobs <= 2000):
        parser.error("--jobs 8..5000, --repeat 1..5, --latency-jobs 10..2000")
    if not (1 <= args.n <= 500 and 1 <= args.rounds <= 5):
        parser.error("--n 1..500, --rounds 1..5")
    load, started = os.getloadavg()[0], time.time()
    server = PostgresServer(durable=True)
    folder = Path(tempfile.mkdtemp(prefix="cxr-bench-scale-db-"))
    try:
        server.start()
        dbs = Databases(server, folder)
        rows = queue_overhead(dbs, args.jobs, args.repeat)
        calls = latencies(dbs, args.latency_jobs, args.repeat)
        e2e = None if args.no_e2e else end_to_end(server, args.n, args.rounds, args.timeout)
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    command = " ".join(["bench/scale.py", *sys.argv[1:]])
    loads = (load, os.getloadavg()[0])
    shared = " (other work ran at the same time)" if max(loads) > 1 else ""
    facts = (f"Machine: {machine_line()}; load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the end{shared};"
             f" {time.time() - started:.0f} s. Command: `.venv/bin/python {command}`.")  # fmt: skip
    text = report(rows, calls, e2e, args, facts)
    print(text)
    if args.write_docs:
        write_docs(text, short_report(rows, calls, e2e, facts))
    bursts = [] if e2e is None else [e2e["warm_up"], *e2e["bursts"]]
    good = all(r["check"]["ok"] for r in rows) and all(b["finished"] and not b["refused"] for b in bursts)
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
