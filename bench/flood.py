"""A flood of stalled connections against the receiver while a legitimate PACS stores real radiographs.

Usage::

    .venv/bin/python bench/flood.py [--connections 300] [--images 10] [--flood-source 127.0.0.2] [--timeout 150]

What it does (loopback only; bounded in connections, images and seconds):

1. starts ``cxr-node serve receiver`` (one receiver process, every ``node.*`` limit at its default, logging at
   warning) on a free port of 127.0.0.1 and waits until it answers C-ECHO;
2. opens ``--connections`` TCP connections to it from ``--flood-source`` (127.0.0.2 plays another host on the
   loopback network; 127.0.0.1 is the PACS's own address), each sending one byte (the first byte of an
   A-ASSOCIATE-RQ header) and then nothing; a thread notes when the node closes each of them;
3. one second later, a PACS (pynetdicom, calling AE ``PACS``) stores ``--images`` copies of pydicom-data's real
   chest CR ``RG1_UNCR.dcm`` (7.2 MB each, a fresh SOP Instance UID each) over one association; an association
   that is refused, rejected or aborted is retried after one second, as a PACS's retry queue would (faster);
4. samples the receiver process's resident memory and thread count every 0.2 s, and reads its peak RSS
   (``VmHWM``) at the end.

It prints one JSON object of figures: time until every image had Success, the statuses, association attempts,
when the node dropped the stalled connections (seconds after they connected) and the receiver's peak RSS and
thread count. The figures in docs/benchmarks.md come from it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

REPO: Final = Path(__file__).resolve().parent.parent
SOURCE: Final = Path(sysconfig.get_paths()["purelib"]) / "data_store" / "data" / "RG1_UNCR.dcm"  # pydicom-data
START_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 30.0
RETRY_S: Final = 1.0
SAMPLE_S: Final = 0.2


@dataclass
class Flood:
    """The stalled connections: when each connected and when the node closed it (None while open)."""

    connected: list[float] = field(default_factory=list)
    dropped: dict[int, float] = field(default_factory=dict)
    refused: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class Sampler:
    """Resident memory and threads of a process, sampled until stopped."""

    pid: int
    rss_kb: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """Sample every SAMPLE_S seconds until :attr:`stop` is set."""
        while not self.stop.wait(SAMPLE_S):
            fields = proc_status(self.pid)
            if fields:
                self.rss_kb.append(fields.get("VmRSS", 0))
                self.threads.append(fields.get("Threads", 0))


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/PID/status (kB for memory); empty when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, int] = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])
    return fields


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def receiver_pid(supervisor: int) -> int:
    """The receiver child of ``cxr-node serve receiver`` (not multiprocessing's resource tracker)."""
    for pid in children_of(supervisor):
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise RuntimeError("no receiver process found under the supervisor")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` copies of the real chest CR, each with a fresh SOP Instance UID."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(SOURCE)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"cr{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@contextlib.contextmanager
def receiver(workdir: Path, port: int) -> Iterator[int]:
    """Run ``cxr-node serve receiver`` on 127.0.0.1:``port``; yield the receiver process's pid."""
    config = workdir / "node.yaml"
    settings = {
        "node": {"host": "127.0.0.1", "port": port, "receiver_processes": 1},
        "storage": {"root": str(workdir / "state")},
        "metrics": {"enabled": False},
        "logging": {"level": "warning"},
    }
    config.write_text(yaml.safe_dump(settings))
    log = (workdir / "node.log").open("wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "receiver", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while echo(port) != 0:
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the receiver did not start; see {workdir / 'node.log'}")
            time.sleep(0.5)
        yield receiver_pid(node.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(STOP_TIMEOUT_S)
        log.close()


def echo(port: int) -> int | None:
    """C-ECHO the node with the node's own SCU; its status, or None without an association."""
    from cxr_node.errors import SendError
    from cxr_node.send.scu import PeerAddress
    from cxr_node.send.scu import echo as c_echo

    try:
        return c_echo(PeerAddress("CXR_NODE", "127.0.0.1", port), calling_aet="PACS", timeout_s=5)
    except SendError:
        return None


def flood(port: int, count: int, source: str, state: Flood, opened: queue.SimpleQueue[socket.socket | None]) -> None:
    """Open ``count`` connections from ``source``, send one byte on each, hand each to the watcher, stall."""
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"\x01")
        except OSError:
            state.refused += 1
            sock.close()
            continue
        sock.setblocking(False)
        state.connected.append(time.monotonic())
        opened.put(sock)
    opened.put(None)


def watch(opened: queue.SimpleQueue[socket.socket | None], state: Flood) -> list[socket.socket]:
    """Note when the node closes each stalled connection (end of stream or reset); return the sockets."""
    selector, sockets, flooding = selectors.DefaultSelector(), [], True
    while not state.stop.is_set() and (flooding or len(state.dropped) < len(sockets)):
        while flooding and not opened.empty():
            sock = opened.get()
            if sock is None:
                flooding = False
                break
            selector.register(sock, selectors.EVENT_READ, len(sockets))
            sockets.append(sock)
        for key, _ in selector.select(timeout=0.05):
            index = key.data
            with contextlib.suppress(OSError):
                if key.fileobj.recv(4096):  # type: ignore[union-attr]
                    continue  # an A-ABORT or a rejection before the close: wait for the close
            state.dropped[index] = time.monotonic() - state.connected[index]
            selector.unregister(key.fileobj)
    selector.close()
    return sockets


def pacs_store(port: int, images: list[Path], deadline: float) -> dict[str, Any]:
    """Store every image, retrying refused or broken associations every RETRY_S until ``deadline``."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    pending, statuses, attempts = list(images), {}, 0
    start = time.monotonic()
    first_success: float | None = None
    while pending and time.monotonic() < deadline:
        attempts += 1
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
        if assoc.is_established:
            for path in list(pending):
                reply = assoc.send_c_store(path)
                code = int(reply.Status) if "Status" in reply else None
                if code is None:
                    break
                statuses[path.name] = code
                pending.remove(path)
                if first_success is None and code == 0:
                    first_success = time.monotonic() - start
            if assoc.is_established:
                assoc.release()
        if pending:
            time.sleep(RETRY_S)
    return {
        "stored": sum(1 for code in statuses.values() if code == 0),
        "statuses": sorted({f"0x{code:04X}" for code in statuses.values()}),
        "attempts": attempts,
        "first_success_s": None if first_success is None else round(first_success, 2),
        "all_stored_s": None if pending else round(time.monotonic() - start, 2),
    }


def run(connections: int, images: int, source: str, timeout: float) -> dict[str, Any]:
    """Flood, store, measure; return the figures."""
    with tempfile.TemporaryDirectory(prefix="cxr-flood-") as tmp:
        workdir = Path(tmp)
        files = make_images(workdir / "images", images)
        port = free_port()
        with receiver(workdir, port) as pid:
            sampler = Sampler(pid)
            threading.Thread(target=sampler.run, daemon=True).start()
            state = Flood()
            opened: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
            result: list[list[socket.socket]] = []
            watcher = threading.Thread(target=lambda: result.append(watch(opened, state)), daemon=True)
            watcher.start()
            flood_start = time.monotonic()
            flood(port, connections, source, state, opened)
            flood_s = time.monotonic() - flood_start
            time.sleep(1.0)
            pacs = pacs_store(port, files, time.monotonic() + timeout)
            deadline = time.monotonic() + timeout
            while len(state.dropped) < len(state.connected) and time.monotonic() < deadline:
                time.sleep(0.2)
            state.stop.set()
            watcher.join(5)
            sampler.stop.set()
            peak = proc_status(pid)
            for sock in result[0] if result else []:
                sock.close()
        drops = sorted(state.dropped.values())
        return {
            "connections": connections,
            "flood_source": source,
            "flood_open_s": round(flood_s, 2),
            "refused_at_connect": state.refused,
            **{f"pacs_{key}": value for key, value in pacs.items()},
            "dropped": len(drops),
            "dropped_first_s": round(drops[0], 2) if drops else None,
            "dropped_median_s": round(statistics.median(drops), 2) if drops else None,
            "dropped_p90_s": round(drops[int(0.9 * (len(drops) - 1))], 2) if drops else None,
            "dropped_last_s": round(drops[-1], 2) if drops else None,
            "still_open_at_end": len(state.connected) - len(drops),
            "receiver_peak_rss_mb": round(peak.get("VmHWM", max(sampler.rss_kb, default=0)) / 1024, 1),
            "receiver_peak_threads": max(sampler.threads, default=0),
        }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=300, help="stalled connections (default 300)")
    parser.add_argument("--images", type=int, default=10, help="images the PACS stores (default 10)")
    parser.add_argument("--flood-source", default="127.0.0.2", help="address the flood connects from")
    parser.add_argument(
        "--timeout",
        type=float,
        default=150.0,
        help="seconds the PACS keeps retrying, and "
        "then the wait for the stalled connections to be dropped (default 150)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 2000 or not 1 <= args.images <= 100:
        parser.error("--connections must be 1-2000 and --images 1-100")
    print(json.dumps(run(args.connections, args.images, args.flood_source, args.timeout), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
