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
    """Print the node at a glance: jobs by state, queue, deliveries per destination, disk, model."""
    from cxr_node.app import open_store
    from cxr_node.metrics import snapshot

    settings = _settings(args)
    store = open_store(settings, readonly=True)
    try:
        snap = snapshot(settings, store)
    finally:
        store.close()
    report = {
        "storage_root": str(settings.storage.root),
        "model_manifest": str(settings.models.manifest),
        "jobs": snap.jobs,
        "total": sum(snap.jobs.values()),
        "queue_depth": snap.queue_depth,
        "queue_limit": settings.node.max_queue_depth,
        "oldest_pending_s": round(snap.oldest_pending_s, 1),
        "disk_used_percent": round(snap.disk_used * 100, 1),
        "disk_limit_percent": settings.storage.max_disk_percent,
        "deliveries": {f"{dest}/{state}": n for (dest, state), n in sorted(snap.deliveries.items())},
        "destinations": {
            name: {k: state[k] for k in ("reachable", "accepted", "refused", "error")}
            for name, state in snap.destinations.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"storage root  {report['storage_root']}   model {report['model_manifest']}")
    print(
        f"queue         {report['queue_depth']} waiting (limit {report['queue_limit']}), oldest pending "
        f"{report['oldest_pending_s']:.0f} s, disk {report['disk_used_percent']}% (limit "
        f"{report['disk_limit_percent']:g}%)"
    )
    print(f"jobs          {report['total']}")
    for state, count in report["jobs"].items():
        print(f"  {state:<12}{count:>8}")
    for name, state in report["destinations"].items():
        up = "up" if state["reachable"] else f"DOWN ({state['error']})"
        unmet = f", REFUSES {', '.join(state['refused'])}" if state["refused"] else ""
        counts = ", ".join(
            f"{k.split('/')[1]} {n}" for k, n in report["deliveries"].items() if k.startswith(name + "/")
        )
        print(f"destination   {name}: {up}{unmet}; deliveries: {counts or 'none'}")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    """Re-queue the deliveries of one job, or of every dead job."""
    from cxr_node.app import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        try:
            ids = store.resend(job_id=args.job, dead=args.dead)
        except ValueError as exc:
            raise CxrNodeError(f"{exc}; see cxr-node status") from exc
    finally:
        store.close()
    print(f"re-queued {len(ids)} job(s){': ' + ', '.join(map(str, ids)) if ids else ''}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove every trace of one study: inputs, outputs, jobs and their index entries."""
    from cxr_node.app import open_store, purge_index
    from cxr_node.jobs.retention import purge_jobs

    settings = _settings(args)
    store = open_store(settings)
    try:
        ids = store.study_jobs(args.study)
        count = purge_jobs(store, settings.storage.root, ids)
    finally:
        store.close()
    removed = purge_index(settings, [args.study])
    print(f"purged study {args.study}: {count} job(s), {removed} index entr{'y' if removed == 1 else 'ies'}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """The neighbour index: import the labelled library, label a study, query a file, rebuild."""
    from cxr_node import library
    from cxr_node.app import open_index, open_store

    settings = _settings(args)
    index = open_index(settings)
    try:
        if args.index_command == "import":
            count, problems = library.import_library(settings, index, args.labels, args.folder)
            for problem in problems:
                print(f"  skipped {problem}")
            print(f"imported {count} reference case(s) into the library ({len(problems)} skipped)")
        elif args.index_command == "label":
            count = index.label(args.study, None if args.label == "none" else args.label)
            library.relabel_library(settings, args.study, None if args.label == "none" else args.label)
            if not count:
                raise CxrNodeError(f"study {args.study} is not in the index (cxr-node status; index import)")
            print(f"labelled {count} image(s) of study {args.study} {args.label}")
        elif args.index_command == "query":
            print("\n".join(library.format_neighbours(library.query_file(settings, index, args.file, args.k))))
        else:
            store = open_store(settings, readonly=True) if (settings.storage.root / "jobs.sqlite3").exists() else None
            try:
                count, version, problems = library.rebuild(settings, index, store)
            finally:
                if store is not None:
                    store.close()
            print(f"rebuilt the index of model version {version}: {count} embedding(s), {len(problems)} skipped")
    finally:
        index.close()
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


def cmd_dataset_from_store(args: argparse.Namespace) -> int:
    """Write a labelled set of the node's stored images whose accession numbers the site has labelled."""
    from cxr_node.training.from_store import build_from_store

    settings = _settings(args)
    try:
        report = build_from_store(settings.storage.root, Path(args.labels), Path(args.out))
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    print(
        f"wrote {report.csv}: {report.rows} images ({report.positives} covid); "
        f"{report.unlabelled} stored images without a label, {report.labels_without_image} labels without an image"
    )
    return 0


def cmd_dataset_preview(args: argparse.Namespace) -> int:
    """Write a PNG grid of augmented images of a labelled set (the training augmentation, as trained)."""
    from cxr_node.training.augment import preview
    from cxr_node.training.datasets import LabelledSet, read_rows

    try:
        rows = read_rows(Path(args.data))
        out = preview(LabelledSet(rows[: args.n]), Path(args.out), n=args.n, seed=args.seed)
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    print(f"wrote {out}")
    return 0


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


def _print_epoch(log: object) -> None:
    print(log.line(), flush=True)  # type: ignore[attr-defined]


def _command(args: argparse.Namespace) -> str:
    """Return the command line that ran, as a user would type it."""
    import shlex

    return shlex.join(["cxr-node", *getattr(args, "argv", [])])


def _recipe(args: argparse.Namespace, **sections: object):  # type: ignore[no-untyped-def]
    """Return the training recipe from --recipe (if any) with the flags given on top."""
    from cxr_node.training.recipe import load_recipe, make_recipe

    flags = {"data": args.data, "out": args.out, "seed": args.seed, "device": args.device,
             "resume": args.resume or None, "threads": args.threads, "command": _command(args), **sections}  # fmt: skip
    recipe_file = getattr(args, "recipe", None)
    return load_recipe(Path(recipe_file), **flags) if recipe_file else make_recipe({}, source="flags", **flags)


def _sub(args: argparse.Namespace, names: Sequence[str]) -> dict[str, object] | None:
    """Return the flags ``names`` that were given, as a recipe section (None when none were)."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return given or None


def cmd_train_segmentation(args: argparse.Namespace) -> int:
    """Train the lung U-Net alone."""
    from cxr_node.training.runs import run_segmentation

    section = _sub(args, ("input_size", "base_channels", "depth", "epochs", "batch_size", "lr", "patience"))
    try:
        run = run_segmentation(_recipe(args, segmentation=section), on_epoch=_print_epoch)
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    print(f"wrote {run.weights}: validation {run.score_name} {run.score:.4f} after {run.epochs_run} epochs")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """Train one classifier alone."""
    from cxr_node.training.runs import run_classifier

    section = _sub(args, ("input_size", "region", "epochs", "batch_size", "lr", "patience", "pretrained"))
    section = {**(section or {}), "masks": "unet" if args.masks_from else "truth",
               "members": [{"name": args.architecture, "architecture": args.architecture}]}  # fmt: skip
    masks_from = Path(args.masks_from) if args.masks_from else None
    try:
        run = run_classifier(_recipe(args, classifier=section), args.architecture, masks_from, _print_epoch)
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    print(f"wrote {run.weights}: validation {run.score_name} {run.score:.4f} after {run.epochs_run} epochs")
    return 0


def cmd_train_ensemble(args: argparse.Namespace) -> int:
    """Train the U-Net and every member of a recipe; write weights and manifest.yaml."""
    from cxr_node.training.train import train_ensemble

    try:
        manifest = train_ensemble(_recipe(args), on_epoch=_print_epoch)
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    print(f"wrote {manifest}")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    """Reproduce the demo models: synthetic phantoms, then the small U-Net and members."""
    import time

    from cxr_node.training.runs import models_bytes, train_demo

    clock = time.perf_counter()
    work = Path(args.work) if args.work else None
    try:
        manifest = train_demo(Path(args.out), work, images=args.n, size=args.size, on_epoch=_print_epoch,
                              command=_command(args), resume=args.resume or None, threads=args.threads)  # fmt: skip
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    minutes = (time.perf_counter() - clock) / 60
    print(f"wrote {manifest} ({models_bytes(manifest) / 2**20:.1f} MiB in all) in {minutes:.1f} min")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a manifest's models on a labelled set; print the metrics table, write the report."""
    from cxr_node.training.evaluate import evaluate, markdown_table

    out = Path(args.out) if args.out else None
    try:
        found = evaluate(Path(args.manifest), Path(args.data), out, split=args.split, device=args.device,
                         n_resamples=args.resamples)  # fmt: skip
    except ValueError as exc:
        raise CxrNodeError(str(exc)) from exc
    print(markdown_table(found))
    print(f"\n{found.analysed}/{found.images} images analysed ({found.split}); lung masks plausible "
          f"{found.mask_plausible_rate:.1%}; precision@5 {found.precision_at_5:.3f}")  # fmt: skip
    if out is not None:
        print(f"report: {out / 'report.md'}")
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
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
    p.set_defaults(func=cmd_index)

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

    p = sub.add_parser("dataset", help="build labelled sets for training")
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    d = dsub.add_parser("from-store", parents=[common], help="stored images joined to labels by accession number")
    d.add_argument("--labels", required=True, help="CSV with columns accession_number,label")
    d.add_argument("--out", required=True, help="labelled set CSV to write")
    d.set_defaults(func=cmd_dataset_from_store)
    d = dsub.add_parser("preview", help="PNG grid of augmented images of a labelled set")
    d.add_argument("--data", required=True, help="labelled set CSV (path, label, patient_id[, split, mask])")
    d.add_argument("--out", required=True, help="PNG file to write")
    d.add_argument("--n", type=int, default=16, help="images in the grid (default: 16)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random transforms")
    d.set_defaults(func=cmd_dataset_preview)

    p = sub.add_parser("phantoms", help="write synthetic chest radiograph phantoms (DICOM + labels.csv)")
    p.add_argument("--n", type=int, default=200, help="how many images (default: 200)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, 64-2048 (default: 512)")
    p.add_argument("--positive-fraction", type=float, default=0.5, help="share of COVID-like positives")
    p.set_defaults(func=cmd_phantoms)

    _add_train(sub)

    p = sub.add_parser("evaluate", help="evaluate a manifest's models on a labelled set (metrics, CIs, plots)")
    p.add_argument("--manifest", required=True, help="model manifest (YAML)")
    p.add_argument("--data", required=True, help="labelled set CSV (path, label, patient_id[, split, mask])")
    p.add_argument("--out", default=None, help="folder for report.md, report.json and the plots")
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "val", "train", "all"],
        help="part of the set to use when it has a split (default: test)",
    )
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="run the node on loopback and send it chest radiographs as a PACS would")
    p.add_argument("--out", default="demo-output", help="working folder, emptied first (default: demo-output)")
    p.add_argument("--phantoms", type=int, default=6, help="synthetic chest phantoms to send (default: 6)")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``train segmentation|classifier|ensemble|demo``."""
    p = sub.add_parser("train", help="train models (segmentation, classifier, ensemble, demo)")
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", required=True, help="labelled set CSV (path, label, patient_id[, split, mask])")
    data.add_argument("--out", required=True, help="folder for the weights (and manifest)")
    data.add_argument("--seed", type=int, default=None, help="seed of the split and the training (default: 2021)")
    data.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: cpu)")
    data.add_argument("--resume", action="store_true", help="continue from the checkpoints of an interrupted run")
    data.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    loop = argparse.ArgumentParser(add_help=False)
    for flag, kind in (("--input-size", int), ("--epochs", int), ("--batch-size", int), ("--lr", float),
                       ("--patience", int)):  # fmt: skip
        loop.add_argument(flag, type=kind, default=None)

    t = tsub.add_parser("segmentation", parents=[data, loop], help="train the lung U-Net (Dice + BCE)")
    t.add_argument("--base-channels", type=int, default=None)
    t.add_argument("--depth", type=int, default=None)
    t.set_defaults(func=cmd_train_segmentation)

    t = tsub.add_parser("classifier", parents=[data, loop], help="train one torchvision classifier")
    t.add_argument("architecture", help="torchvision model name, e.g. resnet34")
    t.add_argument("--region", choices=["crop", "mask", "crop+mask"], default=None)
    t.add_argument("--masks-from", default=None, help="manifest whose U-Net cuts the regions (default: truth)")
    t.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from ImageNet weights in the local torch hub cache (default: from scratch)",
    )
    t.set_defaults(func=cmd_train_classifier)

    t = tsub.add_parser("ensemble", parents=[data], help="train U-Net and members, write manifest.yaml")
    t.add_argument("--recipe", default=None, help="YAML recipe (cxr_node.training.recipe.EnsembleRecipe keys)")
    t.set_defaults(func=cmd_train_ensemble)

    t = tsub.add_parser("demo", help="reproduce models/demo from synthetic phantoms (about 10 min on 2 cores)")
    t.add_argument("--out", default="models/demo", help="where the manifest and weights go (default: models/demo)")
    t.add_argument("--work", default=None, help="folder for phantoms and checkpoints (default: a temp folder)")
    t.add_argument("--n", type=int, default=600, help="phantoms to train and validate on (default: 600)")
    t.add_argument("--size", type=int, default=320, help="phantom side in pixels (default: 320)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.set_defaults(func=cmd_train_demo)


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
        return 70


if __name__ == "__main__":
    sys.exit(main())
