"""Receive throughput of the node against DCMTK ``storescp`` and Orthanc, same sender, same files, same run.

Usage::

    .venv/bin/python bench/receive.py [--images N] [--repeat R] [--receiver-processes K ...] [--write-docs]

What it does, per repeat and per case (1 association; 4 concurrent associations = 4 ``storescu``
processes, each sending its share of the files):

1. writes N full-size chest radiographs (copies of pydicom-data's real CR ``RG1_UNCR.dcm``, 7.2 MB, each
   with a fresh SOP Instance UID, so no receiver ever sees a duplicate) into a temporary folder;
2. runs the same ``storescu`` command against ``storescp`` (``TCP_NODELAY=1``; ``--fork`` for 4
   associations; it writes files but does not fsync), against ``storescp`` fsyncing each file before it
   answers (durable storescp, the first target's reference; ``--no-storescp-fsync`` skips it), against a fresh
   Orthanc (its own config, storage folder and ports; files fsynced, ``SyncStorageArea``; the second target's
   reference; ``--no-orthanc`` skips it), and against the node's receivers as ``cxr-node serve`` runs them, one
   node per ``--receiver-processes`` value (started once, ``storage.fsync`` true, logging at warning; the
   inference worker is not started);
3. times from starting the senders to the last sender exiting, then checks that all N instances arrived
   (files for ``storescp``; ``CountInstances`` for Orthanc; N more queued jobs in ``cxr-node status --json``
   for the node), so only real work is measured. Received files are deleted and the disks synced between runs.

It prints a Markdown table of the medians over the repeats (images/s, MB/s with MB = 10^6 bytes, and the
ratios of each receiver to storescp, durable storescp and Orthanc); ``--write-docs`` replaces the
"## Receive throughput" section of docs/benchmarks.md with it, the machine facts and the command.

DCMTK 3.6.7's ``storescp`` and Orthanc 1.10 cannot bind one address, so when run as root the benchmark re-runs
itself in a private network namespace that has only loopback (``unshare -n``); nothing it starts is reachable
from outside (without one, Orthanc is skipped). Every subprocess has a timeout and every server is stopped on
exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import yaml

REPO: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable
DEFAULT_SOURCE: Final = Path(sysconfig.get_paths()["purelib"]) / "data_store" / "data" / "RG1_UNCR.dcm"  # pydicom-data
DOCS: Final = REPO / "docs" / "benchmarks.md"
SECTION: Final = "## Receive throughput"
NODE_AET: Final = "CXR_NODE"
SENDER_AET: Final = "PACS"
CASES: Final = (1, 4)  # concurrent associations
DCMTK_ENV: Final = {"TCP_NODELAY": "1"}  # DCMTK leaves Nagle on otherwise, and stalls on delayed ACKs
START_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 45.0
STATUS_TIMEOUT_S: Final = 60.0
NETNS_FLAG: Final = "--in-private-netns"
STORESCP: Final = "storescp"
STORESCP_SYNC: Final = "storescp + fsync per file"
ORTHANC: Final = "Orthanc"
ORTHANC_BIN: Final = Path("/usr/sbin/Orthanc")
ORTHANC_PDU: Final = 131072  # its largest MaximumPduLength (its default is 16384)
LOAD_AT_START: Final = os.getloadavg()  # the other work sharing the CPUs, before this run adds its own


# --------------------------------------------------------------------------------------------- inputs


def make_images(template: Path, folder: Path, count: int) -> list[Path]:
    """Write ``count`` copies of ``template`` into ``folder``, each with a fresh SOP Instance UID.

    Earlier files in ``folder`` are replaced. Returns the paths, sorted.
    """
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ds = dcmread(template)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"cr{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -------------------------------------------------------------------------------------------- servers


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, **DCMTK_ENV}


def echo_ok(port: int) -> bool:
    """Return True when a C-ECHO to ``NODE_AET`` on 127.0.0.1:``port`` succeeds (DCMTK ``echoscu``)."""
    cmd = ["echoscu", "-aet", SENDER_AET, "-aec", NODE_AET, "-to", "5", "-ta", "5", "127.0.0.1", str(port)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=15, env=_dcmtk_env(), check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Server:
    """A receiving server run as its own process group."""

    name: str
    port: int
    cmd: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        """Start the process; return self (call :meth:`wait_ready` next)."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        return self

    def wait_ready(self, extra_check: Callable[[], bool] | None = None) -> None:
        """Wait until C-ECHO succeeds (and ``extra_check()`` is true); raise if it exits or times out."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up; log:\n{tail(self.log)}")
            if echo_ok(self.port) and (extra_check is None or extra_check()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S:.0f} s; log:\n{tail(self.log)}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it has not exited within ``STOP_TIMEOUT_S``."""
        if self.proc is None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        _signal_group(self.proc.pid, signal.SIGKILL)  # storescp --fork children, if any are left
        self.proc = None


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a text file (empty when missing)."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def storescp(workdir: Path, out: Path, assocs: int, max_pdu: int, durable: bool = False) -> Server:
    """Return (not started) a ``storescp`` writing to ``out``; ``--fork`` when ``assocs`` > 1.

    ``durable`` runs ``sync FILE`` (an fsync of the file) before each response, in the foreground
    (``--exec-on-reception`` with ``--exec-sync``): a reference that pays for durability as the node does.
    """
    port = free_port()
    cmd = ["storescp", "-aet", NODE_AET, "-od", str(out), "-pdu", str(max_pdu), "-dhl", "+xa"]
    cmd += ["--fork"] if assocs > 1 else []
    cmd += ["--exec-on-reception", "sync #p/#f", "--exec-sync"] if durable else []
    name = STORESCP_SYNC if durable else STORESCP
    return Server(name, port, [*cmd, str(port)], workdir / "storescp.log", env=DCMTK_ENV)


@dataclass
class OrthancServer:
    """An Orthanc run with its own configuration, storage folder and ports (inside the private namespace)."""

    server: Server
    http_port: int
    folder: Path

    def instances(self) -> int:
        """How many instances Orthanc holds (REST ``/statistics``)."""
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT_S) as reply:
            return int(json.loads(reply.read())["CountInstances"])

    def http_up(self) -> bool:
        """True once the REST API answers."""
        try:
            self.instances()
        except OSError:
            return False
        return True


def orthanc(workdir: Path) -> OrthancServer:
    """Return (not started) an Orthanc with a fresh storage folder, accepting any AE, files fsynced.

    ``SyncStorageArea`` (fsync of each stored file before the answer) is Orthanc's default since 1.7.4 and set
    here explicitly; its SQLite index runs with ``SYNCHRONOUS=NORMAL`` in WAL mode (commits not fsynced).
    """
    folder = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
    port, http_port = free_port(), free_port()
    config = {
        "Name": "bench-receive",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "DicomAet": NODE_AET,
        "DicomPort": port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "StorageCompression": False,
        "SyncStorageArea": True,
        "MaximumPduLength": ORTHANC_PDU,
        "DicomThreadsCount": 4,
        "SaveJobs": False,
        "OverwriteInstances": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    server = Server(ORTHANC, port, [str(ORTHANC_BIN), str(folder / "orthanc.json")], folder / "orthanc.log")
    return OrthancServer(server, http_port, folder)


@dataclass
class Node:
    """One node (its receiver processes) with its own config and storage root."""

    processes: int
    server: Server
    config: Path
    root: Path

    @property
    def label(self) -> str:
        """The row label in the results table."""
        return node_label(self.processes)

    def queued_and_total(self) -> tuple[int, int]:
        """Return (queued jobs, all jobs) from ``cxr-node status --json``."""
        cmd = [PYTHON, "-m", "cxr_node", "status", "--json", "--config", str(self.config)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, cwd=REPO, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"cxr-node status failed: {done.stderr.strip()}")
        report = yaml.safe_load(done.stdout)
        return int(report["jobs"]["queued"]), int(report["total"])

    def clear_inbox(self) -> None:
        """Delete received files (the jobs DB stays: the next run's instances have new UIDs)."""
        shutil.rmtree(self.root / "inbox", ignore_errors=True)

    def children_up(self) -> bool:
        """True once the supervisor says every receiver process is up (its ready file)."""
        return (self.root / "run" / "receiver.ready").exists()


def node_label(processes: int) -> str:
    """The results-table label of a node with ``processes`` receiver processes."""
    return f"cxr-node, {processes} receiver process{'es' if processes > 1 else ''}"


def start_node(workdir: Path, processes: int, fsync: bool) -> Node:
    """Write a config and start the node's receivers (``processes`` of them); wait until they answer."""
    port = free_port()
    base = workdir / f"node-{processes}"
    root = base / "storage"
    root.mkdir(parents=True)
    settings = {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port, "receiver_processes": processes},
        "storage": {"root": str(root), "fsync": fsync},
        "destinations": [],
        "logging": {"level": "warning", "format": "json"},
        "metrics": {"port": free_port()},  # each node its own: two nodes run side by side
    }
    config = base / "node.yaml"
    config.write_text(yaml.safe_dump(settings))
    # `cxr-node serve receiver`: the receiver processes only. The inference worker would compete for the CPUs
    # and move jobs out of "queued" while we count them.
    cmd = [PYTHON, "-m", "cxr_node", "serve", "receiver", "--config", str(config)]
    node = Node(processes, Server(f"cxr-node ({processes})", port, cmd, base / "node.log"), config, root)
    node.server.start()
    node.server.wait_ready(node.children_up)
    return node


# ------------------------------------------------------------------------------------------- senders


def send(port: int, files: Sequence[Path], assocs: int, logdir: Path, timeout_s: float) -> float:
    """Send ``files`` with ``assocs`` concurrent ``storescu`` processes; return the seconds until all exited.

    Raises
    ------
    RuntimeError
        When a sender fails or runs past ``timeout_s``.
    """
    groups = [list(files[i::assocs]) for i in range(assocs)]
    timeouts = ["-to", "30", "-ta", "30", "-td", "60"]
    base = ["storescu", "-aet", SENDER_AET, "-aec", NODE_AET, *timeouts, "127.0.0.1", str(port)]
    logs = [logdir / f"storescu-{i}.log" for i in range(assocs)]
    handles = [log.open("wb") for log in logs]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start = time.perf_counter()
        for group, handle in zip(groups, handles, strict=True):
            cmd = [*base, *map(str, group)]
            procs.append(subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_dcmtk_env()))
        for proc in procs:
            proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
        elapsed = time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"storescu ran past {timeout_s:.0f} s") from exc
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for handle in handles:
            handle.close()
    failed = [(p.returncode, log) for p, log in zip(procs, logs, strict=True) if p.returncode != 0]
    if failed:
        code, log = failed[0]
        raise RuntimeError(f"storescu exited with {code}:\n{tail(log)}")
    return elapsed


def count_files(folder: Path) -> int:
    """Return how many regular files lie under ``folder``."""
    return sum(1 for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Results:
    """Seconds per (case, receiver label), one entry per repeat."""

    images: int
    megabytes: float
    seconds: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def add(self, assocs: int, label: str, elapsed: float) -> None:
        """Record one timed run."""
        self.seconds.setdefault((assocs, label), []).append(elapsed)
        rate = self.images / elapsed
        mb_s = self.megabytes / elapsed
        print(f"  {assocs} assoc  {label:<34} {elapsed:7.2f} s  {rate:6.2f} images/s  {mb_s:7.1f} MB/s", flush=True)

    def rate(self, assocs: int, label: str) -> float:
        """Median images/s of a (case, receiver)."""
        return statistics.median(self.images / s for s in self.seconds[(assocs, label)])

    def spread(self, assocs: int, label: str) -> tuple[float, float]:
        """(min, max) images/s of a (case, receiver)."""
        rates = [self.images / s for s in self.seconds[(assocs, label)]]
        return min(rates), max(rates)


def run_storescp(
    workdir: Path, files: Sequence[Path], assocs: int, args: argparse.Namespace, durable: bool = False
) -> float:
    """Time one run against a fresh ``storescp``; check that every file arrived; clean up."""
    out = Path(tempfile.mkdtemp(prefix="storescp-out-", dir=workdir))
    server = storescp(workdir, out, assocs, args.storescp_pdu, durable).start()
    try:
        server.wait_ready()
        elapsed = send(server.port, files, assocs, workdir, args.timeout)
        received = count_files(out)
    finally:
        server.stop()
    if received != len(files):
        raise RuntimeError(f"storescp received {received} files, {len(files)} sent")
    shutil.rmtree(out)
    return elapsed


def run_orthanc(workdir: Path, files: Sequence[Path], assocs: int, timeout_s: float) -> float:
    """Time one run against a fresh Orthanc; check that it holds every instance; clean up."""
    pacs = orthanc(workdir)
    pacs.server.start()
    try:
        pacs.server.wait_ready(pacs.http_up)
        elapsed = send(pacs.server.port, files, assocs, workdir, timeout_s)
        received = pacs.instances()
    finally:
        pacs.server.stop()
    if received != len(files):
        raise RuntimeError(f"Orthanc holds {received} instances, {len(files)} sent")
    shutil.rmtree(pacs.folder)
    return elapsed


def run_node(node: Node, workdir: Path, files: Sequence[Path], assocs: int, timeout_s: float) -> float:
    """Time one run against a running node; check that N more jobs were queued; clear its inbox."""
    queued_before, total_before = node.queued_and_total()
    elapsed = send(node.server.port, files, assocs, workdir, timeout_s)
    queued, total = node.queued_and_total()
    if (queued - queued_before, total - total_before) != (len(files), len(files)):
        raise RuntimeError(
            f"{node.label}: {queued - queued_before} jobs queued and {total - total_before} recorded, {len(files)} sent"
        )
    node.clear_inbox()
    return elapsed


def settle() -> None:
    """Flush dirty pages so that one run's writeback does not land in the next run's time."""
    os.sync()
    time.sleep(0.5)


def benchmark(args: argparse.Namespace, workdir: Path) -> Results:
    """Run every (repeat, case, receiver) and return the timings."""
    nodes: list[Node] = []
    images = workdir / "images"
    try:
        for processes in args.receiver_processes:
            nodes.append(start_node(workdir, processes, fsync=not args.no_fsync))
        results: Results | None = None
        for repeat in range(1, args.repeat + 1):
            for assocs in CASES:
                files = make_images(args.source, images, args.images)
                if results is None:
                    results = Results(len(files), sum(p.stat().st_size for p in files) / 1e6)
                print(f"repeat {repeat}/{args.repeat}, {assocs} association(s), {len(files)} images", flush=True)
                settle()
                results.add(assocs, STORESCP, run_storescp(workdir, files, assocs, args))
                if not args.no_storescp_fsync:
                    settle()
                    results.add(assocs, STORESCP_SYNC, run_storescp(workdir, files, assocs, args, durable=True))
                if args.with_orthanc:
                    settle()
                    results.add(assocs, ORTHANC, run_orthanc(workdir, files, assocs, args.timeout))
                for node in nodes:
                    settle()
                    results.add(assocs, node.label, run_node(node, workdir, files, assocs, args.timeout))
        assert results is not None
        return results
    finally:
        for node in nodes:
            node.server.stop()


# -------------------------------------------------------------------------------------------- report


REFERENCES: Final = ((STORESCP, "x storescp"), (STORESCP_SYNC, "x durable storescp"), (ORTHANC, "x Orthanc"))
"""The receivers the node is compared with, and their ratio columns; the last two are the targets'."""
TARGETS: Final = {STORESCP_SYNC: 0.8, ORTHANC: 1.0}


def table(results: Results, labels: Sequence[str]) -> str:
    """Return the Markdown table of medians with the ratios to each reference measured (targets in bold)."""
    refs = [(label, title) for label, title in REFERENCES if (CASES[0], label) in results.seconds]
    rows = [
        "| associations | receiver | images/s (median) | MB/s (median) | images/s min-max | "
        + " | ".join(title for _, title in refs)
        + " |",
        "|---:|---|---:|---:|---:|" + "---:|" * len(refs),
    ]
    mb_per_image = results.megabytes / results.images
    for assocs in CASES:
        for label in [*(label for label, _ in refs), *labels]:
            rate = results.rate(assocs, label)
            low, high = results.spread(assocs, label)
            cells = [f"{assocs}", label, f"{rate:.2f}", f"{rate * mb_per_image:.1f}", f"{low:.2f}-{high:.2f}"]
            for ref, _ in refs:
                ratio = rate / results.rate(assocs, ref)
                node_target = label.startswith("cxr-node") and ref in TARGETS
                cells.append(f"**{ratio:.2f}**" if node_target else f"{ratio:.2f}")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _first_line(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _fs_type(path: Path) -> str:
    """Return the file system type of the mount holding ``path`` (longest matching mount point)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1].replace("\\040", " ")
            inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
            if inside and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def orthanc_version() -> str:
    """Orthanc's version as it prints it (``Orthanc 1.10.1``), or 'Orthanc' when it cannot say."""
    line = _first_line([str(ORTHANC_BIN), "--version"]) if ORTHANC_BIN.exists() else ""
    found = re.search(r"\d+\.\d+\.\d+", line)
    return found.group(0) if found else ""


def machine_facts(workdir: Path) -> list[str]:
    """Return the facts that make the numbers comparable: CPU, disk, versions, date."""
    import pydicom
    import pynetdicom

    dcmtk = re.search(r"v(\d+\.\d+\.\d+)", _first_line(["storescp", "--version"]))
    return [
        f"date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"CPU: {_cpu_model()}, {len(os.sched_getaffinity(0))} cores available (nproc)",
        f"disk: {_fs_type(workdir)} ({workdir.parent}); kernel {platform.release()}",
        "load average at the start of the run (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in LOAD_AT_START),
        "load average at the end of the run (1, 5, 15 min): "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (the benchmark included)",
        f"Python {platform.python_version()}, pynetdicom {pynetdicom.__version__}, pydicom {pydicom.__version__}, "
        f"DCMTK {dcmtk.group(1) if dcmtk else 'unknown'}",
    ]


def section(results: Results, labels: Sequence[str], args: argparse.Namespace, workdir: Path, command: str) -> str:
    """Return the "## Receive throughput" section for docs/benchmarks.md."""
    mb = results.megabytes / results.images
    fsync = "off (`--no-fsync`)" if args.no_fsync else "on"
    lines = [
        SECTION,
        "",
        f"{results.images} full-size chest radiographs (pydicom-data `RG1_UNCR.dcm`, CR 1955 x 1841, 16 bit, "
        f"{mb:.1f} MB each, Explicit VR Little Endian, a fresh SOP Instance UID per run) sent by DCMTK `storescu` "
        "over loopback, over one association and over 4 concurrent associations (4 `storescu` processes, each "
        "with a quarter of the files). Time runs from starting the senders to the last one exiting; every run "
        "checks that all instances arrived (files written by `storescp`; N instances in Orthanc's `/statistics`; "
        "N new queued jobs for the node). "
        f"Median of {args.repeat} repeats, runs interleaved; MB = 10^6 bytes.",
        "",
        f"- `storescp`: `TCP_NODELAY=1`, `-pdu {args.storescp_pdu}` (its largest), `--fork` for 4 associations; "
        "writes each file but does not fsync (not durable: shown for scale).",
        f"- `{STORESCP_SYNC}` (durable storescp, target >= 0.8x): the same, plus `--exec-on-reception 'sync #p/#f' "
        "--exec-sync`, so each file is fsynced (by a `sync FILE` process) before the response.",
        f"- `{ORTHANC}` {orthanc_version()} (target >= 1.0x): a fresh instance per run with its own config and "
        "storage folder, in the same private network namespace as everything else; `SyncStorageArea: true` "
        "(its default: each stored file is fsynced before the response; its SQLite index runs WAL with "
        f"`SYNCHRONOUS=NORMAL`, so index commits are not fsynced), `MaximumPduLength: {ORTHANC_PDU}` (its largest; "
        "default 16384), `DicomThreadsCount: 4`, `StorageCompression: false`, no plugins.",
        "- cxr-node: `cxr-node serve receiver` (the supervisor with its receiver children only; "
        "the inference worker is left out so it neither takes CPU nor moves jobs out of `queued`), "
        f"`storage.fsync` {fsync} (P-DATA streamed into a spool file as it arrives, flushed in the background "
        "every MiB; then file fsync + "
        "rename into the inbox + folder fsync, then a "
        "SQLite WAL commit with `synchronous=FULL`, before Success), `logging.level: warning`, "
        "`node.max_pdu` 262144 (default), N receiver processes sharing the port (`node.receiver_processes`).",
        "",
        table(results, labels),
        "",
        "Machine:",
        "",
        *[f"- {fact}" for fact in machine_facts(workdir)],
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace the receive-throughput section of ``path`` with ``text`` (append it when missing)."""
    current = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated.rstrip("\n") + "\n")


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="radiographs sent per run (default 40)")
    parser.add_argument("--repeat", type=int, default=3, help="repeats; the median is reported (default 3)")
    parser.add_argument(
        "--receiver-processes",
        type=int,
        nargs="+",
        default=[1, 2],
        metavar="K",
        help="node.receiver_processes values to measure (default: 1 2)",
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the DICOM file copied (RG1_UNCR.dcm)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder (system temp)")
    parser.add_argument("--storescp-pdu", type=int, default=131072, help="storescp -pdu (default 131072, its largest)")
    parser.add_argument(
        "--no-storescp-fsync",
        action="store_true",
        help="skip the reference storescp that fsyncs each file before answering",
    )
    parser.add_argument(
        "--no-orthanc",
        action="store_true",
        help="skip Orthanc (it is skipped anyway outside a private network namespace: it listens on every interface)",
    )
    parser.add_argument("--no-fsync", action="store_true", help="node with storage.fsync false (diagnosis only)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run of the senders may take")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section {SECTION!r} of {DOCS}")
    parser.add_argument(
        "--netns",
        choices=["auto", "off"],
        default="auto",
        help="auto: as root, run in a private network namespace with loopback only (default)",
    )
    parser.add_argument(NETNS_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.receiver_processes = list(dict.fromkeys(args.receiver_processes))
    if args.images < 4 or args.repeat < 1 or min(args.receiver_processes) < 1:
        parser.error("--images must be at least 4, --repeat and --receiver-processes at least 1")
    return args


def command_line(argv: Sequence[str]) -> str:
    """The command as a user types it (without the internal namespace flag)."""
    return shlex.join([".venv/bin/python", "bench/receive.py", *[a for a in argv if a != NETNS_FLAG]])


def in_private_netns(argv: Sequence[str]) -> int | None:
    """Re-run this script in a loopback-only network namespace when possible; None to run here."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        print("note: not root; storescp (which cannot bind one address) listens on every interface", file=sys.stderr)
        return None
    script = 'ip link set lo up && exec "$0" "$@"'
    cmd = ["unshare", "--net", "--", "/bin/sh", "-c", script, PYTHON, str(Path(__file__).resolve()), *argv, NETNS_FLAG]
    child = subprocess.Popen(cmd)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # the child got SIGINT too: let it stop its servers, then return
            continue


def check_tools() -> None:
    """Fail early, in one line, when a DCMTK tool is missing."""
    missing = [tool for tool in ("storescp", "storescu", "echoscu") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"receive.py: DCMTK tools not found on PATH: {', '.join(missing)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; optionally write docs/benchmarks.md."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    check_tools()
    if args.netns == "auto" and not args.in_private_netns:
        code = in_private_netns(argv)
        if code is not None:
            return code
    args.with_orthanc = not args.no_orthanc and args.in_private_netns and ORTHANC_BIN.exists()
    if not args.with_orthanc and not args.no_orthanc:
        print(f"note: Orthanc skipped ({ORTHANC_BIN} missing or no private network namespace)", file=sys.stderr)
    if not args.source.exists():
        raise SystemExit(f"receive.py: {args.source}: not found (pip install pydicom-data, or give --source)")
    with temporary_workdir(args.workdir) as workdir:
        results = benchmark(args, workdir)
        labels = [node_label(k) for k in args.receiver_processes]
        text = section(results, labels, args, workdir, command_line(argv))
    print()
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"wrote {DOCS}")
    return 0


@contextlib.contextmanager
def temporary_workdir(parent: Path | None) -> Iterator[Path]:
    """A temporary folder for inputs, outputs and logs (in ``parent``, made if missing), removed afterwards."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-receive-", dir=parent))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
