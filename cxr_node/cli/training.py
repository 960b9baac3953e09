"""Commands of the ML engineer: labelled sets, phantoms, training and evaluation."""

from __future__ import annotations

import argparse
import datetime
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_node.cli.common import Subparsers, settings, user_errors
from cxr_node.config import Settings
from cxr_node.errors import CxrNodeError

if TYPE_CHECKING:
    from cxr_node.training.loop import EpochLog
    from cxr_node.training.recipe import EnsembleRecipe


def cmd_dataset_from_store(args: argparse.Namespace) -> int:
    """Write a labelled set of the node's stored images whose accession numbers the site has labelled."""
    from cxr_node.app import open_store
    from cxr_node.training.from_store import build_from_store

    found = settings(args)
    store = open_store(found, readonly=True)
    try:
        with user_errors():
            report = build_from_store(found.storage.root, Path(args.labels), Path(args.out), store)
    finally:
        store.close()
    print(
        f"wrote {report.csv}: {report.rows} images ({report.positives} covid); "
        f"{report.unlabelled} stored images without a label, {report.labels_without_image} labels without an image"
    )
    return 0


def cmd_dataset_preview(args: argparse.Namespace) -> int:
    """Write a PNG grid of augmented images of a labelled set (the training augmentation, as trained)."""
    from cxr_node.training.augment import preview
    from cxr_node.training.datasets import LabelledSet, read_rows

    with user_errors():
        rows = read_rows(Path(args.data))
        out = preview(LabelledSet(rows[: args.n]), Path(args.out), n=args.n, seed=args.seed)
    print(f"wrote {out}")
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    """Write a labelled set of synthetic chest phantoms as DICOM, with masks and labels.csv."""
    from cxr_node.training.phantoms import write_phantom_set

    with user_errors():
        labels = write_phantom_set(
            Path(args.out), n=args.n, seed=args.seed, size=args.size, positive_fraction=args.positive_fraction
        )
    print(f"wrote {args.n} phantoms under {args.out}; labels: {labels}")
    return 0


def _print_epoch(log: EpochLog) -> None:
    print(log.line(), flush=True)


def _command(args: argparse.Namespace) -> str:
    """Return the command line that ran, as a user would type it."""
    return shlex.join(["cxr-node", *getattr(args, "argv", [])])


def _recipe(args: argparse.Namespace, **sections: object) -> EnsembleRecipe:
    """Return the training recipe from --recipe (if any) with the flags given on top."""
    from cxr_node.training.recipe import load_recipe, make_recipe

    flags = {"data": args.data, "out": args.out, "seed": args.seed, "device": args.device,
             "resume": args.resume or None, "threads": args.threads, "command": _command(args), **sections}  # fmt: skip
    recipe_file = getattr(args, "recipe", None)
    return load_recipe(Path(recipe_file), **flags) if recipe_file else make_recipe({}, source="flags", **flags)


def _section(args: argparse.Namespace, names: Sequence[str]) -> dict[str, object] | None:
    """Return the flags ``names`` that were given, as a recipe section (None when none were)."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return given or None


def cmd_train_segmentation(args: argparse.Namespace) -> int:
    """Train the lung U-Net alone."""
    from cxr_node.training.runs import run_segmentation

    section = _section(args, ("input_size", "base_channels", "depth", "epochs", "batch_size", "lr", "patience"))
    with user_errors():
        run = run_segmentation(_recipe(args, segmentation=section), on_epoch=_print_epoch)
    print(f"wrote {run.weights}: validation {run.score_name} {run.score:.4f} after {run.epochs_run} epochs")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """Train one classifier alone."""
    from cxr_node.training.runs import run_classifier

    section = _section(args, ("input_size", "region", "epochs", "batch_size", "lr", "patience", "pretrained"))
    section = {**(section or {}), "masks": "unet" if args.masks_from else "truth",
               "members": [{"name": args.architecture, "architecture": args.architecture}]}  # fmt: skip
    masks_from = Path(args.masks_from) if args.masks_from else None
    with user_errors():
        run = run_classifier(_recipe(args, classifier=section), args.architecture, masks_from, _print_epoch)
    print(f"wrote {run.weights}: validation {run.score_name} {run.score:.4f} after {run.epochs_run} epochs")
    return 0


def cmd_train_ensemble(args: argparse.Namespace) -> int:
    """Train the U-Net and every member of a recipe; write weights and manifest.yaml."""
    from cxr_node.training.train import train_ensemble

    with user_errors():
        manifest = train_ensemble(_recipe(args), on_epoch=_print_epoch)
    print(f"wrote {manifest}")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    """Reproduce the demo models: synthetic phantoms, then the small U-Net and members."""
    from cxr_node.training.runs import models_bytes, train_demo

    clock = time.perf_counter()
    work = Path(args.work) if args.work else None
    with user_errors():
        manifest = train_demo(Path(args.out), work, images=args.n, size=args.size, on_epoch=_print_epoch,
                              command=_command(args), resume=args.resume or None, threads=args.threads)  # fmt: skip
    minutes = (time.perf_counter() - clock) / 60
    print(f"wrote {manifest} ({models_bytes(manifest) / 2**20:.1f} MiB in all) in {minutes:.1f} min")
    return 0


def cmd_bf16_agreement(args: argparse.Namespace) -> int:
    """Compare the ensemble at fp32 and at bf16 autocast on the CPU; exit 1 when bf16 is beyond tolerance."""
    import json

    from cxr_node.training.agreement import Tolerance, bf16_agreement

    with user_errors():
        tolerance = Tolerance(decisions=args.decision_tolerance, probability=args.probability_tolerance)
        found = bf16_agreement(Path(args.manifest), Path(args.data), split=args.split, tolerance=tolerance)
    print("\n".join(found.lines()))
    if found.within_tolerance:
        print("the manifest may say classifier.cpu_bf16: true (compute.cpu_precision: auto then uses bf16 with AMX)")
    if args.out:
        path = Path(args.out) / "bf16_agreement.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found.as_dict(), indent=2), encoding="utf-8")
        print(f"report: {path}")
    return 0 if found.within_tolerance else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a manifest's models on a labelled set; print the metrics table, write the report."""
    from cxr_node.training.evaluate import evaluate, markdown_table

    if args.bf16_agreement:
        return cmd_bf16_agreement(args)
    out = Path(args.out) if args.out else None
    with user_errors():
        found = evaluate(Path(args.manifest), Path(args.data), out, split=args.split, device=args.device,
                         n_resamples=args.resamples)  # fmt: skip
    print(markdown_table(found))
    print(f"\n{found.analysed}/{found.images} images analysed ({found.split}); lung masks plausible "
          f"{found.mask_plausible_rate:.1%}; precision@5 {found.precision_at_5:.3f}")  # fmt: skip
    if out is not None:
        print(f"report: {out / 'report.md'}")
    return 0


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def cmd_domain_fit(args: argparse.Namespace) -> int:
    """Fit a model's domain description on its training and validation images; name it in the manifest."""
    from cxr_node.training.domain import fit_domain

    with user_errors():
        fitted = fit_domain(Path(args.manifest), Path(args.data), pass_rate=args.pass_rate, device=args.device,
                            progress=_progress)  # fmt: skip
    found, images = fitted.description, fitted.images
    print(f"wrote {fitted.file}: fitted on {images['train']} training images, bound {found.bound:.2f} lets "
          f"{found.pass_rate:.0%} of {images['val']} validation images pass; manifest {fitted.manifest}")  # fmt: skip
    return 0


def cmd_domain_score(args: argparse.Namespace) -> int:
    """Score images (files, or a labelled set's part) against a model's domain description."""
    from cxr_node.training.domain import score_images
    from cxr_node.training.evaluate import split_rows

    with user_errors():
        paths = [Path(p) for p in args.images]
        if args.data:
            paths += [row.path for row in split_rows(Path(args.data), args.split)[0]]
        if not paths:
            raise ValueError("give image files, or --data with a labelled set")
        scored = score_images(Path(args.manifest), paths, pass_rate=args.pass_rate, device=args.device,
                              progress=_progress if len(paths) > 16 else None)  # fmt: skip
    if args.each or not args.data:
        print("\n".join(scored.lines()))
    f = scored.summary()
    if not f["images"]:
        print(f"no image scored: {f['not_classified']} not classified (the node does not analyse them either)")
        return 0
    print(f"{f['images']} images scored, {f['not_classified']} not classified; bound {f['bound']:.2f}: "
          f"{f['pass_rate']:.1%} inside; median score {f['median']:.2f}, largest {f['max']:.2f}")  # fmt: skip
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Choose the site's operating point for the model in use from the site's outcomes; write the calibration."""
    import getpass

    from cxr_node.app import open_store
    from cxr_node.infer.registry import load_manifest
    from cxr_node.training.calibration import describe, parse_target, run_calibration
    from cxr_node.training.outcomes import read_outcomes

    found = settings(args)
    with user_errors():
        target = parse_target(args.target)
        outcomes = read_outcomes(Path(args.labels))
    path = Path(args.manifest) if args.manifest else found.models.manifest
    manifest = load_manifest(path)
    store = open_store(found, readonly=True)
    try:
        with user_errors():
            run = run_calibration(store, manifest, outcomes, target, Path(args.out),
                                  report=Path(args.report) if args.report else None, n_resamples=args.resamples,
                                  seed=args.seed, by=args.by or getpass.getuser(), command=_command(args),
                                  progress=_progress)  # fmt: skip
    finally:
        store.close()
    print("\n".join(describe(run.found)))
    candidate = next((i for i, c in enumerate(found.models.candidates) if c.manifest == path), None)
    key = "models.calibration" if candidate is None else f"calibration of models.candidates[{candidate}]"
    print(f"wrote {run.file}; set {key}: {run.file} in {found.source} and restart the worker")
    if run.report:
        print(f"report: {run.report['markdown']}")
    return 0


def _candidate_key(found: Settings, given: str | None) -> str:
    """The candidate to compare: ``--candidate`` (a manifest or ``name/version``), else the only one configured."""
    from cxr_node.cli.mode import candidate_keys, manifest_key

    if given:
        return manifest_key(Path(given), "--candidate") if Path(given).is_file() else given
    keys = [key for key, _ in candidate_keys(found)]
    if len(keys) != 1:
        listed = ", ".join(keys) or "none"
        raise CxrNodeError(f"give --candidate (name/version or its manifest): models.candidates lists {listed}")
    return keys[0]


def _since(text: str | None) -> float:
    """``--since YYYY-MM-DD`` (UTC midnight) as epoch seconds; 0 without it."""
    if not text:
        return 0.0
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise CxrNodeError(f"--since {text!r}: expected a date, YYYY-MM-DD") from None
    return datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()


def cmd_compare(args: argparse.Namespace) -> int:
    """Report how a candidate model run beside the model in use differs from it (and on labelled cases)."""
    from cxr_node.app import open_store
    from cxr_node.cli.mode import configured_model_key
    from cxr_node.training.compare import compare, describe, load_pairs, write_report
    from cxr_node.training.outcomes import read_outcomes

    found = settings(args)
    candidate = _candidate_key(found, args.candidate)
    live = args.live or configured_model_key(found)
    with user_errors():
        outcomes = read_outcomes(Path(args.labels)) if args.labels else None
    store = open_store(found, readonly=True)
    try:
        pairs = load_pairs(store, candidate, _since(args.since))
    finally:
        store.close()
    if not pairs:
        raise CxrNodeError(f"no results of {candidate} recorded{' since ' + args.since if args.since else ''}: list "
                           "its manifest in models.candidates and let the worker analyse images with it")  # fmt: skip
    with user_errors():
        comparison = compare(pairs, live, outcomes, n_resamples=args.resamples, seed=args.seed)
    print("\n".join(describe(comparison)))
    if args.out:
        files = write_report(comparison, Path(args.out), command=_command(args))
        print(f"report: {files['markdown']}")
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``dataset``, ``phantoms``, ``train`` and ``evaluate`` to ``sub``."""
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

    _register_train(sub)
    _register_domain(sub)
    _register_calibrate(sub, common)

    p = sub.add_parser(
        "compare",
        parents=[common],
        help="a candidate model (models.candidates) beside the model in use: agreement, shifts, metrics",
    )
    p.add_argument(
        "--candidate",
        default=None,
        help="the candidate: name/version or its manifest (default: the only one in models.candidates)",
    )
    p.add_argument("--live", default=None, help="the model in use, name/version (default: models.manifest's)")
    p.add_argument("--labels", default=None, help="CSV of outcomes (as for calibrate): adds both models' metrics")
    p.add_argument("--since", default=None, help="only results recorded since this day (YYYY-MM-DD, UTC)")
    p.add_argument("--out", default=None, help="folder for compare.md, compare.html, compare.json and the plots")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.set_defaults(func=cmd_compare)  # fmt: skip

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
    p.add_argument(
        "--bf16-agreement",
        action="store_true",
        help="instead of the metrics: the ensemble at fp32 and at bf16 autocast on the CPU, decisions and "
        "probabilities compared (use --split val); exit 1 beyond tolerance",
    )
    p.add_argument("--decision-tolerance", type=float, default=0.01, help="share of decisions bf16 may change")
    p.add_argument("--probability-tolerance", type=float, default=0.02, help="largest |p_bf16 - p_fp32| allowed")
    p.set_defaults(func=cmd_evaluate)


def _register_domain(sub: Subparsers) -> None:
    """Add ``domain fit|score`` to ``sub``."""
    p = sub.add_parser("domain", help="the out-of-domain gate: fit a model's domain description, score images")
    dsub = p.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--manifest", required=True, help="model manifest (YAML)")
    model.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default: cpu)")
    d = dsub.add_parser("fit", parents=[model], help="fit on the model's training and validation images")
    d.add_argument("--data", required=True, help="the labelled set the model was trained on (its split is checked)")
    d.add_argument("--pass-rate", type=float, default=0.95, help="share of validation images to pass (default: 0.95)")
    d.set_defaults(func=cmd_domain_fit)
    d = dsub.add_parser("score", parents=[model], help="score image files or a labelled set against the description")
    d.add_argument("images", nargs="*", help="DICOM or PNG files")
    d.add_argument("--data", default=None, help="a labelled set CSV (its --split part)")
    parts = ["test", "val", "train", "all"]
    d.add_argument("--split", default="all", choices=parts, help="part of --data (default: all)")
    d.add_argument("--pass-rate", type=float, default=None, help="judge at this pass rate (default: the description's)")
    d.add_argument("--each", action="store_true", help="with --data: one line per image too")
    d.set_defaults(func=cmd_domain_score)


def _register_train(sub: Subparsers) -> None:
    """Add ``train segmentation|classifier|ensemble|demo`` to ``sub``."""
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


def _register_calibrate(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``calibrate`` to ``sub``."""
    p = sub.add_parser("calibrate", parents=[common], help="the site's operating point from its outcomes")
    p.add_argument("--labels", required=True, help="CSV of outcomes: accession number, label (positive/negative)")
    p.add_argument("--target", required=True, help="sensitivity=0.90 or specificity=0.95")
    p.add_argument("--out", required=True, help="site calibration file to write (YAML)")
    p.add_argument("--report", default=None, help="folder for the report (ROC and reliability plots, summary)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument("--by", default=None, help="who calibrates (default: the user name)")
    p.add_argument("--manifest", default=None,
                   help="the model to calibrate: a candidate's manifest (default: models.manifest)")  # fmt: skip
    p.set_defaults(func=cmd_calibrate)
