"""Running and operating the node: ``serve``, ``status``, ``resend``, ``purge``, ``config check``, ``demo``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_node import logs
from cxr_node.cli.common import Subparsers, settings, user_errors
from cxr_node.jobs.leases import Holder

if TYPE_CHECKING:
    from cxr_node.jobs.interfaces import Store


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node in the foreground."""
    from cxr_node.app import serve

    found = settings(args)
    logs.configure(found.logging.level, found.logging.format)
    return serve(found, role=args.role)


def status_report(args: argparse.Namespace) -> dict[str, Any]:
    """The node at a glance, as ``status --json`` prints it."""
    from cxr_node.app import open_store
    from cxr_node.cli.mode import running_mode
    from cxr_node.jobs.states import VALUES_REPAIRED, JobState
    from cxr_node.metrics import health, snapshot

    found = settings(args)
    store = open_store(found, readonly=True)
    try:
        now = time.time()
        snap = snapshot(found, store, now)
        repaired = store.jobs.moves(JobState.WRITTEN, VALUES_REPAIRED)
        hosts = hosts_report(store, now)
        golive = running_mode(store, found)
    finally:
        store.close()
    stale = found.metrics.stuck_after_s
    return {
        "problems": health(found, snap, now),
        "stuck_jobs": [job_id for job_id, seconds in snap.stuck if seconds > stale],
        "jobs_with_values_repaired": repaired,
        "alive_s_ago": {role: round(now - at, 1) for role, at in sorted(snap.alive.items())},
        "hosts": hosts,
        "storage_root": str(found.storage.root),
        "model_manifest": str(found.models.manifest),
        "golive": golive,
        "model_candidates": [str(candidate.manifest) for candidate in found.models.candidates],
        "jobs": snap.jobs,
        "total": sum(snap.jobs.values()),
        "queue_depth": snap.queue_depth,
        "queue_limit": found.node.max_queue_depth,
        "oldest_pending_s": round(snap.oldest_pending_s, 1),
        "disk_used_percent": round(snap.disk_used * 100, 1),
        "disk_limit_percent": found.storage.max_disk_percent,
        "deliveries": {f"{dest}/{state}": n for (dest, state), n in sorted(snap.deliveries.items())},
        "destinations": {
            name: {k: state[k] for k in ("reachable", "accepted", "refused", "error")}
            for name, state in snap.destinations.items()
        },
    }


def hosts_report(store: Store, now: float) -> dict[str, dict[str, Any]]:
    """Per host, every process that held work: its role, seconds since it renewed, the jobs it holds and when
    the first of their leases ends, and what it inferred in the last hour (all hosts sharing the store)."""
    held, done = store.jobs.held(), store.jobs.throughput(now - 3600)
    hosts: dict[str, dict[str, Any]] = {}
    for state in store.jobs.holders():
        holder = Holder.parse(state.role, state.id)
        host, pid = (holder.host, holder.pid) if holder is not None else (state.id, 0)
        jobs, until = held.get(state.id, (0, 0.0))
        hosts.setdefault(host, {})[f"{state.role} {pid}"] = {
            "alive_s_ago": round(now - state.renewed_at, 1),
            "jobs_held": jobs,
            "lease_left_s": round(until - now, 1) if jobs else None,
            "inferred_last_hour": done.get(state.id, 0),
        }
    return hosts


def status_lines(report: dict[str, Any]) -> list[str]:
    """The status report as the lines a terminal shows."""
    lines = [f"PROBLEM       {problem}" for problem in report["problems"]]
    lines += [
        f"storage root  {report['storage_root']}   model {report['model_manifest']}",
        f"go-live mode  {golive_line(report['golive'])}",
        *(
            f"candidate     {path} (beside it: results recorded apart, no outputs; cxr-node compare)"
            for path in report["model_candidates"]
        ),
        f"queue         {report['queue_depth']} waiting (limit {report['queue_limit']}), oldest pending "
        f"{report['oldest_pending_s']:.0f} s, disk {report['disk_used_percent']}% (limit "
        f"{report['disk_limit_percent']:g}%)",
        f"jobs          {report['total']}",
    ]
    lines += [f"  {state:<12}{count:>8}" for state, count in report["jobs"].items()]
    alive = ", ".join(f"{role} {seconds:g} s ago" for role, seconds in report["alive_s_ago"].items())
    lines.append(f"last alive    {alive or 'no worker or sender has run yet'}")
    if len(report["hosts"]) > 1:  # several hosts share the store: who holds what
        for host, processes in report["hosts"].items():
            for name, p in processes.items():
                lease = f", lease ends in {p['lease_left_s']:g} s" if p["jobs_held"] else ""
                lines.append(
                    f"host {host:<9}{name}: alive {p['alive_s_ago']:g} s ago, holds {p['jobs_held']} job(s){lease},"
                    f" inferred {p['inferred_last_hour']} in the last hour"
                )
    if report["jobs_with_values_repaired"]:
        count = report["jobs_with_values_repaired"]
        lines.append(f"repaired      {count} job(s) had source values repaired or left out (see the SR, the logs)")
    if report["stuck_jobs"]:
        lines.append(f"stuck jobs    {', '.join(map(str, report['stuck_jobs']))} (running, no live worker)")
    for name, state in report["destinations"].items():
        up = "up" if state["reachable"] else f"DOWN ({state['error']})"
        unmet = f", REFUSES {', '.join(state['refused'])}" if state["refused"] else ""
        counts = ", ".join(
            f"{k.split('/')[1]} {n}" for k, n in report["deliveries"].items() if k.startswith(name + "/")
        )
        lines.append(f"destination   {name}: {up}{unmet}; deliveries: {counts or 'none'}")
    return lines


def golive_line(golive: dict[str, Any]) -> str:
    """The running model's go-live mode in one line, e.g. ``cxr-demo/1: live (set by Dr A, 2026-12-03 ...)``."""
    if not golive["recorded"]:
        return f"{golive['model']}: {golive['mode']} (golive.initial_mode, not recorded yet)"
    return f"{golive['model']}: {golive['mode']} (set by {golive['set_by']}, {golive['set_at']}; cxr-node mode show)"


def cmd_status(args: argparse.Namespace) -> int:
    """Print the node at a glance: jobs by state, queue, deliveries per destination, disk, model."""
    report = status_report(args)
    print(json.dumps(report, indent=2) if args.json else "\n".join(status_lines(report)))
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    """Re-queue the deliveries of one job, or of every dead job."""
    from cxr_node.app import open_store

    store = open_store(settings(args))
    try:
        with user_errors("; see cxr-node status"):
            ids = store.deliveries.resend(job_id=args.job, dead=args.dead)
    finally:
        store.close()
    print(f"re-queued {len(ids)} job(s){': ' + ', '.join(map(str, ids)) if ids else ''}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove every trace of one study: inputs, outputs, jobs and their index entries."""
    from cxr_node.app import open_store, purge_index
    from cxr_node.jobs.retention import purge_jobs

    found = settings(args)
    store = open_store(found)
    try:
        count = purge_jobs(store, found.storage.root, store.jobs.study_jobs(args.study))
    finally:
        store.close()
    removed = purge_index(found, [args.study])
    print(f"purged study {args.study}: {count} job(s), {removed} index entr{'y' if removed == 1 else 'ies'}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the configuration and every file it names; print where it came from and what was checked."""
    import sys

    from cxr_node.cli.checks import check

    found = settings(args)
    checked, problems = check(found)
    for line in problems:
        print(f"cxr-node: error: {found.source}: {line}", file=sys.stderr)
    if problems:
        return 2
    print(
        f"{found.source}: OK (AE {found.node.ae_title} on {found.node.host}:{found.node.port}, "
        f"storage {found.storage.root}, {len(found.destinations)} destination(s))"
    )
    print("\n".join(f"  {line}" for line in checked))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo: the node on loopback, fed by a PACS played by this command."""
    from cxr_node.demo import run_demo

    return run_demo(Path(args.out), phantoms=args.phantoms)


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add the node's commands to ``sub``."""
    p = sub.add_parser("serve", parents=[common], help="run the node in the foreground")
    p.add_argument(
        "role",
        nargs="?",
        default="all",
        choices=["all", "receiver", "worker", "sender"],
        help="all: every role as supervised child processes (default); receiver: the receiver processes only; "
        "worker: the inference worker only; sender: deliveries to the destinations and housekeeping "
        "(one unit per role on one storage.root makes a split deployment)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", parents=[common], help="jobs by state, queue, deliveries, destinations, disk")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("resend", parents=[common], help="re-queue deliveries (one job, or every dead job)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--job", type=int, help="the job id (see cxr-node status / the logs)")
    group.add_argument("--dead", action="store_true", help="every dead job")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("purge", parents=[common], help="remove a study: files, jobs and neighbour-index entries")
    p.add_argument("--study", required=True, help="the Study Instance UID")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("check", parents=[common], help="validate the configuration file")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("demo", help="run the node on loopback and send it chest radiographs as a PACS would")
    p.add_argument("--out", default="demo-output", help="working folder, emptied first (default: demo-output)")
    p.add_argument("--phantoms", type=int, default=6, help="synthetic chest phantoms to send (default: 6)")
    p.set_defaults(func=cmd_demo)
