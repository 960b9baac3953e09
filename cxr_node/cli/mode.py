"""Staged go-live: ``cxr-node mode show`` and ``cxr-node mode set`` (shadow → supervised → live, per model version).

A model version's mode lives in the jobs store (``model_modes``, with every setting in ``model_mode_events``): a
version with no record starts in ``golive.initial_mode`` (recorded by the worker at its first start), and only an
operator moves it, naming who they are. Going live needs the site calibration (:func:`calibration_refusal`) unless
``--override-uncalibrated`` is given, which the history records.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import yaml

from cxr_node.cli.common import Subparsers, settings, user_errors
from cxr_node.config import Settings
from cxr_node.errors import ConfigError, CxrNodeError, ModelError, StorageError
from cxr_node.results.findings import MODES, Mode

if TYPE_CHECKING:
    from cxr_node.jobs.interfaces import Store
    from cxr_node.jobs.records import ModeRecord

OVERRIDE_NOTE: Final = "live without a site calibration (--override-uncalibrated)"
"""What the history says of a go-live that overrode the missing calibration."""


def manifest_key(path: Path, where: str = "models.manifest") -> str:
    """The model version the manifest at ``path`` names, as ``name/version`` (read from the YAML; no weights loaded).

    Raises
    ------
    ConfigError
        When the manifest cannot be read or names no name and version (``where``: the key that names it).
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where} {path}: cannot read it ({exc})") from exc
    if not isinstance(data, dict) or not data.get("name") or data.get("version") in (None, ""):
        raise ConfigError(f"{where} {path}: expected the keys name and version")
    return f"{data['name']}/{data['version']}"


def configured_model_key(found: Settings) -> str:
    """The model version ``models.manifest`` names, as ``name/version``."""
    return manifest_key(found.models.manifest)


def candidate_keys(found: Settings) -> list[tuple[str, Path | None]]:
    """Each candidate of ``models.candidates`` as ``name/version``, with its calibration file (or None)."""
    return [(manifest_key(c.manifest, f"models.candidates[{i}].manifest"), c.calibration)
            for i, c in enumerate(found.models.candidates)]  # fmt: skip


def calibration_refusal(found: Settings, model_key: str) -> str | None:
    """Why ``model_key`` may not go live without ``--override-uncalibrated``, or None when it may.

    The one place that decides what counts as a site calibration: the configuration names a site calibration file
    (``cxr-node calibrate``) for the model version (``models.calibration`` for the configured model, a candidate's
    ``calibration`` for a candidate in ``models.candidates``), and the file reads and was made for this model
    version (name and version; the worker checks its weights' checksums when it loads the model, and refuses to
    start on a mismatch).
    """
    from cxr_node.infer.calibration import load_calibration

    where, path = "models.calibration", found.models.calibration
    for i, (key, named) in enumerate(candidate_keys(found)):
        if key == model_key and model_key != configured_model_key(found):
            where, path = f"models.candidates[{i}].calibration", named
    if path is None:
        return f"{model_key} has no site calibration ({where} is not set; see cxr-node calibrate)"
    try:
        calibration = load_calibration(Path(path))
    except ModelError as exc:
        return str(exc)
    made_for = f"{calibration.model.name}/{calibration.model.version}"
    if made_for != model_key:
        return f"{where} {path} was made for {made_for}, not {model_key}"
    return None


def set_mode(
    store: Store,
    found: Settings,
    model_key: str,
    mode: Mode,
    by: str,
    reason: str | None = None,
    override_uncalibrated: bool = False,
) -> ModeRecord:
    """Record an operator's setting of ``model_key``'s mode; going live is checked by :func:`calibration_refusal`.

    Raises
    ------
    CxrNodeError
        When going live is refused (no site calibration and no override), or ``by`` is empty.
    """
    if not by.strip():
        raise CxrNodeError("--by: say who sets the mode (a name)")
    if mode == "live":
        refusal = calibration_refusal(found, model_key)
        if refusal is not None and not override_uncalibrated:
            raise CxrNodeError(f"not set live: {refusal}; give --override-uncalibrated to go live anyway")
        if refusal is not None:
            reason = f"{OVERRIDE_NOTE}: {refusal}" + (f"; {reason}" if reason else "")
    return store.modes.set(model_key, mode, by.strip(), reason)


def running_mode(store: Store, found: Settings) -> dict[str, Any]:
    """The configured model's mode as ``status`` shows it: recorded, or the initial mode it will start in."""
    key = configured_model_key(found)
    try:
        record = store.modes.current(key)
    except StorageError:  # a store not yet upgraded to the go-live schema (status opens it read-only)
        record = None
    if record is None:
        return {"model": key, "mode": found.golive.initial_mode, "set_by": None, "set_at": None, "recorded": False}
    return {**_record(record), "recorded": True}


def mode_report(store: Store, found: Settings) -> dict[str, Any]:
    """Every model version's mode (the configured one marked), and the history, as ``mode show --json`` prints."""
    return {
        "configured": running_mode(store, found),
        "candidates": [
            {"model": key, "calibration": None if path is None else str(path)} for key, path in candidate_keys(found)
        ],
        "models": [_record(record) for record in store.modes.all()],
        "history": [_record(record) for record in store.modes.history()],
    }


def _record(record: ModeRecord) -> dict[str, Any]:
    return {
        "model": record.model_key,
        "mode": record.mode,
        "set_by": record.set_by,
        "set_at": _when(record.set_at),
        "reason": record.reason,
    }


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def mode_lines(report: dict[str, Any]) -> list[str]:
    """The mode report as a terminal shows it."""
    configured = report["configured"]
    lines = [f"configured model  {configured['model']}: {_mode_line(configured)}"]
    lines += [
        f"candidate model   {c['model']}: shadow beside it (models.candidates: results recorded apart, no "
        f"outputs; calibration {c['calibration'] or 'none'}; cxr-node compare)"
        for c in report["candidates"]
    ]
    others = [m for m in report["models"] if m["model"] != configured["model"]]
    lines += [f"other model       {m['model']}: {_mode_line(m)}" for m in others]
    lines.append("history")
    lines += [f"  {h['set_at']}  {h['model']}  {h['mode']:<10}  by {h['set_by']}{_why(h)}" for h in report["history"]]
    return lines


def _mode_line(entry: dict[str, Any]) -> str:
    if not entry.get("recorded", True):
        return f"{entry['mode']} (golive.initial_mode; recorded when the worker first starts it)"
    return f"{entry['mode']} (set by {entry['set_by']}, {entry['set_at']}{_why(entry)})"


def _why(entry: dict[str, Any]) -> str:
    return f": {entry['reason']}" if entry.get("reason") else ""


def cmd_mode_show(args: argparse.Namespace) -> int:
    """Print every model version's go-live mode and the history of who set it when."""
    from cxr_node.app import open_store

    found = settings(args)
    store = open_store(found, readonly=True)
    try:
        report = mode_report(store, found)
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else "\n".join(mode_lines(report)))
    return 0


def cmd_mode_set(args: argparse.Namespace) -> int:
    """Set a model version's go-live mode (the configured model's by default), recording who and why."""
    from cxr_node.app import open_store

    found = settings(args)
    key = args.model or configured_model_key(found)
    store = open_store(found)
    try:
        with user_errors():
            record = set_mode(store, found, key, args.mode, args.by, args.reason, args.override_uncalibrated)
    finally:
        store.close()
    print(f"{record.model_key}: {record.mode} (set by {record.set_by}, {_when(record.set_at)}{_why(_record(record))})")
    return 0


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``mode show`` and ``mode set`` to ``sub``."""
    p = sub.add_parser("mode", help="staged go-live of a model version: shadow, supervised, live")
    msub = p.add_subparsers(dest="mode_command", required=True, metavar="ACTION")
    show = msub.add_parser("show", parents=[common], help="each model version's mode, who set it when, history")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_mode_show)
    s = msub.add_parser("set", parents=[common], help="set a model version's mode (live needs the site calibration)")
    s.add_argument("mode", choices=MODES, help="shadow: QA destinations only; supervised: marked for QA review; live")
    s.add_argument("--by", required=True, help='who sets it (recorded), e.g. "Dr A"')
    s.add_argument("--reason", default=None, help="why (recorded)")
    s.add_argument("--model", default=None, help="the model version name/version (default: models.manifest's)")
    s.add_argument(
        "--override-uncalibrated",
        action="store_true",
        help="go live without a site calibration (models.calibration); recorded in the history",
    )
    s.set_defaults(func=cmd_mode_set)
