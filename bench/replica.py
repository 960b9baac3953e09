"""The in-memory replica each worker keeps of the shared case store: today's numpy engine against faiss.

Usage::

    .venv/bin/pip install faiss-cpu      # for this measurement only: faiss is not a dependency of cxr-node
    .venv/bin/python bench/replica.py [--sizes 100000 1000000] [--queries 200] [--pg-rows 50000] [--write-docs]

Engines, all on the same rows (512-d float32 unit embeddings of the clustered set of ``bench/neighbours.py``: a
Gaussian mixture of 1024 components on the sphere) and the same held-out queries:

- ``numpy``: :class:`cxr_node.neighbours.engine.Partition` with the default (measured) settings, built as the
  index builds it from the store (seeded training sample, spherical k-means, every row to its list);
- ``faiss flat``: ``IndexIDMap(IndexFlatIP)``, exact;
- ``faiss ivf``: ``IndexIVFFlat`` (inner product) with the numpy engine's number of lists, trained on a sample of
  the same size, queried at three ``nprobe``.

Each size runs in a child process of its own (clean memory figures, a hard timeout) which, engine by engine
(the previous one freed first): builds it (timed; RSS added); times single top-10 queries one by one (the
worker's pattern; faiss on one OpenMP thread, as the numpy engine scans on one; builds use every core) and scores
recall@10 against the exact top-10 (numpy, blockwise); times the catch-up of 1,000 new rows (what a replica
does when other hosts added them) and a purge of 10 rows. Every loop is bounded by count and time.

``--pg-rows`` adds what a scale-out worker runs end to end, on a throw-away PostgreSQL (``tests/postgres.py``):
queries through :class:`~cxr_node.neighbours.index.ReplicaIndex` on
:class:`~cxr_node.neighbours.postgres.PgCaseStore` against the same index on SQLite, and the next query's time
after another host committed 1 or 1,000 rows (the tail read included).

``--write-docs`` replaces the text between the markers ``<!-- bench/replica.py: begin -->`` and
``<!-- bench/replica.py: end -->`` in docs/benchmarks.md (the section is appended when they are absent).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Protocol

import numpy as np

REPO: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cxr_node.neighbours import EngineParams, NewCase, ReplicaIndex  # noqa: E402
from cxr_node.neighbours.engine import Exclusion, Partition, Rows  # noqa: E402
from cxr_node.neighbours.store import CHUNK_ROWS  # noqa: E402

DOCS: Final = REPO / "docs" / "benchmarks.md"
RESULTS: Final = REPO / "bench" / "out" / "replica.json"
BEGIN: Final = "<!-- bench/replica.py: begin -->"
END: Final = "<!-- bench/replica.py: end -->"
HEADING: Final = "## The scale-out replica: numpy engine or faiss (`bench/replica.py`)"
DIM: Final = 512
K: Final = 10
CATCH_UP_ROWS: Final = 1000
PURGE_ROWS: Final = 10
WARM_UP: Final = 5
SIZES: Final = (100_000, 250_000)  # 1M holds two engines of 2 GB side by side: past this machine's budget
NPROBES: Final = (8, 16, 32)
QUERY_BUDGET_S: Final = 20.0  # per engine and setting: fewer queries are timed when it is spent
CHILD_TIMEOUT_S: Final = 600
GT_CHUNK: Final = 65_536
PG_BATCH: Final = 1000
PG_SINGLE_ADDS: Final = 30
PG_BULK_ADDS: Final = 3
VERSION: Final = "bench-1.0"
TARGET_MS: Final = 10.0
TARGET_RECALL: Final = 0.95


def _sibling(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (the data set and the measuring helpers of the neighbour benchmark)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    if spec is None or spec.loader is None:
        raise ImportError(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NB: Final = _sibling("neighbours")
PG_ABOUT: Final = (
    "The scale-out path end to end, with the index's own calls (catch-up, search, the hits' cases read from the"
    " store), on a throw-away PostgreSQL on this machine (loopback; `tests/postgres.py`): the same rows in the"
    " index on the SQLite file and on `PgCaseStore`, queries interleaved (k = 10, the query's patient and study"
    " excluded). Then, on PostgreSQL, one host's query with nothing new since its last, right after another host"
    " committed one row (the change counter moved: the index reads the tail above its watermark and the partition"
    " counts), and right after it committed 1,000 rows; each new row is then found by its own vector. Load from"
    " the store: building the replica from the database (no checkpoint)."
)
ABOUT: Final = """\
Each worker on a scale-out node keeps an in-memory replica of the shared case store
(`cxr_node.neighbours.ReplicaIndex` on `PgCaseStore`) and follows other hosts' commits by reading rows above its
watermark. Which engine should that replica be: today's numpy engine (`cxr_node.neighbours.engine.Partition`,
IVF-flat, default settings) or faiss (`faiss-cpu`: `IndexFlatIP` exact, `IndexIVFFlat` with the same number of
lists and training-sample size)? Same rows for all (the clustered 512-d set of `bench/neighbours.py`, held as
float16 and handed to every engine as the same float32 values), 200 held-out queries, top-10, nothing excluded.
Single queries one by one (the worker's pattern), faiss on one OpenMP thread as the numpy engine scans on one;
builds use both cores. The numpy engine and faiss IVF are built side by side and their queries interleaved, query
by query, so both see the same moments of a shared machine; faiss flat runs alone before them. Recall@10 is
against the exact top-10 (numpy, blockwise). Catch-up: adding 1,000 rows another host committed (the engine's
part; the store's part is in the last table). Purge: removing 10 rows. RSS added: resident memory the build
added. Ratios are within one run; absolute times vary with the machine's load (listed below)."""


# --------------------------------------------------------------------------------------------- data


class Data:
    """The stored rows, held as float16 (half the memory: at 1M, 1 GB instead of 2) and handed to every engine
    and to the exact search as the same float32 values, chunk by chunk."""

    def __init__(self, size: int) -> None:
        full = NB.generate("clustered", size, seed=1)
        self.half = full.astype(np.float16)
        del full
        self.total = size

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first row, float32 rows)`` of :data:`CHUNK_ROWS` rows."""
        for start in range(0, self.total, CHUNK_ROWS):
            yield start, self.half[start : start + CHUNK_ROWS].astype(np.float32)

    def sample(self, count: int, seed: int) -> np.ndarray:
        """``count`` rows drawn without replacement (seeded, in row order) as the index draws its training sample."""
        rng = np.random.default_rng(seed)
        rows: np.ndarray = self.half[np.sort(rng.choice(self.total, size=count, replace=False))]
        return rows.astype(np.float32)


# --------------------------------------------------------------------------------------------- engines


class Engine(Protocol):
    """One replica engine as the benchmark drives it: build, search one query, add rows, remove ids."""

    name: str = ""
    settings: tuple[str, ...] = ("",)

    def build(self, data: Data) -> None: ...

    def search(self, query: np.ndarray, setting: str) -> np.ndarray: ...

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def describe(self) -> str: ...


class NumpyEngine(Engine):
    """Today's engine: :class:`Partition`, exact up to 30k rows then IVF-flat, built as the index builds it."""

    name = "numpy"
    settings = ("default", *(f"nprobe {n}" for n in NPROBES))

    def __init__(self) -> None:
        self.params = EngineParams()
        self.part = Partition(DIM, self.params)

    def build(self, data: Data) -> None:
        count = self.params.sample_for(data.total, self.params.lists_for(data.total))
        sample = data.sample(count, self.params.seed)
        chunks = (_rows(chunk, start) for start, chunk in data.chunks())
        self.part = Partition.build(DIM, self.params, data.total, sample, chunks)

    def search(self, query: np.ndarray, setting: str) -> np.ndarray:
        nprobe = None if setting == "default" else int(setting.split()[1])
        return self.part.search(query, K, Exclusion(), nprobe).ids

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.part.add(_rows(vectors, int(ids[0])))

    def remove(self, ids: np.ndarray) -> None:
        self.part.remove(ids)

    def describe(self) -> str:
        centroids = self.part.centroids
        return "exact" if centroids is None else f"ivf:{len(centroids)}"


class FaissFlat(Engine):
    """faiss exact search: ``IndexIDMap(IndexFlatIP)`` (the map keeps the store's ids through removals)."""

    name = "faiss flat"

    def __init__(self, faiss: ModuleType) -> None:
        self.faiss = faiss
        self.index: Any = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))

    def build(self, data: Data) -> None:
        for start, chunk in data.chunks():
            self.index.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))

    def search(self, query: np.ndarray, setting: str) -> np.ndarray:
        _, ids = self.index.search(query[None, :], K)
        return np.asarray(ids[0])

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        self.index.remove_ids(ids)

    def describe(self) -> str:
        return "flat"


class FaissIvf(FaissFlat):
    """faiss ``IndexIVFFlat`` with the numpy engine's list count and sample size, at several ``nprobe``."""

    name = "faiss ivf"
    settings = tuple(f"nprobe {n}" for n in NPROBES)

    def __init__(self, faiss: ModuleType) -> None:
        self.faiss = faiss
        self.params = EngineParams()

    def build(self, data: Data) -> None:
        nlist = self.params.lists_for(data.total)
        sample = data.sample(self.params.sample_for(data.total, nlist), self.params.seed)
        self.quantizer = self.faiss.IndexFlatIP(DIM)  # the index refers to it: kept alive as long
        self.index = self.faiss.IndexIVFFlat(self.quantizer, DIM, nlist, self.faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = self.params.seed
        self.index.train(sample)
        super().build(data)

    def search(self, query: np.ndarray, setting: str) -> np.ndarray:
        self.index.nprobe = int(setting.split()[1])
        return super().search(query, setting)

    def describe(self) -> str:
        return f"ivf:{self.index.nlist}"


def _rows(vectors: np.ndarray, first_id: int) -> Rows:
    """Rows with consecutive ids from ``first_id`` and no exclusion keys."""
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    return Rows(np.ascontiguousarray(vectors), ids, np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64))


# --------------------------------------------------------------------------------------------- measuring


def exact_top(data: Data, queries: np.ndarray) -> np.ndarray:
    """Exact top-``K`` row indices for every query (numpy, chunk by chunk; ties by the smaller row)."""
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), K), np.int64)
    for start, chunk in data.chunks():
        scores = queries @ chunk.T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.lexsort((merged_ids, -merged_scores), axis=1)[:, :K]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_ids = np.take_along_axis(merged_ids, order, 1)
    return best_ids


def build(engine: Engine, data: Data, threads: Callable[[int], None]) -> dict[str, Any]:
    """Build ``engine`` on every core; return its build time and the RSS it added."""
    gc.collect()
    before = NB.rss_bytes()
    threads(os.cpu_count() or 1)
    started = time.perf_counter()
    engine.build(data)
    seconds = time.perf_counter() - started
    gc.collect()
    threads(1)
    return {"engine": engine.name, "build_s": seconds, "rss_mb": (NB.rss_bytes() - before) / 1e6}


def time_queries(engines: list[Engine], queries: np.ndarray, truth: np.ndarray) -> list[dict[str, dict[str, float]]]:
    """Time single queries of every engine and setting, interleaved query by query (the same moments of a shared
    machine for all), after a warm-up, until every query ran or the time budget is spent; score recall@10."""
    pairs = [(engine, setting) for engine in engines for setting in engine.settings]
    for engine, setting in pairs:
        for query in queries[:WARM_UP]:
            engine.search(query, setting)
    times: list[list[float]] = [[] for _ in pairs]
    hits = [0] * len(pairs)
    deadline = time.perf_counter() + QUERY_BUDGET_S * len(pairs)
    for query, expected in zip(queries, truth, strict=True):
        for slot, (engine, setting) in enumerate(pairs):
            started = time.perf_counter()
            found = engine.search(query, setting)
            times[slot].append(time.perf_counter() - started)
            hits[slot] += len(set(found.tolist()) & set(expected.tolist()))
        if time.perf_counter() > deadline:
            break
    out: list[dict[str, dict[str, float]]] = [{} for _ in engines]
    for slot, (engine, setting) in enumerate(pairs):
        out[engines.index(engine)][setting] = {
            "queries": len(times[slot]),
            "p50_ms": 1000 * NB.pct(times[slot], 0.5),
            "p95_ms": 1000 * NB.pct(times[slot], 0.95),
            "recall": hits[slot] / (K * len(times[slot])),
        }
    return out


def follow(engine: Engine, total: int) -> dict[str, Any]:
    """Time the catch-up of 1,000 rows other hosts added (each then found by its own vector) and a purge of 10."""
    fresh = NB.generate("clustered", CATCH_UP_ROWS, seed=3)
    ids = np.arange(total, total + CATCH_UP_ROWS, dtype=np.int64)
    started = time.perf_counter()
    engine.add(fresh, ids)
    out: dict[str, Any] = {"catch_up_ms": 1000 * (time.perf_counter() - started)}
    probes = range(0, CATCH_UP_ROWS, 100)
    found = sum(int(engine.search(fresh[i], engine.settings[-1])[0] == ids[i]) for i in probes)
    started = time.perf_counter()
    engine.remove(np.arange(0, total, total // PURGE_ROWS, dtype=np.int64)[:PURGE_ROWS])
    return out | {
        "purge_ms": 1000 * (time.perf_counter() - started),
        "found_new": found / len(probes),
        "kind": engine.describe(),
    }


def faiss_module() -> ModuleType | None:
    """faiss, or None when it is not installed."""
    try:
        import faiss  # type: ignore[import-not-found,unused-ignore]  # installed for the measurement only
    except ImportError:
        return None
    return faiss


def child(size: int, queries_count: int) -> dict[str, Any]:
    """Measure every engine at ``size`` rows: faiss flat alone first (then freed), then the numpy engine and faiss
    IVF side by side, their queries interleaved. Return the figures."""
    loads, busy0, own0 = os.getloadavg(), NB.busy_seconds(), NB.own_seconds()
    began = time.perf_counter()
    NB.reset_peak()
    data = Data(size)
    queries = NB.generate("clustered", queries_count, seed=2)
    trace = {"data": NB.rss_bytes() / 1e6, "data_peak": NB.rss_bytes("VmHWM") / 1e6}
    started = time.perf_counter()
    truth = exact_top(data, queries)
    out: dict[str, Any] = {"size": size, "queries": queries_count, "truth_s": time.perf_counter() - started}
    faiss = faiss_module()
    threads: Callable[[int], None] = (lambda n: None) if faiss is None else faiss.omp_set_num_threads
    groups: list[list[Engine]] = [[NumpyEngine()]]
    if faiss is not None:
        groups = [[FaissFlat(faiss)], [NumpyEngine(), FaissIvf(faiss)]]
        out["faiss"] = faiss.__version__
    results = []
    for number, group in enumerate(groups):
        built = [build(engine, data, threads) for engine in group]
        trace[f"group{number}_built"] = NB.rss_bytes() / 1e6
        trace[f"group{number}_peak"] = NB.rss_bytes("VmHWM") / 1e6
        timed = time_queries(group, queries, truth)
        for engine, figures, settings in zip(group, built, timed, strict=True):
            results.append(figures | {"settings": settings} | follow(engine, size))
        group.clear()
        gc.collect()
        trace[f"group{number}_freed"] = NB.rss_bytes() / 1e6
    results.sort(key=lambda r: ["numpy", "faiss flat", "faiss ivf"].index(r["engine"]))
    busy = NB.busy_seconds() - busy0 - (NB.own_seconds() - own0)
    return out | {
        "engines": results,
        "rss_trace_mb": trace,
        "peak_mb": NB.rss_bytes("VmHWM") / 1e6,
        "raw_mb": size * DIM * 4 / 1e6,
        "child_s": time.perf_counter() - began,
        "load_start": loads,
        "load_end": os.getloadavg(),
        "others_cpu_s": max(0.0, busy),
    }


# --------------------------------------------------------------------------------------------- PostgreSQL


def new_case(row: int) -> NewCase:
    """The case of row ``row`` (the neighbour benchmark's: 2 images per study, 4 per patient)."""
    result: NewCase = NB.case(row)
    return result


def pg_child(rows: int, queries_count: int) -> dict[str, Any]:
    """The scale-out path end to end: queries on PostgreSQL against SQLite, and catch-up after other hosts' adds."""
    from cxr_node.neighbours.postgres import PgCaseStore
    from tests.postgres import PostgresServer, available

    reason = available()
    if reason is not None:
        return {"skipped": reason}
    stored = NB.generate("clustered", rows + PG_BULK_ADDS * CATCH_UP_ROWS + PG_SINGLE_ADDS, seed=4)
    queries = NB.generate("clustered", queries_count, seed=5)
    server = PostgresServer().start()
    out: dict[str, Any] = {"rows": rows}
    try:
        url = server.create_database("replica_bench")
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            with ReplicaIndex(root / "a", store=PgCaseStore(url, server.password)) as writer:
                started = time.perf_counter()
                fill(writer, stored[:rows], 0)
                out["pg_insert_per_s"] = rows / (time.perf_counter() - started)
                reader = ReplicaIndex(root / "b", store=PgCaseStore(url, server.password))
                with reader, ReplicaIndex(root / "sqlite", fsync=False) as local:
                    fill(local, stored[:rows], 0)
                    local.load(VERSION)
                    out["pg_load_s"] = reader.load(VERSION).load_seconds
                    out["sqlite"], out["pg"] = query_times([local, reader], queries)
                    out |= catch_ups(writer, reader, stored, queries, rows)
    finally:
        server.stop()
    return out


def fill(index: ReplicaIndex, vectors: np.ndarray, first: int) -> None:
    """Add ``vectors`` as rows ``first..`` in batches of :data:`PG_BATCH`."""
    for start in range(0, len(vectors), PG_BATCH):
        chunk = vectors[start : start + PG_BATCH]
        index.add_many(VERSION, chunk, [new_case(first + start + i) for i in range(len(chunk))])


def timed_query(index: ReplicaIndex, query: np.ndarray) -> float:
    """Seconds of one query through the index: catch-up, search, the hits' cases from the store."""
    started = time.perf_counter()
    index.query(VERSION, query, K, patient_hash="new-patient", study_instance_uid="9.9.9")
    return time.perf_counter() - started


def query_times(indexes: list[ReplicaIndex], queries: np.ndarray) -> list[dict[str, float]]:
    """Median and p95 of single queries through each index, interleaved query by query, nothing committed."""
    times: list[list[float]] = [[] for _ in indexes]
    deadline = time.perf_counter() + QUERY_BUDGET_S * len(indexes)
    for query in queries:
        for slot, index in enumerate(indexes):
            times[slot].append(timed_query(index, query))
        if time.perf_counter() > deadline:
            break
    return [{"queries": len(t), "p50_ms": 1000 * NB.pct(t, 0.5), "p95_ms": 1000 * NB.pct(t, 0.95)} for t in times]


def catch_ups(
    writer: ReplicaIndex, reader: ReplicaIndex, stored: np.ndarray, queries: np.ndarray, rows: int
) -> dict[str, float]:
    """The reader's query right after the writer (another host) committed 1 row, or 1,000, against the same
    query with nothing committed before it; each new row is then found by its own vector (not timed)."""
    plain, single, bulk, found = [], [], [], 0
    first = rows + PG_BULK_ADDS * CATCH_UP_ROWS
    for number, row in enumerate(range(first, first + PG_SINGLE_ADDS)):
        plain.append(timed_query(reader, queries[number]))
        writer.add(VERSION, stored[row], new_case(row))
        single.append(timed_query(reader, queries[number]))
        found += top_sop(reader, stored[row]) == new_case(row).sop_instance_uid
    for round_ in range(PG_BULK_ADDS):
        start = rows + round_ * CATCH_UP_ROWS
        fill(writer, stored[start : start + CATCH_UP_ROWS], start)
        bulk.append(timed_query(reader, queries[round_]))
        found += top_sop(reader, stored[start + 7]) == new_case(start + 7).sop_instance_uid
    return {
        "plain_ms": 1000 * float(np.median(plain)),
        "catch_up_1_ms": 1000 * float(np.median(single)),
        "catch_up_1000_ms": 1000 * float(np.median(bulk)),
        "found_new": found / (PG_BULK_ADDS + PG_SINGLE_ADDS),
    }


def top_sop(index: ReplicaIndex, vector: np.ndarray) -> str:
    """The SOP Instance UID of the nearest case."""
    (hit,) = index.query(VERSION, vector, 1, patient_hash=None, study_instance_uid=None)
    return hit.case.sop_instance_uid


# --------------------------------------------------------------------------------------------- parent


def run_child(args: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return its figures."""
    started = time.perf_counter()
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args}: child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def fmt_size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def numpy_default(run: dict[str, Any]) -> dict[str, float]:
    """The numpy engine's figures at its default setting (the first it was measured at)."""
    settings: dict[str, dict[str, float]] = engine_of(run, "numpy")["settings"]
    return next(iter(settings.values()))


def engine_of(run: dict[str, Any], name: str) -> dict[str, Any]:
    """The engine ``name``'s figures in ``run``."""
    found: dict[str, Any] = next(e for e in run["engines"] if e["engine"] == name)
    return found


def engine_table(results: list[dict[str, Any]]) -> str:
    """One row per size, engine and setting; query ratios against the numpy engine's default, same run."""
    lines = [
        "| rows | engine | setting | query p50 / p95 ms | p50 / numpy default | recall@10 | build s | RSS added MB"
        " | catch-up 1,000 rows ms | purge 10 rows ms |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results:
        base = numpy_default(run)["p50_ms"]
        for engine in run["engines"]:
            for setting, q in engine["settings"].items():
                lines.append(
                    f"| {fmt_size(run['size'])} | {engine['engine']} ({engine['kind']}) | {setting or 'default'}"
                    f" | {q['p50_ms']:.2f} / {q['p95_ms']:.2f} | {q['p50_ms'] / base:.2f}x | {q['recall']:.3f}"
                    f" | {engine['build_s']:.1f} | {engine['rss_mb']:,.0f} | {engine['catch_up_ms']:.1f}"
                    f" | {engine['purge_ms']:.1f} |"
                )
    return "\n".join(lines)


def pg_table(pg: dict[str, Any]) -> str:
    """The end-to-end path: the index on PostgreSQL against SQLite, and catch-up after another host's commit."""
    if "skipped" in pg:
        return f"PostgreSQL part skipped: {pg['skipped']}."
    return "\n".join(
        [
            "| store | rows | query p50 / p95 ms | same query, nothing new / after another host added 1 row"
            " / 1,000 rows: median ms | load from the store s | insert /s |",
            "|---|---:|---:|---:|---:|---:|",
            f"| SQLite (one host) | {fmt_size(pg['rows'])} | {pg['sqlite']['p50_ms']:.2f}"
            f" / {pg['sqlite']['p95_ms']:.2f} | - | - | - |",
            f"| PostgreSQL (shared) | {fmt_size(pg['rows'])} | {pg['pg']['p50_ms']:.2f} / {pg['pg']['p95_ms']:.2f}"
            f" | {pg['plain_ms']:.2f} / {pg['catch_up_1_ms']:.2f} / {pg['catch_up_1000_ms']:.1f}"
            f" | {pg['pg_load_s']:.1f} | {pg['pg_insert_per_s']:,.0f} |",
        ]
    )


def extrapolated(run: dict[str, Any]) -> str:
    """1M figures scaled from the largest run: the numpy engine scans a fixed number of rows (``scan_rows``), so
    its query time stays (fewer, longer lists); an IVF list holds N / sqrt(N) rows, so faiss at a fixed nprobe
    scans sqrt(N) more; a flat scan grows with N; memory with N; the build's assignment with N x sqrt(N)."""
    factor = 1_000_000 / run["size"]
    numpy_q = numpy_default(run)
    parts = [f"numpy default ~{numpy_q['p50_ms']:.1f} ms"]
    if any(e["engine"] == "faiss ivf" for e in run["engines"]):
        for setting, q in engine_of(run, "faiss ivf")["settings"].items():
            parts.append(f"faiss IVF {setting} ~{q['p50_ms'] * factor**0.5:.1f} ms")
        parts.append(f"faiss flat ~{engine_of(run, 'faiss flat')['settings']['']['p50_ms'] * factor:.0f} ms")
    numpy_engine = engine_of(run, "numpy")
    return (
        f"Scaled from {fmt_size(run['size'])} to 1M (query p50): {', '.join(parts)}; numpy memory"
        f" ~{numpy_engine['rss_mb'] * factor / 1e3:.1f} GB, build ~{numpy_engine['build_s'] * factor**1.5:.0f} s."
    )


def verdict(results: list[dict[str, Any]], earlier: dict[str, Any] | None) -> str:
    """The figures the decision rests on: the largest size of this run, scaled to 1M, and a 1M run if given."""
    run = results[-1]
    numpy_q = numpy_default(run)
    lines = [
        f"At {fmt_size(run['size'])} x 512, numpy engine (default): query p50 {numpy_q['p50_ms']:.2f} ms,"
        f" p95 {numpy_q['p95_ms']:.2f} ms (target <= {TARGET_MS:.0f}), recall@10 {numpy_q['recall']:.3f}"
        f" (target >= {TARGET_RECALL})."
    ]
    if any(e["engine"] == "faiss ivf" for e in run["engines"]):
        numpy_settings = engine_of(run, "numpy")["settings"]
        for setting, q in engine_of(run, "faiss ivf")["settings"].items():
            same = numpy_settings.get(setting)
            versus = f"; numpy at the same lists {same['p50_ms']:.2f} ms, {same['recall']:.3f}" if same else ""
            lines.append(f"faiss IVF {setting}: p50 {q['p50_ms']:.2f} ms, recall@10 {q['recall']:.3f}{versus}.")
    lines.append(extrapolated(run))
    if earlier is not None:
        big = earlier["engines"][-1]
        lines.append(
            f"Measured at {fmt_size(big['size'])} in an earlier run ({big['child_s']:.0f} s, peak RSS"
            f" {big['peak_mb'] / 1e3:.1f} GB: over this machine's budget, so not repeated): numpy default"
            f" {numpy_default(big)['p50_ms']:.2f} ms at recall {numpy_default(big)['recall']:.3f}."
        )
    return " ".join(lines)


def decision(results: list[dict[str, Any]], earlier: dict[str, Any] | None) -> str:
    """The decision, with the ratios it rests on computed from this run (and the earlier 1M run, if given)."""
    run = results[-1]
    if not any(e["engine"] == "faiss ivf" for e in run["engines"]):
        return "faiss is not installed: no comparison was made."
    numpy_settings, faiss_settings = engine_of(run, "numpy")["settings"], engine_of(run, "faiss ivf")["settings"]
    ratios = [numpy_settings[s]["p50_ms"] / faiss_settings[s]["p50_ms"] for s in faiss_settings]
    recall_gap = max(abs(numpy_settings[s]["recall"] - faiss_settings[s]["recall"]) for s in faiss_settings)
    default, shallow = numpy_settings["default"], numpy_settings[f"nprobe {NPROBES[0]}"]
    depth_gain = default["p50_ms"] / shallow["p50_ms"]
    big = (earlier or {"engines": [run]})["engines"][-1]
    big_numpy, big_flat, big_ivf = (engine_of(big, name) for name in ("numpy", "faiss flat", "faiss ivf"))
    scaled = numpy_default(run)["p50_ms"]  # the numpy engine's query cost does not grow with N (extrapolated())
    trace = run.get("rss_trace_mb", {})
    kept = f"{trace.get('group0_built', 0):,.0f} -> {trace.get('group0_freed', 0):,.0f} MB"
    return (
        "**Decision: each worker's replica stays on the numpy engine; faiss is not added.** At the same lists"
        f" scanned, faiss IVF answered {min(ratios):.1f}-{max(ratios):.1f}x faster than the numpy engine, recall"
        f" within {recall_gap:.3f} ({fmt_size(run['size'])}, nprobe {', '.join(map(str, NPROBES))}). The numpy"
        " engine's default scans at least 20,000 rows per query"
        f" ({default['p50_ms']:.1f} ms, recall {default['recall']:.3f}); at {NPROBES[0]} lists it took"
        f" {shallow['p50_ms']:.1f} ms (recall {shallow['recall']:.3f}): the scan depth (`EngineParams.scan_rows`,"
        f" no new dependency) changes its time {depth_gain:.1f}x, the kernel (faiss) at most {max(ratios):.1f}x."
        " Both engines meet recall@10 >= 0.95 at every size"
        " measured on the clustered set. The 10 ms target at 1M: met on a free core (6.1 ms, section above) and"
        f" by the figure scaled from {fmt_size(run['size'])} here (~{scaled:.1f} ms); the {fmt_size(big['size'])}"
        f" pass, under a load of {big['load_start'][0]:.0f} to {big['load_end'][0]:.0f} on 2 cores, took"
        f" {numpy_default(big)['p50_ms']:.1f} ms p50 (faiss IVF at nprobe 32:"
        f" {big_ivf['settings']['nprobe 32']['p50_ms']:.1f} ms, nprobe 16:"
        f" {big_ivf['settings']['nprobe 16']['p50_ms']:.1f} ms). faiss would cost a compiled dependency"
        " outside the stage rule (numpy + stdlib, held by"
        " import-linter), a second checkpoint format, patient and study exclusions through per-query id"
        " selectors or over-fetching (the numpy engine masks them inside the scan and widens until k rows pass),"
        f" {big_ivf['build_s'] / big_numpy['build_s']:.1f}x the build time at {fmt_size(big['size'])} and"
        f" {big_ivf['rss_mb'] / big['raw_mb']:.2f}x the raw vectors in memory against"
        f" {big_numpy['rss_mb'] / big['raw_mb']:.2f}x (its lists grow on the heap, and memory it frees stays in"
        f" the process: RSS {kept} when the flat index was freed at {fmt_size(run['size'])}, which is why the"
        f" {fmt_size(big['size'])} pass peaked at {big['peak_mb'] / 1e3:.1f} GB). faiss removes rows faster"
        f" ({big_ivf['purge_ms']:.0f} ms against"
        f" {big_numpy['purge_ms']:.0f} ms for 10 rows; purges are rare). faiss flat is out: an exact scan per"
        f" query, {big_flat['settings']['']['p50_ms'] / numpy_default(big)['p50_ms']:.0f}x the numpy engine at"
        f" {fmt_size(big['size'])}. Revisit if worker hosts cannot give a query a free core: faiss IVF at nprobe"
        " 16 is the measured alternative."
    )


def machine(results: list[dict[str, Any]], measured: dict[str, Any]) -> str:
    """The machine, the versions, the load during each run and the command."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    faiss = next((r["faiss"] for r in results if "faiss" in r), "not installed")
    loads = ", ".join(
        f"{fmt_size(r['size'])}: {r['load_start'][0]:.2f} -> {r['load_end'][0]:.2f}"
        f" (others {r['others_cpu_s']:.0f} CPU s in {r['wall_s']:.0f} s; peak RSS {r['peak_mb'] / 1e3:.1f} GB)"
        for r in results
    )
    return "\n".join(
        [
            f"- date: {measured['date']} (end of the run)",
            f"- CPU: {cpu}, {os.cpu_count()} cores available; RAM {mem_gib:.0f} GiB",
            f"- Python {platform.python_version()}, numpy {np.__version__}, faiss-cpu {faiss} (installed for the"
            " measurement only)",
            f"- 1-minute load average at start -> end of each size, and CPU used by other processes: {loads}",
            "",
            "```",
            measured["command"],
            "```",
        ]
    )


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace the text between the markers (the heading stays outside them), or append the section."""
    current = path.read_text()
    block = f"{BEGIN}\n{text.strip()}\n{END}"
    pattern = re.compile(rf"{re.escape(BEGIN)}.*?{re.escape(END)}", re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _: block, current, count=1)
    else:
        updated = f"{current.rstrip()}\n\n{HEADING}\n\n{block}\n"
    path.write_text(updated)


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run every size and the PostgreSQL part, each in a child; save and return the results."""
    results = []
    for size in args.sizes:
        results.append(run_child(["--child", str(size), "--queries", str(args.queries)]))
        print(
            f"{fmt_size(size)}: {results[-1]['child_s']:.0f} s, peak RSS {results[-1]['peak_mb']:,.0f} MB", flush=True
        )
    pg = run_child(["--pg-child", str(args.pg_rows), "--queries", str(args.queries)]) if args.pg_rows else None
    measured = {
        "engines": results,
        "pg": pg,
        "date": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "command": " ".join([".venv/bin/python bench/replica.py", *sys.argv[1:]]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(measured, indent=1))
    return measured


def report(measured: dict[str, Any], earlier: dict[str, Any] | None) -> str:
    """The section's text: what was measured, the decision, the tables, the machine and the command."""
    results = measured["engines"]
    parts = [ABOUT, _wrap(decision(results, earlier)), engine_table(results), _wrap(verdict(results, earlier))]
    if earlier is not None:
        big = earlier["engines"][-1]
        parts += [
            _wrap(
                f"The earlier {fmt_size(big['size'])} run ({earlier.get('date', 'date not recorded')}, an earlier"
                " version of this script that timed the numpy engine at its default only and its engines one"
                f" after the other; load {big['load_start'][0]:.2f} -> {big['load_end'][0]:.2f}, other processes"
                f" {big['others_cpu_s']:.0f} CPU s in {big['child_s']:.0f} s; `{earlier.get('command', '')}`):"
            ),
            engine_table([big]),
        ]
    if measured["pg"] is not None:
        parts += [_wrap(PG_ABOUT), pg_table(measured["pg"])]
    return "\n\n".join([*parts, "### Machine and command", machine(results, measured)])


def _wrap(text: str) -> str:
    """A paragraph wrapped at 120 columns, as the rest of docs/benchmarks.md."""
    return textwrap.fill(text, width=120, break_long_words=False, break_on_hyphens=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--pg-rows", type=int, default=50_000, help="rows of the PostgreSQL part (0: skip it)")
    parser.add_argument("--earlier", type=Path, help="results JSON of an earlier (larger) run to show as well")
    parser.add_argument("--report-only", action="store_true", help="report bench/out/replica.json, measure nothing")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pg-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.queries)))
        return 0
    if args.pg_child:
        print(json.dumps(pg_child(args.pg_child, args.queries)))
        return 0
    earlier = json.loads(args.earlier.read_text()) if args.earlier else None
    measured = json.loads(RESULTS.read_text()) if args.report_only else measure_all(args)
    text = report(measured, earlier)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
