"""Model manifests (YAML), weight checksums and offline construction of the networks they name."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlparse

import torch
import torchvision
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from torch import nn

from cxr_node.errors import ModelError

CONCAT: Final = "concat"
"""``classifier.embedding.member`` value that concatenates every member's features."""

Region = Literal["crop", "mask", "crop+mask"]
StateDict = dict[str, torch.Tensor]

_SHA256_PATTERN: Final = r"^[0-9a-fA-F]{64}$"
_CHUNK: Final = 1 << 20


class KeyedError(ValueError):
    """A validation failure about a sub-key of the model that raised it (so the message can name it)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Frozen(BaseModel):
    """Immutable, strict about unknown keys; YAML numbers are accepted where a string is expected."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


class SegmentationSpec(_Frozen):
    """The lung segmentation network: a :class:`~cxr_node.infer.unet.UNet` and its weights."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    architecture: Literal["unet"]
    input_size: int = Field(ge=16, le=4096)
    base_channels: int = Field(ge=1, le=256)
    depth: int = Field(ge=2, le=8)
    upsample: Literal["bilinear", "transpose"] = "bilinear"
    weights: str = Field(min_length=1, description="path relative to the manifest file (or absolute)")
    sha256: str = Field(pattern=_SHA256_PATTERN)
    mask_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _fits_depth(self) -> SegmentationSpec:
        if self.input_size < 2 ** (self.depth - 1):
            raise KeyedError("input_size", f"{self.input_size} is smaller than 2**(depth-1) = {2 ** (self.depth - 1)}")
        return self


class MemberSpec(_Frozen):
    """One classification network of the ensemble (a torchvision architecture with a 2-class head)."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    architecture: str
    weights: str = Field(min_length=1, description="path relative to the manifest file (or absolute)")
    sha256: str = Field(pattern=_SHA256_PATTERN)
    metrics: dict[str, Any] | None = None

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_architecture(value)

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class EmbeddingSpec(_Frozen):
    """Whose penultimate features are the retrieval embedding: one member, or ``"concat"`` of all."""

    member: str = CONCAT


class ExplainSpec(_Frozen):
    """Which member Grad-CAM explains, at which layer (dotted module path; default its last Conv2d)."""

    member: str
    layer: str | None = None


class ClassifierSpec(_Frozen):
    """The ensemble: input geometry and normalisation, how the lung region is fed, operating point."""

    input_size: int = Field(ge=16, le=4096)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    region: Region
    threshold: float = Field(ge=0.0, le=1.0)
    embedding: EmbeddingSpec = EmbeddingSpec()
    explain: ExplainSpec
    members: list[MemberSpec] = Field(min_length=1)
    cpu_bf16: bool = False
    """Whether bf16 autocast on the CPU was checked to keep this ensemble's decisions within tolerance
    (``cxr-node evaluate --bf16-agreement`` on its validation set); ``compute.cpu_precision: auto`` picks
    bf16 only for such a model."""

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if min(value) <= 0:
            raise ValueError(f"every std must be > 0; found {value}")
        return value

    @model_validator(mode="after")
    def _members_named(self) -> ClassifierSpec:
        names = [member.name for member in self.members]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise KeyedError("members", f"member names must be unique; repeated: {', '.join(duplicates)}")
        if self.embedding.member not in (*names, CONCAT):
            raise KeyedError("embedding.member", f"{self.embedding.member!r} is not {CONCAT!r} or one of {names}")
        if self.explain.member not in names:
            raise KeyedError("explain.member", f"{self.explain.member!r} is not one of {names}")
        return self

    def member(self, name: str) -> MemberSpec:
        """Return the member called ``name`` (KeyError if there is none)."""
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)


class DomainSpec(_Frozen):
    """The model's domain description (:mod:`cxr_node.infer.domain`): where its training and validation images
    lie, and the bound of the out-of-domain gate. Optional: a manifest without one runs with no gate."""

    file: str = Field(min_length=1, description="path relative to the manifest file (or absolute)")
    sha256: str = Field(pattern=_SHA256_PATTERN)

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class Manifest(_Frozen):
    """A model manifest: what the models are, where their weights are, what they are for.

    Weight paths are kept as written; :meth:`resolve` turns one into a path relative to the
    directory of the file the manifest was loaded from (the working directory for one built in memory).
    """

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    provenance: dict[str, Any] = Field(default_factory=dict)
    segmentation: SegmentationSpec
    classifier: ClassifierSpec
    metrics: dict[str, Any] | None = None
    domain: DomainSpec | None = None
    _directory: Path | None = PrivateAttr(default=None)

    @property
    def directory(self) -> Path:
        """The directory relative weight paths are resolved against."""
        return self._directory if self._directory is not None else Path.cwd()

    def resolve(self, weights: str) -> Path:
        """Return the file that a ``weights`` entry of this manifest names."""
        return self.directory / weights


def known_architecture(name: str) -> str:
    """Return ``name`` if it is a torchvision classification model, else raise ValueError saying so."""
    if name not in classification_architectures():
        raise ValueError(f"unknown architecture {name!r} (expected a torchvision classification model name)")
    return name


@cache
def classification_architectures() -> frozenset[str]:
    """Return the names of torchvision's classification models (``torchvision.models.<name>``)."""
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def load_manifest(path: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and validate a model manifest.

    Parameters
    ----------
    path : str or Path
        The YAML file.
    check_files : bool
        Also require every weights file it names to exist (checksums are verified when loading).

    Returns
    -------
    Manifest
        The validated manifest; its weight paths resolve against ``path``'s directory.

    Raises
    ------
    ModelError
        One line naming the file and the key: missing file, bad YAML, a missing, unknown or invalid
        key, an unknown architecture, a missing weights file.
    """
    file = Path(path)
    data = _read_yaml(file)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{file}: {_describe(exc)}") from exc
    manifest._directory = file.resolve().parent
    if check_files:
        _check_weights_exist(manifest, file)
    return manifest


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write ``manifest`` as YAML to ``path`` (weight paths as they are, so keep it beside them)."""
    file = Path(path)
    text = yaml.safe_dump(manifest.model_dump(mode="python"), sort_keys=False, allow_unicode=True)
    file.write_text(text, encoding="utf-8")
    return file


def _read_yaml(file: Path) -> Mapping[str, Any]:
    """Return the mapping at the top of ``file``; a :class:`ModelError` line on any problem."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(f"model manifest {file} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"model manifest {file} cannot be read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelError(f"{file}: not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(data, Mapping):
        raise ModelError(f"{file}: expected a mapping of keys at the top; found {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Return the YAML error as one line with its position."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _describe(exc: ValidationError) -> str:
    """Return the first validation error as ``key: what is wrong`` (and how many more there are)."""
    errors = exc.errors()
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, KeyedError):
        loc.append(cause.key)
    key = ".".join(loc) or "<top>"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return " ".join(f"{key}: {_message(first, cause)}{more}".split())


def _message(error: Mapping[str, Any], cause: object) -> str:
    """Return the human part of one pydantic error."""
    kind = error["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if isinstance(cause, Exception):
        return str(cause)
    found = repr(error.get("input"))
    return f"{error['msg']}; found {found[:80]}"


def _check_weights_exist(manifest: Manifest, file: Path) -> None:
    """Raise a :class:`ModelError` line for the first weights entry whose file is absent."""
    entries = [("segmentation.weights", manifest.segmentation.weights)]
    entries += [(f"classifier.members.{i}.weights", m.weights) for i, m in enumerate(manifest.classifier.members)]
    for key, weights in entries:
        if not manifest.resolve(weights).is_file():
            raise ModelError(f"{file}: {key}: weights file {manifest.resolve(weights)} not found")
    if manifest.domain is not None and not manifest.resolve(manifest.domain.file).is_file():
        raise ModelError(f"{file}: domain.file: domain description {manifest.resolve(manifest.domain.file)} not found")


def sha256_file(path: str | Path) -> str:
    """Return the lowercase hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(path: str | Path, expected_sha256: str) -> StateDict:
    """Return the state dict in ``path`` after checking its checksum; tensors only, on the CPU.

    Raises
    ------
    ModelError
        The file is missing or unreadable, its SHA-256 is not ``expected_sha256`` (the message names
        the file, the expected and the found checksums), or it does not hold a mapping of tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"weights file {file} not found")
    found = sha256_file(file)
    if found != expected_sha256.lower():
        raise ModelError(f"weights file {file} refused: sha256 expected {expected_sha256.lower()}, found {found}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled files
        raise ModelError(f"weights file {file} cannot be loaded as a state dict: {_one_line(exc)}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {file} does not hold a state dict (a mapping of names to tensors)")
    return state  # as saved: an OrderedDict whose _metadata some modules (MNASNet) need to load


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` into ``module`` strictly; a :class:`ModelError` line naming ``source`` if they differ."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights {source} do not fit {type(module).__name__}: missing {_few(result.missing_keys)},"
            f" unexpected {_few(result.unexpected_keys)}"
        )
    return module


def _few(keys: list[str]) -> str:
    """Return up to three keys and how many more, for a one-line message."""
    shown = ", ".join(keys[:3]) or "none"
    return f"{shown} (+{len(keys) - 3})" if len(keys) > 3 else shown


def _one_line(exc: BaseException) -> str:
    """Return the first line of an exception's message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def build_classifier(architecture: str, num_classes: int = 2) -> nn.Module:
    """Return a torchvision ``architecture`` with random weights and a ``num_classes`` head (no download).

    Raises
    ------
    ModelError
        ``architecture`` is not a torchvision classification model.
    """
    _require_known(architecture)
    model: nn.Module = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    return model


def _require_known(architecture: str) -> None:
    """Raise a :class:`ModelError` line if ``architecture`` is not a torchvision classification model."""
    if architecture not in classification_architectures():
        raise ModelError(f"unknown architecture {architecture!r} (expected a torchvision classification model name)")


def final_layer(model: nn.Module) -> tuple[str, nn.Linear | nn.Conv2d]:
    """Return the name and module of ``model``'s classification layer.

    That is its last :class:`~torch.nn.Linear`, or, for networks without one (SqueezeNet), its last
    :class:`~torch.nn.Conv2d`. Registration order is execution order in every torchvision model.

    Raises
    ------
    ModelError
        ``model`` has neither.
    """
    layers: list[tuple[str, nn.Linear | nn.Conv2d]]
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = layers or [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not layers:
        raise ModelError(f"{type(model).__name__} has no Linear or Conv2d layer to classify with")
    return layers[-1]


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (rows, columns) size, stride or padding."""
    return (int(value[0]), int(value[1]))


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace ``model``'s :func:`final_layer` by a freshly initialised one with ``num_classes`` outputs."""
    name, old = final_layer(model)
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        padding = old.padding if isinstance(old.padding, str) else _pair(old.padding)
        new = nn.Conv2d(old.in_channels, num_classes, _pair(old.kernel_size), _pair(old.stride), padding)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def imagenet_start(architecture: str, num_classes: int = 2) -> nn.Module:
    """Return ``architecture`` with torchvision's default ImageNet weights and a new ``num_classes`` head.

    The weights come only from the local torch hub cache (``torch.hub.get_dir()/checkpoints``); this
    never downloads.

    Raises
    ------
    ModelError
        Unknown architecture, no default weights, or the weights file is not in the cache (the
        message says which file to put where, or to train with ``--no-pretrained``).
    """
    _require_known(architecture)
    weights = torchvision.models.get_model_weights(architecture).DEFAULT
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    filename = Path(urlparse(weights.url).path).name
    if not (directory / filename).is_file():
        raise ModelError(
            f"ImageNet weights for {architecture} not in {directory}; put {filename} there"
            " or train from scratch with --no-pretrained"
        )
    with _no_downloads(architecture, directory):
        model = torchvision.models.get_model(architecture, weights=weights)
    return replace_head(model, num_classes)


@contextmanager
def _no_downloads(architecture: str, directory: Path) -> Iterator[None]:
    """Make torch.hub's downloader raise a :class:`ModelError` for the duration (not thread-safe)."""

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise ModelError(f"ImageNet weights for {architecture} not in {directory}; refusing to download {url}")

    original = torch.hub.download_url_to_file
    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original
