"""``cxr-node outcomes``: the sites' final findings in (``import`` a CSV, ``pull`` from FHIR) and out (``show``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from cxr_node.cli.common import Subparsers, settings, user_errors
from cxr_node.config import Settings
from cxr_node.errors import ConfigError, CxrNodeError
from cxr_node.outcomes.mapping import Mapping as OutcomeMapping
from cxr_node.outcomes.mapping import load_mapping


def _mapping(found: Settings) -> OutcomeMapping:
    with user_errors(" (outcomes.mapping in the configuration)"):
        return load_mapping(found.outcomes.mapping)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _summary(recorded: int, repeated: int, labels: Mapping[str, int], unmapped: Mapping[str, int]) -> str:
    lines = [f"  recorded {recorded}, repeated (already recorded) {repeated}"]
    if labels:
        lines.append(f"  labels: {_counts(labels)}")
    lines.append(f"  unmappable {sum(unmapped.values())}" + (f": {_counts(unmapped)}" if unmapped else ""))
    return "\n".join(lines)


def cmd_import(args: argparse.Namespace) -> int:
    """Record the outcomes of a CSV file; print what was recorded, repeated and unmappable (by reason)."""
    from cxr_node.app import open_store
    from cxr_node.outcomes.csv_in import import_csv

    found = settings(args)
    mapping = _mapping(found)
    path = Path(args.file)
    store = open_store(found)
    try:
        with user_errors():
            done = import_csv(path, mapping, store.outcomes)
    finally:
        store.close()
    print(f"{path}:")
    print(_summary(done.recorded, done.repeated, done.labels, done.unmapped))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull final DiagnosticReports from a FHIR R4 server and record their outcomes."""
    from cxr_node.app import open_store
    from cxr_node.outcomes.fhir_in import Client, pull

    if args.max_pages < 1:
        raise CxrNodeError(f"--max-pages: at least 1, found {args.max_pages}")
    found = settings(args)
    mapping = _mapping(found)
    token = _token(args.token_file)
    client = Client(args.fhir_url, token, Path(args.ca_file) if args.ca_file else None, args.timeout)
    since = _when(args.since, "--since")
    store = open_store(found)
    try:
        done = pull(client, since, mapping, store.outcomes, args.max_pages)
    finally:
        store.close()
    print(f"{args.fhir_url}: {done.pages} page(s), {done.reports} DiagnosticReport(s)")
    print(_summary(done.recorded, done.repeated, done.labels, done.unmapped))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """List recorded outcomes, oldest first."""
    from cxr_node.app import open_store

    found = settings(args)
    store = open_store(found)
    try:
        if args.accession:
            rows = store.outcomes.for_accession(args.accession)
        else:
            since = _when(args.since, "--since")
            rows = store.outcomes.query(since.timestamp() if since else 0.0)
    finally:
        store.close()
    rows = rows[-args.limit :] if args.limit else rows
    print(f"{'reported':<17} {'received':<17} {'accession':<18} {'label':<15} {'source':<6} {'source id':<28} code")
    for row in rows:
        reported = _stamp(row.reported_at) if row.reported_at is not None else "-"
        study = f" study {row.study_instance_uid}" if row.study_instance_uid else ""
        print(
            f"{reported:<17} {_stamp(row.received_at):<17} {row.accession_number:<18} {row.label:<15}"
            f" {row.source:<6} {row.source_id:<28} {row.code}{study}"
        )
    print(f"{len(rows)} outcome(s)")
    return 0


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def _when(value: str | None, flag: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise CxrNodeError(f"{flag}: {value!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM])") from None


def _token(path: str | None) -> str:
    if not path:
        return ""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the token file: {exc.strerror or exc}") from exc
    token = lines[0].strip() if lines else ""
    if not token:
        raise ConfigError(f"{path}: the token file is empty (the bearer token on its first line)")
    return token


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``outcomes`` commands to ``sub``."""
    p = sub.add_parser(
        "outcomes",
        help="the sites' final findings (ground truth): import a CSV, pull from FHIR, show (docs/outcomes.md)",
    )
    osub = p.add_subparsers(dest="outcomes_command", required=True, metavar="ACTION")
    d = osub.add_parser(
        "import",
        parents=[common],
        help="record the findings of a CSV (accession and finding columns, any of the usual names), mapped by"
        " outcomes.mapping; importing the same file again records nothing new",
    )
    d.add_argument("file", metavar="FILE", help="CSV (comma, semicolon or tab separated; UTF-8 or Latin-1)")
    d.set_defaults(func=cmd_import)
    d = osub.add_parser(
        "pull",
        parents=[common],
        help="record the final DiagnosticReports of a FHIR R4 server (accession from identifier type ACSN)",
    )
    d.add_argument("--fhir-url", required=True, metavar="URL", help="the server's base, e.g. https://fhir.example/r4")
    d.add_argument("--since", metavar="DATE", help="only reports updated since (_lastUpdated=ge DATE); default: all")
    d.add_argument("--token-file", metavar="FILE", help="bearer token on the first line (sent as Authorization)")
    d.add_argument("--ca-file", metavar="FILE", help="PEM CA bundle to verify an https server (default: the system's)")
    d.add_argument("--max-pages", type=int, default=100, metavar="N", help="most Bundle pages followed (default 100)")
    d.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds per request (default 30)")
    d.set_defaults(func=cmd_pull)
    d = osub.add_parser("show", parents=[common], help="list the recorded outcomes, oldest first")
    d.add_argument("--accession", metavar="A", help="only this accession number (the last one supersedes)")
    d.add_argument("--since", metavar="DATE", help="only those reported (else received) since DATE")
    d.add_argument("--limit", type=int, default=0, metavar="N", help="only the last N")
    d.set_defaults(func=cmd_show)
