"""Turn the ``compute.device`` setting (auto | cpu | cuda | cuda:N) into a :class:`torch.device`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import torch
from torch import nn

from cxr_node.errors import ModelError

_CUDA_SPEC: Final = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(spec: str) -> torch.device:
    """Return the device that ``compute.device`` names.

    Parameters
    ----------
    spec : str
        ``"auto"`` (the first CUDA device if there is one, else the CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``; case and surrounding blanks are ignored.

    Returns
    -------
    torch.device
        The device to load the models on.

    Raises
    ------
    ModelError
        ``spec`` is none of the above, or it names a CUDA device this machine does not have; the
        one-line message says what to set instead.
    """
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_SPEC.match(text)
    if match is None:
        raise ModelError(f"compute.device must be auto, cpu, cuda or cuda:N; found {spec!r}")
    return _cuda_device(spec, int(match.group(1) or 0))


def _cuda_device(spec: str, index: int) -> torch.device:
    """Return ``cuda:index`` if this machine has it, else raise a one-line :class:`ModelError`."""
    if not torch.cuda.is_available():
        raise ModelError(
            f"compute.device is {spec!r} but no CUDA device is available; set compute.device: cpu (or auto)"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ModelError(
            f"compute.device is {spec!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1});"
            " set compute.device: cpu, auto or an existing cuda:N"
        )
    return torch.device("cuda", index)


def place(module: nn.Module, device: torch.device | str, memory_format: torch.memory_format) -> nn.Module:
    """Move ``module`` to ``device`` with its 4-D weights in ``memory_format`` (channels_last or contiguous).

    ``Module.to`` takes ``memory_format`` as a keyword its type stubs do not declare; this is the one typed call.
    """
    move: Callable[..., nn.Module] = module.to
    return move(device=device, memory_format=memory_format)
