"""``cxr-node config check``: the configuration, and every file it names, checked before the node needs them.

A key that parses can still name a file that is missing, unreadable, too open (a secret), made for another model
(a site calibration), or not what it should be (a manifest, a mapping file). The node would refuse to start, or a
role would die at start-up, on each of those; this finds them all at once, one line each, naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from pydantic import BaseModel

from cxr_node.config import Settings
from cxr_node.errors import ConfigError, CxrNodeError

SECRETS: Final = frozenset({"password_file", "token_file", "database_password_file"})
"""File keys holding a secret: only their owner may read them (checked as the node reads them)."""


def named_files(section: BaseModel, where: str = "") -> Iterator[tuple[str, Path]]:
    """Every ``*_file`` key set in ``section`` and its subsections (destinations included), as (key, path)."""
    for name in type(section).model_fields:
        value = getattr(section, name)
        key = f"{where}{name}"
        if name.endswith("_file") and isinstance(value, Path):
            yield key, value
        elif isinstance(value, BaseModel):
            yield from named_files(value, f"{key}.")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    label = getattr(item, "name", None)
                    yield from named_files(item, f"{key}[{label if label else i}].")


def file_problems(found: Settings) -> list[str]:
    """One line per named file that cannot be read (or, for a secret, that others may read)."""
    from cxr_node.privacy import read_secret

    problems = []
    for key, path in named_files(found):
        if key.rsplit(".", 1)[-1] in SECRETS:
            try:
                read_secret(path, key, ConfigError)
            except CxrNodeError as exc:
                problems.append(str(exc))
        elif not path.is_file() or not os.access(path, os.R_OK):
            problems.append(f"{key}: {path}: {'not readable' if path.exists() else 'no such file'}")
    return problems


def model_problems(found: Settings) -> tuple[list[str], list[str]]:
    """The models (``models.manifest``, its calibration, each candidate and its calibration): what was checked,
    and one line per problem (a manifest that does not load, a calibration made for another model)."""
    from cxr_node.errors import ModelError
    from cxr_node.infer.calibration import load_for
    from cxr_node.infer.registry import load_manifest

    checked: list[str] = []
    problems: list[str] = []
    entries = [("models.manifest", found.models.manifest, "models.calibration", found.models.calibration)]
    entries += [(f"models.candidates[{i}].manifest", c.manifest, f"models.candidates[{i}].calibration", c.calibration)
                for i, c in enumerate(found.models.candidates)]  # fmt: skip
    for key, path, calibration_key, calibration in entries:
        try:
            manifest = load_manifest(path)
        except ModelError as exc:
            problems.append(f"{key}: {exc}")
            continue
        line = f"{key}: {manifest.name} {manifest.version}"
        if calibration is not None:
            try:
                line += f", {load_for(calibration, manifest).description}"
            except ModelError as exc:
                problems.append(f"{calibration_key}: {exc}")
        checked.append(line)
    return checked, problems


def mapping_problems(found: Settings) -> tuple[list[str], list[str]]:
    """The outcome mapping file: needed by the HL7 listener when ``hl7_in.enabled`` (and by ``outcomes import``
    and ``outcomes pull`` when they run)."""
    from cxr_node.outcomes.mapping import load_mapping

    path = found.outcomes.mapping
    try:
        load_mapping(path)
    except ValueError as exc:
        if found.hl7_in.enabled:
            return [], [f"outcomes.mapping: {exc}"]
        return [f"outcomes.mapping: not usable ({exc}); needed once hl7_in is enabled or outcomes are imported"], []
    return [f"outcomes.mapping: {path or 'the mapping shipped with cxr-node'}"], []


def check(found: Settings) -> tuple[list[str], list[str]]:
    """Everything ``config check`` looks at beyond the keys: (what was checked, the problems)."""
    problems = file_problems(found)
    models, bad_models = model_problems(found)
    mapping, bad_mapping = mapping_problems(found)
    return models + mapping, problems + bad_models + bad_mapping
