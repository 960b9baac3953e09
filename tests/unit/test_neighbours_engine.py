"""The in-memory search structure: blocks, exact/IVF partitions, training, ranking, checkpoint files."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_node.neighbours import checkpoint
from cxr_node.neighbours.engine import (
    Block,
    EngineParams,
    Exclusion,
    Partition,
    Rows,
    key_of,
    top_k,
    train_centroids,
)

DIM = 16
PARAMS = EngineParams(exact_max=300, nprobe=4, scan_rows=1, train_per_list=8)


def rows(start: int, count: int, seed: int = 0, patient: int = 0, study: int = 0) -> Rows:
    """Return ``count`` random unit rows with ids ``start..`` and the given exclusion keys."""
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(start, start + count, dtype=np.int64)
    return Rows(vectors, ids, np.full(count, patient, np.int64), np.full(count, study, np.int64))


def exact(batch: Rows, query: np.ndarray, k: int) -> list[int]:
    """Return the exact top-k ids of ``batch`` for ``query`` (ties by id)."""
    scores = batch.vectors @ query
    return batch.ids[np.lexsort((batch.ids, -scores))][:k].tolist()


def test_top_k_breaks_ties_by_smaller_id_and_drops_excluded() -> None:
    """Equal scores come back smaller id first; -inf (excluded) scores never come back."""
    scores = np.array([0.5, 0.9, 0.5, -np.inf, 0.5], np.float32)
    hits = top_k(scores, np.array([40, 10, 20, 5, 30], np.int64), 3)
    assert hits.ids.tolist() == [10, 20, 30]
    assert top_k(scores, np.arange(5, dtype=np.int64), 10).ids.tolist() == [1, 0, 2, 4]


def test_block_grows_removes_in_order_and_trims() -> None:
    """A block grows by at most a quarter, keeps row order on removal and gives spare room back."""
    block = Block(DIM)
    for start in range(0, 1000, 100):
        block.append(rows(start, 100, seed=start))
        assert len(block.ids) <= max(1.25 * block.n + 16, 116)
    assert block.remove(np.arange(0, 1000, 2, dtype=np.int64)) == 500
    assert block.rows().ids.tolist() == list(range(1, 1000, 2))
    assert len(block.ids) == block.n == 500


def test_partition_turns_ivf_past_the_threshold_and_retrains_as_it_grows() -> None:
    """Every row stays findable through exact -> IVF -> retrained IVF, and a full scan equals brute force."""
    part = Partition(DIM, PARAMS)
    added = []
    for start in range(0, 2400, 200):
        batch = rows(start, 200, seed=start)
        part.add(batch)
        added.append(batch)
    every = Rows.concat(added, DIM)
    assert part.kind == "ivf"
    assert part.trained_size >= PARAMS.retrain_growth * (PARAMS.exact_max + 1)  # retrained since it turned IVF
    assert part.all_ids().tolist() == list(range(2400))
    nlist = len(part.list_sizes())
    for query in rows(0, 5, seed=99).vectors:
        assert part.search(query, 10, Exclusion(), nprobe=nlist).ids.tolist() == exact(every, query, 10)


def test_ivf_search_scans_lists_until_the_row_budget_is_met() -> None:
    """Without an explicit nprobe, lists are scanned nearest first until ``scan_rows`` rows: all of them, exactly."""
    every = rows(0, 1500, seed=8)
    part = Partition(DIM, EngineParams(exact_max=300, nprobe=1, scan_rows=1500, train_per_list=8))
    part.add(every)
    assert part.kind == "ivf"
    for query in rows(0, 5, seed=9).vectors:
        assert part.search(query, 10, Exclusion()).ids.tolist() == exact(every, query, 10)


def test_ivf_search_widens_until_k_rows_pass_the_exclusion() -> None:
    """When the nearest lists hold only the excluded patient, the search scans further and still returns k rows."""
    base = rows(0, 400, seed=1, patient=key_of("P"))
    query = base.vectors[0]
    close = query + 0.01 * base.vectors
    near = Rows(close / np.linalg.norm(close, axis=1, keepdims=True), base.ids, base.patients, base.studies)
    others = rows(400, 1200, seed=2)
    part = Partition(DIM, PARAMS)
    part.add(Rows.concat([near, others], DIM))
    hits = part.search(query, 10, Exclusion(patient=key_of("P")), nprobe=1)
    assert len(hits.ids) == 10
    assert (hits.ids >= 400).all()


def test_training_is_deterministic_and_bounded() -> None:
    """The same sample and seed give the same centroids; one Lloyd step is enough to stop in time."""
    sample = rows(0, 500, seed=3).vectors
    first = train_centroids(sample, 20, PARAMS)
    assert np.array_equal(first, train_centroids(sample, 20, PARAMS))
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    quick = EngineParams(kmeans_iterations=50, kmeans_seconds=1e-9)
    assert train_centroids(sample, 20, quick).shape == (20, DIM)
    with pytest.raises(ValueError, match="sample"):
        train_centroids(sample[:5], 20, PARAMS)


def test_bulk_build_equals_itself_whatever_the_chunks() -> None:
    """Building from the same rows and sample gives the same lists, whether fed in one chunk or many."""
    every = rows(0, 1200, seed=4)
    sample = every.vectors[::4]
    one = Partition.build(DIM, PARAMS, 1200, sample, iter([every]))
    many = Partition.build(DIM, PARAMS, 1200, sample, (every.take(slice(s, s + 97)) for s in range(0, 1200, 97)))
    assert one.kind == many.kind == "ivf"
    assert [r.ids.tolist() for r in one.lists()] == [r.ids.tolist() for r in many.lists()]


@pytest.mark.parametrize("size", [0, 50, 900], ids=["empty", "exact", "ivf"])
def test_checkpoint_round_trip(tmp_path: Path, size: int) -> None:
    """A written checkpoint reads back to the same partitions, centroids and watermark."""
    store, library = Partition(DIM, PARAMS), Partition(DIM, PARAMS)
    store.add(rows(1, size, seed=5))
    library.add(rows(5000, 7, seed=6))
    path = checkpoint.path_for(tmp_path, "v1")
    snap = checkpoint.Snapshot("v1", 3, 5006, DIM, {False: store, True: library})
    checkpoint.write(path, snap)
    back = checkpoint.read(path, PARAMS)
    assert (back.version, back.generation, back.watermark, back.dim) == ("v1", 3, 5006, DIM)
    for original, loaded in ((store, back.partitions[False]), (library, back.partitions[True])):
        assert loaded.kind == original.kind
        if original.centroids is not None:
            assert np.array_equal(loaded.centroids, original.centroids)
        for a, b in zip(original.lists(), loaded.lists(), strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(a.__dict__.values(), b.__dict__.values(), strict=True))


def test_checkpoint_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """A temporary file left by a killed writer of this host goes at the next write; a live writer's stays, and
    so does one another host writes into a shared folder (its process ids are not this host's)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    path = checkpoint.path_for(tmp_path, "v1")
    stale = path.with_name(f"{path.name}.{pid}@{socket.gethostname()}{checkpoint.PARTIAL}")
    stale_unnamed = path.with_name(f"{path.name}.{pid}{checkpoint.PARTIAL}")  # written before hosts were named
    live = path.with_name(f"{path.name}.1{checkpoint.PARTIAL}")  # pid 1 always runs
    elsewhere = path.with_name(f"{path.name}.{pid}@another-host.example{checkpoint.PARTIAL}")
    for temp in (stale, stale_unnamed, live, elsewhere):
        temp.write_bytes(b"half")
    checkpoint.write(path, checkpoint.Snapshot("v1", 1, 0, DIM, {False: Partition(DIM, PARAMS)}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, elsewhere.name])


def test_engine_params_are_checked() -> None:
    """Impossible settings raise ValueError naming the setting."""
    with pytest.raises(ValueError, match="nprobe"):
        EngineParams(nprobe=0)
    with pytest.raises(ValueError, match="retrain_growth"):
        EngineParams(retrain_growth=1.0)
    assert EngineParams().lists_for(1_000_000) == 1000
    assert EngineParams().lists_for(100) == 12


def test_default_settings_keep_recall_as_an_index_grows_to_200k() -> None:
    """Grown by adds through exact, IVF and two retrainings, 200,000 clustered rows keep recall@10 >= 0.95."""
    rng = np.random.default_rng(7)
    dim, count = 128, 200_000
    centres = rng.standard_normal((300, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n: int) -> np.ndarray:
        rows = centres[rng.integers(0, 300, n)] + rng.standard_normal((n, dim)).astype(np.float32) * 0.07
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    stored, queries = draw(count), draw(50)
    part = Partition(dim, EngineParams())
    zeros = np.zeros(count, np.int64)
    for start in range(0, count, 5000):
        part.add(Rows(stored[start : start + 5000], np.arange(start, start + 5000), zeros[:5000], zeros[:5000]))
    assert part.kind == "ivf"
    every = Rows(stored, np.arange(count), zeros, zeros)
    found = [set(part.search(q, 10, Exclusion()).ids.tolist()) & set(exact(every, q, 10)) for q in queries]
    assert sum(len(f) for f in found) / (10 * len(queries)) >= 0.95
