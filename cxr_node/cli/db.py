"""The store's schema and home: ``db upgrade`` (create or migrate) and ``db migrate`` (SQLite → PostgreSQL)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxr_node.cli.common import Subparsers, settings
from cxr_node.config import Settings
from cxr_node.errors import ConfigError


def where(found: Settings) -> str:
    """The store the settings name, for messages (never with a password)."""
    if found.storage.shared:
        from cxr_node.jobs.postgres import redact

        return redact(found.storage.database)
    from cxr_node.jobs import spool

    return str(found.storage.root / spool.DB_NAME)


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Create the store's schema, or migrate it to this version; safe to run again, and from many hosts."""
    from cxr_node.app import open_index, open_store

    found = settings(args)
    store = open_store(found)
    before = store.migrated_from
    store.close()
    index = open_index(found)
    index.close()
    version = _schema_version(found)
    change = "already current" if before is None else ("created" if before == 0 else f"migrated from {before}")
    print(f"jobs store {where(found)}: schema version {version} ({change}); neighbour index ready")
    return 0


def _schema_version(found: Settings) -> int:
    if found.storage.shared:
        from cxr_node.jobs.postgres import SCHEMA_VERSION as PG_VERSION

        return PG_VERSION
    from cxr_node.jobs.sqlite import SCHEMA_VERSION

    return SCHEMA_VERSION


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy a stopped single-host node's SQLite store into an empty PostgreSQL database."""
    from cxr_node.app import INDEX_FOLDER
    from cxr_node.jobs.migrate import migrate, migrate_cases
    from cxr_node.jobs.postgres import PostgresStore, is_postgres, password, redact
    from cxr_node.neighbours.index import DB_NAME as INDEX_DB

    found = settings(args)
    source = Path(args.source.removeprefix("sqlite:"))
    target = args.target or (found.storage.database if found.storage.shared else "")
    if not is_postgres(target):
        raise ConfigError(
            "db migrate needs the target: --to postgresql://user@host:5432/dbname, or storage.database in the"
            " configuration"
        )
    secret = password(found.storage.database_password_file)
    store = PostgresStore(target, secret)
    try:
        copied = migrate(
            source,
            store,
            found.worker.max_attempts,
            progress=lambda table, n: print(f"  {table:<14}{n:>10} rows"),
        )
    finally:
        store.close()
    cases = migrate_cases(source.parent / INDEX_FOLDER / INDEX_DB, target, secret)
    for table, n in cases.items():
        print(f"  {'index ' + table:<14}{n:>10} rows")
    total = sum(copied.rows.values()) + sum(cases.values())
    print(
        f"moved {total} rows from {source} to {redact(target)}"
        f"{f'; {copied.requeued} running job(s) re-queued' if copied.requeued else ''}."
        " Point every role at it: storage.database in the configuration (docs/scale-out.md)."
    )
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``db`` commands to ``sub``."""
    p = sub.add_parser("db", help="the store's schema, and moving it to PostgreSQL")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    d = dsub.add_parser(
        "upgrade",
        parents=[common],
        help="create or migrate the schema of storage.database (SQLite or PostgreSQL); safe to repeat",
    )
    d.set_defaults(func=cmd_upgrade)
    d = dsub.add_parser(
        "migrate",
        parents=[common],
        help="copy a stopped single-host node's SQLite store into an empty PostgreSQL database",
    )
    d.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="SQLITE",
        help="the node's jobs database: sqlite:/var/lib/cxr-node/jobs.sqlite3 (or the path)",
    )
    d.add_argument(
        "--to",
        dest="target",
        default=None,
        metavar="URL",
        help="postgresql://user@host:5432/dbname (default: storage.database); the password as for the node",
    )
    d.set_defaults(func=cmd_migrate)
