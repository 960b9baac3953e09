"""Turn the ``compute`` settings into a :class:`torch.device` and, on the CPU, the precision to run at."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import torch
from torch import nn

from cxr_node.errors import ModelError

_CUDA_SPEC: Final = re.compile(r"^cuda(?::(\d+))?$")
CPUINFO: Final = Path("/proc/cpuinfo")

CpuPrecision = Literal["bf16", "fp32"]
CPU_PRECISIONS: Final = ("auto", "bf16", "fp32")


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


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers for bfloat16 inference.

    Attributes
    ----------
    capability : str
        :func:`torch.backends.cpu.get_cpu_capability` (``AVX512``, ``AVX2``, ...): the widest vector kernels
        torch dispatches to.
    flags : frozenset of str
        The kernel's CPU flags (``/proc/cpuinfo``); empty where there is no such file.
    onednn : bool
        Whether torch was built with oneDNN, which runs bf16 convolutions on the CPU.
    """

    capability: str
    flags: frozenset[str]
    onednn: bool

    @classmethod
    def detect(cls, cpuinfo: Path = CPUINFO) -> CpuFeatures:
        """Read this machine's features."""
        onednn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]  # unannotated in torch
        return cls(torch.backends.cpu.get_cpu_capability(), _cpu_flags(cpuinfo), onednn)

    @property
    def avx512_bf16(self) -> bool:
        """bf16 dot products in AVX-512 (``vdpbf16ps``): bf16 at fp32's multiply-add rate, half the bytes."""
        return "avx512_bf16" in self.flags

    @property
    def amx_bf16(self) -> bool:
        """AMX tiles with bf16 (Sapphire Rapids and later): matrix units several times fp32's rate."""
        return {"amx_bf16", "amx_tile"} <= self.flags

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 runs in hardware here (AVX512-BF16 or AMX-BF16) through oneDNN."""
        return self.onednn and (self.avx512_bf16 or self.amx_bf16)

    def describe(self) -> str:
        """One line for logs and reports: capability and the bf16 features found."""
        found = [name for name, present in (("avx512_bf16", self.avx512_bf16), ("amx_bf16", self.amx_bf16)) if present]
        return f"{self.capability}, bf16: {', '.join(found) or 'none'}"


def _cpu_flags(cpuinfo: Path) -> frozenset[str]:
    """Return the flags of the first processor listed in ``cpuinfo``; empty when it cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_cpu_precision(spec: str, *, model_checked: bool, features: CpuFeatures | None = None) -> CpuPrecision:
    """Return the precision ``compute.cpu_precision`` names: what the ensemble runs at on the CPU.

    Parameters
    ----------
    spec : str
        ``"fp32"``; ``"bf16"`` (autocast to bfloat16 on any CPU, slow where it is emulated); or ``"auto"``:
        bf16 only for a checked model on a CPU with AMX-BF16, fp32 otherwise. AVX512-BF16 alone does not
        qualify: its bf16 dot product does as many multiply-adds per cycle as fp32 FMAs, and on such a CPU
        the paper's ensemble ran slower in bf16 than in fp32 (docs/benchmarks.md, Inference).
    model_checked : bool
        Whether the model's manifest says bf16 keeps its decisions within tolerance (``classifier.cpu_bf16``).
    features : CpuFeatures, optional
        The CPU's features; detected when not given.

    Raises
    ------
    ModelError
        ``spec`` is none of the above.
    """
    text = spec.strip().lower()
    if text not in CPU_PRECISIONS:
        raise ModelError(f"compute.cpu_precision must be auto, bf16 or fp32; found {spec!r}")
    if text != "auto":
        return "bf16" if text == "bf16" else "fp32"
    if not model_checked:
        return "fp32"
    found = features or CpuFeatures.detect()
    return "bf16" if found.onednn and found.amx_bf16 else "fp32"
