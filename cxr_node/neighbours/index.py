"""The neighbour index: top-k past cases by cosine similarity, per model version, durable across kill -9.

:class:`NeighbourIndex` is the interface callers type against; :class:`ReplicaIndex` implements it over any
:class:`~cxr_node.neighbours.store.CaseStore`, the source of truth: the embedded SQLite file (the default) or
a PostgreSQL database shared by every host (:class:`~cxr_node.neighbours.postgres.PgCaseStore`). Each model
version's search structure is an in-memory replica of the store's rows (:mod:`cxr_node.neighbours.engine`),
loaded on first use from its checkpoint file (:mod:`cxr_node.neighbours.checkpoint`) plus the rows added
since, or built from the rows. Layout under ``root`` (one folder per host)::

    neighbours.sqlite3 (+ -wal, -shm)   cases and float32 embeddings; WAL, synchronous=FULL (SQLite store only)
    checkpoints/<sha256(version)[:32]>.ckpt   one search structure per model version (a cache)

Several processes, and with PostgreSQL several hosts, may write the same store (workers and the CLI): every
call first catches up with what the others committed (the store's ``data_version`` says when: rows with ids
above the replica's watermark are read, and partition counts that differ from the store's make it drop rows
deleted elsewhere), so a case added anywhere is found at the next query and none serves a purged case.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import ArrayLike

from cxr_node.neighbours import checkpoint
from cxr_node.neighbours.cases import (
    Case,
    Label,
    Neighbour,
    NewCase,
    check_k,
    check_label,
    check_text,
    check_version,
    finite_similarity,
    indexable,
    unit_vectors,
)
from cxr_node.neighbours.engine import (
    EngineParams,
    Exclusion,
    Floats,
    Hits,
    Partition,
    key_of,
    top_k,
)
from cxr_node.neighbours.store import CHUNK_ROWS, CaseStore, Changes, SqliteCaseStore

DB_NAME: Final = "neighbours.sqlite3"
CHECKPOINTS: Final = "checkpoints"
_QUERY_ATTEMPTS: Final = 3  # a case purged by another process between search and read: search again


class NeighbourIndex(Protocol):
    """What the pipeline and the CLI need from the neighbour index (contracts: :class:`ReplicaIndex`)."""

    def add(self, version: str, vector: ArrayLike, case: NewCase) -> Case: ...
    def add_many(self, version: str, vectors: ArrayLike, cases: Sequence[NewCase]) -> list[Case]: ...
    def query(
        self,
        version: str,
        vector: ArrayLike,
        k: int = 5,
        *,
        patient_hash: str | None,
        study_instance_uid: str | None,
        library_only: bool = False,
    ) -> list[Neighbour]: ...
    def checkpoint(self, version: str | None = None) -> int: ...
    def rebuild(self, version: str, items: Iterable[tuple[NewCase, ArrayLike]]) -> int: ...
    def label(self, study_uid: str, label: Label | None) -> int: ...
    def purge_study(self, study_uid: str) -> int: ...
    def size(self, version: str) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class IndexStats:
    """Where one model version's search structure stands (for ``cxr-node status`` and the benchmark).

    ``engines`` maps ``store``/``library`` to ``exact`` or ``ivf:<lists>``; ``origin`` says how it was
    loaded (``checkpoint``, ``database``, or ``not loaded``).
    """

    version: str
    size: int
    dim: int
    engines: dict[str, str]
    nbytes: int
    origin: str
    load_seconds: float
    train_seconds: float


@dataclass
class _Loaded:
    """One model version held in memory: its partitions and how far they follow the database."""

    dim: int
    generation: int
    watermark: int
    partitions: dict[bool, Partition]
    origin: str
    dirty: bool = True
    load_seconds: float = 0.0


class ReplicaIndex:
    """The neighbour index: a store's cases, searched in memory; thread-safe, safe to open from several
    processes, and from several hosts on a shared store.

    Parameters
    ----------
    root : Path
        Its folder (``storage.root / "index"``; with a store other hosts share, a folder of this host's own,
        such as one under ``storage.run_dir``); created when missing. It holds the checkpoint files.
    params : EngineParams, optional
        Search settings (exact/IVF threshold, lists, nprobe); the defaults are the measured ones.
    fsync : bool
        ``synchronous=FULL`` when True: an add that returned survives power loss, not only kill -9 (SQLite).
    store : CaseStore, optional
        The cases and embeddings; by default the SQLite file ``root/neighbours.sqlite3``. Shared by every
        host: ``store=PgCaseStore(url, password)``.
    """

    def __init__(
        self, root: Path, params: EngineParams | None = None, *, fsync: bool = True, store: CaseStore[Any] | None = None
    ) -> None:
        self.root = Path(root)
        self.params = params or EngineParams()
        self._store: CaseStore[Any] = store or SqliteCaseStore(self.root / DB_NAME, fsync=fsync)
        self._lock = threading.RLock()
        self._loaded: dict[str, _Loaded] = {}
        self._data_version = self._store.data_version()

    # ------------------------------------------------------------------------------------------ writes

    def add(self, version: str, vector: ArrayLike, case: NewCase) -> Case:
        """Store one image's embedding and metadata; once this returns, it survives a crash.

        Parameters
        ----------
        version : str
            The model version that made ``vector``; only embeddings of the same version are compared.
        vector : array_like
            The embedding (1-D, finite, not zero; normalised here). Its length is fixed by the version's
            first embedding.
        case : NewCase
            The image. Adding an image already stored returns it unchanged (except a new label, and
            ``source="library"`` promoting a ``store`` case).

        Returns
        -------
        Case
            The stored case, with its case number.

        Raises
        ------
        ValueError
            Naming ``version``, ``vector`` or ``case``: wrong length, NaN, zero vector, not a NewCase.
        """
        if np.ndim(vector) != 1:
            raise ValueError(f"vector must be 1-D (one embedding), found shape {np.shape(vector)}")
        if not isinstance(case, NewCase):
            raise ValueError(f"case must be a NewCase, found {type(case).__name__}")
        return self._add(version, np.asarray(vector)[None, :], [case], "vector")[0]

    def add_many(self, version: str, vectors: ArrayLike, cases: Sequence[NewCase]) -> list[Case]:
        """Store several embeddings in one transaction (``vectors`` is ``(N, D)``); see :meth:`add`."""
        return self._add(version, vectors, _check_cases("cases", cases), "vectors")

    def _add(self, version: str, vectors: ArrayLike, cases: list[NewCase], name: str) -> list[Case]:
        """Check, then store, then follow in memory (versions held there) once committed."""
        version = check_version(version)
        with self._lock:
            with self._store.transaction() as db:
                self._sync()
                info = self._store.version_info(version)
                units = unit_vectors(name, vectors, info[0] if info else None)
                if len(units) != len(cases):
                    raise ValueError(f"cases must number as many as vectors ({len(units)}), found {len(cases)}")
                stored, changes = self._store.insert(db, version, units, cases)
            self._apply(changes)
        return stored

    def rebuild(self, version: str, items: Iterable[tuple[NewCase, ArrayLike]]) -> int:
        """Replace every embedding of ``version`` by ``items`` (e.g. after re-embedding), in one transaction.

        The caller computes the new embeddings. Cases keep their case numbers (same SOP Instance UID); cases
        of the version that ``items`` leaves out, and in no other version, are deleted, and so are items whose
        UIDs no report could write (an accession number or date that cannot be written is stored empty:
        :func:`~cxr_node.neighbours.cases.indexable`). The search
        structure is then built from the stored rows and checkpointed, so the same items always give the
        same index and the same query results. Returns how many embeddings were written.

        Raises
        ------
        ValueError
            Naming ``version`` or ``items`` (a bad pair, vectors of different lengths, NaN, zero vector).
        """
        version = check_version(version)
        with self._lock:
            self._loaded.pop(version, None)  # its memory goes before the new rows arrive
            with self._store.transaction() as db:
                self._sync()
                pairs = iter(items)
                first = next(pairs, None)
                info = self._store.version_info(version)
                if first is None and info is None:
                    return 0
                dim = _item(first)[1].shape[0] if first is not None else _dim(info)
                count, changes = self._store.replace(db, version, dim, _validated_items(first, pairs, dim))
                checkpoint.remove(self._checkpoint_path(version))  # before the commit: never a stale one
            self._apply(changes)
            self._store.truncate_wal()
            self.checkpoint(version)
        return count

    def label(self, study_uid: str, label: Label | None) -> int:
        """Set (or clear, with None) the confirmed label of every case of a study; return how many cases."""
        check_text("study_uid", study_uid, required=True)
        check_label(label)
        with self._lock:
            return self._store.set_label(study_uid, label)

    def purge_study(self, study_uid: str) -> int:
        """Delete a study's cases, from memory, the database and the checkpoints; return how many images.

        Checkpoints holding them are deleted before the commit and written again for versions held in
        memory; the database overwrites deleted rows (``secure_delete``) and truncates its WAL.
        """
        check_text("study_uid", study_uid, required=True)
        with self._lock:
            with self._store.transaction() as db:
                self._sync()
                count, changes = self._store.purge(db, study_uid)
                for version in changes.versions():
                    checkpoint.remove(self._checkpoint_path(version))
            self._apply(changes)
            self._store.truncate_wal()
            for version in changes.versions() & set(self._loaded):
                self.checkpoint(version)
        return count

    def invalid_cases(self) -> list[tuple[Case, tuple[str, ...]]]:
        """Return the stored cases that fail today's identifier checks, each with its ``"field: reason"``
        problems (:func:`~cxr_node.neighbours.cases.identifier_problems`), in case-number order."""
        with self._lock:
            return self._store.invalid()

    def drop_invalid(self) -> tuple[int, int]:
        """Delete the cases whose UIDs are unusable and clear accession numbers and dates that cannot be
        written, from the database, memory and checkpoints, as :meth:`purge_study` does; return
        ``(deleted, cleared)``."""
        with self._lock:
            with self._store.transaction() as db:
                self._sync()
                dropped, cleared, changes = self._store.clean(db)
                for version in changes.versions():
                    checkpoint.remove(self._checkpoint_path(version))
            self._apply(changes)
            self._store.truncate_wal()
            for version in changes.versions() & set(self._loaded):
                self.checkpoint(version)
        return dropped, cleared

    def checkpoint(self, version: str | None = None) -> int:
        """Write the search structure of ``version`` (loading it first), or of every version held in memory.

        Versions unchanged since their last checkpoint are skipped. On one host the files are written under
        the database's write lock, so a purge by another process waits and then deletes the fresh file. On a
        shared store, other hosts' writes are not held off (a checkpoint of 1M rows takes seconds); the index
        catches up once the files are written instead, and deletes any file holding rows purged meanwhile.
        Either way a checkpoint never keeps a purged vector past this host's next call. Also truncates the
        database's WAL. Returns how many checkpoint files were written.
        """
        with self._lock:
            self._sync()
            targets = [check_version(version)] if version is not None else sorted(self._loaded)
            for target in targets:
                self._get(target)  # loading (maybe long) happens outside the write lock
            with self._writers_held():
                self._sync()
                written = sum(self._write_checkpoint(v) for v in targets)
            if self._store.shared:
                self._sync()
            self._store.truncate_wal()
        return written

    def _writers_held(self) -> AbstractContextManager[object]:
        """The store's write lock on one host (a purge can't commit mid-write); nothing on a shared store."""
        return nullcontext() if self._store.shared else self._store.transaction()

    # ------------------------------------------------------------------------------------------ reads

    def query(
        self,
        version: str,
        vector: ArrayLike,
        k: int = 5,
        *,
        patient_hash: str | None,
        study_instance_uid: str | None,
        library_only: bool = False,
        nprobe: int | None = None,
    ) -> list[Neighbour]:
        """Return the ``k`` stored cases most similar to ``vector`` under ``version``, nearest first.

        Parameters
        ----------
        version : str
            Model version of ``vector``; other versions' embeddings are never compared.
        vector : array_like
            The query embedding (1-D).
        k : int
            How many neighbours (1..10000); fewer come back only when fewer cases are eligible.
        patient_hash, study_instance_uid : str or None
            The query image's patient hash and study: cases of either are left out (None: no exclusion).
        library_only : bool
            Search only the labelled reference library.
        nprobe : int, optional
            IVF lists to scan before widening (recall against speed); None: ``params.nprobe``.

        Raises
        ------
        ValueError
            Naming ``version``, ``vector``, ``k``, ``patient_hash``, ``study_instance_uid`` or ``nprobe``.
        """
        version, k = check_version(version), check_k(k)
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
            raise ValueError(f"nprobe must be a positive integer or None, found {nprobe!r}")
        exclusion = _exclusion(patient_hash, study_instance_uid)
        if np.ndim(vector) != 1:
            raise ValueError(f"vector must be 1-D (one embedding), found shape {np.shape(vector)}")
        with self._lock:
            for _ in range(_QUERY_ATTEMPTS):
                self._sync()
                loaded = self._get(version)
                if loaded is None:
                    unit_vectors("vector", vector, None)
                    return []
                query = unit_vectors("vector", vector, loaded.dim)[0]
                found = self._search(loaded, query, k, exclusion, library_only, nprobe)
                if found is not None:
                    return found
                self._data_version = -1  # a hit vanished (another process purged it): catch up, search again
            return []

    def size(self, version: str) -> int:
        """Return how many embeddings ``version`` has (both sources), from the database."""
        return self._store.count(check_version(version))

    def versions(self) -> list[str]:
        """Return the model versions with embeddings, sorted."""
        return self._store.versions()

    def load(self, version: str) -> IndexStats:
        """Load ``version``'s search structure now (at start-up) rather than at the first query."""
        with self._lock:
            self._sync()
            self._get(check_version(version))
            return self.stats(version)

    def stats(self, version: str) -> IndexStats:
        """Return where ``version``'s search structure stands; does not load it."""
        version = check_version(version)
        with self._lock:
            loaded = self._loaded.get(version)
            if loaded is None:
                info = self._store.version_info(version)
                return IndexStats(version, self.size(version), info[0] if info else 0, {}, 0, "not loaded", 0.0, 0.0)
            parts = loaded.partitions
            return IndexStats(
                version=version,
                size=sum(p.size for p in parts.values()),
                dim=loaded.dim,
                engines={_source(lib): _engine_name(p) for lib, p in parts.items()},
                nbytes=sum(p.nbytes for p in parts.values()),
                origin=loaded.origin,
                load_seconds=loaded.load_seconds,
                train_seconds=sum(p.train_seconds for p in parts.values()),
            )

    def close(self) -> None:
        """Drop the search structures and close the database (no checkpoint is written)."""
        with self._lock:
            self._loaded.clear()
            self._store.close()

    def __enter__(self) -> ReplicaIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ search

    def _search(
        self, loaded: _Loaded, query: Floats, k: int, exclusion: Exclusion, library_only: bool, nprobe: int | None
    ) -> list[Neighbour] | None:
        """Search the partitions, read the hits' cases; None when a hit has vanished from the database."""
        parts = [p for lib, p in loaded.partitions.items() if lib or not library_only]
        merged = _merge([p.search(query, k, exclusion, nprobe) for p in parts], k)
        ids = merged.ids.tolist()
        cases = self._store.cases(ids)
        if len(cases) != len(ids):
            return None
        return [
            Neighbour(case=cases[i], similarity=finite_similarity(float(s)), rank=rank)
            for rank, (i, s) in enumerate(zip(ids, merged.scores.tolist(), strict=True), start=1)
        ]

    # ------------------------------------------------------------------------------------------ memory

    def _get(self, version: str) -> _Loaded | None:
        """Return ``version`` held in memory, loading it first; None when it has no embeddings."""
        loaded = self._loaded.get(version)
        if loaded is None:
            loaded = self._load(version)
            if loaded is not None:
                self._loaded[version] = loaded
        return loaded

    def _load(self, version: str) -> _Loaded | None:
        info = self._store.version_info(version)
        if info is None:
            return None
        started = time.perf_counter()
        dim, generation = info
        loaded = self._from_checkpoint(version, dim, generation)
        if loaded is None:
            loaded = self._from_database(version, dim, generation)
        loaded.load_seconds = time.perf_counter() - started
        return loaded

    def _from_checkpoint(self, version: str, dim: int, generation: int) -> _Loaded | None:
        """Load the checkpoint, then make it equal to the database (drop deleted rows, replay new ones)."""
        path = self._checkpoint_path(version)
        if not path.exists():
            return None
        try:
            snap = checkpoint.read(path, self.params)
        except checkpoint.CheckpointError:
            return None  # a damaged cache: rebuilt from the database below
        if (snap.version, snap.generation, snap.dim) != (version, generation, dim):
            return None
        parts = {lib: snap.partitions.get(lib) or Partition(dim, self.params) for lib in (False, True)}
        loaded = _Loaded(dim, generation, snap.watermark, parts, origin="checkpoint", dirty=False)
        if self._reconcile(version, loaded):
            loaded.dirty = True
        return loaded

    def _from_database(self, version: str, dim: int, generation: int) -> _Loaded:
        """Build both partitions from the rows (sample, train, stream), deterministically."""
        with self._store.snapshot():
            upto = self._store.max_id(version)
            plans = {lib: self._plan(version, lib, dim, upto) for lib in (False, True)}
        parts = {
            lib: Partition.build(dim, self.params, total, sample, self._store.stream(version, lib, dim, 0, upto))
            for lib, (total, sample) in plans.items()
        }
        return _Loaded(dim, generation, upto, parts, origin="database")

    def _plan(self, version: str, library: bool, dim: int, upto: int) -> tuple[int, Floats]:
        """Return a partition's row count and its training sample (seeded choice of rows)."""
        ids = self._store.ids(version, library, upto)
        total = len(ids)
        if total <= self.params.exact_max:
            return total, np.empty((0, dim), np.float32)
        count = self.params.sample_for(total, self.params.lists_for(total))
        rng = np.random.default_rng(self.params.seed)
        picks = ids[np.sort(rng.choice(total, size=count, replace=False))]
        return total, self._store.fetch(version, picks, dim).vectors

    def _sync(self) -> None:
        """Catch up with what other connections committed since the last call (cheap when nothing did)."""
        current = self._store.data_version()
        if current == self._data_version:
            return
        self._data_version = current
        for version in list(self._loaded):
            self._catch_up(version)

    def _catch_up(self, version: str) -> None:
        loaded = self._loaded[version]
        info = self._store.version_info(version)
        if info is None or info[1] != loaded.generation:
            del self._loaded[version]  # rebuilt or emptied elsewhere: loaded again when needed
            return
        with self._store.snapshot():
            upto = self._store.max_id(version)
            for lib, part in loaded.partitions.items():
                for rows in self._store.stream(version, lib, loaded.dim, loaded.watermark, upto):
                    part.add(rows)
                    loaded.dirty = True
            counts = {lib: self._store.count(version, lib) for lib in loaded.partitions}
        loaded.watermark = max(loaded.watermark, upto)
        if any(counts[lib] != part.size for lib, part in loaded.partitions.items()):
            self._reconcile(version, loaded)
            loaded.dirty = True

    def _reconcile(self, version: str, loaded: _Loaded) -> bool:
        """Make the partitions hold exactly the database's rows; return whether anything changed."""
        changed = False
        with self._store.snapshot():
            upto = max(self._store.max_id(version), loaded.watermark)
            for lib, part in loaded.partitions.items():
                stored, held = self._store.ids(version, lib, upto), part.all_ids()
                extra = np.setdiff1d(held, stored, assume_unique=True)
                missing = np.setdiff1d(stored, held, assume_unique=True)
                if len(extra):
                    part.remove(extra)
                    self._forget_checkpoint(version)
                for start in range(0, len(missing), CHUNK_ROWS):
                    part.add(self._store.fetch(version, missing[start : start + CHUNK_ROWS], loaded.dim))
                changed = changed or bool(len(extra) or len(missing))
        loaded.watermark = upto
        return changed

    def _forget_checkpoint(self, version: str) -> None:
        """Delete this host's checkpoint of ``version``: it may hold rows another host purged (shared store).

        On one host the purging process deleted it already, and a file written since holds no purged row.
        """
        if self._store.shared:
            checkpoint.remove(self._checkpoint_path(version))

    def _apply(self, changes: Changes) -> None:
        """Apply a committed write of this connection to the versions held in memory."""
        for version, removed in changes.removed.items():
            if version in self._loaded:
                ids = np.array(removed, np.int64)
                for part in self._loaded[version].partitions.values():
                    part.remove(ids)
                self._loaded[version].dirty = True
        for (version, lib), added in changes.added.items():
            loaded = self._loaded.get(version)
            if loaded is not None:
                loaded.partitions[lib].add(added.rows(loaded.dim))
                loaded.dirty = True
        for version, max_id in changes.max_id.items():
            if version in self._loaded:
                self._loaded[version].watermark = max(self._loaded[version].watermark, max_id)

    def _write_checkpoint(self, version: str) -> bool:
        loaded = self._get(version)
        path = self._checkpoint_path(version)
        if loaded is None or (not loaded.dirty and path.exists()):
            return False
        snap = checkpoint.Snapshot(version, loaded.generation, loaded.watermark, loaded.dim, loaded.partitions)
        checkpoint.write(path, snap)
        loaded.dirty = False
        return True

    def _checkpoint_path(self, version: str) -> Path:
        return checkpoint.path_for(self.root / CHECKPOINTS, version)


# ---------------------------------------------------------------------------------------------- helpers


def _merge(hits: list[Hits], k: int) -> Hits:
    """Return the best ``k`` of several partitions' hits."""
    if len(hits) == 1:
        return hits[0]
    return top_k(np.concatenate([h.scores for h in hits]), np.concatenate([h.ids for h in hits]), k)


def _exclusion(patient_hash: str | None, study_instance_uid: str | None) -> Exclusion:
    """Return the exclusion keys of a query (None or "": nothing excluded on that field)."""
    for name, value in (("patient_hash", patient_hash), ("study_instance_uid", study_instance_uid)):
        if value is not None:
            check_text(name, value, required=False)
    return Exclusion(
        patient=key_of(patient_hash) if patient_hash else None,
        study=key_of(study_instance_uid) if study_instance_uid else None,
    )


def _check_cases(name: str, cases: Sequence[NewCase]) -> list[NewCase]:
    """Return ``cases`` as a list, or raise ValueError naming ``name`` when one is not a NewCase."""
    if isinstance(cases, NewCase | str | bytes):
        raise ValueError(f"{name} must be a sequence of NewCase, found {type(cases).__name__}")
    found = list(cases)
    for case in found:
        if not isinstance(case, NewCase):
            raise ValueError(f"{name} must hold NewCase records, found {type(case).__name__}")
    return found


def _dim(info: tuple[int, int] | None) -> int:
    """The dimension of a model version's stored embeddings (it has some)."""
    if info is None:
        raise ValueError("the model version has no embeddings yet")
    return info[0]


def _item(pair: object) -> tuple[NewCase, Floats]:
    """Return a ``(NewCase, vector)`` pair of ``items`` with the vector as float64 1-D, or raise ValueError."""
    if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], NewCase):
        raise ValueError(f"items must hold (NewCase, vector) pairs, found {type(pair).__name__}")
    vector = np.asarray(pair[1])
    if vector.ndim != 1:
        raise ValueError(f"items must hold 1-D vectors, found shape {vector.shape}")
    return pair[0], vector


def _validated_items(first: object, rest: Iterator[object], dim: int) -> Iterator[tuple[NewCase, Floats]]:
    """Yield ``items`` checked and normalised, lazily (a rebuild may stream millions); cases that cannot be
    named are left out."""
    if first is None:
        return
    for raw in itertools.chain([first], rest):
        case, vector = _item(raw)
        kept, _ = indexable(case)
        if kept is not None:
            yield kept, unit_vectors("items", vector, dim)[0]


def _source(library: bool) -> str:
    return "library" if library else "store"


def _engine_name(part: Partition) -> str:
    return part.kind if part.centroids is None else f"{part.kind}:{len(part.centroids)}"


SqliteNeighbourIndex = ReplicaIndex
"""The name :class:`ReplicaIndex` had when SQLite was its only store (kept for callers)."""
