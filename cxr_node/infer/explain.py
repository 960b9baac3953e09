"""Grad-CAM (Selvaraju et al. 2017): where in the image a network's positive-class score comes from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_node.errors import ModelError
from cxr_node.infer.registry import final_layer


def default_layer(model: nn.Module) -> str:
    """Return the dotted name of ``model``'s last :class:`~torch.nn.Conv2d` that is not its classifier.

    Raises
    ------
    ModelError
        ``model`` has no such convolution (Grad-CAM needs a spatial feature map).
    """
    head, _ = final_layer(model)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name != head]
    if not names:
        raise ModelError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    last: str = names[-1]
    return last


def cam(activations: torch.Tensor, gradients: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return Grad-CAM maps from a layer's activations and the score's gradients with respect to them.

    Parameters
    ----------
    activations, gradients : torch.Tensor
        ``(N, C, h, w)``, same shape, any float dtype.
    size : tuple of int
        ``(H, W)`` to upsample to (the network's input size).

    Returns
    -------
    torch.Tensor
        ``(N, H, W)`` float32 in [0, 1]: ReLU of the gradient-weighted channel sum, bilinearly
        upsampled, divided by each map's maximum; a map with no positive evidence is all zeros.
    """
    if activations.ndim != 4 or activations.shape != gradients.shape:
        raise ValueError(
            "activations and gradients must be (N, C, h, w) of one shape;"
            f" found {tuple(activations.shape)} and {tuple(gradients.shape)}"
        )
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((weights * activations.float()).sum(dim=1, keepdim=True))
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0.0)
    peak = maps.amax(dim=(1, 2), keepdim=True)
    safe = peak.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(peak > 0, maps / safe, torch.zeros_like(maps)).clamp(0.0, 1.0)


class GradCam:
    """Grad-CAM on one layer of one network.

    Use :meth:`recording` around a forward pass that the caller runs with gradients enabled, then
    :meth:`heatmap` on the score to explain; or call the object for a self-contained pass.
    Gradients are taken with :func:`torch.autograd.grad` with respect to the recorded activation
    only, so no parameter ``.grad`` is written and frozen parameters are fine.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in eval mode.
    layer : str, optional
        Dotted path of the target module; default :func:`default_layer`. Its output must be a
        ``(N, C, h, w)`` tensor.

    Raises
    ------
    ModelError
        ``layer`` is not a module of ``model``, or the default layer does not exist.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        self.model = model
        self.layer_name = default_layer(model) if layer is None else layer
        try:
            self.layer = model.get_submodule(self.layer_name)
        except AttributeError as exc:
            raise ModelError(f"Grad-CAM layer {self.layer_name!r} is not a module of {type(model).__name__}") from exc
        self._activation: torch.Tensor | None = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the target layer's output during the forward passes run inside the block."""
        handle = self.layer.register_forward_hook(self._keep)
        try:
            yield
        finally:
            handle.remove()
            self._activation = None

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        """Forward hook: keep the layer's output (the graph node gradients are taken against)."""
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ModelError(f"Grad-CAM layer {self.layer_name!r} must output (N, C, h, w); it does not")
        self._activation = output

    def heatmap(self, score: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Return the ``(N, H, W)`` Grad-CAM maps of ``score`` ``(N,)`` from the recorded forward pass.

        Each sample's score depends only on its own activations (eval mode), so the gradient of the
        summed score gives every sample's own gradient in one backward pass. After a bf16 autocast forward
        pass the activation and its gradient are bf16; :func:`cam` weighs and sums them in float32.
        """
        if self._activation is None:
            raise RuntimeError("GradCam.heatmap needs a forward pass inside GradCam.recording()")
        if not score.requires_grad:
            raise ModelError("Grad-CAM needs gradients: run the forward pass with gradients enabled")
        (gradients,) = torch.autograd.grad(score.sum(), self._activation)
        return cam(self._activation.detach(), gradients, size)

    def __call__(self, batch: torch.Tensor, target: int = 1) -> np.ndarray:
        """Return ``(N, H, W)`` float32 maps in [0, 1] for class ``target`` of ``batch`` ``(N, C, H, W)``."""
        if batch.ndim != 4:
            raise ValueError(f"batch must be (N, C, H, W); found shape {tuple(batch.shape)}")
        with torch.inference_mode(False), torch.enable_grad(), self.recording():
            inputs = batch.detach().clone().requires_grad_(True)
            logits = self.model(inputs)
            maps = self.heatmap(logits[:, target], (batch.shape[-2], batch.shape[-1]))
        return maps.cpu().numpy()
