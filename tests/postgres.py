"""A real, throw-away PostgreSQL server on loopback for tests of the PostgreSQL store backend.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` from the newest installed PostgreSQL in a
private temporary folder, listens on ``127.0.0.1`` only (plus a Unix socket inside that folder) and
hands out databases owned by the non-superuser role ``cxr``. PostgreSQL refuses to run as root, so
when the tests run as root the server runs as the ``postgres`` system user.

URL convention: :meth:`PostgresServer.create_database` returns ``postgresql://cxr@127.0.0.1:PORT/NAME``
without the password; the password is :attr:`PostgresServer.password`, or a 0600 file written by
:meth:`PostgresServer.write_password_file`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

APP_ROLE = "cxr"
SUPERUSER = "postgres"
SYSTEM_USER = "postgres"  # the OS account the server runs as when the tests run as root
NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,62}")
CONFIG_FILE = "cxr-test.conf"  # included at the end of postgresql.conf, so its settings win
START_ATTEMPTS = 3  # a free port can be taken by someone else between picking and binding it

# Durability is traded for speed: these databases are thrown away after the session.
SERVER_CONFIG = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
"""
DURABLE_CONFIG = """
fsync = on
synchronous_commit = on
full_page_writes = on
"""
"""Appended for ``durable=True`` (the last setting in the file wins): a commit returns once it is on disk, as in
production; for measurements (bench/scale.py), not tests."""


@dataclass(frozen=True)
class Account:
    """The OS account that owns the data directory and runs the server."""

    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        """True when the account is the one this process runs as (no user switch needed)."""
        return self.uid == os.geteuid()


def find_bindir() -> Path | None:
    """Return the folder of ``initdb`` and ``pg_ctl`` of the newest PostgreSQL installed, or None.

    Debian's ``/usr/lib/postgresql/<major>/bin`` comes first (it is not on PATH), then
    ``pg_config --bindir``, then PATH.
    """
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_major_version, reverse=True)
    candidates = [*debian, _pg_config_bindir(), _which_dir("initdb")]
    for folder in candidates:
        if folder is not None and (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _major_version(bindir: Path) -> int:
    """The major version in ``/usr/lib/postgresql/<major>/bin``, 0 when it is not a number."""
    name = bindir.parent.name
    return int(name) if name.isdigit() else 0


def _pg_config_bindir() -> Path | None:
    """``pg_config --bindir``, or None without pg_config."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


def _which_dir(tool: str) -> Path | None:
    """The folder holding ``tool`` on PATH, or None."""
    path = shutil.which(tool)
    return Path(path).parent if path else None


def server_account() -> Account | None:
    """The account to run PostgreSQL as: this process's, or ``postgres`` when running as root."""
    if os.geteuid() != 0:
        return Account(os.geteuid(), os.getegid())
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        return None
    return Account(entry.pw_uid, entry.pw_gid)


def available() -> str | None:
    """Return None when a PostgreSQL server can be started here, else the reason it cannot."""
    bindir = find_bindir()
    if bindir is None:
        return "PostgreSQL is not installed (Debian package postgresql: initdb and pg_ctl not found)"
    account = server_account()
    if account is None:
        return f"running as root and there is no '{SYSTEM_USER}' user to run PostgreSQL as"
    if not _executable_by(bindir / "initdb", account):
        return f"{bindir / 'initdb'} cannot be run by uid {account.uid}"
    return None


def _executable_by(tool: Path, account: Account) -> bool:
    """True when ``tool --version`` runs as ``account``."""
    done = subprocess.run(
        [str(tool), "--version"], capture_output=True, check=False, timeout=30, **_as_account(account)
    )
    return done.returncode == 0


def _as_account(account: Account) -> dict[str, Any]:
    """Keyword arguments of :func:`subprocess.run` that run the child as ``account``."""
    if account.is_current:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _private_root(account: Account) -> Path:
    """Make an empty 0700 folder owned by ``account`` that it can reach (every parent searchable)."""
    parent = Path(tempfile.gettempdir())
    if not account.is_current and not _searchable_by_others(parent):
        parent = Path("/tmp")  # e.g. TMPDIR under a 0700 home of root
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-", dir=parent))
    if not account.is_current:
        os.chown(root, account.uid, account.gid)
    return root


def _searchable_by_others(folder: Path) -> bool:
    """True when every folder from / down to ``folder`` can be traversed by any user."""
    return all(part.stat().st_mode & stat.S_IXOTH for part in [folder, *folder.parents])


class PostgresServer:
    """One PostgreSQL cluster in its own temporary folder, on a free loopback port.

    Parameters
    ----------
    bindir : Path or None
        Folder of ``initdb`` and ``pg_ctl``; None finds the newest installed (:func:`find_bindir`).
    durable : bool
        Keep PostgreSQL's durability (fsync, synchronous commit, full page writes: :data:`DURABLE_CONFIG`)
        instead of trading it for speed.

    Attributes
    ----------
    root : Path
        The private folder: ``data/`` (the cluster), ``socket/`` (the Unix socket), ``postgres.log``.
    port : int
        The TCP port on 127.0.0.1, valid once started.
    password : str
        The password of the role ``cxr`` that owns every database made by :meth:`create_database`.
    startup_s : float
        Seconds that :meth:`start` took (initdb, start, role creation).
    """

    def __init__(self, bindir: Path | None = None, durable: bool = False) -> None:
        found = bindir or find_bindir()
        account = server_account()
        if found is None or account is None:
            raise RuntimeError(f"PostgreSQL cannot start here: {available()}")
        self.bindir = found
        self.account = account
        self.root = Path()
        self.port = 0
        self.password = secrets.token_urlsafe(24)
        self.superuser_password = secrets.token_urlsafe(24)
        self.startup_s = 0.0
        self.durable = durable
        self._running = False

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        """The folder of the server's Unix socket."""
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        """The server's log (pg_ctl -l)."""
        return self.root / "postgres.log"

    def start(self) -> PostgresServer:
        """Create the cluster, start the server and create the ``cxr`` role; return self."""
        began = time.monotonic()
        self.root = _private_root(self.account)
        atexit.register(self.stop)
        try:
            self._initdb()
            self._start_on_free_port()
            self._create_app_role()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool as the server account in the server's folder; raise with its output on failure."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,
            env={**env, "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **_as_account(self.account),
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def _write_owned(self, path: Path, text: str) -> None:
        """Write a 0600 file that the server account owns."""
        path.write_text(text)
        path.chmod(0o600)
        if not self.account.is_current:
            os.chown(path, self.account.uid, self.account.gid)

    def _initdb(self) -> None:
        """Create the cluster: UTF-8, C locale, scram-sha-256 for every connection, no fsync."""
        pwfile = self.root / "superuser-password"
        self._write_owned(pwfile, self.superuser_password)
        try:
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            )  # fmt: skip
        finally:
            pwfile.unlink()
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\ninclude '{CONFIG_FILE}'\n")
        self.socket_dir.mkdir(mode=0o700)
        if not self.account.is_current:
            os.chown(self.socket_dir, self.account.uid, self.account.gid)

    def _start_on_free_port(self) -> None:
        """Start the server on a free loopback port, picking another when the port was taken meanwhile."""
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = _free_port()
            config = SERVER_CONFIG.format(port=self.port, socket_dir=self.socket_dir)
            config += DURABLE_CONFIG if self.durable else ""
            self._write_owned(self.data_dir / CONFIG_FILE, config)
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60", "start")
            except RuntimeError:
                if attempt == START_ATTEMPTS or "could not bind" not in self.log_tail():
                    raise RuntimeError(f"PostgreSQL did not start; log:\n{self.log_tail()}") from None
                continue
            self._running = True
            return

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server log, '' when there is none yet."""
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection as the superuser over TCP (for administration)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=self.superuser_password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
            **kwargs,
        )

    def _create_app_role(self) -> None:
        """Create the login role ``cxr``: no superuser, cannot create roles or databases."""
        statement = sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
            sql.Identifier(APP_ROLE), sql.Literal(self.password)
        )
        with self.connect() as conn:
            conn.execute(statement)

    def url(self, name: str) -> str:
        """The URL of database ``name`` as role ``cxr``, without the password."""
        return f"postgresql://{APP_ROLE}@127.0.0.1:{self.port}/{name}"

    def unique_name(self, prefix: str = "test") -> str:
        """A database name not used before: ``<prefix>_<12 random hex digits>``."""
        return f"{prefix}_{secrets.token_hex(6)}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` owned by ``cxr``; return its URL (without the password).

        Raises
        ------
        ValueError
            When ``name`` is not a lower-case SQL identifier of at most 63 characters.
        """
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"name: expected a lower-case identifier [a-z_][a-z0-9_]{{0,62}}, found {name!r}")
        statement = sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(APP_ROLE))
        with self.connect() as conn:
            conn.execute(statement)
        return self.url(name)

    def drop_database(self, name: str, *, ignore_errors: bool = False) -> None:
        """Drop database ``name`` if it exists, ending its open connections (``WITH (FORCE)``)."""
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        try:
            with self.connect() as conn:
                conn.execute(statement)
        except psycopg.Error:
            if not ignore_errors:
                raise

    def write_password_file(self, path: Path) -> Path:
        """Write the ``cxr`` password (no trailing newline) to a new 0600 file at ``path``; return ``path``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.password)
        return path

    def stop(self) -> None:
        """Stop the server (fast shutdown, SIGKILL as a last resort) and remove its folder; idempotent."""
        atexit.unregister(self.stop)
        if self._running:
            self._running = False
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        if self.root != Path() and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """SIGKILL the postmaster named in ``postmaster.pid``; its children exit when it is gone."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
