"""End-to-end turnaround and throughput: a burst of phantom chest images through ``cxr-node serve`` (demo models,
CPU) to a Storage SCP playing the PACS, all on loopback.

Turnaround is measured per image from the node's receipt (the job's received_at, taken when the last byte of
the C-STORE is on disk) to the SR stored at the PACS. Throughput is images with their SR delivered per
minute over the whole burst. Bounded: at most ``--n`` images and ``--timeout`` seconds.

    .venv/bin/python bench/e2e.py --n 100 [--write-docs]      # a burst of 100 in one association
    .venv/bin/python bench/e2e.py --n 30 --every 5            # one image every 5 s, each in its own association
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cxr_node.demo import DEMO_MANIFEST, DemoPacs, _free_port, _start_node, write_config
from cxr_node.jobs import spool
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.send.scu import PeerAddress, send_files
from cxr_node.training.phantoms import write_phantom_set


@contextmanager
def node_and_pacs(n: int, seed: int, size: int, log_name: str) -> Iterator[tuple[list[Path], int, DemoPacs, Path]]:
    """``cxr-node serve`` (demo models) sending to a Storage SCP playing the PACS, and ``n`` phantoms to send:
    (files, the node's port, the PACS, the state folder). The node is stopped and its log kept on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        port, pacs_port = _free_port(), _free_port()
        config = write_config(out, port, DEMO_MANIFEST.resolve(), pacs_port, None)
        labels = write_phantom_set(out / "inputs", n=n, seed=seed, size=size)
        files = sorted((labels.parent).rglob("*.dcm"))
        pacs = DemoPacs(out / "pacs", pacs_port).start()
        node = _start_node(config, port, out / "node.log")
        try:
            yield files, port, pacs, out / "state"
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            pacs.stop()
            shutil.copy(out / "node.log", Path(tempfile.gettempdir()) / log_name)


def turnaround(pacs: DemoPacs, state: Path, n: int, timeout: float) -> list[float]:
    """Wait (bounded) for every SR; each image's seconds from its receipt (job received_at) to its SR, sorted."""
    deadline = time.monotonic() + timeout
    while len(pacs.arrived) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    store = SqliteStore(state / spool.DB_NAME, readonly=True)
    received = {job.sop_instance_uid: job.received_at for job in store.jobs.query(limit=n + 10)}
    store.close()
    return sorted(pacs.arrived[uid] - received[uid] for uid in pacs.arrived if uid in received)


def figures(seconds: list[float]) -> dict[str, float]:
    """min, median, p95 and max of the turnarounds."""
    return {
        "delivered": len(seconds),
        "min_s": seconds[0],
        "median_s": statistics.median(seconds),
        "p95_s": seconds[int(0.95 * (len(seconds) - 1))],
        "max_s": seconds[-1],
    }


def run(n: int, timeout: float) -> dict[str, float]:
    """Send ``n`` phantoms in one association and wait until every SR is at the PACS."""
    with node_and_pacs(n, 99, 512, "cxr-node-e2e.log") as (files, port, pacs, state):
        start = time.time()
        results = send_files(files, PeerAddress("CXR_NODE", "127.0.0.1", port), calling_aet="BENCH")
        assert all(r.ok for r in results), [r.comment for r in results if not r.ok]
        sent = time.time()
        seconds = turnaround(pacs, state, n, timeout)
        done = time.time()
    return {"images": n, "send_s": sent - start, "images_per_min": 60 * len(seconds) / (done - start)} | figures(
        seconds
    )


def run_steady(n: int, interval: float, timeout: float, size: int) -> dict[str, float]:
    """Send ``n`` phantoms one every ``interval`` seconds, each over its own association (as a modality's
    auto-route does), and wait until every SR is at the PACS."""
    with node_and_pacs(n, 98, size, "cxr-node-e2e-steady.log") as (files, port, pacs, state):
        start = time.monotonic()
        for i, path in enumerate(files):
            time.sleep(max(0.0, start + i * interval - time.monotonic()))
            results = send_files([path], PeerAddress("CXR_NODE", "127.0.0.1", port), calling_aet="BENCH")
            assert all(r.ok for r in results), [r.comment for r in results if not r.ok]
        seconds = turnaround(pacs, state, n, timeout)
    return {"images": n, "interval_s": interval} | figures(seconds)


def rss_mib(pid: int) -> float:
    """Resident set size of one process, MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def soak(n: int, chunk: int, timeout: float) -> list[dict[str, float]]:
    """Send ``n`` images in chunks of ``chunk`` (fresh UIDs per send, one patient and study each) and sample the
    RSS of the supervisor and each child after every chunk is delivered."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        port, pacs_port = _free_port(), _free_port()
        config = write_config(out, port, DEMO_MANIFEST.resolve(), pacs_port, None)
        labels = write_phantom_set(out / "inputs", n=chunk, seed=5, size=512)
        base = [dcmread(p) for p in sorted(labels.parent.rglob("*.dcm"))]
        pacs = DemoPacs(out / "pacs", pacs_port).start()
        node = _start_node(config, port, out / "node.log")
        pids_file = out / "state" / "run" / "receiver+worker+sender.pids"
        while not pids_file.with_suffix(".ready").exists() and node.poll() is None:
            time.sleep(0.2)
        children = [int(line.split()[0]) for line in pids_file.read_text().splitlines()]  # pid start-time
        names = ["receiver", "worker", "sender"]
        deadline = time.monotonic() + timeout
        try:
            sent = 0
            while sent < n and time.monotonic() < deadline:
                batch = out / "batch"
                shutil.rmtree(batch, ignore_errors=True)
                batch.mkdir()
                for i, ds in enumerate(base[: n - sent]):
                    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                    ds.StudyInstanceUID, ds.PatientID = generate_uid(), f"SOAK-{sent + i}"
                    ds.save_as(batch / f"{i}.dcm", enforce_file_format=True)
                results = send_files(
                    sorted(batch.glob("*.dcm")), PeerAddress("CXR_NODE", "127.0.0.1", port), calling_aet="SOAK"
                )
                sent += sum(r.ok for r in results)
                while len(pacs.arrived) < sent and time.monotonic() < deadline:
                    time.sleep(0.2)
                point = {"images": len(pacs.arrived), "supervisor": rss_mib(node.pid)}
                point.update({name: rss_mib(pid) for name, pid in zip(names, children, strict=False)})
                curve.append(point)
                print("  " + "  ".join(f"{k} {v:.0f}" for k, v in point.items()), flush=True)
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            pacs.stop()
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--write-docs", action="store_true", help="print a Markdown table row for docs/benchmarks.md")
    parser.add_argument("--soak", type=int, default=0, help="instead: send this many images in chunks, sample RSS")
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--every", type=float, default=0, help="instead: send --n images one every EVERY seconds")
    parser.add_argument("--size", type=int, default=512, help="phantom side in pixels for --every (default 512)")
    args = parser.parse_args()
    if args.every:
        r = run_steady(args.n, args.every, args.timeout, args.size)
        print(
            f"{r['delivered']}/{r['images']} SRs delivered, one image every {args.every:g} s ({args.size} px): "
            f"turnaround min {r['min_s']:.2f} s, median {r['median_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
            f"max {r['max_s']:.2f} s"
        )
        return 0 if r["delivered"] == r["images"] else 1
    if args.soak:
        curve = soak(args.soak, args.chunk, args.timeout)
        first, last = curve[0], curve[-1]
        print(
            "RSS MiB first -> last chunk: "
            + ", ".join(f"{k} {first[k]:.0f} -> {last[k]:.0f}" for k in first if k != "images")
        )
        return 0 if last["images"] >= args.soak else 1
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
