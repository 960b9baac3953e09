"""The ``cxr-node`` command line. Turns any CxrNodeError into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cxr_node import __version__, logs
from cxr_node.config import Settings, config_path, load_settings
from cxr_node.errors import ConfigError, CxrNodeError

Command = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    overrides = {key: value for key, value in getattr(args, "overrides", {}).items() if value is not None}
    return settings.with_overrides(overrides) if overrides else settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node in the foreground."""
    from cxr_node.app import serve

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    return serve(settings, role=args.role)


def cmd_status(args: argparse.Namespace) -> int:
    """Print job counts by state."""
    from cxr_node.app import open_store

    settings = _settings(args)
    store = open_store(settings, readonly=True)
    try:
        counts = store.counts()
    finally:
        store.close()
    report = {
        "storage_root": str(settings.storage.root),
        "jobs": {state.value: n for state, n in counts.items()},
        "total": sum(counts.values()),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"storage root  {report['storage_root']}")
    print(f"jobs          {report['total']}")
    for state, count in report["jobs"].items():
        print(f"  {state:<12}{count:>8}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate the configuration and print where it came from."""
    settings = _settings(args)
    print(
        f"{settings.source}: OK (AE {settings.node.ae_title} on {settings.node.host}:{settings.node.port}, "
        f"storage {settings.storage.root}, {len(settings.destinations)} destination(s))"
    )
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a peer given as AE@host:port or as a destination name from the config."""
    from cxr_node.dicom import status
    from cxr_node.send.scu import echo

    peer, calling = _peer(args)
    result = echo(peer, calling_aet=calling)
    print(f"C-ECHO {peer}: status 0x{result:04X}")
    return 0 if status.is_success(result) else 1


def cmd_send(args: argparse.Namespace) -> int:
    """C-STORE files (or every file under folders) to a peer."""
    from cxr_node.send.scu import send_files

    files = _expand(args.files)
    if not files:
        raise CxrNodeError("no files to send: give DICOM files or folders that contain them")
    peer, calling = _peer(args, args.to)
    results = send_files(files, peer, calling_aet=calling)
    for r in results:
        code = "----" if r.status is None else f"{r.status:04X}"
        print(f"0x{code}  {r.path}{'  ' + r.comment if r.comment else ''}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} sent, {failed} failed")
    return 0 if failed == 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo: the node on loopback, fed by a PACS played by this command."""
    from cxr_node.demo import run_demo

    return run_demo(Path(args.out), phantoms=args.phantoms)


def cmd_phantoms(args: argparse.Namespace) -> int:
    """Write a labelled set of synthetic chest phantoms as DICOM, with masks and labels.csv."""
    from cxr_node.training.phantoms import write_phantom_set

    try:
        labels = write_phantom_set(
            Path(args.out), n=args.n, seed=args.seed, size=args.size, positive_fraction=args.positive_fraction
        )
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    print(f"wrote {args.n} phantoms under {args.out}; labels: {labels}")
    return 0


def _peer(args: argparse.Namespace, target: str | None = None):  # type: ignore[no-untyped-def]
    from cxr_node.send.scu import PeerAddress

    target = target or args.dest
    calling = args.calling_aet
    try:
        return PeerAddress.parse(target), calling or "CXR_NODE"
    except ValueError:
        pass
    settings = _settings(args)
    for dest in settings.destinations:
        if dest.name == target:
            return PeerAddress(dest.ae_title, dest.host, dest.port), calling or settings.node.ae_title
    names = ", ".join(d.name for d in settings.destinations) or "none configured"
    raise ConfigError(f"{target!r} is neither AE@host:port nor a destination in {settings.source} ({names})")


def _expand(items: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.exists():
            files.append(path)
        else:
            raise CxrNodeError(f"{item}: no such file or folder")
    return files


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="cxr-node", description="Chest X-ray AI DICOM node.")
    parser.add_argument("--version", action="version", version=f"cxr-node {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"YAML configuration (default: $CXR_NODE_CONFIG or {config_path(None)})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the node in the foreground")
    p.add_argument(
        "role",
        nargs="?",
        default="all",
        choices=["all", "receiver"],
        help="all: supervisor with every role as child processes (default); receiver: the SCP only",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", parents=[common], help="show jobs by state")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("check", parents=[common], help="validate the configuration file")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    p.add_argument("dest", help="AE@host:port, or a destination name from the config")
    p.add_argument("--calling-aet", default=None, help="our AE title (default: node.ae_title)")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", parents=[common], help="C-STORE DICOM files to a peer")
    p.add_argument("files", nargs="+", help="DICOM files or folders")
    p.add_argument("--to", required=True, help="AE@host:port, or a destination name from the config")
    p.add_argument("--calling-aet", default=None, help="our AE title (default: node.ae_title)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("phantoms", help="write synthetic chest radiograph phantoms (DICOM + labels.csv)")
    p.add_argument("--n", type=int, default=200, help="how many images (default: 200)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, 64-2048 (default: 512)")
    p.add_argument("--positive-fraction", type=float, default=0.5, help="share of COVID-like positives")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("demo", help="run the node on loopback and send it chest radiographs as a PACS would")
    p.add_argument("--out", default="demo-output", help="working folder, emptied first (default: demo-output)")
    p.add_argument("--phantoms", type=int, default=6, help="synthetic chest phantoms to send (default: 6)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = build_parser().parse_args(argv)
    command: Command = args.func
    try:
        return command(args)
    except CxrNodeError as exc:
        print(f"cxr-node: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
