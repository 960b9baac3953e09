"""Several hosts on one PostgreSQL case store: each worker's in-memory replica follows what the others commit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cxr_node.neighbours import CHECKPOINTS, EngineParams, NewCase, ReplicaIndex
from cxr_node.neighbours.checkpoint import path_for
from tests.index_backends import IndexBackend
from tests.postgres import PostgresServer

VERSION = "demo-1.0"
DIM = 32
SMALL_IVF = EngineParams(exact_max=400, nprobe=8, scan_rows=1, train_per_list=16)  # approximate at test sizes
ADDS_PER_WRITER = 60
WAIT_S = 60.0


def unit(count: int, seed: int) -> np.ndarray:
    """Return ``count`` random unit float32 rows."""
    rows = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def new_case(row: int, **extra: str) -> NewCase:
    """Return the case of row ``row``: its own patient and study."""
    return NewCase(f"1.2.826.0.1.{row}", f"1.2.826.0.2.{row}", f"A{row}", "20240102", f"p{row}", **extra)  # type: ignore[arg-type]


def top(index: ReplicaIndex, vector: np.ndarray, k: int = 1, **kwargs: bool) -> list[str]:
    """Return the SOP Instance UIDs of the ``k`` nearest cases (nothing excluded)."""
    found = index.query(VERSION, vector, k, patient_hash=None, study_instance_uid=None, **kwargs)
    return [n.case.sop_instance_uid for n in found]


@pytest.fixture
def database(postgres_server: PostgresServer, postgres_url: str) -> IndexBackend:
    """One PostgreSQL database for every host of the test."""
    return IndexBackend("postgresql", postgres_url, postgres_server.password)


@pytest.fixture(params=[EngineParams(), SMALL_IVF], ids=["exact", "ivf"])
def params(request: pytest.FixtureRequest) -> EngineParams:
    """Search settings: exact partitions, and IVF lists at test sizes."""
    result: EngineParams = request.param
    return result


@pytest.fixture
def hosts(tmp_path: Path, database: IndexBackend, params: EngineParams) -> Iterator[tuple[ReplicaIndex, ReplicaIndex]]:
    """Two hosts' indexes: one database, each its own local folder (checkpoints)."""
    with database.open(tmp_path / "a" / "index", params) as a, database.open(tmp_path / "b" / "index", params) as b:
        yield a, b


def test_each_host_finds_what_the_other_added_at_its_next_query(hosts: tuple[ReplicaIndex, ReplicaIndex]) -> None:
    """A case committed on one host is found by the other host's very next query, in both directions."""
    a, b = hosts
    stored = unit(700, seed=1)
    a.add_many(VERSION, stored[:500], [new_case(r) for r in range(500)])
    assert top(b, stored[3]) == [new_case(3).sop_instance_uid]
    loaded = b.stats(VERSION)
    for row in range(500, 520):
        a.add(VERSION, stored[row], new_case(row))
        assert top(b, stored[row]) == [new_case(row).sop_instance_uid]
    b.add_many(VERSION, stored[520:700], [new_case(r, source="library", label="covid") for r in range(520, 700)])
    assert top(a, stored[650], library_only=True) == [new_case(650).sop_instance_uid]
    assert a.stats(VERSION).size == b.stats(VERSION).size == a.size(VERSION) == 700
    assert b.stats(VERSION).load_seconds == loaded.load_seconds  # followed by the tail, never loaded again


def test_a_purge_on_one_host_is_never_served_by_the_other(
    hosts: tuple[ReplicaIndex, ReplicaIndex], tmp_path: Path, database: IndexBackend, params: EngineParams
) -> None:
    """After host A purges a study, host B's next query leaves it out, and B's checkpoint holding it is gone."""
    a, b = hosts
    stored = unit(600, seed=2)
    a.add_many(VERSION, stored, [new_case(r) for r in range(600)])
    assert top(b, stored[7]) == [new_case(7).sop_instance_uid]
    assert b.checkpoint(VERSION) == 1
    b_file = path_for(tmp_path / "b" / "index" / CHECKPOINTS, VERSION)
    assert a.purge_study(new_case(7).study_instance_uid) == 1
    assert new_case(7).sop_instance_uid not in top(b, stored[7], k=600)
    assert not b_file.exists()
    assert b.checkpoint(VERSION) == 1
    assert stored[7].astype("<f4").tobytes() not in b_file.read_bytes()
    assert a.purge_study(new_case(8).study_instance_uid) == 1  # B not running: its checkpoint still holds case 8
    with database.open(tmp_path / "b" / "index", params) as restarted:
        assert new_case(8).sop_instance_uid not in top(restarted, stored[8], k=600)
        assert not b_file.exists()  # the file that held the purged case, deleted on load
        assert restarted.stats(VERSION).size == 598


def test_a_checkpoint_written_during_a_purge_elsewhere_is_deleted(
    hosts: tuple[ReplicaIndex, ReplicaIndex], tmp_path: Path
) -> None:
    """A checkpoint does not hold other hosts' writes off; one that lands holding a case purged meanwhile is
    deleted by the same call, once it has caught up."""
    a, b = hosts
    stored = unit(300, seed=3)
    a.add_many(VERSION, stored, [new_case(r) for r in range(300)])
    top(b, stored[0])
    b_file = path_for(tmp_path / "b" / "index" / CHECKPOINTS, VERSION)
    real_write = b._write_checkpoint

    def write_then_purge(version: str) -> bool:
        written = real_write(version)
        a.purge_study(new_case(9).study_instance_uid)  # commits while B's file is being written
        return written

    b._write_checkpoint = write_then_purge  # type: ignore[method-assign]
    assert b.checkpoint(VERSION) == 1
    assert not b_file.exists()
    assert new_case(9).sop_instance_uid not in top(b, stored[9], k=300)


def test_concurrent_writers_on_two_hosts_are_followed_by_a_third(
    tmp_path: Path, database: IndexBackend, params: EngineParams
) -> None:
    """Two hosts adding one image at a time while a third queries: the third ends holding every row, each
    found by its own vector, and its count equals the database's."""
    stored = unit(2 * ADDS_PER_WRITER, seed=4)
    seed_rows = unit(450, seed=5)
    errors: list[BaseException] = []
    with database.open(tmp_path / "c" / "index", params) as reader:
        reader.add_many(VERSION, seed_rows, [new_case(10_000 + r) for r in range(450)])

        def write(host: str, rows: range) -> None:
            try:
                with database.open(tmp_path / host / "index", params) as writer:
                    for row in rows:
                        writer.add(VERSION, stored[row], new_case(row))
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=write, args=("a", range(0, ADDS_PER_WRITER))),
            threading.Thread(target=write, args=("b", range(ADDS_PER_WRITER, 2 * ADDS_PER_WRITER))),
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + WAIT_S
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            top(reader, stored[0])
        for thread in threads:
            thread.join(WAIT_S)
        assert errors == []
        for row in range(2 * ADDS_PER_WRITER):
            assert top(reader, stored[row]) == [new_case(row).sop_instance_uid]
        assert reader.stats(VERSION).size == reader.size(VERSION) == 450 + 2 * ADDS_PER_WRITER
