"""Nearest-neighbour search: the node's index against exact numpy search, at 10k, 100k and 1M embeddings.

Usage::

    .venv/bin/python bench/neighbours.py [--quick] [--sizes N ...] [--dists clustered uniform ...]
                                         [--queries Q] [--write-docs]

Each (distribution, size) runs in a child process of its own (clean memory figures), which:

1. generates N stored and Q query 512-d embeddings (float32, seeded; queries held out, same distribution);
2. opens a :class:`SqliteNeighbourIndex` in a temporary folder and adds the N embeddings with
   ``add_many`` in batches of 1000 (SQLite commit with fsync per batch, in-memory add, IVF training and
   retraining as the index grows: all of it timed); case metadata are made outside the timed calls;
3. measures the index's memory: RSS and peak RSS above the process before the index, and the arrays'
   own bytes, against the raw vectors (N x 512 x 4 bytes);
4. times Q top-10 queries through ``query`` (search plus reading the 10 cases from SQLite) and through the
   exact peer (``X @ q`` and ``argpartition`` over all N rows, numpy, same process), in alternating passes
   (index, peer, index, peer), and scores recall@10 = |index top-10 & exact top-10| / 10; then the index
   alone for a sweep of ``nprobe``;
5. writes a checkpoint, reopens from it (timed), then deletes it and reopens from the database alone
   (sample, k-means, assign: the build/train time), checking recall after each reopen;
6. times 200 single ``add`` calls (one committed transaction each: what the worker does per image).

The parent prints Markdown tables; ``--write-docs`` replaces the "## Nearest-neighbour search" section
at the end of docs/benchmarks.md with them, the engine choice, the machine and the command. Every child
has a timeout and every loop a bound; temporary folders are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

REPO: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cxr_node.neighbours import EngineParams, NewCase, SqliteNeighbourIndex  # noqa: E402
from cxr_node.neighbours.checkpoint import path_for  # noqa: E402

DOCS: Final = REPO / "docs" / "benchmarks.md"
RESULTS: Final = REPO / "bench" / "out" / "neighbours.json"
SECTION: Final = "## Nearest-neighbour search"
DIM: Final = 512
K: Final = 10
BATCH: Final = 1000
SINGLE_ADDS: Final = 200
VERSION: Final = "bench-1.0"
SIZES: Final = (10_000, 100_000, 1_000_000)
QUICK_SIZES: Final = (10_000, 100_000)
DISTS: Final = ("clustered", "uniform")
SWEEP: Final = (8, 16, 24, 32, 64, 128)
CHILD_TIMEOUT_S: Final = 3600
GEN_CHUNK: Final = 65_536
COMPONENTS: Final = 1024
NOISE: Final = (0.5, 1.0)


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture on the sphere: unit centres, Zipf-like weights, isotropic noise of norm ``radii``."""

    centres: np.ndarray
    weights: np.ndarray
    radii: np.ndarray


def mixture(seed: int = 99) -> Mixture:
    """Return the clustered set's mixture: 1024 components, weights 1/(j+10), noise norms U(0.5, 1.0)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((COMPONENTS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / (np.arange(COMPONENTS) + 10.0)
    return Mixture(centres, weights / weights.sum(), rng.uniform(*NOISE, COMPONENTS).astype(np.float32))


def generate(dist: str, count: int, seed: int) -> np.ndarray:
    """Return ``count`` unit float32 rows of ``dist`` (``clustered`` or ``uniform``), chunk by chunk."""
    out = np.empty((count, DIM), np.float32)
    mix = mixture() if dist == "clustered" else None
    for number, start in enumerate(range(0, count, GEN_CHUNK)):
        rng = np.random.default_rng([seed, number])
        rows = min(GEN_CHUNK, count - start)
        chunk = rng.standard_normal((rows, DIM), dtype=np.float32)
        if mix is not None:
            parts = rng.choice(COMPONENTS, size=rows, p=mix.weights)
            chunk *= mix.radii[parts, None] / np.float32(np.sqrt(DIM))
            chunk += mix.centres[parts]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start : start + rows] = chunk
    return out


def case(row: int) -> NewCase:
    """Return the case of stored row ``row``: 2 images per study, 4 per patient."""
    return NewCase(
        sop_instance_uid=f"1.2.826.0.1.3680043.10.9.{row}",
        study_instance_uid=f"1.2.826.0.1.3680043.10.8.{row // 2}",
        accession_number=f"A{row:08d}",
        study_date="20240101",
        patient_hash=f"{row // 4:016x}",
    )


def row_of(sop: str) -> int:
    """Return the stored row a bench SOP Instance UID names."""
    return int(sop.rsplit(".", 1)[1])


# --------------------------------------------------------------------------------------------- measuring


def rss_bytes(field: str = "VmRSS") -> int:
    """Return this process's resident set size (or ``VmHWM``, its peak) from /proc."""
    with Path("/proc/self/status").open() as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux clear_refs 5); return whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def busy_seconds() -> float:
    """Return the CPU seconds all processes of the machine have used since boot (user+nice+system+...)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # all but idle, iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """Return the CPU seconds this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float:
    """Return the ``q`` quantile (0..1) of ``values``."""
    return float(np.quantile(np.array(values), q))


def exact_top(stored: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Exact top-``K`` rows of ``stored`` by dot product with ``query`` (the numpy peer), best first."""
    scores = stored @ query
    top = np.argpartition(scores, len(scores) - K)[-K:]
    return top[np.argsort(-scores[top])]


def query_index(index: SqliteNeighbourIndex, query: np.ndarray, nprobe: int | None = None) -> list[int]:
    """Return the stored rows of the index's top-``K`` for ``query`` (a new patient, a new study)."""
    found = index.query(VERSION, query, K, patient_hash="new-patient", study_instance_uid="9.9.9", nprobe=nprobe)
    return [row_of(n.case.sop_instance_uid) for n in found]


def recall(found: list[int], truth: np.ndarray) -> float:
    """Return |found & truth| / K."""
    return len(set(found) & set(truth.tolist())) / K


def timed_queries(
    index: SqliteNeighbourIndex,
    stored: np.ndarray,
    queries: np.ndarray,
    truths: list[np.ndarray],
    nprobe: int | None = None,
    peer: bool = False,
) -> dict[str, float]:
    """Time every query through the index, then (``peer``) through the exact search; twice; return medians, recall.

    The two run in separate passes, index then peer then index then peer, so the peer's BLAS threads (which spin
    for a while after each call) and its 2 GB scans do not slow the index's next query, and a slow spell of the
    shared machine falls on both.
    """
    ours, theirs, recalls = [], [], []
    for _ in range(2):
        for query, truth in zip(queries, truths, strict=True):
            started = time.perf_counter()
            found = query_index(index, query, nprobe)
            ours.append(time.perf_counter() - started)
            recalls.append(recall(found, truth))
        for query in queries if peer else ():
            theirs.append(seconds(lambda q=query: exact_top(stored, q)))
    out = {"med_ms": 1e3 * pct(ours, 0.5), "p95_ms": 1e3 * pct(ours, 0.95), "recall": statistics.fmean(recalls)}
    if peer:
        out |= {"exact_med_ms": 1e3 * pct(theirs, 0.5), "exact_p95_ms": 1e3 * pct(theirs, 0.95)}
    return out


def seconds(action: Callable[[], object]) -> float:
    """Return how long ``action()`` took."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------- one run


def insert_all(index: SqliteNeighbourIndex, stored: np.ndarray) -> dict[str, float]:
    """Add every stored row in batches of ``BATCH``; return rows/s over the timed calls and the longest call."""
    spent, longest = 0.0, 0.0
    for start in range(0, len(stored), BATCH):
        cases = [case(row) for row in range(start, min(start + BATCH, len(stored)))]
        took = seconds(lambda s=start, c=cases: index.add_many(VERSION, stored[s : s + BATCH], c))
        spent, longest = spent + took, max(longest, took)
        if start == 0:
            index.load(VERSION)  # the worker's index is loaded: later adds update memory too
    return {"insert_per_s": len(stored) / spent, "insert_s": spent, "longest_batch_s": longest}


def single_adds(index: SqliteNeighbourIndex, dist: str, first_row: int) -> dict[str, float]:
    """Time ``SINGLE_ADDS`` one-image ``add`` calls (a committed transaction each)."""
    vectors = generate(dist, SINGLE_ADDS, seed=3)
    took = [seconds(lambda i=i: index.add(VERSION, vectors[i], case(first_row + i))) for i in range(SINGLE_ADDS)]
    return {"add_med_ms": 1e3 * pct(took, 0.5), "add_p95_ms": 1e3 * pct(took, 0.95)}


def reopen(
    root: Path, stored: np.ndarray, queries: np.ndarray, truths: list[np.ndarray], label: str
) -> dict[str, float]:
    """Open the index again, load it (timed, with its peak RSS) and check recall."""
    base = rss_bytes()
    reset_peak()
    started = time.perf_counter()
    index = SqliteNeighbourIndex(root)
    stats = index.load(VERSION)
    took = time.perf_counter() - started
    peak = rss_bytes("VmHWM") - base
    checked = timed_queries(index, stored, queries, truths)
    index.close()
    return {
        f"{label}_s": took,
        f"{label}_train_s": stats.train_seconds,
        f"{label}_peak_mb": peak / 1e6,
        f"{label}_origin": stats.origin,  # type: ignore[dict-item]
        f"{label}_recall": checked["recall"],
        f"{label}_med_ms": checked["med_ms"],
    }


def run_one(dist: str, size: int, queries_count: int, workdir: Path) -> dict[str, Any]:
    """Measure the index on ``size`` rows of ``dist``; return the figures."""
    loads, busy0, own0 = os.getloadavg(), busy_seconds(), own_seconds()
    stored, queries = generate(dist, size, seed=1), generate(dist, queries_count, seed=2)
    root = workdir / "index"
    index = SqliteNeighbourIndex(root)
    base = rss_bytes()
    reset_peak()
    out: dict[str, Any] = {"dist": dist, "size": size, "queries": queries_count, "raw_mb": stored.nbytes / 1e6}
    out |= insert_all(index, stored)
    stats = index.stats(VERSION)
    out |= {
        "rss_mb": (rss_bytes() - base) / 1e6,
        "peak_mb": (rss_bytes("VmHWM") - base) / 1e6,
        "nbytes_mb": stats.nbytes / 1e6,
        "engine": stats.engines["store"],
        "train_s": stats.train_seconds,
    }
    truths = [exact_top(stored, query) for query in queries]
    out |= timed_queries(index, stored, queries, truths, peer=True)
    out["sweep"] = [
        {"nprobe": n, **timed_queries(index, stored, queries, truths, n)}
        for n in SWEEP
        if stats.engines["store"] != "exact"
    ]
    out["checkpoint_s"] = seconds(index.checkpoint)
    out["checkpoint_mb"] = path_for(root / "checkpoints", VERSION).stat().st_size / 1e6
    out["db_mb"] = sum(p.stat().st_size for p in root.glob("neighbours.sqlite3*")) / 1e6
    index.close()
    out |= reopen(root, stored, queries, truths, "open_checkpoint")
    path_for(root / "checkpoints", VERSION).unlink()
    out |= reopen(root, stored, queries, truths, "open_database")
    with SqliteNeighbourIndex(root) as index:
        index.load(VERSION)
        out |= single_adds(index, dist, size)
    busy, own = busy_seconds() - busy0, own_seconds() - own0
    return out | {"load_start": loads, "load_end": os.getloadavg(), "others_cpu_s": max(0.0, busy - own)}


# --------------------------------------------------------------------------------------------- parent


def run_child(dist: str, size: int, queries: int) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; return its figures."""
    command = [sys.executable, __file__, "--child", dist, str(size), "--queries", str(queries)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{dist} {size}: child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def child_main(dist: str, size: int, queries: int) -> None:
    """Measure one case in this process and print its figures as one JSON line."""
    workdir = Path(tempfile.mkdtemp(prefix="cxr-nbr-bench-"))
    try:
        print(json.dumps(run_one(dist, size, queries, workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fmt_size(n: int) -> str:
    """Return 10k / 100k / 1M."""
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def tables(results: list[dict[str, Any]]) -> str:
    """Return the Markdown tables of the results."""
    lines = [
        "| embeddings | vectors | engine | query median / p95 ms | recall@10 | exact peer median / p95 ms"
        " | insert /s | longest batch s | add() median / p95 ms | RSS / raw | peak / raw | arrays / raw |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        raw = r["raw_mb"]
        lines.append(
            f"| {fmt_size(r['size'])} | {r['dist']} | {r['engine']} | {r['med_ms']:.2f} / {r['p95_ms']:.2f}"
            f" | {r['recall']:.3f} | {r['exact_med_ms']:.2f} / {r['exact_p95_ms']:.2f} | {r['insert_per_s']:,.0f}"
            f" | {r['longest_batch_s']:.1f} | {r['add_med_ms']:.2f} / {r['add_p95_ms']:.2f}"
            f" | {r['rss_mb'] / raw:.2f} | {r['peak_mb'] / raw:.2f} | {r['nbytes_mb'] / raw:.2f} |"
        )
    lines += [
        "",
        "| embeddings | vectors | raw vectors MB | RSS MB | training s (last) | checkpoint write s | checkpoint MB"
        " | database MB | start from checkpoint s | start from database s (peak / raw) | recall after each start |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {fmt_size(r['size'])} | {r['dist']} | {r['raw_mb']:.0f} | {r['rss_mb']:.0f} | {r['train_s']:.1f}"
            f" | {r['checkpoint_s']:.1f} | {r['checkpoint_mb']:.0f} | {r['db_mb']:.0f}"
            f" | {r['open_checkpoint_s']:.1f} | {r['open_database_s']:.1f}"
            f" ({r['open_database_peak_mb'] / r['raw_mb']:.2f})"
            f" | {r['open_checkpoint_recall']:.3f} / {r['open_database_recall']:.3f} |"
        )
    return "\n".join(lines)


def sweep_table(results: list[dict[str, Any]]) -> str:
    """Return the nprobe sweep of the largest size, per distribution."""
    largest = max(r["size"] for r in results)
    rows = [r for r in results if r["size"] == largest and r["sweep"]]
    if not rows:
        return ""
    lines = ["| vectors | " + " | ".join(f"nprobe {n}" for n in SWEEP) + " |", "|---|" + "---:|" * len(SWEEP)]
    for r in rows:
        cells = [f"{s['recall']:.3f} @ {s['med_ms']:.1f} ms" for s in r["sweep"]]
        lines.append(f"| {r['dist']} | " + " | ".join(cells) + " |")
    return f"recall@10 @ median query ms at {fmt_size(largest)} ({rows[0]['engine']}):\n\n" + "\n".join(lines)


def machine(results: list[dict[str, Any]], command: str) -> str:
    """Return the machine facts and the command."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    mem = Path("/proc/meminfo").read_text().split()[1]
    versions = f"Python {platform.python_version()}, numpy {np.__version__}, SQLite {sqlite3.sqlite_version}"
    loads = ", ".join(
        f"{fmt_size(r['size'])} {r['dist']}: {r['load_start'][0]:.2f} -> {r['load_end'][0]:.2f}"
        f" (others {r['others_cpu_s']:.0f} CPU s in {r['wall_s']:.0f} s)"
        for r in results
    )
    return "\n".join(
        [
            f"- date: {dt.datetime.fromtimestamp(RESULTS.stat().st_mtime, dt.UTC):%Y-%m-%d %H:%M} UTC (end of the run)",
            f"- CPU: {cpu}, {len(os.sched_getaffinity(0))} cores available; RAM {int(mem) / 2**20:.0f} GiB",
            f"- {versions}",
            f"- 1-minute load average at start -> end of each run, and CPU used by other processes: {loads}",
            "",
            "```",
            command,
            "```",
        ]
    )


def section(results: list[dict[str, Any]], command: str) -> str:
    """Return the whole docs section."""
    params = EngineParams()
    about = ABOUT.format(
        exact_max=params.exact_max,
        nprobe=params.nprobe,
        scan_rows=params.scan_rows,
        growth=params.retrain_growth,
        per_list=params.train_per_list,
        iterations=params.kmeans_iterations,
        k=K,
        batch=BATCH,
    )
    parts = [SECTION, about, tables(results), sweep_table(results), verdict(results), "### Machine and command"]
    return "\n\n".join(p for p in [*parts, machine(results, command)] if p)


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace this benchmark's section of ``path`` (or append it), leaving the other sections alone."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(current)
    if found is None:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        updated = current[: found.start()] + text.rstrip("\n") + "\n\n" + current[found.end() :]
    path.write_text(updated.rstrip("\n") + "\n")


ABOUT: Final = """\
`cxr_node.neighbours.SqliteNeighbourIndex` (numpy + stdlib) against exact numpy search (`X @ q` and
`argpartition` over all rows, same process) as the peer, query by query. 512-d float32 unit embeddings, top-{k};
each query is a new image of a new patient (nothing excluded). Two sets: **clustered**, a Gaussian mixture on the
sphere (1024 components, unit centres, weights 1/(j+10), isotropic noise of norm U(0.5, 1.0) per component), and
**uniform** (uniformly random directions: no structure at all, the worst case for any index that partitions
space). Inserts: `add_many` batches of {batch} (one SQLite commit with fsync each, the in-memory add, and every IVF
training or retraining the growth triggers, all timed; "longest batch" is the worst stall a retraining caused).
`add()`: one image per committed transaction, as the worker adds. Memory: RSS above the process before the index
(the test vectors are allocated before it), its peak during the inserts, and the index's own arrays (rows held +
centroids), each over the raw vectors (N x 512 x 4 bytes). Start-up: reopening from the checkpoint (read, CRC-32,
check against the database) and from the database alone (sample, k-means, assign every row: the build/train time).

**Engine.** Exact scan up to {exact_max} rows per partition (a model version's store or library cases), then
IVF-flat: spherical k-means centroids (sqrt(N) lists, {per_list} training rows per list, at most {iterations} Lloyd
steps), one contiguous float32 block per list. A query ranks the centroids and scans the nearest lists until they
hold {scan_rows:,} rows, at least {nprobe} lists (a constant cost per query; a small index is scanned more
thoroughly), one matrix-vector product per list in numpy's single-threaded loop (OpenBLAS threads stall when other
threads hold the other core: at 300k rows with another process busy, p95 was 80 ms through OpenBLAS, 8 ms this
way), and doubles the lists scanned until
{k} rows pass the patient/study exclusions. The sweep below fixes the number of lists instead. A partition
retrains (sample, k-means, every row to its nearest new list) each time it has grown {growth:g}x, so lists stay
short; cheaper schemes cost recall (comparing rows only with new centroids near their old one: -4 points; splitting
long lists by 2-means instead of retraining: -2 points, at 250k clustered rows). Vector blocks live in private
anonymous mappings: freed memory goes back to the system at once (heap blocks left glibc holes worth 25 % of RSS)
and spare room is address space, not memory.

**Why this engine, and not FAISS or hnswlib.** At 1M x 512 an exact scan reads 2 GB per query (about 100 ms here),
so a sub-linear index is needed. IVF-flat keeps the vectors exact (no quantisation: recall depends only on which
lists are scanned, and a full scan is exact), needs no memory beyond the vectors (ids, exclusion keys and centroids
are under 2 %), inserts with one small matrix product, deletes for real (a purged study leaves memory, database and
checkpoint), gives the same index from the same rows (seeded), and is a few hundred lines of numpy, which the
stage rule (numpy + stdlib only, DESIGN.md §3) requires. FAISS (IVF-PQ, HNSW) and hnswlib would query faster and
degrade less on unstructured data, but they are compiled dependencies outside the stage rule; hnswlib only marks
deletions (a vector stays until its slot is reused), HNSW links add 5-20 % memory at 512-d, and HNSW inserts run
at a few thousand vectors per second per core; neither is needed for the targets on clustered data (below).
Product quantisation would cut memory 8-30x at a recall cost, not needed at 1M (2 GB)."""


def verdict(results: list[dict[str, Any]]) -> str:
    """Return the targets and whether the largest clustered run meets each (figures from that run)."""
    runs = [r for r in results if r["dist"] == "clustered"]
    if not runs:
        return ""
    r = max(runs, key=lambda x: x["size"])
    checks = [
        ("query median <= 10 ms", f"{r['med_ms']:.2f} ms", r["med_ms"] <= 10),
        ("recall@10 >= 0.95", f"{r['recall']:.3f}", r["recall"] >= 0.95),
        ("insert >= 10,000/s", f"{r['insert_per_s']:,.0f}/s", r["insert_per_s"] >= 10_000),
        ("memory (RSS) <= 1.5x raw", f"{r['rss_mb'] / r['raw_mb']:.2f}x", r["rss_mb"] <= 1.5 * r["raw_mb"]),
    ]
    lines = [f"Targets, clustered, {fmt_size(r['size'])}:", ""]
    lines += [f"- {name}: {found} ({'met' if ok else '**not met**'})" for name, found, ok in checks]
    lines += ["", NOTES]
    return "\n".join(lines)


NOTES: Final = """\
On uniformly random vectors no partition of space helps (every point is about as far from every other), so
recall at the same scan is far lower; the sweep shows what scanning more lists buys, up to the exact scan.
`add()` one image at a time is bound by the fsync of its commit (the in-memory part is well under a
millisecond); the worker adds one image per inference (about 2 per second here), so this is never its bottleneck.
At 10k the exact BLAS peer beats the index's query (which also reads the 10 cases from SQLite and scans with one
thread); both are far below the target. At 10k and 100k RSS sits 40-60 % above the raw vectors: a roughly constant
~90-110 MB (SQLite's cache, the interpreter, and allocator-retained temporaries of training and assignment), 6 % at
1M. The insert rate at 1M varied from 10,400 to 13,100/s between runs on this machine (retraining, which is most
of the difference, competes for the 2 cores). All figures come from one
run of the command below on a machine shared with other work: the load averages and the CPU time other processes
used during each run are listed; medians resist that, p95 and the insert rate do not."""


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the children, print (and optionally write) the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k and 100k only")
    parser.add_argument("--sizes", type=int, nargs="+", help="stored embeddings per run (default 10k 100k 1M)")
    parser.add_argument("--dists", nargs="+", choices=DISTS, default=list(DISTS))
    parser.add_argument("--queries", type=int, default=300, help="queries per run (default 300)")
    parser.add_argument("--write-docs", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--from-json", action="store_true", help=f"render the results saved in {RESULTS}")
    parser.add_argument("--child", nargs=2, metavar=("DIST", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child[0], int(args.child[1]), args.queries)
        return 0
    if args.from_json:
        saved = json.loads(RESULTS.read_text())
        results, command = saved["results"], saved["command"]
    else:
        results = run_all(args)
        command = json.loads(RESULTS.read_text())["command"]
    text = section(results, command.strip())
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every (size, distribution) child; save the results after each to :data:`RESULTS`."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    command = ".venv/bin/python bench/neighbours.py " + " ".join(sys.argv[1:])
    results: list[dict[str, Any]] = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        for dist in args.dists:
            print(f"running {dist} {fmt_size(size)} ...", file=sys.stderr, flush=True)
            results.append(run_child(dist, size, args.queries))
            RESULTS.write_text(json.dumps({"command": command.strip(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
