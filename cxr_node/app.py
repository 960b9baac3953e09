"""The composition root: Settings in, the node's objects out, wired. The one place that sees every stage.

Typed builders (:func:`open_store`, :func:`load_model`, :func:`provenance`, :func:`open_index`,
:func:`build_worker`, :func:`build_dispatcher`, :func:`build_sender`) are used by ``serve``, the CLI, the demo
and the tests alike; :func:`run_role` is what each child process of the supervisor runs. torch is imported only
by the builders of the worker's model, so the receiver and sender processes never load it.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from cxr_node.config import Settings
from cxr_node.errors import ConfigError, ModelError, StorageError
from cxr_node.jobs import spool
from cxr_node.jobs.interfaces import Store
from cxr_node.jobs.leases import recover_deliveries, recover_jobs
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from cxr_node.jobs.wakeup import Wakeup
from cxr_node.metrics import MetricsServer, share_with_children
from cxr_node.neighbours import ReplicaIndex
from cxr_node.outcomes.hl7_in import Hl7Server, start_hl7_in
from cxr_node.privacy import PatientHasher, load_key
from cxr_node.receive.handlers import event_handlers
from cxr_node.receive.intake import Intake
from cxr_node.receive.scp import NodeServer, spool_received_into, start_server
from cxr_node.receive.stow import StowServer, start_stow
from cxr_node.results.findings import Algorithm, Provenance, SiteOperatingPoint
from cxr_node.results.kinds import producible
from cxr_node.scheduler import Housekeeper, Sender, timetable
from cxr_node.send.deliver import Dispatcher
from cxr_node.supervisor import ROLES, STOP_GRACE_S, Supervisor, Wiring

if TYPE_CHECKING:
    from cxr_node.infer.engine import Engine
    from cxr_node.infer.registry import Manifest
    from cxr_node.work.candidates import Candidate
    from cxr_node.work.loop import Analyser, Worker
    from cxr_node.work.write import OutputWriter

log = structlog.get_logger("cxr_node.app")

INDEX_FOLDER: Final = "index"
SHARED_SPOOL_GRACE_S: Final = 3600.0
"""On a storage root other hosts share, spool files younger than this are left to their receivers at start-up."""


def open_store(settings: Settings, readonly: bool = False) -> Store:
    """Open the durable store: the SQLite file under ``storage.root`` (created with the root when writable),
    or the PostgreSQL database of ``storage.database`` that every host shares.

    Raises
    ------
    StorageError
        With the path or server and what to do, when the root cannot be created or the database opened.
    """
    root = settings.storage.root
    if settings.storage.shared:
        from cxr_node.jobs.postgres import PostgresStore, password  # libpq only where it is used

        url = settings.storage.database
        return PostgresStore(url, password(settings.storage.database_password_file), readonly=readonly)
    if readonly and not (root / spool.DB_NAME).exists():
        raise StorageError(f"{root / spool.DB_NAME}: no jobs database yet (has the node run with this storage.root?)")
    if not readonly:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"storage.root {root}: cannot create it ({exc.strerror}); set storage.root in {settings.source}"
            ) from exc
        if not os.access(root, os.W_OK):
            raise StorageError(f"storage.root {root}: not writable by this user; set storage.root in {settings.source}")
    wakeup = None if readonly else Wakeup(root)
    return SqliteStore(root / spool.DB_NAME, fsync=settings.storage.fsync, readonly=readonly, wakeup=wakeup)


def load_model(settings: Settings, path: Path | None = None) -> tuple[Manifest, Engine]:
    """The manifest of ``models.manifest`` (or of ``path``: a candidate's) and its engine on ``compute.device``
    (imports torch).

    Raises
    ------
    ModelError
        When the manifest or its weights cannot be loaded (missing, wrong checksum, no CUDA device).
    """
    from cxr_node.infer.classify import RuntimeOptions
    from cxr_node.infer.device import resolve_cpu_precision, resolve_device
    from cxr_node.infer.engine import Engine
    from cxr_node.infer.registry import load_manifest

    manifest = load_manifest(path or settings.models.manifest)
    checked = manifest.classifier.cpu_bf16
    options = RuntimeOptions(
        device=resolve_device(settings.compute.device),
        channels_last=settings.worker.channels_last,
        precision=settings.worker.precision,
        cpu_precision=resolve_cpu_precision(settings.compute.cpu_precision, model_checked=checked),
    )
    return manifest, Engine.from_manifest(manifest, options)


def provenance(settings: Settings, manifest: Manifest) -> Provenance:
    """Who makes the outputs: the manifest's model and this node (name, version, intended use, device UID)."""
    from cxr_node import __version__
    from cxr_node.dicom.uids import device_uid

    return Provenance(
        model_name=manifest.name,
        model_version=manifest.version,
        intended_use=manifest.intended_use,
        members=tuple(member.name for member in manifest.classifier.members),
        software_version=__version__,
        device_uid=device_uid(settings.node.ae_title),
        algorithms=algorithms(manifest),
        site_operating_point=site_operating_point(settings, manifest),
    )


def site_operating_point(settings: Settings, manifest: Manifest) -> SiteOperatingPoint | None:
    """The operating point of the site calibration ``models.calibration`` names (None when unset).

    Raises
    ------
    ModelError
        When the file cannot be read, or was made for another model, version or weights than ``manifest``'s.
    """
    return operating_point(settings.models.calibration, manifest)


def operating_point(calibration: Path | None, manifest: Manifest) -> SiteOperatingPoint | None:
    """The operating point of the site calibration file ``calibration`` for ``manifest`` (None when unset).

    Raises
    ------
    ModelError
        When the file cannot be read, or was made for another model, version or weights than ``manifest``'s.
    """
    if calibration is None:
        return None
    from cxr_node.infer.calibration import load_for

    found = load_for(calibration, manifest)
    return SiteOperatingPoint(found.threshold, found.description)


def load_candidates(settings: Settings, model_key: str) -> list[Candidate]:
    """The candidate models of ``models.candidates``, each with its engine, gate and site operating point.

    Raises
    ------
    ModelError
        When a candidate cannot be loaded, its calibration does not apply to it, or it has the same name and
        version as ``model_key`` (the configured model) or another candidate.
    """
    from cxr_node.work.candidates import Candidate
    from cxr_node.work.gate import DomainGate

    found: list[Candidate] = []
    for entry in settings.models.candidates:
        manifest, engine = load_model(settings, entry.manifest)
        key = f"{manifest.name}/{manifest.version}"
        if key == model_key or key in (c.key for c in found):
            raise ModelError(f"models.candidates {entry.manifest}: {key} is already configured (a candidate needs its "
                             "own name or version)")  # fmt: skip
        gate = DomainGate.for_model(settings.domain.gate, engine.domain, settings.domain.pass_rate)
        found.append(Candidate(engine, gate, operating_point(entry.calibration, manifest)))
    return found


def algorithms(manifest: Manifest) -> tuple[Algorithm, ...]:
    """The manifest's algorithms as the outputs identify them (IHE AI Results): the ensemble, whose Device UID
    follows every weights file it runs, then each classifier and the lung segmentation, each following its own."""
    from cxr_node.dicom.uids import algorithm_uid

    segmentation, members = manifest.segmentation, manifest.classifier.members
    every = (segmentation.sha256, *(member.sha256 for member in members))
    return (
        Algorithm(manifest.name, manifest.version, algorithm_uid(manifest.name, manifest.version, *every), "ensemble"),
        *(
            Algorithm(
                member.name, member.version, algorithm_uid(member.name, member.version, member.sha256), "classifier"
            )
            for member in members
        ),
        Algorithm(
            segmentation.name,
            segmentation.version,
            algorithm_uid(segmentation.name, segmentation.version, segmentation.sha256),
            "segmentation",
        ),
    )


def patient_hasher(settings: Settings) -> PatientHasher:
    """The site's keyed hash of patient identifiers (its key created under ``storage.root`` on first use).

    Raises
    ------
    StorageError
        When the key cannot be created or read, or others may read it.
    """
    return PatientHasher(load_key(settings.storage.identifier_key_file))


def open_index(settings: Settings) -> ReplicaIndex:
    """The persistent neighbour index: its cases in SQLite under ``storage.root/index``, or, when hosts share a
    PostgreSQL store, in that database, with this host's in-memory replica checkpointed under its run folder."""
    if settings.storage.shared:
        from cxr_node.jobs.postgres import password
        from cxr_node.neighbours.postgres import PgCaseStore

        cases = PgCaseStore(settings.storage.database, password(settings.storage.database_password_file))
        return ReplicaIndex(settings.storage.run_dir / INDEX_FOLDER, store=cases)
    return ReplicaIndex(settings.storage.root / INDEX_FOLDER, fsync=settings.storage.fsync)


def purge_index(settings: Settings, studies: Sequence[str]) -> int:
    """Remove studies from the neighbour index (retention, ``cxr-node purge``); return the entries removed."""
    if not settings.storage.shared and not (settings.storage.root / INDEX_FOLDER).exists():
        return 0
    index = open_index(settings)
    try:
        return sum(index.purge_study(study) for study in studies)
    finally:
        index.close()


def build_worker(
    settings: Settings,
    store: Store,
    analyser: Analyser | None = None,
    manifest: Manifest | None = None,
    candidates: Sequence[Candidate] | None = None,
) -> Worker:
    """The inference worker: the model (``analyser`` or the one of ``models.manifest``), the candidates beside it
    (``candidates`` or those of ``models.candidates``), the output writer for every destination, the pool its
    decoding and writing run in (``worker.cpu_processes``) and, when ``neighbours.k`` is above 0, the neighbour
    index. ``close()`` it when done."""
    from cxr_node.infer.registry import load_manifest
    from cxr_node.work.feedback import Feedback
    from cxr_node.work.loop import Worker
    from cxr_node.work.pool import StepPool
    from cxr_node.work.retrieve import IndexRetriever

    if analyser is None:
        manifest, analyser = load_model(settings)
    manifest = manifest or load_manifest(settings.models.manifest)
    made_by = provenance(settings, manifest)
    if made_by.site_operating_point is not None:
        site = made_by.site_operating_point
        log.info("worker.operating_point", threshold=site.threshold, source=site.source)
    if candidates is None:
        candidates = load_candidates(settings, made_by.model_key)
    for candidate in candidates:
        source = candidate.site.source if candidate.site is not None else "model manifest"
        log.info("worker.candidate", model=candidate.key, operating_point=source, outputs="none (shadow)")
    writer = build_writer(settings, store, made_by)
    if writer.golive is not None:  # recorded now (initial mode) if new: status shows it, a restart keeps it
        log.info("worker.mode", model=made_by.model_key, mode=writer.golive.mode_of(made_by.model_key))
    retriever = IndexRetriever(open_index(settings), settings.neighbours) if settings.neighbours.k else None
    feedback = Feedback(store.outcomes, retriever.index) if retriever is not None else None
    root, hasher = settings.storage.root, patient_hasher(settings)
    processes = pool_processes(settings)
    pool = StepPool(processes, start_pool_child, (settings, made_by)) if processes else None
    listener = store.listen("queued")
    return Worker(
        root,
        store.jobs,
        store.results,
        analyser,
        made_by,
        settings.worker,
        writer,
        retriever,
        hasher=hasher,
        listener=listener,
        pool=pool,
        domain=settings.domain,
        candidates=candidates,
        feedback=feedback,
    )


def build_writer(settings: Settings, store: Store, made_by: Provenance) -> OutputWriter:
    """The output writer: the configured outputs, a delivery to every destination (to a worklist triage one only
    for a result it wants), in the model version's go-live mode (``golive``; shadow withholds them from
    destinations not marked ``qa``)."""
    from cxr_node.work.write import GoLive, OutputWriter, TriageTarget

    destinations = [destination.name for destination in settings.destinations if destination.triage_kind is None]
    triage = [TriageTarget(d.name, d.triage_kind, d.sends) for d in settings.destinations if d.triage_kind]
    qa = tuple(destination.name for destination in settings.destinations if destination.qa)
    golive = GoLive(store.modes, settings.golive.initial_mode, qa)
    root, fsync = settings.storage.root, settings.storage.fsync
    return OutputWriter(root, store.jobs, store.results, made_by, settings.results, destinations, fsync, golive, triage)


def pool_processes(settings: Settings) -> int:
    """The worker's pool size: ``worker.cpu_processes``, or for ``auto`` every core but one on a GPU, none on
    the CPU (inference already uses every core there)."""
    from cxr_node.work.pool import auto_processes

    chosen = settings.worker.cpu_processes
    if chosen != "auto":
        return chosen
    device = settings.compute.device
    if device == "auto":
        from cxr_node.infer.device import resolve_device

        device = str(resolve_device("auto"))
    return auto_processes("cpu" if device == "cpu" else "cuda")


def start_pool_child(settings: Settings, made_by: Provenance) -> None:
    """The initializer of each worker pool child: logging, its own store, and its output writer."""
    from cxr_node import logs
    from cxr_node.work.pool import install_writer

    logs.configure(settings.logging.level, settings.logging.format)
    install_writer(build_writer(settings, open_store(settings), made_by))


def build_dispatcher(settings: Settings, store: Store) -> Dispatcher:
    """The deliveries to every configured destination, proposing every output kind the node may write."""
    from cxr_node.send.triage import TriageReader

    kinds = producible(settings.results)  # the not-analysed SR is sent even with structured_report off
    site = None
    if settings.models.calibration is not None and any(d.triage_kind for d in settings.destinations):
        try:  # names the source of the operating point in triage messages (the worker checked that it applies)
            from cxr_node.infer.calibration import load_calibration

            found = load_calibration(settings.models.calibration)
            site = SiteOperatingPoint(found.threshold, found.description)
        except ModelError as exc:
            log.warning("triage.calibration_unreadable", error=str(exc))
    reader = TriageReader(settings.storage.root, store.jobs, store.results, site)
    root, destinations = settings.storage.root, settings.destinations
    return Dispatcher(store.deliveries, root, destinations, settings.delivery, kinds, reader=reader)


def build_sender(settings: Settings, store: Store) -> Sender:
    """The sender role: deliveries, probes, settling, retention and dead-letter reports on a timetable."""
    dispatcher = build_dispatcher(settings, store)
    housekeeper = Housekeeper(settings, store, on_purge=lambda studies: purge_index(settings, studies))
    listener = store.listen("deliveries")
    return Sender(dispatcher, housekeeper, timetable(settings, dispatcher, housekeeper), store.jobs, listener)


def recover(settings: Settings, roles: Sequence[str] = ROLES) -> None:
    """Bring the store to a consistent state after any stop, for the roles about to start.

    Receiving: partial and half-received files are removed, stored files without a job are adopted (safe only
    while no receiver runs on this storage root). Working: the jobs of workers that are gone (dead on this host,
    or whose leases expired) are re-queued, or end dead after their last attempt. Sending: deliveries that dead
    senders of this host had claimed are freed.
    """
    store = open_store(settings)
    try:
        if "receiver" in roles:
            grace = SHARED_SPOOL_GRACE_S if settings.storage.shared else 0.0  # other hosts may be receiving
            removed = spool.remove_partials(settings.storage.root, min_age_s=grace)
            adopted = Intake(settings, store.jobs, patient_hasher(settings)).adopt_orphans(min_age_s=grace)
            log.info("recovery.receiving", partial_files_removed=removed, orphans_adopted=adopted)
        if "worker" in roles:
            moved = recover_jobs(store.jobs, "worker", settings.worker.max_attempts, time.time())
            given_up = [job.id for job in moved if job.state is JobState.DEAD]
            log.info("recovery.jobs", jobs_requeued=len(moved) - len(given_up), jobs_given_up=given_up)
        if "sender" in roles:
            log.info("recovery.deliveries", deliveries_freed=recover_deliveries(store.jobs, store.deliveries))
    finally:
        store.close()


class Receiver:
    """The receiver role: the SCP (and, with ``stow.enabled``, the STOW-RS endpoint) and the intake writing to
    the durable store."""

    def __init__(self, settings: Settings, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self.store = open_store(settings)
        self.intake = Intake(settings, self.store.jobs, patient_hasher(settings))
        self.server: NodeServer | None = None
        self.stow: StowServer | None = None
        self.hl7: Hl7Server | None = None

    @property
    def port(self) -> int:
        """The port the SCP listens on (useful when configured as 0)."""
        if self.server is None:
            raise RuntimeError("the receiver is not started")
        return int(self.server.server_address[1])

    def start(self) -> Receiver:
        """Start accepting associations."""
        storage = self.settings.storage
        spool_received_into(storage.root / spool.RECEIVING, flush=storage.fsync)
        self.server = start_server(self.settings.node, event_handlers(self.intake), reuse_port=self.reuse_port)
        if self.settings.stow.enabled:
            try:
                root = self.settings.storage.root
                self.stow = start_stow(self.settings.stow, self.intake, root, reuse_port=self.reuse_port)
            except BaseException:
                self.stop(grace_s=0)
                raise
        if self.settings.hl7_in.enabled:
            try:
                self.hl7 = start_hl7_in(self.settings, self.store.outcomes, reuse_port=self.reuse_port)
            except BaseException:
                self.stop(grace_s=0)
                raise
        return self

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, let open associations finish (up to ``grace_s``), then close the store."""
        if self.stow is not None:
            self.stow.stop(grace_s)
            self.stow = None
        if self.hl7 is not None:
            self.hl7.stop(grace_s)
            self.hl7 = None
        if self.server is not None:
            ae = self.server.ae
            self.server.shutdown()
            deadline = time.monotonic() + grace_s
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in ae.active_associations:
                assoc.abort()
            self.server = None
        self.store.close()
        log.info("receiver.stopped")


def run_receiver(settings: Settings, reuse_port: bool = False, ready: Event | None = None) -> int:
    """Run the receiver in this process until SIGTERM or SIGINT; return the exit code."""
    stop = _stop_event()
    receiver = Receiver(settings, reuse_port=reuse_port).start()
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("receiver.stopping")
    receiver.stop()
    return 0


def keep_out_of_collections() -> None:
    """Take what a started worker holds for its whole life out of the cyclic garbage collector's walks.

    The models, pydicom's and highdicom's dictionaries and the neighbour index are some 650,000 tracked objects
    that are never garbage; without this, each full collection (every few images, as the outputs' data sets
    are made and dropped) walks all of them: about 0.2 s of CPU each on a 2-core EPYC, against 2 to 9 ms once
    frozen (``gc.freeze``; bench/cost.py). What is made afterwards is collected as before.
    """
    gc.collect()
    gc.freeze()


def run_worker(settings: Settings, ready: Event | None = None) -> int:
    """Run the inference worker in this process until SIGTERM or SIGINT; return the exit code."""
    stop = _stop_event()
    manifest, engine = load_model(settings)
    log.info("worker.model_loaded", model=manifest.name, version=manifest.version, **engine.runtime)
    store = open_store(settings)
    worker = build_worker(settings, store, engine, manifest)
    keep_out_of_collections()
    if ready is not None:
        ready.set()
    try:
        worker.run(stop)
    finally:
        worker.close()
        store.close()
    return 0


def run_sender(settings: Settings, ready: Event | None = None) -> int:
    """Run the sender (deliveries to the destinations, probes, retention) until SIGTERM or SIGINT."""
    stop = _stop_event()
    store = open_store(settings)
    sender = build_sender(settings, store)
    if ready is not None:
        ready.set()
    try:
        sender.run(stop)
    finally:
        store.close()
    return 0


def run_role(role: str, settings: Settings, ready: Event) -> int:
    """The entry point of one supervised child process: run ``role`` until SIGTERM."""
    if role == "worker":
        return run_worker(settings, ready=ready)
    if role == "sender":
        return run_sender(settings, ready=ready)
    return run_receiver(settings, reuse_port=True, ready=ready)


def start_metrics(settings: Settings, roles: Sequence[str]) -> MetricsServer | None:
    """The /metrics and /healthz endpoint of this supervisor (when enabled).

    The supervisor that runs the receivers (or every role) always serves it; one that runs only a worker or a
    sender serves it too (a pod's probes, a scale-out host's metrics), unless another role's supervisor on this
    host already has the port: then it logs that and goes on without. /healthz judges this supervisor's roles
    when it runs some of them only. The supervisor that runs the worker first gives it an empty multiprocess
    metrics folder.

    Raises
    ------
    ConfigError
        When the receivers' supervisor cannot listen on the metrics port.
    """
    if "worker" in roles:
        share_with_children(settings.storage.run_dir)
    if not settings.metrics.enabled:
        return None
    judged = None if set(roles) == set(ROLES) else list(roles)
    try:
        return MetricsServer(settings, open_store(settings), roles=judged).start()
    except OSError as exc:
        where = f"{settings.metrics.host}:{settings.metrics.port}"
        if "receiver" not in roles:
            log.warning("metrics.not_served", address=where, error=exc.strerror, hint="set metrics.port per role")
            return None
        raise ConfigError(f"{settings.source}: metrics.port: cannot listen on {where}: {exc.strerror}") from exc


WIRING: Final = Wiring(run_role=run_role, recover=recover, start_extras=start_metrics)


def serve(settings: Settings, role: str = "all") -> int:
    """Run the node in the foreground: every role (``all``) or one, as supervised child processes.

    ``receiver`` runs ``node.receiver_processes`` receivers; ``worker`` the inference worker; ``sender``
    the deliveries and housekeeping. One unit per role makes a split deployment on one storage root.
    """
    roles = list(ROLES) if role == "all" else [role]
    return Supervisor(settings, roles, WIRING).run()


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop
