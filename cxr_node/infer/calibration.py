"""The site calibration file: the operating point a site chose for one model on its own outcomes.

``cxr-node calibrate`` (:mod:`cxr_node.training.calibration`) writes it; the worker reads it when
``models.calibration`` is set and uses its threshold instead of the manifest's. It is a file of its own, beside
the manifest (which keeps its checksum): it names the model (name, version) and the checksum of every weights
file it was calibrated with, so a file made for another model, or for the same version retrained, refuses to
load (:func:`check_applies`). See docs/calibration.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxr_node.errors import ModelError

if TYPE_CHECKING:
    from cxr_node.infer.registry import Manifest

KIND: Final = "cxr-node site calibration"
FORMAT: Final = 1
TargetMetric = Literal["sensitivity", "specificity"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class CalibratedModel(_Frozen):
    """The model the calibration applies to: its name, version and every weights file's SHA-256 by network."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    weights_sha256: dict[str, str] = Field(min_length=1)


class Target(_Frozen):
    """What the threshold was chosen to meet: a sensitivity or a specificity of at least ``value``."""

    metric: TargetMetric
    value: float = Field(gt=0.0, le=1.0)

    @property
    def text(self) -> str:
        """E.g. ``sensitivity 0.90``."""
        return f"{self.metric} {self.value:.2f}"


class SiteCalibration(_Frozen):
    """One site calibration, as written to and read from YAML (the keys below; more are kept as ``report``)."""

    kind: Literal["cxr-node site calibration"] = KIND
    format: int = FORMAT
    model: CalibratedModel
    threshold: float = Field(ge=0.0, le=1.0)
    target: Target
    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    calibrated_by: str = ""
    cases: int = Field(ge=1)
    positives: int = Field(ge=0)
    manifest_threshold: float | None = None
    metrics: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    bootstrap: dict[str, int | float] = Field(default_factory=dict)
    left_out: dict[str, int] = Field(default_factory=dict)
    command: str = ""

    @property
    def description(self) -> str:
        """Where the operating point comes from, as the outputs say it: ``site calibration of DATE for TARGET``."""
        return f"site calibration of {self.date} for {self.target.text}"


def weights_checksums(manifest: Manifest) -> dict[str, str]:
    """Every weights file of ``manifest`` by network name: the lung segmentation, then each classifier."""
    found = {manifest.segmentation.name: manifest.segmentation.sha256}
    found.update({member.name: member.sha256 for member in manifest.classifier.members})
    return found


def load_calibration(path: Path) -> SiteCalibration:
    """Read and validate a site calibration file.

    Raises
    ------
    ModelError
        One line naming the file: missing, unreadable, not YAML, or a key missing or invalid.
    """
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"site calibration {path} not found") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelError(f"site calibration {path} cannot be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a site calibration (expected a mapping of keys at the top)")
    try:
        return SiteCalibration.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top)"
        raise ModelError(f"{path}: {key}: {first['msg']} (a file written by cxr-node calibrate?)") from exc


def check_applies(calibration: SiteCalibration, manifest: Manifest, path: Path) -> None:
    """Refuse a calibration made for another model, another version, or other weights than ``manifest``'s.

    Raises
    ------
    ModelError
        One line naming the file and what differs.
    """
    made_for = (calibration.model.name, calibration.model.version)
    if made_for != (manifest.name, manifest.version):
        raise ModelError(
            f"{path}: calibrated for model {made_for[0]} {made_for[1]}, but the node loads {manifest.name} "
            f"{manifest.version}: calibrate this model (cxr-node calibrate) or unset models.calibration"
        )
    loaded = weights_checksums(manifest)
    if calibration.model.weights_sha256 != loaded:
        differ = sorted(set(loaded) ^ set(calibration.model.weights_sha256)) or sorted(
            name for name in loaded if loaded[name] != calibration.model.weights_sha256.get(name)
        )
        raise ModelError(
            f"{path}: calibrated with other weights than the manifest's ({', '.join(differ)} differ): "
            "the model was retrained or replaced; calibrate it again (cxr-node calibrate)"
        )


def load_for(path: Path, manifest: Manifest) -> SiteCalibration:
    """The calibration at ``path``, checked against ``manifest`` (:func:`load_calibration`, :func:`check_applies`)."""
    calibration = load_calibration(path)
    check_applies(calibration, manifest, path)
    return calibration


def save_calibration(calibration: SiteCalibration, path: Path) -> Path:
    """Write ``calibration`` as YAML to ``path`` (keys in the model's order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# written by cxr-node calibrate; the node uses it when models.calibration names it\n"
    body = yaml.safe_dump(calibration.model_dump(mode="python"), sort_keys=False, allow_unicode=True)
    path.write_text(header + body, encoding="utf-8")
    return path
