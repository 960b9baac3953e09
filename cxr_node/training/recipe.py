"""What an ensemble is trained from (:class:`EnsembleRecipe`), and the provenance its manifest records.

A recipe can be written as YAML (``cxr-node train ensemble --recipe FILE``); every key has a default that
suits the small demo models, so a site recipe names only what it changes (bigger networks, ImageNet
starts, more epochs).
"""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr_node.errors import ConfigError
from cxr_node.infer.classify import IMAGENET_MEAN, IMAGENET_STD
from cxr_node.infer.registry import Region, known_architecture
from cxr_node.training.augment import AugmentConfig
from cxr_node.training.datasets import DEFAULT_FRACTIONS, SPLIT_CSV

DEMO_INTENDED_USE = "demo: synthetic training data, not for clinical use"
MaskSourceName = Literal["unet", "truth"]


class _Frozen(BaseModel):
    """Immutable, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SegmentationRecipe(_Frozen):
    """The lung U-Net and how to train it."""

    name: str = "lungs"
    version: str = "1"
    input_size: int = Field(default=160, ge=16, le=1024)
    base_channels: int = Field(default=8, ge=1, le=128)
    depth: int = Field(default=4, ge=2, le=7)
    upsample: Literal["bilinear", "transpose"] = "bilinear"
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=16, ge=2)
    lr: float = Field(default=3e-3, gt=0)
    patience: int = Field(default=4, ge=1)
    max_train_images: int | None = Field(default=None, ge=2, description="train on at most this many images")


class MemberRecipe(_Frozen):
    """One member of the ensemble: a torchvision architecture under a name (and its own learning rate)."""

    name: str = Field(min_length=1)
    architecture: str
    lr: float | None = Field(default=None, gt=0, description="default: the classifier's lr")

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_architecture(value)


class ClassifierRecipe(_Frozen):
    """The ensemble's input geometry, its members and how to train them."""

    input_size: int = Field(default=128, ge=16, le=1024)
    region: Region = "crop+mask"
    masks: MaskSourceName = Field(default="unet", description="cut training regions with the U-Net or the truth")
    members: list[MemberRecipe] = Field(
        default_factory=lambda: [
            MemberRecipe(name="mobilenet", architecture="mobilenet_v3_small"),
            MemberRecipe(name="shufflenet", architecture="shufflenet_v2_x0_5"),
            MemberRecipe(name="squeezenet", architecture="squeezenet1_1"),
        ],
        min_length=1,
    )
    pretrained: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=16, ge=2)
    lr: float = Field(default=2e-3, gt=0)
    patience: int = Field(default=4, ge=1)
    threshold_method: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(default=0.9, gt=0, le=1)
    explain: str | None = Field(default=None, description="member Grad-CAM explains (default: the first)")

    @model_validator(mode="after")
    def _names(self) -> ClassifierRecipe:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique; found {names}")
        if self.explain is not None and self.explain not in names:
            raise ValueError(f"explain member {self.explain!r} is not one of {names}")
        return self


class EnsembleRecipe(_Frozen):
    """Everything :func:`cxr_node.training.train.train_ensemble` needs.

    Paths are as given (relative ones against the working directory). ``split_csv`` defaults to
    ``split.csv`` beside ``data``.
    """

    data: Path
    data_description: str = Field(default="", description="where the data came from, for the provenance")
    out: Path
    split_csv: Path | None = None
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = Field(default=2021, ge=0)
    name: str = "demo"
    version: str = "1"
    intended_use: str = DEMO_INTENDED_USE
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's choice)")
    max_side: int = Field(default=1024, ge=16)
    augment: AugmentConfig = AugmentConfig()
    segmentation: SegmentationRecipe = SegmentationRecipe()
    classifier: ClassifierRecipe = ClassifierRecipe()
    command: str = Field(default="", description="the command line recorded in the provenance")
    resume: bool = False
    checkpoints: Path | None = Field(default=None, description="per-epoch checkpoints (default: out/checkpoints)")

    @property
    def split_path(self) -> Path:
        """Where the split is read from or written to."""
        return self.split_csv or self.data.parent / SPLIT_CSV

    @property
    def checkpoint_dir(self) -> Path:
        """Where each network's per-epoch checkpoint is written (and resumed from)."""
        return self.checkpoints or self.out / "checkpoints"


def load_recipe(path: Path, /, **overrides: Any) -> EnsembleRecipe:
    """Read a recipe from YAML, with ``overrides`` (non-None values) on top.

    Raises
    ------
    ConfigError
        One line naming the file and the first bad key.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read as YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top")
    return make_recipe(data, source=str(path), **overrides)


def make_recipe(values: dict[str, Any], /, source: str = "recipe", **overrides: Any) -> EnsembleRecipe:
    """Validate recipe ``values`` with ``overrides`` (non-None values) on top; ConfigError naming the key."""
    merged = {**values, **{key: value for key, value in overrides.items() if value is not None}}
    try:
        return EnsembleRecipe.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "<top>"
        raise ConfigError(f"{source}: {key}: {first['msg']}") from exc


def software_versions() -> dict[str, str]:
    """Return the versions of Python and the packages that shape the weights."""
    versions = {"python": platform.python_version()}
    for package in ("cxr-node", "torch", "torchvision", "numpy", "pydicom"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def command_line() -> str:
    """Return the running command line, as typed (``cxr-node ...`` when run through the entry point)."""
    program = Path(sys.argv[0]).name if sys.argv else "python"
    program = "cxr-node" if program in ("cxr-node", "__main__.py") else program
    return " ".join([program, *sys.argv[1:]])


def today() -> str:
    """Return today's date (UTC) as YYYY-MM-DD."""
    return datetime.datetime.now(datetime.UTC).date().isoformat()
