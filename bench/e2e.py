"""End-to-end turnaround and throughput: a burst of phantom chest images through ``cxr-node serve`` (demo models,
CPU) to a Storage SCP playing the PACS, all on loopback.

Turnaround is measured per image from the node's receipt (the job's received_at, taken when the last byte of
the C-STORE is on disk) to the SR stored at the PACS. Throughput is images with their SR delivered per
minute over the whole burst. Bounded: at most ``--n`` images and ``--timeout`` seconds.

    .venv/bin/python bench/e2e.py --n 100 [--write-docs]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cxr_node.demo import DEMO_MANIFEST, DemoPacs, _free_port, _start_node, _write_config
from cxr_node.jobs import spool
from cxr_node.jobs.store import SqliteJobStore
from cxr_node.send.scu import PeerAddress, send_files
from cxr_node.training.phantoms import write_phantom_set


def run(n: int, timeout: float) -> dict[str, float]:
    """Send ``n`` phantoms in one association and wait until every SR is at the PACS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        port, pacs_port = _free_port(), _free_port()
        config = _write_config(out, port, DEMO_MANIFEST.resolve(), pacs_port)
        labels = write_phantom_set(out / "inputs", n=n, seed=99, size=512)
        files = sorted((labels.parent).rglob("*.dcm"))
        pacs = DemoPacs(out / "pacs", pacs_port).start()
        node = _start_node(config, port, out / "node.log")
        try:
            start = time.time()
            results = send_files(files, PeerAddress("CXR_NODE", "127.0.0.1", port), calling_aet="BENCH")
            assert all(r.ok for r in results), [r.comment for r in results if not r.ok]
            sent = time.time()
            deadline = time.monotonic() + timeout
            while len(pacs.arrived) < n and time.monotonic() < deadline:
                time.sleep(0.2)
            done = time.time()
            store = SqliteJobStore(out / "state" / spool.DB_NAME, readonly=True)
            received = {job.sop_instance_uid: job.received_at for job in store.jobs(limit=n + 10)}
            store.close()
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            pacs.stop()
        turnaround = sorted(pacs.arrived[uid] - received[uid] for uid in pacs.arrived if uid in received)
        return {
            "images": n,
            "delivered": len(turnaround),
            "send_s": sent - start,
            "min_s": turnaround[0],
            "median_s": statistics.median(turnaround),
            "p95_s": turnaround[int(0.95 * (len(turnaround) - 1))],
            "max_s": turnaround[-1],
            "images_per_min": 60 * len(turnaround) / (done - start),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--write-docs", action="store_true", help="print a Markdown table row for docs/benchmarks.md")
    args = parser.parse_args()
    r = run(args.n, args.timeout)
    print(f"{r['delivered']}/{r['images']} SRs delivered; burst sent in {r['send_s']:.1f} s")
    print(
        f"turnaround min {r['min_s']:.1f} s, median {r['median_s']:.1f} s, p95 {r['p95_s']:.1f} s, "
        f"max {r['max_s']:.1f} s; sustained {r['images_per_min']:.0f} images/min"
    )
    if args.write_docs:
        print(
            f"| {r['images']} | {r['min_s']:.1f} | {r['median_s']:.1f} | {r['p95_s']:.1f} | {r['images_per_min']:.0f} |"
        )
    return 0 if r["delivered"] == r["images"] else 1


if __name__ == "__main__":
    sys.exit(main())
