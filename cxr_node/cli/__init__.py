"""The ``cxr-node`` command line: the parser assembled from each command group, and one-line errors.

Any :class:`~cxr_node.errors.CxrNodeError` (and an OSError on a file the user named) becomes one line on
stderr and an exit code; anything else is a bug, shown as one line unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cxr_node import __version__
from cxr_node.cli import db, dicom, index, mode, node, outcomes, report, training
from cxr_node.cli.common import Command, config_parent
from cxr_node.errors import CxrNodeError

INTERNAL_ERROR = 70
"""Exit code of an unexpected error (EX_SOFTWARE)."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="cxr-node", description="Chest X-ray AI DICOM node.")
    parser.add_argument("--version", action="version", version=f"cxr-node {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = config_parent()
    for group in (node, mode, db, index, dicom, training, outcomes, report):
        group.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in trained models' provenance
    command: Command = args.func
    try:
        return command(args)
    except CxrNodeError as exc:
        print(f"cxr-node: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file or folder the user named: say which and why, in one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cxr-node: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if args.debug:
            raise
        print(f"cxr-node: internal error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return INTERNAL_ERROR
