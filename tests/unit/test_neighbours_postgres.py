"""The PostgreSQL case store itself: turn-taking writers, the change counter, snapshots, counts, schema, logins."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from cxr_node.errors import StorageError
from cxr_node.neighbours import NewCase
from cxr_node.neighbours.postgres import APPLICATION, SCHEMA_VERSION, PgCaseStore
from cxr_node.neighbours.store import SqliteCaseStore
from tests.postgres import PostgresServer

VERSION = "demo-1.0"
DIM = 8
BLOCKED_S = 0.5  # how long a second writer is watched to stay blocked
WAIT_S = 30.0


def unit(count: int, seed: int = 0) -> np.ndarray:
    """Return ``count`` random unit float32 rows of length :data:`DIM`."""
    rows = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def new_case(row: int, study: str | None = None, **extra: Any) -> NewCase:
    """Return the case of row ``row`` (its own study unless given)."""
    return NewCase(f"1.2.{row}", study or f"1.3.{row}", f"A{row}", "20240102", f"p{row}", **extra)


def add(store: PgCaseStore, rows: range, version: str = VERSION, **extra: Any) -> list[int]:
    """Insert one case per row in one transaction; return the new embeddings' ids."""
    with store.transaction() as tx:
        _, changes = store.insert(tx, version, unit(len(rows), rows.start), [new_case(r, **extra) for r in rows])
    return sorted(i for added in changes.added.values() for i in added.ids)


def add_then_fail(store: PgCaseStore) -> None:
    """Insert one case, then fail before the commit."""
    with store.transaction() as tx:
        store.insert(tx, VERSION, unit(1, 9), [new_case(9)])
        raise RuntimeError("rolled back")


@pytest.fixture
def password(postgres_server: PostgresServer) -> str:
    """The node role's password."""
    return postgres_server.password


@pytest.fixture
def store(postgres_url: str, password: str) -> Iterator[PgCaseStore]:
    """A store on a fresh database."""
    opened = PgCaseStore(postgres_url, password)
    yield opened
    opened.close()


@pytest.fixture
def other(postgres_url: str, password: str) -> Iterator[PgCaseStore]:
    """A second store on the same database: another host."""
    opened = PgCaseStore(postgres_url, password)
    yield opened
    opened.close()


def test_writers_on_two_hosts_take_turns_so_ids_follow_commit_order(store: PgCaseStore, other: PgCaseStore) -> None:
    """A second host's write transaction starts (reads included) only once the first has committed, so it sees
    the first's rows and its embedding ids are all above the first's."""
    entered = threading.Event()
    later: list[int] = []

    def second() -> None:
        with other.transaction() as tx:
            entered.set()
            assert other.count(VERSION) == 5
            _, changes = other.insert(tx, VERSION, unit(5, 5), [new_case(r) for r in range(5, 10)])
        later.extend(i for added in changes.added.values() for i in added.ids)

    with store.transaction() as tx:
        _, changes = store.insert(tx, VERSION, unit(5), [new_case(r) for r in range(5)])
        writer = threading.Thread(target=second)
        writer.start()
        assert not entered.wait(BLOCKED_S), "the second writer did not wait for the first"
    writer.join(WAIT_S)
    first = [i for added in changes.added.values() for i in added.ids]
    assert len(later) == 5
    assert min(later) > max(first)


def test_a_write_waiting_past_the_lock_timeout_fails_and_leaves_the_other_alone(
    store: PgCaseStore, postgres_url: str, password: str
) -> None:
    """A write that waits longer than ``lock_timeout_s`` for another host's raises StorageError (once, quickly);
    the other's write commits."""
    impatient = PgCaseStore(postgres_url, password, lock_timeout_s=0.2)
    try:
        with store.transaction() as tx:
            store.insert(tx, VERSION, unit(2), [new_case(r) for r in range(2)])
            started = time.monotonic()
            with pytest.raises(StorageError, match="lock timeout"):
                add(impatient, range(2, 3))
            assert time.monotonic() - started < 5.0
        assert impatient.count(VERSION) == 2
        assert add(impatient, range(2, 3))
    finally:
        impatient.close()


def test_data_version_moves_on_every_commit_of_any_host_and_not_on_reads(
    store: PgCaseStore, other: PgCaseStore
) -> None:
    """Adds, labels and purges committed by another host change data_version; reads and rollbacks do not."""
    seen = [store.data_version()]
    add(other, range(3))
    seen.append(store.data_version())
    other.set_label("1.3.1", "covid")
    seen.append(store.data_version())
    with other.transaction() as tx:
        other.purge(tx, "1.3.2")
    seen.append(store.data_version())
    assert len(set(seen)) == 4
    other.cases([1, 2])
    assert sum(len(rows) for rows in other.stream(VERSION, False, DIM, 0, 10)) == 2
    with pytest.raises(RuntimeError, match="rolled back"):
        add_then_fail(other)
    assert store.data_version() == seen[-1]
    assert other.count(VERSION) == 2


def test_snapshot_does_not_see_commits_made_during_it(store: PgCaseStore, other: PgCaseStore) -> None:
    """Inside ``snapshot()`` every read sees the same state; another host's commit shows after the block."""
    add(store, range(4))
    with store.snapshot():
        before = (store.max_id(VERSION), store.count(VERSION), store.data_version())
        add(other, range(4, 8))
        assert (store.max_id(VERSION), store.count(VERSION), store.data_version()) == before
        assert sum(len(rows) for rows in store.stream(VERSION, False, DIM, 0, 100)) == 4
    assert store.count(VERSION) == 8
    assert store.max_id(VERSION) > before[0]


def test_partition_counts_follow_every_write(store: PgCaseStore, postgres_url: str, password: str) -> None:
    """The partition counts the replicas compare equal COUNT(*) after adds, a promotion, a purge and a rebuild."""

    def counted() -> dict[tuple[str, bool], int]:
        with psycopg.connect(postgres_url, password=password) as conn:
            rows = conn.execute("SELECT model_version, library, count(*) FROM embeddings GROUP BY 1, 2").fetchall()
        return {(version, library): n for version, library, n in rows}

    def kept() -> dict[tuple[str, bool], int]:
        found = {(v, lib): store.count(v, lib) for v in store.versions() for lib in (False, True)}
        return {key: n for key, n in found.items() if n}

    add(store, range(10))
    add(store, range(10), version="v2")
    add(store, range(10, 14), source="library")
    assert kept() == counted() == {(VERSION, False): 10, ("v2", False): 10, (VERSION, True): 4}
    with store.transaction() as tx:
        store.insert(tx, VERSION, unit(1), [new_case(0, source="library")])  # promotes case 0 in both versions
    with store.transaction() as tx:
        store.purge(tx, "1.3.5")
    assert kept() == counted() == {(VERSION, False): 8, ("v2", False): 8, (VERSION, True): 5, ("v2", True): 1}
    with store.transaction() as tx:
        store.replace(tx, VERSION, DIM, [(new_case(r), unit(1, r)[0]) for r in range(3)])
    assert kept() == counted()
    assert store.count(VERSION) == 3


def test_ids_only_grow_even_after_the_highest_is_purged(store: PgCaseStore) -> None:
    """A purged embedding's id is never handed out again (the identity sequence never goes back)."""
    first = add(store, range(3))
    with store.transaction() as tx:
        store.purge(tx, "1.3.2")
    assert store.max_id(VERSION) == first[1]
    again = add(store, range(3, 4))
    assert again[0] > first[-1]


def test_versions_sort_as_in_sqlite(store: PgCaseStore, tmp_path: Path) -> None:
    """Model versions come back in the same (code-point) order from both backends."""
    sqlite = SqliteCaseStore(tmp_path / "cases.sqlite3")
    names = ["b-1", "B-1", "a-1", "_x", "a-10", "a-2"]
    for number, name in enumerate(names):
        for backend in (store, sqlite):
            with backend.transaction() as tx:
                backend.insert(tx, name, unit(1), [new_case(number)])  # type: ignore[arg-type]
    assert store.versions() == sqlite.versions() == sorted(names)
    sqlite.close()


def test_hosts_starting_together_create_the_schema_once(postgres_url: str, password: str) -> None:
    """Four stores opened at once on a fresh database all open; the schema version is recorded once."""
    opened: list[PgCaseStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(PgCaseStore(postgres_url, password))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    for one in opened:
        one.close()
    assert (errors, len(opened)) == ([], 4)
    with psycopg.connect(postgres_url, password=password) as conn:
        assert conn.execute("SELECT version FROM neighbour_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused_naming_both_versions(store: PgCaseStore, postgres_url: str, password: str) -> None:
    """A database migrated by a newer cxr-node is not opened: the error names its version and ours."""
    with psycopg.connect(postgres_url, password=password) as conn:
        conn.execute("UPDATE neighbour_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match=rf"neighbour schema {SCHEMA_VERSION + 1} is newer .*\({SCHEMA_VERSION}\)"):
        PgCaseStore(postgres_url, password)


def test_a_refused_login_fails_at_once_without_showing_the_password(postgres_url: str) -> None:
    """A wrong password raises StorageError naming the database, never the password, and quickly."""
    url = postgres_url.replace("cxr@", "cxr:not-the-password@")
    with pytest.raises(StorageError, match="cannot connect") as raised:
        PgCaseStore(url)
    assert "not-the-password" not in str(raised.value)
    assert "cxr:***@" in str(raised.value)


def drop_connections(server: PostgresServer) -> int:
    """End every connection of the index stores at the server (what a restart or a failover does)."""
    with server.connect() as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
            (APPLICATION,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_connections_the_server_dropped_are_replaced_on_the_next_call(
    store: PgCaseStore, postgres_server: PostgresServer
) -> None:
    """After the server dropped the pool's connections (a restart, a failover), reads, snapshots and writes
    just work: each runs once more on a fresh connection."""
    add(store, range(3))
    assert drop_connections(postgres_server) >= 1
    assert store.count(VERSION) == 3
    assert drop_connections(postgres_server) >= 1
    with store.snapshot():
        assert len(store.cases([1, 2, 3])) == 3
    assert drop_connections(postgres_server) >= 1
    add(store, range(3, 5))
    assert store.count(VERSION) == 5
