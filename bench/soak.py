"""The worker's memory over a long run: RSS after every chunk of images, queued → written, many thousands.

The worker as ``serve`` builds it (demo models on the CPU, the writer with all four outputs, the neighbour
index) processes chunks of synthetic chest phantoms (512 px, fresh UIDs, one patient and study each) in this
process; after each chunk the finished jobs are purged as retention would (files, rows), so the disk stays
bounded, and the process's RSS is sampled. The network is left out (receiving and sending run in other
processes of the node, flat in ``bench/e2e.py --soak``): what is measured is the worker's own memory.

    .venv/bin/python bench/soak.py --images 10000 [--chunk 200] [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cost import queue_copy
from cxr_node import app, logs
from cxr_node.config import Settings
from cxr_node.jobs import retention
from cxr_node.jobs.states import JobState
from cxr_node.training.phantoms import write_phantom_set

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/soak.py: begin -->", "<!-- bench/soak.py: end -->"


def rss_mib() -> float:
    """This process's resident set size, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def enqueue(store: object, root: Path, base: list, first: int) -> None:
    """Queue each phantom of ``base`` again with fresh UIDs (one new patient and study each)."""
    for i, ds in enumerate(base):
        queue_copy(store, root, ds, first + i, "SOAK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--chunk", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=7200, help="stop after this many seconds (default 2 h)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.chunk <= args.images <= 100_000:
        parser.error("need 1 <= --chunk <= --images <= 100000")
    logs.configure("warning", "console")
    torch.set_num_threads(min(2, len(os.sched_getaffinity(0))))
    started, deadline = time.time(), time.monotonic() + args.timeout
    curve: list[tuple[int, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="cxr-soak-") as tmp:
        root = Path(tmp) / "state"
        settings = Settings().with_overrides(
            {
                "storage.root": str(root),
                "models.manifest": str(REPO / "models" / "demo" / "manifest.yaml"),
                "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}],
                "results.segmentation": True,
                "results.presentation_state": True,
                "logging.level": "warning",
            }
        )
        labels = write_phantom_set(Path(tmp) / "inputs", n=args.chunk, seed=5, size=512)
        base = [dcmread(path) for path in sorted(labels.parent.rglob("*.dcm"))]
        store = app.open_store(settings)
        worker = app.build_worker(settings, store)
        stop = threading.Event()
        done = 0
        try:
            while done < args.images and time.monotonic() < deadline:
                enqueue(store, root, base[: args.images - done], done)
                while jobs := worker.take_batch(stop):
                    worker.process(jobs)
                finished = [job.id for job in store.jobs.query(JobState.WRITTEN, limit=args.chunk * 2)]
                done += len(finished)
                retention.purge_jobs(store, root, finished)
                index = index_mib(worker)
                curve.append((done, rss_mib(), time.time() - started, index))
                print(f"  images {done:6d}  worker RSS {curve[-1][1]:7.1f} MiB  index {index:6.1f} MiB  "
                      f"{curve[-1][2]:6.0f} s", flush=True)  # fmt: skip
        finally:
            worker.close()
            store.close()
    text = report(curve, args)
    print(text)
    if args.write_docs:
        doc = DOCS.read_text()
        head, rest = doc.split(BEGIN, 1)
        DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0 if done >= args.images else 1


def index_mib(worker: Any) -> float:
    """The neighbour index's vectors in memory, MiB (it grows by design: one embedding per analysed image)."""
    index = getattr(worker.retriever, "index", None)
    if index is None:
        return 0.0
    return index.stats(worker.provenance.model_version).nbytes / 2**20


def report(curve: list[tuple[int, float, float, float]], args: argparse.Namespace) -> str:
    """The curve at ten points and the growth over its second half, with and without the index's vectors."""
    half = next(point for point in curve if point[0] >= curve[-1][0] / 2)
    last = curve[-1]
    growth = (last[1] - half[1]) / half[1]
    own = ((last[1] - last[3]) - (half[1] - half[3])) / (half[1] - half[3])
    step = max(1, len(curve) // 10)
    points = curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else [])
    lines = [
        "| images | " + " | ".join(f"{p[0]:,}" for p in points) + " |",
        "|---|" + "---:|" * len(points),
        "| worker RSS, MiB | " + " | ".join(f"{p[1]:.0f}" for p in points) + " |",
        "| the index's vectors, MiB | " + " | ".join(f"{p[3]:.0f}" for p in points) + " |",
        "| RSS less the index, MiB | " + " | ".join(f"{p[1] - p[3]:.0f}" for p in points) + " |",
        "",
        f"Growth over the second half ({half[0]:,} → {last[0]:,} images): RSS **{growth * 100:+.1f} %** "
        f"({half[1]:.0f} → {last[1]:.0f} MiB), of which the index's vectors {last[3] - half[3]:+.0f} MiB; "
        f"RSS less the index **{own * 100:+.1f} %**; peak {max(p[1] for p in curve):.0f} MiB; "
        f"{last[2] / 60:.0f} min, {last[0] / last[2]:.1f} images/s.",
        f"Machine: {time.strftime('%Y-%m-%d', time.gmtime())}, {len(os.sched_getaffinity(0))} cores, "
        f"torch {torch.__version__}. Command: `.venv/bin/python bench/soak.py --images {args.images} "
        f"--chunk {args.chunk}`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
