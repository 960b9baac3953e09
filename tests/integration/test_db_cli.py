"""`cxr-node db upgrade` and `cxr-node db migrate`: a single-host node's store moved onto a real PostgreSQL with
every row, id and output UID kept, and the CLI's one-line refusals."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cxr_node.app import Receiver
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.jobs import spool
from cxr_node.jobs.leases import Holder
from cxr_node.jobs.postgres import PostgresStore
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import DeliveryState, JobState
from cxr_node.neighbours import ReplicaIndex
from cxr_node.neighbours.postgres import PgCaseStore
from tests.integration.helpers import echo, small_cr, store_all, write_config
from tests.integration.test_cli import cli
from tests.postgres import PostgresServer
from tests.unit.test_jobs import new_job
from tests.unit.test_neighbours import VERSION, clustered, fill, new_case, row_of
from tests.unit.test_store_states import NOT_ANALYSED, output

WORKER = Holder("worker", "old-host", 1, 1)


def single_host_store(path: Path) -> dict[str, int]:
    """A store with a job in every kind of place: delivered, written (one delivery open), running, queued,
    skipped; return job ids by name."""
    store = SqliteStore(path)
    try:
        ids = {}
        for name in ("delivered", "written", "running"):
            job, _ = store.jobs.record(new_job(f"7.{name}"), JobState.QUEUED)
            ids[name] = job.id
        for name in ("delivered", "written"):
            store.jobs.claim(1, WORKER, 60)
            store.results.save_result(ids[name], NOT_ANALYSED, b"\0" * 16)
            store.results.save_outputs(ids[name], [output("sr"), output("sc")], ("pacs",))
        for kind in ("sr", "sc"):
            store.deliveries.record(ids["delivered"], "pacs", kind, DeliveryState.DELIVERED, 0, None)
        store.deliveries.record(ids["written"], "pacs", "sr", DeliveryState.DELIVERED, 0, None)
        store.jobs.claim(1, WORKER, 60)  # "running" stays with the old host's worker
        ids["queued"] = store.jobs.record(new_job("7.queued"), JobState.QUEUED)[0].id
        ids["skipped"] = store.jobs.record(new_job("7.skipped"), JobState.SKIPPED, "modality OT")[0].id
        with store.db.transaction() as db:  # the old node stopped long ago
            db.execute("UPDATE holders SET renewed_at = ?", (time.time() - 3600,))
        return ids
    finally:
        store.close()


def pg_settings(settings: Settings, url: str, password_file: Path) -> Settings:
    """``settings`` pointed at the PostgreSQL database ``url``."""
    return settings.with_overrides({"storage.database": url, "storage.database_password_file": password_file})


def test_migrate_moves_every_row_with_ids_and_uids_kept(
    settings: Settings, postgres_url: str, postgres_server: PostgresServer, postgres_password_file: Path, tmp_path: Path
) -> None:
    """Every job, event, result, output and delivery arrives; ids and output UIDs are unchanged; the job the old
    worker was running is re-queued; new jobs continue after the highest id; the open delivery is still due."""
    source = settings.storage.root / spool.DB_NAME
    ids = single_host_store(source)
    stored = clustered(np.random.default_rng(3), 60)
    index = ReplicaIndex(settings.storage.root / "index")
    fill(index, stored)
    index.close()
    config = write_config(pg_settings(settings, postgres_url, postgres_password_file), tmp_path / "node.yaml")
    done = cli("db", "migrate", "--from", f"sqlite:{source}", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "running job(s) re-queued" in done.stdout
    assert "index embeddings" in done.stdout
    replica = ReplicaIndex(tmp_path / "replica", store=PgCaseStore(postgres_url, postgres_server.password))
    try:  # the same cases, numbered as before, and new ones after them
        found = replica.query(VERSION, stored[7], 3, patient_hash=None, study_instance_uid=None)
        assert row_of(found[0].case.sop_instance_uid) == 7
        assert replica.size(VERSION) == 60
        [added] = replica.add_many(VERSION, stored[:1], [new_case(999)])
        assert added.case_id == 61
    finally:
        replica.close()
    old, new = SqliteStore(source, readonly=True), PostgresStore(postgres_url, postgres_server.password)
    try:
        for job in old.jobs.query():
            moved = new.jobs.get(job.id)
            assert moved is not None and moved.instance_key == job.instance_key
            expected = JobState.QUEUED if job.id == ids["running"] else job.state
            assert moved.state is expected
            assert new.jobs.history(job.id)[: len(old.jobs.history(job.id))] == old.jobs.history(job.id)
            assert new.results.outputs(job.id) == old.results.outputs(job.id)
        assert new.results.result(ids["written"]).embedding == b"\0" * 16
        assert [(d.job_id, d.kind) for d in new.deliveries.due("pacs", time.time(), 10)] == [(ids["written"], "sc")]
        assert new.deliveries.counts() == old.deliveries.counts()
        assert new.jobs.record(new_job("7.after"), JobState.QUEUED)[0].id == max(ids.values()) + 1
    finally:
        old.close()
        new.close()
    again = cli("db", "migrate", "--from", f"sqlite:{source}", "--config", str(config))
    assert again.returncode != 0 and again.stderr.count("\n") == 1
    assert "already holds jobs" in again.stderr


def test_migrate_refuses_a_node_that_still_runs(
    settings: Settings, postgres_url: str, postgres_password_file: Path, tmp_path: Path
) -> None:
    """A holder renewed a moment ago: the node still runs; nothing is copied and the message says to stop it."""
    source = settings.storage.root / spool.DB_NAME
    store = SqliteStore(source)
    store.jobs.renew(WORKER, 60)
    store.close()
    config = write_config(pg_settings(settings, postgres_url, postgres_password_file), tmp_path / "node.yaml")
    done = cli("db", "migrate", "--from", str(source), "--config", str(config))
    assert done.returncode != 0 and done.stderr.count("\n") == 1
    assert "still runs" in done.stderr and "Traceback" not in done.stderr


def test_upgrade_creates_then_finds_current_and_migrates_an_old_sqlite_file(
    settings: Settings, postgres_url: str, postgres_password_file: Path, tmp_path: Path
) -> None:
    """On PostgreSQL: created, then already current. On SQLite: a version-5 file is migrated in place."""
    config = write_config(pg_settings(settings, postgres_url, postgres_password_file), tmp_path / "pg.yaml")
    first, second = (cli("db", "upgrade", "--config", str(config)) for _ in range(2))
    assert first.returncode == 0 and "(created)" in first.stdout, first.stderr
    assert second.returncode == 0 and "(already current)" in second.stdout
    path = settings.storage.root / spool.DB_NAME
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:  # back to version 5: no delivery leases, no event holders, no go-live modes
        db.executescript(
            "ALTER TABLE deliveries DROP COLUMN holder; ALTER TABLE deliveries DROP COLUMN lease_until;"
            " ALTER TABLE job_events DROP COLUMN holder; ALTER TABLE outputs DROP COLUMN mode;"
            " DROP TABLE model_modes; DROP TABLE model_mode_events; PRAGMA user_version = 5;"
        )
    done = cli("db", "upgrade", "--config", str(write_config(settings, tmp_path / "lite.yaml")))
    assert done.returncode == 0 and "(migrated from 5)" in done.stdout, done.stderr


def test_a_password_in_the_url_is_refused_without_echoing_it(settings: Settings, tmp_path: Path) -> None:
    """The configuration names the problem and where the password goes; the password never reaches stderr."""
    config = write_config(settings, tmp_path / "node.yaml")
    text = config.read_text().replace("database: sqlite", "database: postgresql://cxr:hunter2@127.0.0.1/x")
    config.write_text(text)
    done = cli("status", "--config", str(config))
    assert done.returncode != 0 and "hunter2" not in done.stderr + done.stdout
    assert "storage.database_password_file" in done.stderr


@pytest.mark.parametrize("password", ["wrong", None])
def test_an_unreachable_or_refusing_database_is_one_line(
    settings: Settings, postgres_url: str, tmp_path: Path, password: str | None
) -> None:
    """A wrong password, or no server at that port: one line naming the database (never the password)."""
    url = postgres_url if password else "postgresql://cxr@127.0.0.1:1/nothing"
    secret = tmp_path / "pw"
    secret.write_text(password or "irrelevant")
    secret.chmod(0o600)
    config = write_config(pg_settings(settings, url, secret), tmp_path / "node.yaml")
    done = cli("status", "--config", str(config))
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot connect" in done.stderr and (password or "irrelevant") not in done.stderr


def test_receivers_answer_out_of_resources_while_the_database_is_down(
    make_settings: Callable[..., Settings], chest_cr: Path, tmp_path: Path
) -> None:
    """PostgreSQL stops under a running receiver: the next C-STORE is answered 0xA700 (the PACS retries later)
    within the pool's wait, never Success for what could not be recorded; C-ECHO still answers."""
    server = PostgresServer().start()
    try:
        url = server.create_database("down")
        secret = server.write_password_file(tmp_path / "pw")
        node = Receiver(make_settings(**{"storage.database": url, "storage.database_password_file": secret})).start()
        try:
            assert store_all(node.port, [small_cr(chest_cr, "before")]) == [status.SUCCESS]
            server.stop()
            assert store_all(node.port, [small_cr(chest_cr, "during")]) == [status.OUT_OF_RESOURCES]
            assert echo(node.port) == status.SUCCESS
        finally:
            node.stop(grace_s=2)
    finally:
        server.stop()
