"""The classifier ensemble: member probabilities, their mean, the retrieval embedding and Grad-CAM in one pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from cxr_node.errors import ModelError
from cxr_node.infer.device import CpuPrecision, place
from cxr_node.infer.explain import GradCam
from cxr_node.infer.registry import (
    CONCAT,
    Manifest,
    StateDict,
    build_classifier,
    final_layer,
    load_into,
    load_weights,
)

Precision = Literal["bf16", "fp16", "fp32"]

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
_AUTOCAST_DTYPES: Final = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RuntimeOptions:
    """How the ensemble runs.

    Attributes
    ----------
    device : torch.device
        Where the members live (see :func:`cxr_node.infer.device.resolve_device`).
    channels_last : bool
        Store weights and inputs NHWC (faster convolutions on recent GPUs).
    precision : {"bf16", "fp16", "fp32"}
        Autocast dtype on CUDA (``worker.precision``).
    cpu_precision : {"fp32", "bf16"}
        On the CPU: float32, or autocast to bfloat16 (``compute.cpu_precision``, resolved by
        :func:`cxr_node.infer.device.resolve_cpu_precision`).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    precision: Precision = "bf16"
    cpu_precision: CpuPrecision = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32; found {self.precision!r}")
        if self.cpu_precision not in ("bf16", "fp32"):
            raise ValueError(f"cpu_precision must be bf16 or fp32; found {self.cpu_precision!r}")

    @property
    def active_precision(self) -> Precision:
        """The precision the ensemble runs at on this device: ``precision`` on CUDA, ``cpu_precision`` elsewhere."""
        return self.precision if self.device.type == "cuda" else self.cpu_precision

    def autocast(self) -> AbstractContextManager[object]:
        """Return the autocast context for a forward pass (a no-op in fp32).

        Only the forward pass belongs inside it: gradients (Grad-CAM) are taken outside, as autocast asks.
        """
        if self.active_precision == "fp32":
            return nullcontext()
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        return torch.autocast(device_type=kind, dtype=_AUTOCAST_DTYPES[self.active_precision])

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of weights and inputs."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


@dataclass(frozen=True)
class EnsembleOutput:
    """What the ensemble says about a batch of ``N`` images of side ``S``.

    Attributes
    ----------
    member_probs : Mapping[str, numpy.ndarray]
        Member name to its ``(N,)`` float32 positive-class probability (softmax[:, 1]), in member order.
    probability : numpy.ndarray
        ``(N,)`` float32: the mean of the members' probabilities.
    embedding : numpy.ndarray
        ``(N, D)`` float32, unit L2 norm: penultimate features for retrieval.
    heatmap : numpy.ndarray
        ``(N, S, S)`` float32 in [0, 1]: Grad-CAM of the explain member for the positive class.
    """

    member_probs: Mapping[str, NDArray[np.float32]]
    probability: NDArray[np.float32]
    embedding: NDArray[np.float32]
    heatmap: NDArray[np.float32]


@dataclass(frozen=True)
class _Pass:
    """One member's results on one batch, still as tensors."""

    probability: torch.Tensor
    features: torch.Tensor | None
    heatmap: torch.Tensor | None = None


class FeatureHook:
    """Captures a network's penultimate features: the input of its :func:`~cxr_node.infer.registry.final_layer`.

    For a final ``Linear`` this is the ``(N, D)`` vector it classifies; for a final ``Conv2d``
    (SqueezeNet) it is that convolution's ``(N, D, h, w)`` input, globally average-pooled to ``(N, D)``.
    Use :meth:`attached` around the forward pass; :attr:`features` then holds float32 ``(N, D)``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layer_name, self.layer = final_layer(model)
        self.features: torch.Tensor | None = None

    @contextmanager
    def attached(self) -> Iterator[FeatureHook]:
        """Capture features during the forward passes run inside the block."""
        self.features = None
        handle = self.layer.register_forward_hook(self._keep)
        try:
            yield self
        finally:
            handle.remove()

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        """Forward hook: pool and keep the layer's input."""
        features = inputs[0].detach().float()
        if features.ndim == 4:
            features = features.mean(dim=(2, 3))
        self.features = features.flatten(1)


def _head_outputs(layer: nn.Linear | nn.Conv2d) -> int:
    """Return how many classes a final layer produces."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class Ensemble:
    """Two-class CNNs whose positive-class probabilities are averaged (Keidar et al. 2021).

    Parameters
    ----------
    members : Mapping[str, torch.nn.Module]
        Name to network; each maps ``(N, 3, S, S)`` normalised images to ``(N, 2)`` logits. They are
        put in eval mode, frozen and moved to the device once, here, in place: the ensemble owns them
        (pass copies to build a second ensemble from the same modules).
    explain : str
        The member Grad-CAM explains.
    explain_layer : str, optional
        Its target layer (dotted path); default its last non-head ``Conv2d``.
    embedding : str
        A member name, or ``"concat"``: every member's L2-normalised features, concatenated in member
        order and normalised again.
    options : RuntimeOptions
        Device, memory format and precision.
    mean, std : sequence of float
        Per-channel normalisation :meth:`prepare` applies (ImageNet statistics by default).

    Raises
    ------
    ModelError
        ``explain`` or ``embedding`` is not a member, a member has no 2-class head, or the explain
        layer does not exist.
    """

    def __init__(
        self,
        members: Mapping[str, nn.Module],
        *,
        explain: str,
        explain_layer: str | None = None,
        embedding: str = CONCAT,
        options: RuntimeOptions | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.options = options or RuntimeOptions()
        _check_roles(list(members), explain, embedding)
        self.members = {name: self._place(name, module) for name, module in members.items()}
        self.explain = explain
        self.embedding = embedding
        self.gradcam = GradCam(self.members[explain], explain_layer)
        self.hooks = {name: FeatureHook(module) for name, module in self.members.items()}
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        options: RuntimeOptions | None = None,
        states: Mapping[str, StateDict] | None = None,
    ) -> Ensemble:
        """Build the manifest's members and load their checksummed weights (or ``states[name]``, if given)."""
        spec = manifest.classifier
        members = {}
        for member in spec.members:
            path = manifest.resolve(member.weights)
            state = load_weights(path, member.sha256) if states is None else states[member.name]
            members[member.name] = load_into(build_classifier(member.architecture), state, path)
        return cls(
            members,
            explain=spec.explain.member,
            explain_layer=spec.explain.layer,
            embedding=spec.embedding.member,
            options=options,
            mean=spec.mean,
            std=spec.std,
        )

    def _place(self, name: str, module: nn.Module) -> nn.Module:
        """Check the head, then put ``module`` in eval mode, frozen, on the device and memory format."""
        _, head = final_layer(module)
        if _head_outputs(head) != 2:
            raise ModelError(f"ensemble member {name!r} has {_head_outputs(head)} outputs; a 2-class head is needed")
        module = module.eval().requires_grad_(False)
        return place(module, self.options.device, self.options.memory_format)

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """Return ``(N, 3, S, S)`` normalised network input from ``(N, S, S)`` float32 images in [0, 1].

        The grey image is repeated over the three channels, then the manifest's mean and std are applied.
        """
        if not isinstance(images, np.ndarray) or images.dtype != np.float32 or images.ndim != 3:
            found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"images must be a float32 (N, S, S) numpy array; found {found}")
        grey = torch.from_numpy(np.ascontiguousarray(images))[:, None].expand(-1, 3, -1, -1)
        return (grey - self.mean).div_(self.std)  # the difference is new: divided in place

    def forward(self, batch: torch.Tensor) -> EnsembleOutput:
        """Run every member on ``batch`` ``(N, 3, S, S)`` (normalised) and combine their outputs.

        The explain member runs with gradients (its probability and features come from the same pass
        as the Grad-CAM); the others run under :func:`torch.inference_mode`.
        """
        x = self._to_device(batch)
        passes = {
            name: self._explained(name, x) if name == self.explain else self._inferred(name, x) for name in self.members
        }
        probs = torch.stack([p.probability for p in passes.values()])
        return EnsembleOutput(
            member_probs={name: _numpy(p.probability) for name, p in passes.items()},
            probability=_numpy(probs.mean(dim=0)),
            embedding=_numpy(self._embedding(passes)),
            heatmap=_numpy(_required(passes[self.explain].heatmap)),
        )

    __call__ = forward

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Check ``batch`` and move it to the device in the configured memory format."""
        if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
            found = batch.dtype if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"batch must be a floating-point torch.Tensor; found {found}")
        if batch.ndim != 4 or batch.shape[0] < 1 or batch.shape[1] != 3:
            raise ValueError(f"batch must have shape (N, 3, S, S) with N >= 1; found {tuple(batch.shape)}")
        x = batch.detach().to(self.options.device, dtype=torch.float32, non_blocking=True)
        return x.contiguous(memory_format=self.options.memory_format)

    def _wants_features(self, name: str) -> bool:
        """Whether the embedding uses ``name``'s features."""
        return self.embedding in (CONCAT, name)

    def _inferred(self, name: str, x: torch.Tensor) -> _Pass:
        """Run member ``name`` without gradients."""
        hook = self.hooks[name]
        with torch.inference_mode(), self.options.autocast(), hook.attached():
            logits = self.members[name](x)
        return _Pass(_positive(logits, name), hook.features if self._wants_features(name) else None)

    def _explained(self, name: str, x: torch.Tensor) -> _Pass:
        """Run member ``name`` with gradients and return its probability, features and Grad-CAM maps."""
        hook, size = self.hooks[name], (x.shape[-2], x.shape[-1])
        with torch.inference_mode(False), torch.enable_grad():
            inputs = x.clone().requires_grad_(True)
            with hook.attached(), self.gradcam.recording():
                with self.options.autocast():
                    logits = self.members[name](inputs)
                heatmap = self.gradcam.heatmap(logits[:, 1].float(), size)
        features = hook.features if self._wants_features(name) else None
        return _Pass(_positive(logits.detach(), name), features, heatmap)

    def _embedding(self, passes: Mapping[str, _Pass]) -> torch.Tensor:
        """Return the unit-norm ``(N, D)`` embedding from the members' features."""
        if self.embedding != CONCAT:
            return F.normalize(_required(passes[self.embedding].features), dim=1)
        parts = [F.normalize(_required(p.features), dim=1) for p in passes.values()]
        return F.normalize(torch.cat(parts, dim=1), dim=1)

    @property
    def names(self) -> list[str]:
        """Member names, in order."""
        return list(self.members)


def _check_roles(names: list[str], explain: str, embedding: str) -> None:
    """Raise a :class:`ModelError` line unless the explain and embedding members exist."""
    if not names:
        raise ModelError("an ensemble needs at least one member")
    if explain not in names:
        raise ModelError(f"explain member {explain!r} is not one of {names}")
    if embedding not in (*names, CONCAT):
        raise ModelError(f"embedding member {embedding!r} is not {CONCAT!r} or one of {names}")


def _positive(logits: torch.Tensor, name: str) -> torch.Tensor:
    """Return softmax[:, 1] of ``(N, 2)`` logits in float32."""
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ModelError(f"ensemble member {name!r} returned {tuple(logits.shape)}; (N, 2) logits are needed")
    return torch.softmax(logits.float(), dim=1)[:, 1]


def _required(value: torch.Tensor | None) -> torch.Tensor:
    """Return ``value``; a member pass that should have produced it did not (a bug, not a user error)."""
    if value is None:
        raise RuntimeError("an ensemble pass did not produce a tensor it was asked for")
    return value


def _numpy(tensor: torch.Tensor) -> NDArray[np.float32]:
    """Return ``tensor`` as a float32 numpy array on the CPU."""
    return tensor.detach().float().cpu().numpy()
