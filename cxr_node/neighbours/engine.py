"""The in-memory search structure of one partition: an exact scan, or IVF-flat lists once it is large (numpy only).

A partition holds the unit embeddings of one model version and one source, each row with its embedding id
and two exclusion keys (64-bit hashes of the patient hash and of the Study Instance UID). Below
:attr:`EngineParams.exact_max` rows it is one block scanned in full (exact top-k). Above, it is an inverted
file: spherical k-means centroids trained on a sample, one block per centroid, and a query scans the
lists whose centroids are nearest (at least ``nprobe`` lists and ``scan_rows`` rows), widening until ``k`` rows
pass the exclusions. Nothing here
does I/O; :mod:`cxr_node.neighbours.index` owns persistence.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

EXACT: Final = "exact"
IVF: Final = "ivf"
EngineKind = Literal["exact", "ivf"]
_GROWTH: Final = 1.25  # heap-allocated blocks: spare room at most a quarter of the rows
_MAPPED_GROWTH: Final = 2.0  # blocks in their own mapping: spare pages are never touched, so never resident
_MIN_ROOM: Final = 16
_OWN_MAPPING: Final = 256 * 1024  # bytes from which a vector block gets its own anonymous mapping
_ASSIGN_FLOATS: Final = 1 << 24  # rows x lists scored at once while assigning: 64 MB of float32

Int64s = NDArray[np.int64]
Floats = NDArray[np.float32]


@dataclass(frozen=True)
class EngineParams:
    """How a partition searches; the defaults are the ones measured in docs/benchmarks.md.

    Parameters
    ----------
    exact_max : int
        Largest partition searched exactly; above it the partition becomes IVF-flat.
    nprobe : int
        Fewest lists scanned per query.
    scan_rows : int
        Rows scanned per query, at least: lists are taken nearest first until they hold this many. The cost
        of a query stays about constant as the partition grows, and a small partition gets scanned more
        thoroughly. Both bounds apply before any widening (doubling) to satisfy the exclusions.
    lists_per_sqrt : float
        ``nlist = lists_per_sqrt * sqrt(rows)`` at training, clamped to ``[min_lists, max_lists]``.
    min_lists, max_lists : int
        Bounds of ``nlist``.
    train_per_list : int
        Training sample rows per list (capped by ``max_train``).
    max_train : int
        Largest k-means training sample.
    kmeans_iterations : int
        Lloyd iterations at most.
    kmeans_seconds : float
        Wall-clock budget of one training; iterations stop when it is spent (at least one runs).
    retrain_growth : float
        An IVF partition retrains (new centroids, every row moved to its nearest) once it holds this many
        times the rows it was last trained with, so lists stay short as it grows.
    seed : int
        Seed of the sampling and the k-means initialisation (same rows in, same index out).
    """

    exact_max: int = 30_000
    nprobe: int = 8
    scan_rows: int = 20_000
    lists_per_sqrt: float = 1.0
    min_lists: int = 16
    max_lists: int = 4096
    train_per_list: int = 32
    max_train: int = 131_072
    kmeans_iterations: int = 8
    kmeans_seconds: float = 120.0
    retrain_growth: float = 3.0
    seed: int = 5

    def __post_init__(self) -> None:
        for name in ("exact_max", "nprobe", "scan_rows", "min_lists", "max_lists", "train_per_list", "max_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, found {getattr(self, name)!r}")
        if self.min_lists > self.max_lists:
            raise ValueError(f"min_lists must not exceed max_lists, found {self.min_lists} > {self.max_lists}")
        if not self.lists_per_sqrt > 0 or not self.kmeans_seconds > 0 or self.kmeans_iterations < 1:
            raise ValueError("lists_per_sqrt, kmeans_seconds and kmeans_iterations must be positive")
        if not self.retrain_growth > 1:
            raise ValueError(f"retrain_growth must be above 1, found {self.retrain_growth!r}")

    def lists_for(self, rows: int) -> int:
        """Return the number of lists to train for ``rows`` rows (at most one list per 8 rows)."""
        wanted = round(self.lists_per_sqrt * math.sqrt(rows))
        return max(1, min(self.max_lists, max(self.min_lists, wanted), rows // 8))

    def sample_for(self, rows: int, nlist: int) -> int:
        """Return the training sample size for ``rows`` rows and ``nlist`` lists."""
        return min(rows, self.max_train, self.train_per_list * nlist)


def key_of(text: str) -> int:
    """Return the 64-bit exclusion key of a patient hash or Study Instance UID (stable across processes)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True)
class Rows:
    """A batch of rows: ``(N, D)`` unit float32 vectors, their int64 ids and int64 exclusion keys."""

    vectors: Floats
    ids: Int64s
    patients: Int64s
    studies: Int64s

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: NDArray[np.intp] | slice) -> Rows:
        """Return the rows at ``index`` (a copy for an index array, views for a slice)."""
        return Rows(self.vectors[index], self.ids[index], self.patients[index], self.studies[index])

    @staticmethod
    def concat(parts: list[Rows], dim: int) -> Rows:
        """Return ``parts`` joined into one batch (empty when ``parts`` is)."""
        if not parts:
            return empty_rows(dim)
        return Rows(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("vectors", "ids", "patients", "studies"))
        )


def empty_rows(dim: int) -> Rows:
    """Return a batch of no rows of width ``dim``."""
    return Rows(np.empty((0, dim), np.float32), *(np.empty(0, np.int64) for _ in range(3)))


@dataclass(frozen=True)
class Exclusion:
    """Rows a query must not return: the query's patient and study keys (None: exclude nothing on it)."""

    patient: int | None = None
    study: int | None = None


@dataclass(frozen=True)
class Hits:
    """A search result: ids and similarities, best first (ties broken by the smaller id)."""

    ids: Int64s
    scores: Floats


class Block:
    """A growable block of rows: one IVF list, or the whole exact partition.

    Spare room: at most a quarter of the rows in a heap block; a block in its own mapping doubles when full,
    as its spare pages are never written, so never resident (:func:`_vector_array`).
    """

    __slots__ = ("ids", "n", "patients", "studies", "vectors")

    def __init__(self, dim: int, capacity: int = 0) -> None:
        self.vectors: Floats = _vector_array(capacity, dim)
        self.ids: Int64s = np.empty(capacity, np.int64)
        self.patients: Int64s = np.empty(capacity, np.int64)
        self.studies: Int64s = np.empty(capacity, np.int64)
        self.n = 0

    def rows(self) -> Rows:
        """Return views of the filled rows."""
        n = self.n
        return Rows(self.vectors[:n], self.ids[:n], self.patients[:n], self.studies[:n])

    def append(self, rows: Rows) -> None:
        """Copy ``rows`` in after the filled rows, growing when full (see :func:`_vector_array`)."""
        self.extend(rows.vectors, rows.ids, rows.patients, rows.studies)

    def extend(self, vectors: Floats, ids: Int64s, patients: Int64s, studies: Int64s) -> None:
        """Copy rows given as arrays in after the filled rows (the hot path of inserts: no Rows object)."""
        start = self.n
        end = start + len(ids)
        if end > len(self.ids):
            growth = _MAPPED_GROWTH if _mapped(end, self.vectors.shape[1]) else _GROWTH
            self._resize(max(end, int(len(self.ids) * growth) + _MIN_ROOM))
        self.vectors[start:end] = vectors
        self.ids[start:end] = ids
        self.patients[start:end] = patients
        self.studies[start:end] = studies
        self.n = end

    def remove(self, ids: Int64s) -> int:
        """Drop the rows whose id is in ``ids`` (order of the others kept); return how many."""
        gone = np.isin(self.ids[: self.n], ids)
        count = int(gone.sum())
        if count:
            self._resize(self.n - count, self.rows().take(np.flatnonzero(~gone)))
        return count

    def trim(self) -> None:
        """Give back the spare room of a heap block (a mapped block's spare pages were never resident)."""
        if len(self.ids) != self.n and not _mapped(len(self.ids), self.vectors.shape[1]):
            self._resize(self.n)

    def scores(self, query: Floats, exclusion: Exclusion) -> tuple[Floats, int]:
        """Return every filled row's similarity to ``query`` (excluded rows -inf) and how many are not excluded."""
        n = self.n
        scores = dot_rows(self.vectors[:n], query)
        mask = None
        if exclusion.patient is not None:
            mask = self.patients[:n] == exclusion.patient
        if exclusion.study is not None:
            study = self.studies[:n] == exclusion.study
            mask = study if mask is None else mask | study
        if mask is None:
            return scores, n
        scores[mask] = -np.inf
        return scores, n - int(np.count_nonzero(mask))

    @property
    def nbytes(self) -> int:
        """Bytes of the filled rows (spare room in a mapping of its own is address space, not memory)."""
        return int(self.n * (self.vectors.shape[1] * 4 + 24))

    def _resize(self, capacity: int, rows: Rows | None = None) -> None:
        """Move ``rows`` (default: the filled rows) into fresh arrays of ``capacity`` rows."""
        rows = self.rows() if rows is None else rows
        fresh = Block(self.vectors.shape[1], capacity)
        fresh.append(rows)
        self.vectors, self.ids, self.patients, self.studies = fresh.vectors, fresh.ids, fresh.patients, fresh.studies
        self.n = fresh.n


class Partition:
    """The rows of one model version and one source, searchable; exact or IVF-flat by size.

    Parameters
    ----------
    dim : int
        Vector length.
    params : EngineParams
        Thresholds and IVF settings.
    """

    def __init__(self, dim: int, params: EngineParams) -> None:
        self.dim = dim
        self.params = params
        self.centroids: Floats | None = None
        self.blocks: list[Block] = [Block(dim)]
        self.trained_size = 0
        self.train_seconds = 0.0

    # ------------------------------------------------------------------------------------------ state

    @property
    def kind(self) -> EngineKind:
        """``exact`` or ``ivf``."""
        return EXACT if self.centroids is None else IVF

    @property
    def size(self) -> int:
        """Rows held."""
        return sum(block.n for block in self.blocks)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (vectors, ids, keys) and the centroids."""
        extra = 0 if self.centroids is None else self.centroids.nbytes
        return extra + sum(block.nbytes for block in self.blocks)

    def all_ids(self) -> Int64s:
        """Return every row's id, sorted."""
        return np.sort(np.concatenate([block.ids[: block.n] for block in self.blocks]))

    # ------------------------------------------------------------------------------------------ changes

    def add(self, rows: Rows) -> None:
        """Add ``rows``; converts to IVF past ``exact_max`` and retrains after ``retrain_growth`` x growth."""
        if not len(rows):
            return
        if self.centroids is None:
            self.blocks[0].append(rows)
        else:
            self._distribute(rows)
        if self._needs_training():
            self.retrain()

    def remove(self, ids: Int64s) -> int:
        """Remove the rows whose id is in ``ids``; return how many were held (IVF turns exact when small)."""
        removed = sum(block.remove(ids) for block in self.blocks if block.n)
        if removed and self.centroids is not None and self.size <= self.params.exact_max // 2:
            self._become_exact()
        return removed

    def retrain(self) -> None:
        """Train new centroids on a sample of the rows held and move every row into the new lists.

        Old lists are emptied one by one while the new ones fill, so memory peaks at about one list above
        the rows held. Each row is compared with every new centroid. Cheaper schemes were measured on the
        clustered benchmark set and dropped: comparing a row only with the new centroids nearest its old one
        misplaced 8 % of the rows (cells are far from compact in 512-d); splitting long lists by 2-means
        instead of retraining lost 2 points of recall@10, 3 with a re-placement of the neighbouring lists.
        """
        size = self.size
        if size <= self.params.exact_max:
            self._become_exact()
            return
        started = time.perf_counter()
        nlist = self.params.lists_for(size)
        sample = self._sample(self.params.sample_for(size, nlist))
        centroids = train_centroids(sample, nlist, self.params)
        del sample
        self._refill(centroids, size, self._drain())
        self.train_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------------------------------ search

    def search(self, query: Floats, k: int, exclusion: Exclusion, nprobe: int | None = None) -> Hits:
        """Return the top ``k`` rows by cosine similarity to the unit vector ``query``, not excluded.

        Exact partitions scan every row. IVF partitions scan the nearest lists (``nprobe`` of them when
        given, else at least ``params.nprobe`` lists holding at least ``params.scan_rows`` rows), then twice as many
        (at most log2(nlist) widenings) until ``k`` rows pass the exclusion or every list is scanned, so
        ``k`` rows come back whenever ``k`` rows are eligible.
        """
        if self.centroids is None:
            scores, _ = self.blocks[0].scores(query, exclusion)
            return top_k(scores, self.blocks[0].ids[: self.blocks[0].n], k)
        order = np.argsort(-dot_rows(self.centroids, query), kind="stable")
        probe, done, eligible = min(nprobe or self._probes(order), len(order)), 0, 0
        scores_parts: list[Floats] = []
        id_parts: list[Int64s] = []
        while True:
            for index in order[done:probe]:
                block = self.blocks[index]
                scores, valid = block.scores(query, exclusion)
                scores_parts.append(scores)
                id_parts.append(block.ids[: block.n])
                eligible += valid
            done = probe
            if eligible >= k or done == len(order):
                break
            probe = min(len(order), probe * 2)
        return top_k(np.concatenate(scores_parts), np.concatenate(id_parts), k)

    def _probes(self, order: NDArray[np.intp]) -> int:
        """Return how many lists, nearest first in ``order``, hold ``scan_rows`` rows (at least ``nprobe``)."""
        rows, lists = 0, 0
        for index in order.tolist():
            if rows >= self.params.scan_rows:
                break
            rows += self.blocks[index].n
            lists += 1
        return max(self.params.nprobe, lists)

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, dim: int, params: EngineParams, total: int, sample: Floats, chunks: Iterable[Rows]) -> Partition:
        """Build a partition of ``total`` rows from ``chunks``, training IVF lists on ``sample`` when large.

        The same rows and sample give the same partition (deterministic), whatever the chunk sizes.
        """
        part = cls(dim, params)
        if total <= params.exact_max:
            part.blocks = [Block(dim, total)]
            for chunk in chunks:
                part.blocks[0].append(chunk)
            part.blocks[0].trim()
            return part
        started = time.perf_counter()
        centroids = train_centroids(sample, params.lists_for(total), params)
        part._refill(centroids, total, chunks)
        part.train_seconds = time.perf_counter() - started
        return part

    @classmethod
    def from_blocks(
        cls, dim: int, params: EngineParams, centroids: Floats | None, trained_size: int, blocks: list[Block]
    ) -> Partition:
        """Return a partition made of ``blocks`` (one per centroid, or one for an exact partition)."""
        expected = 1 if centroids is None else len(centroids)
        if len(blocks) != expected:
            raise ValueError(f"blocks must number {expected}, found {len(blocks)}")
        part = cls(dim, params)
        part.centroids, part.trained_size, part.blocks = centroids, trained_size, blocks
        return part

    def lists(self) -> Iterator[Rows]:
        """Yield each list's rows (one for an exact partition), as views."""
        for block in self.blocks:
            yield block.rows()

    def list_sizes(self) -> list[int]:
        """Return the number of rows of each list."""
        return [block.n for block in self.blocks]

    # ------------------------------------------------------------------------------------------ helpers

    def _needs_training(self) -> bool:
        size = self.size
        if self.centroids is None:
            return size > self.params.exact_max
        return size >= self.params.retrain_growth * self.trained_size

    def _become_exact(self) -> None:
        block = Block(self.dim, self.size)
        for old in self._drain():
            block.append(old)
        self.centroids, self.blocks, self.trained_size = None, [block], 0

    def _drain(self) -> Iterator[Rows]:
        """Detach the lists now; return an iterator of their rows, in list order, dropping each once yielded."""
        blocks, self.blocks = self.blocks, []
        blocks.reverse()
        return _popping(blocks)

    def _refill(self, centroids: Floats, trained_size: int, chunks: Iterable[Rows]) -> None:
        """Make ``centroids`` the lists and move the rows of ``chunks`` in."""
        self.centroids = centroids
        self.trained_size = trained_size
        self.blocks = [Block(self.dim) for _ in range(len(centroids))]
        for chunk in chunks:
            self._distribute(chunk)
        for block in self.blocks:
            block.trim()

    def _distribute(self, rows: Rows) -> None:
        """Append each row to the list of its nearest centroid."""
        if self.centroids is None:
            raise RuntimeError("only an IVF partition distributes rows")
        if not len(rows):
            return
        assign = nearest(rows.vectors, self.centroids)
        order = np.argsort(assign, kind="stable")
        vectors, ids, patients, studies = (
            rows.vectors[order],
            rows.ids[order],
            rows.patients[order],
            rows.studies[order],
        )
        lists = assign[order]
        cuts = (np.flatnonzero(np.diff(lists)) + 1).tolist()
        blocks = self.blocks
        for start, end in zip([0, *cuts], [*cuts, len(lists)], strict=True):
            blocks[lists[start]].extend(vectors[start:end], ids[start:end], patients[start:end], studies[start:end])

    def _sample(self, count: int) -> Floats:
        """Return ``count`` rows drawn without replacement (seeded) from the rows held, in list order."""
        sizes = np.array(self.list_sizes(), dtype=np.int64)
        rng = np.random.default_rng(self.params.seed)
        picks = np.sort(rng.choice(int(sizes.sum()), size=count, replace=False))
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        which = np.searchsorted(starts, picks, side="right") - 1
        out = np.empty((count, self.dim), np.float32)
        for index in np.unique(which).tolist():
            chosen = which == index
            out[chosen] = self.blocks[index].vectors[picks[chosen] - starts[index]]
        return out


def _vector_array(rows: int, dim: int) -> Floats:
    """Return an uninitialised ``(rows, dim)`` float32 array; large ones in their own anonymous mapping.

    glibc serves allocations below its (self-raising, up to 32 MB) mmap threshold from the heap, where the
    lists' grow-and-free pattern leaves holes it never returns: RSS then drifts 20-30 % above the rows held.
    A mapping of its own is returned to the system as soon as the array is freed, and its pages become
    resident only when rows are written, so such blocks can double when full at no cost in memory.
    """
    if not _mapped(rows, dim):
        return np.empty((rows, dim), np.float32)
    mapping = mmap.mmap(-1, rows * dim * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: 2x slower faults
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # with THP "always", a huge page would make spare room resident
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, np.float32).reshape(rows, dim)


def _mapped(rows: int, dim: int) -> bool:
    """Return whether a vector block of ``rows`` rows gets a mapping of its own."""
    return rows * dim * 4 >= _OWN_MAPPING


def _popping(blocks: list[Block]) -> Iterator[Rows]:
    """Yield the rows of ``blocks`` from last to first, taking each out of the list (its memory can go)."""
    while blocks:
        yield blocks.pop().rows()


def dot_rows(rows: Floats, query: Floats) -> Floats:
    """Return ``rows @ query`` with numpy's own single-threaded loop rather than BLAS.

    A matrix-vector product is memory-bound, so one core already runs at memory speed; OpenBLAS would
    split it over threads, and on a machine shared with other busy threads (the worker's models) its
    threads wait for each other: measured here at 300k rows, a query's p95 went from ~80 ms to ~8 ms.
    """
    result: Floats = np.einsum("ij,j->i", rows, query)
    return result


def top_k(scores: Floats, ids: Int64s, k: int) -> Hits:
    """Return the ``k`` best finite scores and their ids, best first, ties by the smaller id."""
    finite = np.isfinite(scores)
    if not finite.all():
        scores, ids = scores[finite], ids[finite]
    if len(scores) > k:
        cut = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = np.flatnonzero(scores >= cut)
        scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores))[:k]
    return Hits(ids[order], scores[order])


def nearest(vectors: Floats, centroids: Floats) -> NDArray[np.intp]:
    """Return, for each unit row of ``vectors``, the index of the centroid of highest dot product."""
    out = np.empty(len(vectors), np.intp)
    step = max(1, _ASSIGN_FLOATS // max(1, len(centroids)))
    for start in range(0, len(vectors), step):
        out[start : start + step] = np.argmax(vectors[start : start + step] @ centroids.T, axis=1)
    return out


def train_centroids(sample: Floats, nlist: int, params: EngineParams) -> Floats:
    """Return ``nlist`` unit centroids from spherical k-means on ``sample`` (seeded, bounded in count and time).

    Initial centroids are distinct sample rows; an emptied centroid is re-seeded from a sample row; at most
    ``params.kmeans_iterations`` Lloyd steps run, fewer when ``params.kmeans_seconds`` is spent.
    """
    if len(sample) < nlist:
        raise ValueError(f"sample must have at least nlist={nlist} rows, found {len(sample)}")
    rng = np.random.default_rng(params.seed)
    centroids = sample[np.sort(rng.choice(len(sample), size=nlist, replace=False))].copy()
    deadline = time.monotonic() + params.kmeans_seconds
    for _ in range(params.kmeans_iterations):
        centroids = _lloyd_step(sample, centroids, rng)
        if time.monotonic() > deadline:
            break
    return centroids


def _lloyd_step(sample: Floats, centroids: Floats, rng: np.random.Generator) -> Floats:
    """Return the normalised means of the sample rows nearest each centroid (empty ones re-seeded)."""
    assign = nearest(sample, centroids)
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=len(centroids))
    filled = np.flatnonzero(counts)
    starts = np.concatenate(([0], np.cumsum(counts[filled])[:-1]))
    sums = np.zeros_like(centroids)
    sums[filled] = np.add.reduceat(sample[order], starts, axis=0)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        sums[empty] = sample[rng.choice(len(sample), size=len(empty), replace=False)]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    result: Floats = (sums / norms).astype(np.float32)
    return result
