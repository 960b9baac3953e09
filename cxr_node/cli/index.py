"""``cxr-node index``: the neighbour index and its labelled reference library."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_node.cli.common import Subparsers, settings
from cxr_node.errors import CxrNodeError
from cxr_node.jobs import spool

if TYPE_CHECKING:
    from cxr_node.config import Settings
    from cxr_node.neighbours import SqliteNeighbourIndex
    from cxr_node.work.library import Embedder


def cmd_index(args: argparse.Namespace) -> int:
    """The neighbour index: import the labelled library, label a study, query a file, rebuild, check, clean."""
    from cxr_node.app import load_model, open_index, patient_hasher
    from cxr_node.work.gate import DomainGate
    from cxr_node.work.library import Embedder

    found = settings(args)
    index = open_index(found)
    try:
        if args.index_command == "label":
            return _label(args, found, index)
        if args.index_command in ("check", "drop-invalid"):
            return {"check": _check, "drop-invalid": _drop_invalid}[args.index_command](index)
        _, engine = load_model(found)
        gate = DomainGate.for_model(found.domain.gate, engine.domain, found.domain.pass_rate)
        embedder = Embedder(engine, patient_hasher(found), found.worker.max_side, gate=gate)
        action = {"import": _import, "query": _query, "rebuild": _rebuild}[args.index_command]
        return action(args, found, embedder, index)
    finally:
        index.close()


def _label(args: argparse.Namespace, found: Settings, index: SqliteNeighbourIndex) -> int:
    from cxr_node.work import library

    label = None if args.label == "none" else args.label
    count = index.label(args.study, label)
    library.relabel_library(found, args.study, label)
    if not count:
        raise CxrNodeError(f"study {args.study} is not in the index (cxr-node status; index import)")
    print(f"labelled {count} image(s) of study {args.study} {args.label}")
    return 0


def _check(index: SqliteNeighbourIndex) -> int:
    """List the cases that fail today's identifier checks; exit 1 when there are any (0 when none)."""
    from cxr_node.neighbours.cases import indexable

    found = index.invalid_cases()
    if not found:
        print("every indexed case passes today's identifier checks")
        return 0
    print(f"{'case':<10}  {'source':<7}  {'drop-invalid':<12}  problems")
    for case, problems in found:
        action = "delete" if indexable(case)[0] is None else "clear"
        print(f"{case.case_number:<10}  {case.source:<7}  {action:<12}  {'; '.join(problems)}")
    print(f"{len(found)} case(s) fail today's checks: `cxr-node index drop-invalid` deletes those that cannot be named")
    print("and clears accession numbers and dates that cannot be written")
    return 1


def _drop_invalid(index: SqliteNeighbourIndex) -> int:
    """Delete the cases that cannot be named, clear identifiers that cannot be written."""
    deleted, cleared = index.drop_invalid()
    print(f"deleted {deleted} case(s) that cannot be named; cleared identifiers of {cleared} case(s)")
    return 0


def _import(args: argparse.Namespace, found: Settings, embedder: Embedder, index: SqliteNeighbourIndex) -> int:
    from cxr_node.work import library

    count, problems = library.import_library(found, embedder, index, args.labels, args.folder)
    for problem in problems:
        print(f"  skipped {problem}")
    print(f"imported {count} reference case(s) into the library ({len(problems)} skipped)")
    return 0


def _query(args: argparse.Namespace, found: Settings, embedder: Embedder, index: SqliteNeighbourIndex) -> int:
    from cxr_node.work import library

    print("\n".join(library.format_neighbours(library.query_file(found, embedder, index, args.file, args.k))))
    return 0


def _rebuild(args: argparse.Namespace, found: Settings, embedder: Embedder, index: SqliteNeighbourIndex) -> int:
    from cxr_node.app import open_store
    from cxr_node.work import library

    store = open_store(found, readonly=True) if (found.storage.root / spool.DB_NAME).exists() else None
    try:
        count, version, problems = library.rebuild(found, embedder, index, store.jobs if store else None)
    finally:
        if store is not None:
            store.close()
    print(f"rebuilt the index of model version {version}: {count} embedding(s), {len(problems)} skipped")
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``index import|label|query|rebuild|check|drop-invalid`` to ``sub``."""
    p = sub.add_parser("index", help="the neighbour index: reference library, labels, queries, rebuild")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    i = isub.add_parser("import", parents=[common], help="embed labelled reference cases (DICOM) as the library")
    i.add_argument("--labels", type=Path, required=True, help="CSV with columns path (relative to FOLDER), label")
    i.add_argument("folder", type=Path, help="folder the CSV's paths are relative to")
    i = isub.add_parser("label", parents=[common], help="set the confirmed label of a stored study")
    i.add_argument("--study", required=True, help="Study Instance UID")
    i.add_argument("--label", required=True, choices=["covid", "non-covid", "none"])
    i = isub.add_parser("query", parents=[common], help="print the nearest stored cases of a DICOM file")
    i.add_argument("file", type=Path)
    i.add_argument("-k", type=int, default=5, help="how many neighbours (default 5)")
    isub.add_parser("rebuild", parents=[common], help="re-embed every stored case with the current model")
    isub.add_parser(
        "check", parents=[common], help="list indexed cases whose identifiers fail today's checks (exit 1 if any)"
    )
    isub.add_parser(
        "drop-invalid",
        parents=[common],
        help="delete cases that cannot be named (bad UIDs); clear accession numbers and dates that cannot be written",
    )
    p.set_defaults(func=cmd_index)
