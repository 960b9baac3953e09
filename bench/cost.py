"""The node's own cost per image: the whole worker path, queued → written, on real radiographs, by stage.

Each image is a real chest CR from pydicom-data (NEMA WG04 ``RG1``: 1955 x 1841, 15 bit, uncompressed 7.2 MB
and JPEG 2000 lossless 4.3 MB) with fresh UIDs, queued in a real store and run through the real worker
(``Worker.process``: claim, read, decode, segment, classify, retrieve, record, build, write, fsync, commit) on
the demo models with ``torch.set_num_threads(1)``; a stage's CPU time is ``time.process_time()`` (the whole
process: the JPEG 2000 decoder may use threads of its own). The networks' forward passes (the U-Net, the
ensemble with its Grad-CAM pass) are
timed as their own stages and left out of the node's cost: what is left is the node itself. The neighbour
index holds ``--cases`` earlier cases, so each image gets its similar cases (k = 5). Stage times are
exclusive (a stage timed inside another is not counted twice); "worker (rest)" is what the worker's own
code costs between the timed stages.

A second table compares the JPEG 2000 decoders installed (pylibjpeg-openjpeg and, when installed, GDCM) on
the same files in the same run.

    .venv/bin/python bench/cost.py [--images 12] [--write-docs]
    .venv/bin/python bench/cost.py --quick    # one line, to compare two checkouts run alternately
    python3 bench/cost.py --processes 0 2 4 8 15 --data .gpu/data   # on a GPU machine (bench/gpu/check.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_node import app, logs
from cxr_node.config import Settings
from cxr_node.jobs import spool
from cxr_node.jobs.leases import this_process
from cxr_node.jobs.records import NewJob
from cxr_node.jobs.states import JobState
from cxr_node.neighbours import NewCase

REPO = Path(__file__).resolve().parents[1]
DEMO_MANIFEST = REPO / "models" / "demo" / "manifest.yaml"
NETWORK = ("segment: U-Net forward", "classify: ensemble forward + Grad-CAM")
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/cost.py: begin -->", "<!-- bench/cost.py: end -->"


def machine_line() -> str:
    """Date, CPU model and cores available, Python, torch."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{date}, {model}, {len(os.sched_getaffinity(0))} cores available, torch {torch.__version__}"


def write_docs(text: str) -> None:
    """Replace what stands between the markers in docs/benchmarks.md with ``text``."""
    doc = DOCS.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


class Stages:
    """Exclusive thread-CPU and wall time per named stage; nested stages pause their parent."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, float, float]] = []

    def _charge(self) -> None:
        if self._stack:
            name, cpu, wall = self._stack[-1]
            self.cpu[name] += time.process_time() - cpu
            self.wall[name] += time.perf_counter() - wall

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._charge()
        self._stack.append((name, time.process_time(), time.perf_counter()))
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()
            if self._stack:
                parent = self._stack.pop()[0]
                self._stack.append((parent, time.process_time(), time.perf_counter()))

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time every call of ``owner.attribute`` (a module function or a class method) as ``name``."""
        original = getattr(owner, attribute)
        stages = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            with stages.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def clear(self) -> None:
        self.cpu.clear()
        self.wall.clear()


def instrument(stages: Stages, worker: Any) -> None:
    """Put the stage timers on the worker path (this process only; the code itself is unchanged)."""
    import cxr_node.infer.engine as engine
    import cxr_node.infer.preprocess as preprocess
    import cxr_node.jobs.sql as sql
    import cxr_node.results.outputs as outputs
    import cxr_node.results.render as render
    import cxr_node.results.sc as sc
    import cxr_node.work.load as load
    import cxr_node.work.loop as loop

    try:
        import cxr_node.work.pool as pool
    except ImportError:  # the code before the worker's pool (to measure it with the same bench)
        pool = loop
    import cxr_node.work.write as write
    from cxr_node.infer.classify import Ensemble
    from cxr_node.work.retrieve import IndexRetriever

    stages.wrap(loop.Worker, "process", "worker (rest)")
    stages.wrap(sql.SqlJobs, "claim", "claim (commit)")
    stages.wrap(pool if hasattr(pool, "load") else loop, "load", "read: header tidy")
    stages.wrap(load, "read_header", "read: dcmread")
    stages.wrap(load, "decode", "decode (+ reduce to 1024)")
    stages.wrap(engine.Engine, "analyse", "analyse (rest)")
    for name in (
        "normalise",
        "fit",
        "fit_and_reduce",
        "unfit",
        "unfit_above",
        "unfit_onto",
        "crop_to_mask",
        "mask_outside",
    ):
        if hasattr(preprocess, name):  # some are newer: the bench also measures the code before them
            stages.wrap(preprocess, name, "preprocess")
    stages.wrap(engine, "image_statistics", "domain: image statistics")
    stages.wrap(engine, "mask_quality", "segment: mask check")
    stages.wrap(Ensemble, "prepare", "preprocess")
    stages.wrap(Ensemble, "__call__", NETWORK[1])
    segmenter = worker.analyser.segmenter
    original = segmenter.probabilities

    def probabilities(batch: np.ndarray) -> Any:
        with stages.stage(NETWORK[0]):
            return original(batch)

    segmenter.probabilities = probabilities
    stages.wrap(IndexRetriever, "similar", "retrieve: similar")
    stages.wrap(IndexRetriever, "add", "retrieve: add")
    stages.wrap(loop, "summary_of", "record: summary")
    stages.wrap(sql.SqlResults, "save_result", "record: commit")
    stages.wrap(sql.codec, "stored_arrays", "record: pack arrays")
    stages.wrap(write.codec, "findings", "write: rebuild findings")
    stages.wrap(outputs, "_prepare", "write: copy source values")
    stages.wrap(outputs, "encode", "write: encode")
    stages.wrap(render, "render_overlay", "SC: render overlay")
    stages.wrap(sc, "render_overlay", "SC: render overlay")  # the name the SC builder calls it by
    original_kind = outputs.kind

    def kind(name: str) -> Any:
        entry = original_kind(name)
        build = entry.build

        def timed(*args: Any, **kwargs: Any) -> Any:
            with stages.stage(f"{name.upper() if name != 'pr' else 'GSPS'}: build"):
                return build(*args, **kwargs)

        return dataclasses.replace(entry, build=timed)

    outputs.kind = kind
    stages.wrap(write, "write_durably", "write: file + fsync")
    stages.wrap(sql.SqlResults, "save_outputs", "write: commit")


def settings_for(root: Path, all_outputs: bool) -> Settings:
    return Settings().with_overrides(
        {
            "storage.root": str(root),
            "models.manifest": str(DEMO_MANIFEST),
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}],
            "results.segmentation": all_outputs,
            "results.presentation_state": all_outputs,
            "neighbours.k": 5,
            "domain.gate": "off",  # the demo models refuse the real CR as outside their domain; measure the full path
            "logging.level": "warning",
        }
    )


def enqueue(store: Any, root: Path, source: Path, count: int) -> None:
    """Queue ``count`` copies of ``source`` with fresh UIDs (one patient and study each)."""
    base = dcmread(source)
    for i in range(count):
        queue_copy(store, root, base, i, "COST")


def queue_copy(store: Any, root: Path, ds: Any, number: int, prefix: str) -> None:
    """Queue ``ds`` again as a new instance of a new patient and study (fresh UIDs), as the receiver would."""
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.PatientID = generate_uid(), f"{prefix}{number:05d}"
    key = spool.instance_key(uid)
    relative = spool.relative_path("inbox", key)
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(root / relative, enforce_file_format=True)
    new = NewJob(
        key, uid, str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), f"ACC{number}",
        f"{number:016x}", str(ds.get("Modality", "CR")), str(ds.file_meta.TransferSyntaxUID), prefix, "127.0.0.1:1",
        str(relative), (root / relative).stat().st_size,
    )  # fmt: skip
    store.jobs.record(new, JobState.QUEUED)


def fill_index(worker: Any, cases: int, dim: int, version: str) -> None:
    """Add ``cases`` earlier cases (random unit embeddings, their own patients and studies) to the index."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(cases, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i, vector in enumerate(vectors):
        case = NewCase(
            sop_instance_uid=f"2.25.{10**12 + i}",
            study_instance_uid=f"2.25.{2 * 10**12 + i}",
            accession_number=f"OLD{i}",
            study_date="20260101",
            patient_hash=f"{i + 10**6:016x}",
        )
        worker.retriever.add(case, vector, version)


def run_case(source: Path, images: int, cases: int, all_outputs: bool) -> dict[str, Any]:
    """Run ``images`` copies of ``source`` one by one through a fresh worker; stage CPU/wall per image."""
    with tempfile.TemporaryDirectory(prefix="cxr-cost-") as tmp:
        root = Path(tmp) / "state"
        settings = settings_for(root, all_outputs)
        store = app.open_store(settings)
        worker = app.build_worker(settings, store)
        try:
            enqueue(store, root, source, images + 1)
            holder = this_process("worker")
            worker.process(store.jobs.claim(1, holder, 60))  # warm-up: first-call costs, and the embedding size
            stored = store.results.result(store.jobs.query(JobState.WRITTEN)[0].id)
            assert stored is not None
            assert stored.embedding is not None
            dim = len(stored.embedding) // 4
            fill_index(worker, cases, dim, worker.provenance.model_version)
            app.keep_out_of_collections()  # as `cxr-node serve` does once its worker is built
            stages = Stages()
            instrument(stages, worker)
            totals_cpu, totals_wall = [], []
            per_image: list[dict[str, float]] = []
            for _ in range(images):
                stages.clear()
                cpu, wall = time.process_time(), time.perf_counter()
                with stages.stage("worker (rest)"):
                    worker.process(store.jobs.claim(1, holder, 60))
                totals_cpu.append(time.process_time() - cpu)
                totals_wall.append(time.perf_counter() - wall)
                per_image.append(dict(stages.cpu))
            written = store.jobs.counts()[JobState.WRITTEN]
            similar = [
                len(r.summary.similar) for j in store.jobs.query(JobState.WRITTEN) if (r := store.results.result(j.id))
            ]
        finally:
            worker.close()
            store.close()
    names = sorted({name for image in per_image for name in image})
    median = {name: statistics.median(image.get(name, 0.0) for image in per_image) for name in names}
    network = sum(median.get(name, 0.0) for name in NETWORK)
    return {
        "source": source.name,
        "bytes": source.stat().st_size,
        "images": images,
        "written": written,
        "similar": statistics.median(similar) if similar else 0,
        "stages": median,
        "total_cpu": statistics.median(totals_cpu),
        "total_wall": statistics.median(totals_wall),
        "mean_cpu": statistics.mean(totals_cpu),
        "network": network,
        "all_outputs": all_outputs,
    }


def in_child(source: Path, images: int, cases: int, all_outputs: bool) -> dict[str, Any]:
    """:func:`run_case` in a fresh process (the timers are put on its modules, never on this one's)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_child_setup) as pool:
        return pool.submit(run_case, source, images, cases, all_outputs).result()


def _child_setup() -> None:
    logs.configure("warning", "console")
    torch.set_num_threads(1)


def run_throughput(source: Path, images: int, processes: int) -> dict[str, Any]:
    """The worker's images/s on ``images`` copies of ``source`` (batches of 8, all cores for torch) with its
    decoding and writing inline (0) or in ``processes`` pool processes, and its inference idle share."""
    import threading

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="cxr-overlap-") as tmp:
        root = Path(tmp) / "state"
        settings = settings_for(root, False).with_overrides({"worker.cpu_processes": processes})
        store = app.open_store(settings)
        worker = app.build_worker(settings, store)
        try:
            enqueue(store, root, source, 2)
            worker.process(worker.take_batch(threading.Event()))  # warm-up (the pool's children start too)
            worker.process(worker.take_batch(threading.Event()))
            enqueue(store, root, source, images)
            stop = threading.Event()
            thread = threading.Thread(target=worker.run, args=(stop,))
            started = time.perf_counter()
            busy0 = worker.busy_s
            thread.start()
            deadline = time.monotonic() + 600
            while store.jobs.counts()[JobState.WRITTEN] < images + 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            stop.set()
            thread.join(60)
            written = store.jobs.counts()[JobState.WRITTEN] - 2
            busy, loaded = worker.busy_s - busy0, worker.loaded_s
        finally:
            worker.close()
            store.close()
    return {
        "source": source.name,
        "processes": processes,
        "written": written,
        "images_per_s": written / seconds,
        "idle_share": 1 - busy / loaded if loaded else 0.0,
        "busy_share_of_wall": busy / seconds,
    }


def throughput_in_child(source: Path, images: int, processes: int) -> dict[str, Any]:
    """:func:`run_throughput` in a fresh process."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        1, mp_context=context, initializer=logs.configure, initargs=("warning", "console")
    ) as pool:
        return pool.submit(run_throughput, source, images, processes).result()


@dataclasses.dataclass(frozen=True)
class Package:
    module: str
    pip: str


DECODER_PACKAGES: Final = {
    "pylibjpeg": Package("openjpeg", "pylibjpeg-openjpeg"),  # the node's own dependency
    "gdcm": Package("gdcm", "python-gdcm"),  # not a dependency: install it into .venv to compare
}
"""The JPEG 2000 decoders compared, pydicom's plugin name to the module it needs and the package that has it."""


def progress(line: str) -> None:
    """One line on stderr as each measurement ends, so a run cut short still shows what it measured."""
    print(line, file=sys.stderr, flush=True)


def wg04_folder() -> Path:
    """pydicom-data's folder of test files, where the NEMA WG04 radiographs are."""
    return Path(__import__("data_store").__file__).parent / "data"


def j2k_decoders(data: Path, names: list[str], repeats: int) -> list[dict[str, Any]]:
    """Decode each JPEG 2000 file of ``data`` with every installed decoder: median wall and CPU ms, identical or not."""
    rows = []
    for name in names:
        ds = dcmread(data / name)
        reference = None
        for plugin, package in DECODER_PACKAGES.items():
            if importlib.util.find_spec(package.module) is None:
                rows.append({"file": name, "decoder": plugin, "error": f"not installed (pip install {package.pip})"})
                continue
            try:
                first = pixel_array(ds, decoding_plugin=plugin)
            except Exception as exc:  # installed, but cannot decode this syntax
                reason = str(exc).splitlines()[0][:80]
                rows.append({"file": name, "decoder": plugin, "error": f"cannot decode: {reason}"})
                continue
            walls, cpus = [], []
            for _ in range(repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                pixel_array(ds, decoding_plugin=plugin)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            same = reference is None or bool(np.array_equal(reference, first))
            reference = first if reference is None else reference
            rows.append(
                {
                    "file": name,
                    "bytes": (data / name).stat().st_size,
                    "shape": first.shape,
                    "decoder": plugin,
                    "wall": statistics.median(walls),
                    "cpu": statistics.median(cpus),
                    "same": same,
                }
            )
    return rows


def stage_table(results: list[dict[str, Any]]) -> list[str]:
    order = [
        "claim (commit)", "read: dcmread", "decode (+ reduce to 1024)", "read: header tidy", "preprocess",
        NETWORK[0], "segment: mask check", NETWORK[1], "domain: image statistics", "analyse (rest)",
        "retrieve: similar", "retrieve: add",
        "record: summary", "record: pack arrays", "record: commit", "write: rebuild findings",
        "write: copy source values", "SR: build", "SC: render overlay", "SC: build", "SEG: build", "GSPS: build",
        "write: encode", "write: file + fsync", "write: commit", "worker (rest)",
    ]  # fmt: skip
    names = [n for n in order if any(n in r["stages"] for r in results)]
    names += sorted({n for r in results for n in r["stages"]} - set(names))
    header = "| stage | " + " | ".join(column(r) for r in results) + " |"
    lines = [header, "|---|" + "---:|" * len(results)]
    for name in names:
        label = f"*{name}* (network, not the node)" if name in NETWORK else name
        lines.append(f"| {label} | " + " | ".join(f"{r['stages'].get(name, 0.0) * 1000:.1f}" for r in results) + " |")
    lines.append("| **all stages, CPU** | " + " | ".join(f"{r['total_cpu'] * 1000:.1f}" for r in results) + " |")
    lines.append(
        "| **the node's own CPU** (all stages less the networks) | "
        + " | ".join(f"**{(r['total_cpu'] - r['network']) * 1000:.1f}**" for r in results)
        + " |"
    )
    lines.append(
        "| all stages, CPU, mean over the images (the garbage collector's full walks included) | "
        + " | ".join(f"{r['mean_cpu'] * 1000:.1f}" for r in results)
        + " |"
    )
    lines.append("| wall, queued → written | " + " | ".join(f"{r['total_wall'] * 1000:.1f}" for r in results) + " |")
    return lines


def column(result: dict[str, Any]) -> str:
    kinds = "SR + SC + SEG + GSPS" if result["all_outputs"] else "SR + SC"
    return f"{result['source']}, {kinds}"


def throughput_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| file | decoding and writing | images/s | x inline | inference busy, share of wall | idle share"
        " (1 - busy / jobs in hand) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    inline = {row["source"]: row["images_per_s"] for row in rows if row["processes"] == 0}
    for row in rows:
        where = "inline (`worker.cpu_processes: 0`)" if not row["processes"] else f"{row['processes']} processes"
        lines.append(
            f"| {row['source']} | {where} | {row['images_per_s']:.2f}"
            f" | {row['images_per_s'] / inline[row['source']]:.2f}"
            f" | {row['busy_share_of_wall']:.2f} | {row['idle_share']:.2f} |"
        )
    return lines


def decoder_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| file | size | decoder | wall ms (median) | CPU ms | pixels identical to the first decoder |"]
    lines.append("|---|---:|---|---:|---:|---|")
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['file']} | | {row['decoder']} | {row['error']} | | |")
            continue
        size = f"{row['bytes'] / 1e6:.1f} MB, {row['shape'][1]} x {row['shape'][0]}"
        same = "yes" if row["same"] else "**no**"
        lines.append(
            f"| {row['file']} | {size} | {row['decoder']} | {row['wall'] * 1000:.0f} | {row['cpu'] * 1000:.0f}"
            f" | {same} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images per case (median over them; default 12)")
    parser.add_argument("--cases", type=int, default=2000, help="earlier cases in the neighbour index")
    parser.add_argument("--repeats", type=int, default=3, help="decodes per file and decoder")
    parser.add_argument("--overlap", type=int, default=24, help="images per worker throughput run (0: none)")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="worker.cpu_processes of the throughput runs (default 0 1 2; 0: decoding and writing inline)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder holding RG1_UNCR.dcm, RG1_J2KR.dcm, RG1_J2KI.dcm and RG3_J2KR.dcm (default: pydicom-data's)",
    )
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/benchmarks.md")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the uncompressed CR with SR + SC, one line: the node's own CPU and the networks' (to compare two "
        "checkouts run alternately: this VM's speed drifts, the networks' CPU shows by how much)",
    )
    args = parser.parse_args()
    if not 1 <= args.images <= 200:
        parser.error("--images must be 1..200")
    logs.configure("warning", "console")
    torch.set_num_threads(1)
    if any(count < 0 for count in args.processes):
        parser.error("--processes must be 0 or more")
    data = args.data or wg04_folder()
    if args.quick:
        found = in_child(data / "RG1_UNCR.dcm", args.images, args.cases, all_outputs=False)
        own, network = (found["total_cpu"] - found["network"]) * 1000, found["network"] * 1000
        print(f"node's own CPU {own:.1f} ms, networks {network:.1f} ms, ratio {own / network:.2f} ({REPO})")
        return 0
    load_start = os.getloadavg()
    started = time.time()
    results = []
    for name, all_outputs in (("RG1_UNCR.dcm", False), ("RG1_J2KR.dcm", False), ("RG1_UNCR.dcm", True)):
        results.append(in_child(data / name, args.images, args.cases, all_outputs))
        progress(f"{column(results[-1])}: {results[-1]['total_cpu'] * 1000:.1f} ms of CPU per image")
    decoders = j2k_decoders(data, ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm"], args.repeats)
    overlap = []
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm") if args.overlap else ():
        for processes in args.processes:
            overlap.append(throughput_in_child(data / name, args.overlap, processes))
            progress(f"{name}, {processes} processes: {overlap[-1]['images_per_s']:.2f} images/s")
    for result in results:
        assert result["written"] == args.images + 1, result
    lines = stage_table(results)
    lines += ["", *decoder_table(decoders)]
    if overlap:
        lines += ["", *throughput_table(overlap)]
    facts = [
        "",
        f"- {machine_line()}; torch threads 1; load average {load_start[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; {time.time() - started:.0f} s",
        f"- per case: {args.images} images after one warm-up image, median per image; neighbour index with "
        f"{args.cases} earlier cases, {results[0]['similar']:.0f} similar cases per SR; "
        f"Python {platform.python_version()}",
        "",
        "```",
        " ".join([".venv/bin/python bench/cost.py", *sys.argv[1:]]),
        "```",
    ]
    text = "\n".join(lines + facts)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
