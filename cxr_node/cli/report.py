"""``cxr-node report``: how the model performed on the site's patients over a period, and whether its inputs drift."""

from __future__ import annotations

import argparse
import json
import shlex
from datetime import date
from pathlib import Path

from cxr_node.cli.common import Subparsers, settings, user_errors


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the ``report`` command to ``sub``."""
    parser = sub.add_parser(
        "report", parents=[common], help="performance over time: metrics with CIs, drift, rates, turnaround",
        description="Write a report of a period (whole UTC days, both included): sensitivity, specificity, PPV, NPV "
        "and AUC with bootstrap CIs per ISO week, modality and sending system, the confusion matrix, calibration, "
        "score drift (PSI, KS) against the reference, out-of-domain and not-analysed rates, volume and turnaround "
        "(docs/monitoring.md).",
    )  # fmt: skip
    parser.add_argument("--since", required=True, metavar="YYYY-MM-DD", help="first day of the period (UTC)")
    parser.add_argument("--until", required=True, metavar="YYYY-MM-DD", help="last day of the period (included)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (report.html, .md, .json, PNGs)")
    parser.add_argument("--model", metavar="NAME/VERSION", help="model judged (default: most results in the period)")
    parser.add_argument("--resamples", type=int, default=1000, metavar="N", help="bootstrap resamples (1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="bootstrap seed (0)")
    parser.add_argument("--baseline-since", metavar="YYYY-MM-DD", help="first day of the reference window of the "
                        "scores (default: monitoring.baseline_since/until, else its first baseline_days)")  # fmt: skip
    parser.add_argument("--baseline-until", metavar="YYYY-MM-DD", help="last day of the reference window (included)")
    parser.add_argument("--json", action="store_true", help="print the report's JSON instead of the summary lines")
    parser.set_defaults(func=cmd_report)


def parse_day(text: str, flag: str) -> date:
    """``YYYY-MM-DD`` as a date; ValueError naming ``flag`` otherwise."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: not a date (expected YYYY-MM-DD, e.g. 2026-01-05)") from None


def baseline(args: argparse.Namespace) -> tuple[date, date] | None:
    """The reference window the flags give (until exclusive), or None; ValueError when only one is given."""
    if args.baseline_since is None and args.baseline_until is None:
        return None
    if args.baseline_since is None or args.baseline_until is None:
        raise ValueError("give --baseline-since and --baseline-until together")
    since = parse_day(args.baseline_since, "--baseline-since")
    until = parse_day(args.baseline_until, "--baseline-until")
    if until < since:
        raise ValueError(f"--baseline-until {until} is before --baseline-since {since}")
    return since, date.fromordinal(until.toordinal() + 1)


def cmd_report(args: argparse.Namespace) -> int:
    """Compute the period's figures from the store and write the report folder; print the summary."""
    from cxr_node.app import open_store
    from cxr_node.monitor.report import as_json, describe, run_report

    found = settings(args)
    with user_errors():
        since, until = parse_day(args.since, "--since"), parse_day(args.until, "--until")
        window = baseline(args)
    store = open_store(found, readonly=True)
    try:
        with user_errors():
            run = run_report(store, found.monitoring, since, until, Path(args.out), model=args.model,
                             baseline=window, resamples=args.resamples, seed=args.seed,
                             command=shlex.join(["cxr-node", *getattr(args, "argv", [])]))  # fmt: skip
    finally:
        store.close()
    if args.json:
        print(json.dumps(as_json(run.figures), indent=2, allow_nan=False))
    else:
        print("\n".join(describe(run.figures, found.monitoring)))
        print(f"report: {run.files['html']}")
    return 0
