"""The PostgreSQL test fixtures start a real, loopback-only server with isolated, password-protected databases."""

from __future__ import annotations

import stat
from pathlib import Path

import psycopg
import pytest

from tests.postgres import APP_ROLE, PostgresServer


def test_round_trip(postgres_url: str, postgres_server: PostgresServer) -> None:
    """Role cxr creates a table, inserts and reads back through the URL and its password."""
    with psycopg.connect(postgres_url, password=postgres_server.password) as conn:
        conn.execute("CREATE TABLE job (id integer PRIMARY KEY, state text NOT NULL)")
        conn.execute("INSERT INTO job VALUES (%s, %s), (%s, %s)", (1, "queued", 2, "done"))
        rows = conn.execute("SELECT id, state FROM job ORDER BY id").fetchall()
    assert rows == [(1, "queued"), (2, "done")]


def test_url_has_no_password(postgres_url: str, postgres_server: PostgresServer) -> None:
    """The URL names role cxr on 127.0.0.1 and carries no password."""
    assert postgres_url.startswith(f"postgresql://{APP_ROLE}@127.0.0.1:{postgres_server.port}/")
    assert postgres_server.password not in postgres_url


def test_password_file_and_pgpassword(
    postgres_url: str, postgres_password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 0600 password file holds the password that libpq accepts from PGPASSWORD."""
    assert stat.S_IMODE(postgres_password_file.stat().st_mode) == 0o600
    monkeypatch.setenv("PGPASSWORD", postgres_password_file.read_text())
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_ROLE,)


def test_listens_on_loopback_only(postgres_server: PostgresServer) -> None:
    """TCP is bound to 127.0.0.1 only and the Unix socket lies in the server's own folder."""
    with postgres_server.connect() as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW unix_socket_directories").fetchone() == (str(postgres_server.socket_dir),)
        assert str(conn.execute("SELECT inet_server_addr()").fetchone()[0]) == "127.0.0.1"


def test_app_role_owns_database_without_superuser(postgres_url: str, postgres_server: PostgresServer) -> None:
    """Role cxr owns its database but is no superuser and cannot create databases or roles."""
    query = """
        SELECT r.rolsuper, r.rolcreatedb, r.rolcreaterole, pg_get_userbyid(d.datdba)
        FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()
    """
    with psycopg.connect(postgres_url, password=postgres_server.password) as conn:
        assert conn.execute(query).fetchone() == (False, False, False, APP_ROLE)


def test_databases_are_isolated(postgres_server: PostgresServer) -> None:
    """A table made in one database is not visible in another."""
    names = [postgres_server.unique_name() for _ in range(2)]
    first, second = (postgres_server.create_database(name) for name in names)
    try:
        with psycopg.connect(first, password=postgres_server.password) as conn:
            conn.execute("CREATE TABLE only_here (x integer)")
        with psycopg.connect(second, password=postgres_server.password) as conn:
            assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
    finally:
        for name in names:
            postgres_server.drop_database(name)


def test_wrong_password_is_refused(postgres_url: str, postgres_server: PostgresServer) -> None:
    """A wrong password fails scram-sha-256 authentication over TCP."""
    wrong = postgres_server.password + "x"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_url, password=wrong, connect_timeout=10)


def test_drop_ends_open_connections(postgres_server: PostgresServer) -> None:
    """drop_database succeeds while a client is still connected, and the database is gone."""
    name = postgres_server.unique_name()
    url = postgres_server.create_database(name)
    with psycopg.connect(url, password=postgres_server.password) as lingering:
        postgres_server.drop_database(name)
        assert lingering.closed or lingering.broken or _is_dead(lingering)
    with postgres_server.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone() == (0,)


def _is_dead(conn: psycopg.Connection[object]) -> bool:
    """True when the server has ended this connection."""
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


def test_stop_leaves_nothing_behind(postgres_server: PostgresServer) -> None:
    """stop() ends the postmaster and removes the server's folder; a second stop is harmless."""
    server = PostgresServer().start()
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    server.stop()
    server.stop()
    assert not server.root.exists()
    assert not _running(pid)


def _running(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
