"""What only the PostgreSQL backend has: LISTEN/NOTIFY wake-ups across hosts, its schema versions, and where
its password comes from (a real PostgreSQL; the behaviour both backends share is in test_store_states.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from cxr_node.errors import InvalidTransition, StorageError
from cxr_node.jobs.postgres import PASSWORD_ENV, PostgresStore, password, redact
from cxr_node.jobs.states import JobState
from tests.postgres import PostgresServer
from tests.unit.test_jobs import new_job


@pytest.fixture
def store(postgres_url: str, postgres_server: PostgresServer) -> PostgresStore:
    """A store on a fresh database."""
    opened = PostgresStore(postgres_url, postgres_server.password)
    yield opened
    opened.close()


def test_a_queued_job_on_one_host_wakes_a_worker_listening_on_another(
    store: PostgresStore, postgres_url: str, postgres_server: PostgresServer
) -> None:
    """NOTIFY travels with the commit: the listener wakes for a queued job, not for a skipped one, and not for
    a transaction that rolled back."""
    other_host = PostgresStore(postgres_url, postgres_server.password)
    listener = other_host.listen("queued")
    try:
        assert listener.active
        store.jobs.record(new_job("8.1"), JobState.SKIPPED, "modality OT")
        assert not listener.wait(0.3)

        def rolled_back() -> None:
            with store.db.transaction():
                store.db.wake("queued")
                raise InvalidTransition("rolled back on purpose")

        with pytest.raises(InvalidTransition):
            rolled_back()
        assert not listener.wait(0.3)
        woken = threading.Event()
        waiter = threading.Thread(target=lambda: woken.set() if listener.wait(10) else None)
        waiter.start()
        store.jobs.record(new_job("8.3"), JobState.QUEUED)
        waiter.join(10)
        assert woken.is_set()
        assert not listener.wait(0.1)  # every pending call was consumed
    finally:
        listener.close()
        other_host.close()


def test_a_listener_survives_the_database_dropping_its_connection(
    store: PostgresStore, postgres_server: PostgresServer
) -> None:
    """The server ends the LISTEN connection (a restart, a fail-over): waits become timeouts, then the listener
    connects again by itself and wakes as before."""
    listener = store.listen("deliveries")
    try:
        with postgres_server.connect() as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            ).fetchall()
        assert ended == [(True,)]
        assert not listener.wait(0.5)
        assert listener.wait(0.2) is False  # reconnected (or still trying); never raises
        deadline = time.monotonic() + 10
        while not listener.active and time.monotonic() < deadline:
            listener.wait(0.1)
        with store.db.transaction():
            store.db.wake("deliveries")
        assert listener.wait(5)
    finally:
        listener.close()


def test_read_only_open_of_an_empty_database_says_to_run_db_upgrade(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    """`cxr-node status` before any role ran: one line telling the operator what to run."""
    with pytest.raises(StorageError, match="run `cxr-node db upgrade`"):
        PostgresStore(postgres_url, postgres_server.password, readonly=True)


def test_a_schema_newer_than_this_node_is_refused(
    store: PostgresStore, postgres_url: str, postgres_server: PostgresServer
) -> None:
    """A database a newer cxr-node migrated is never written by an older one."""
    with psycopg.connect(postgres_url, password=postgres_server.password, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StorageError, match="schema 99 is newer than this cxr-node"):
        PostgresStore(postgres_url, postgres_server.password)


def test_the_password_comes_from_an_owner_only_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0600 file's first line; a file others may read is refused; without a file, CXR_NODE_DB_PASSWORD."""
    secret = tmp_path / "db-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    assert password(secret) == "s3cret"
    secret.chmod(0o644)
    with pytest.raises(StorageError, match="others may read it; chmod 600"):
        password(secret)
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert password(None) == "from-env"
    monkeypatch.delenv(PASSWORD_ENV)
    assert password(None) is None
    assert redact("postgresql://u:p@h:5432/d") == "postgresql://u:***@h:5432/d"


def test_a_pooled_connection_the_server_ended_is_replaced_after_idling(
    store: PostgresStore, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends the store's connections (a restart, a fail-over): once a connection has idled past
    CHECK_IDLE_S, the pool tries it before use and opens a new one, so the next call simply works."""
    import cxr_node.jobs.postgres as backend

    assert store.jobs.counts()[JobState.QUEUED] == 0
    with postgres_server.connect() as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'cxr' AND pid <> pg_backend_pid()"
        ).fetchall()
    assert ended and all(row == (True,) for row in ended)
    monkeypatch.setattr(backend, "CHECK_IDLE_S", 0.0)
    store.jobs.record(new_job("8.9"), JobState.QUEUED)
    assert store.jobs.counts()[JobState.QUEUED] == 1
