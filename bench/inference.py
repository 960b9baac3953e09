"""Inference speed of the paper's ensemble and of the demo engine, against this machine's fp32 matmul throughput.

Usage::

    .venv/bin/python bench/inference.py [--quick] [--repeat R] [--threads T] [--variants] [--write-docs]
    .venv/bin/python bench/inference.py --gpu-only --write-docs      # on a machine with a CUDA device

What it measures, in one process, with ``torch.set_num_threads(T)`` (default: the cores this process may use):

1. **Matmul reference**: fp32 ``torch.matmul`` of two random n x n matrices (n = 2048), best of 10 after a warm-up,
   GFLOP/s = 2 n^3 / t; measured before and after the network timings, and the higher of the two is the
   reference (so a slow moment does not flatter the efficiency). Each timed run of the ensemble also starts
   with a best-of-3 matmul probe, for a "same-run" efficiency that a drift of a shared machine cannot skew.
2. **FLOPs per image** of each member at 224 px, counted with :class:`torch.utils.flop_counter.FlopCounterMode`:
   convolutions and linear layers only, one multiply-add = 2 FLOPs; batch norm, ReLU, pooling and additions
   are not counted (they are a fraction of a percent of the arithmetic, but not of the time).
3. **The paper's ensemble**: ResNet34, ResNet50, ResNet152 and VGG16 from torchvision with 2-class heads and
   random weights (``build_classifier``), placed by the node's own ``Ensemble`` (``RuntimeOptions``: CPU, fp32,
   channels_last on -- the node's default -- and off). Inputs come from ``Ensemble.prepare`` of random images.

   * *pure classification*: each member's ``module(x)`` under ``torch.inference_mode``, one after the other as
     the node runs them; the ensemble time of a repeat is the sum of its members' times in that repeat;
   * *the node's* ``Ensemble.forward``: the same members, but the explain member (ResNet50) runs with gradients
     for Grad-CAM, plus the concatenated embedding and the copies to numpy; its overhead is reported apart.

   Batch 1 (ms per image) and batch 8 (images/s); the median of R timed runs after W warm-up runs. Every run
   times both layouts, pure then ``Ensemble.forward``, one after the other (each layout has its own copy of the
   members), so a slow spell of a shared machine hits every configuration alike.
   Achieved GFLOP/s at batch 8 = FLOPs per image x images/s; efficiency = that / matmul GFLOP/s (target 50%).
4. **Where the time goes** at batch 8 (node default layout): forward hooks time every leaf module of each
   member, so each kind of layer (3x3, 1x1 and first convolutions, linear, batch norm, ReLU, pooling) gets
   its share of the time and its own GFLOP/s; what no leaf module covers (residual additions, flatten) is "rest".
5. **The demo engine end to end**: ``Engine.from_manifest(load_manifest("models/demo/manifest.yaml"))`` on
   1024 px phantoms, batch 1 and 8: wall time per image and ``Analysis.timings_ms`` (segment, classify).
6. ``--variants`` (adds about 4 minutes on 2 cores): what else the same CPU could do with the ensemble at batch 8:
   one thread, oneDNN off, batch norm folded into the convolutions (``torch.fx``), TorchScript trace + freeze,
   ``torch.compile`` (inductor with the local C++ compiler). None of these is what the node runs.
7. **CPU precision** (``--precision-only`` runs just this, about 5 minutes on 2 cores): the ensemble at fp32 and at
   bf16 autocast (``RuntimeOptions(cpu_precision="bf16")``), channels_last and NCHW, batches 1, 4, 8 and 16,
   each timed run starting with a best-of-3 fp32 and bf16 matmul probe; images/s as ratios to both.
8. On a CUDA device (or ``--gpu-only``): the ensemble at bf16 autocast (``RuntimeOptions(precision="bf16")``),
   batches 1, 8 and 32, against a bf16 matmul reference (n = 8192). Without one it says so.

It prints Markdown tables; ``--write-docs`` replaces the "## Inference" section of docs/benchmarks.md with
them, the machine facts and the command (``--gpu-only --write-docs`` replaces only its "### GPU" part,
``--precision-only --write-docs`` only its "### CPU: fp32 against bf16" part).
``--quick`` is a sanity run of the same code at 64 px with single repeats (well under 30 s).
Nothing is downloaded: every network is built with ``weights=None``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cxr_node.infer.classify import Ensemble, RuntimeOptions
from cxr_node.infer.device import CpuFeatures, resolve_cpu_precision
from cxr_node.infer.engine import Engine
from cxr_node.infer.registry import build_classifier, load_manifest
from cxr_node.training.phantoms import make_phantom

REPO: Final = Path(__file__).resolve().parent.parent
DOCS: Final = REPO / "docs" / "benchmarks.md"
SECTION: Final = "## Inference"
GPU_SUBSECTION: Final = "### GPU (bf16)"
CPU_PRECISION_SUBSECTION: Final = "### CPU: fp32 against bf16 autocast, layouts and batch sizes"
DEMO_MANIFEST: Final = REPO / "models" / "demo" / "manifest.yaml"
PAPER: Final = ("resnet34", "resnet50", "resnet152", "vgg16")
EXPLAIN: Final = "resnet50"  # the explain member of the paper ensemble, as in tests/gpu/test_cuda.py
TARGET_BATCH: Final = 8
TARGET_EFFICIENCY: Final = 0.5
CPU: Final = torch.device("cpu")
GB: Final = 1e9
PURE: Final = "ensemble"  # the members' pure passes, one after the other
NODE: Final = "Ensemble.forward"  # the node's pass: Grad-CAM on the explain member, embedding, numpy copies


@dataclass(frozen=True)
class Plan:
    """How much to measure: image size, batches, warm-ups and repeats."""

    size: int = 224
    batches: tuple[int, ...] = (1, TARGET_BATCH)
    gpu_batches: tuple[int, ...] = (1, TARGET_BATCH, 32)
    warmup: int = 1
    repeat_one: int = 5  # timed runs at batch 1
    repeat_many: int = 5  # timed runs at larger batches
    repeat_variants: int = 3  # timed runs of each --variants configuration
    sweep_batches: tuple[int, ...] = (1, 4, TARGET_BATCH, 16)  # the CPU precision sweep
    repeat_sweep: int = 3  # timed runs of the sweep, per batch
    matmul_n: int = 2048
    gpu_matmul_n: int = 8192
    matmul_repeat: int = 10
    phantom_size: int = 1024
    phantoms: int = 8

    def repeats(self, batch: int) -> int:
        """Timed runs at ``batch``."""
        return self.repeat_one if batch == 1 else self.repeat_many


QUICK: Final = Plan(
    size=64,
    warmup=1,
    repeat_one=2,
    repeat_many=1,
    repeat_variants=1,
    sweep_batches=(1, 4),
    repeat_sweep=1,
    matmul_n=1024,
    gpu_matmul_n=2048,
    matmul_repeat=3,
    phantom_size=256,
)


# ------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where eager work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Return the seconds ``call()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def repeated(call: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Run ``call`` ``warmup`` times untimed, then return the seconds of ``repeat`` timed runs."""
    for _ in range(warmup):
        call()
    return [timed(call, device) for _ in range(repeat)]


def matmul_gflops(n: int, repeat: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Return the best GFLOP/s (2 n^3 / t) of ``torch.matmul`` on two random ``n`` x ``n`` matrices."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    seconds = repeated(lambda: torch.matmul(a, b), device, warmup=1, repeat=repeat)
    return 2 * n**3 / min(seconds) / GB


# --------------------------------------------------------------------------------------------- FLOPs


def count_flops(ensemble: Ensemble, size: int) -> dict[str, int]:
    """FLOPs of one image: each member's forward pass, the pure ensemble, and ``Ensemble.forward``.

    :class:`FlopCounterMode` counts convolutions and matrix products (2 FLOPs per multiply-add);
    ``Ensemble.forward`` includes Grad-CAM's backward pass.
    """
    x = ensemble.prepare(np.zeros((1, size, size), dtype=np.float32))
    flops = {}
    for name, module in ensemble.members.items():
        with FlopCounterMode(display=False) as counter:
            classify_only(module, x, ensemble.options)
        flops[name] = int(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        ensemble.forward(x)
    return {**flops, PURE: sum(flops.values()), NODE: int(counter.get_total_flops())}


# ------------------------------------------------------------------------------------------ ensemble


@dataclass(frozen=True)
class LayoutTimes:
    """Seconds per batch of each timed run of the paper's ensemble, in one memory layout on one device."""

    label: str
    members: tuple[str, ...]
    runs: Mapping[tuple[str, int], list[float]]  # (member, PURE or NODE; batch) -> seconds of each run
    matmul: Mapping[int, list[float]]  # batch -> GFLOP/s of the matmul probe at the start of each run

    def median(self, name: str, batch: int) -> float:
        """Median seconds per batch."""
        return statistics.median(self.runs[name, batch])

    def overhead(self, batch: int) -> float:
        """Median over the runs of ``Ensemble.forward`` minus the pure passes of the same run, in seconds."""
        pairs = zip(self.runs[PURE, batch], self.runs[NODE, batch], strict=True)
        return statistics.median(node - pure for pure, node in pairs)

    def same_run_efficiency(self, flops: int, batch: int) -> float:
        """Median over the runs of the pure ensemble's FLOP rate over the matmul probe's rate in the same run."""
        pairs = zip(self.runs[PURE, batch], self.matmul[batch], strict=True)
        return statistics.median(flops * batch / seconds / GB / probe for seconds, probe in pairs)

    def rate_range(self, name: str, batch: int) -> str:
        """Lowest and highest images/s over the timed runs."""
        runs = self.runs[name, batch]
        return f"{batch / max(runs):.2f}-{batch / min(runs):.2f}"


def layout_label(channels_last: bool) -> str:
    """The name of a memory layout in the tables."""
    return "channels_last" if channels_last else "NCHW"


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Return ``(batch, size, size)`` float32 grey images in [0, 1]."""
    return np.random.default_rng(seed).random((batch, size, size), dtype=np.float32)


def classify_only(module: nn.Module, x: torch.Tensor, options: RuntimeOptions) -> torch.Tensor:
    """One member's pure classification forward pass, as the node runs the members it does not explain."""
    with torch.inference_mode(), options.autocast():
        return module(x)


def time_once(ensemble: Ensemble, batch: torch.Tensor, with_forward: bool = True) -> tuple[dict[str, float], float]:
    """Time each member's pure pass on ``batch``, one after the other, then the node's ``Ensemble.forward``."""
    options = ensemble.options
    x = batch.to(options.device).contiguous(memory_format=options.memory_format)
    pure = {
        name: timed(lambda m=m: classify_only(m, x, options), options.device) for name, m in ensemble.members.items()
    }
    return pure, timed(lambda: ensemble.forward(batch), options.device) if with_forward else 0.0


def ensembles(members: Mapping[str, nn.Module], options: Sequence[RuntimeOptions]) -> list[Ensemble]:
    """One Ensemble per ``options``: the first owns ``members``, the others own copies."""
    copies = [members] + [{name: copy.deepcopy(m) for name, m in members.items()} for _ in options[1:]]
    return [Ensemble(ms, explain=EXPLAIN, options=o) for ms, o in zip(copies, options, strict=True)]


def measure_layouts(
    placed: Sequence[Ensemble], plan: Plan, batches: Sequence[int], probe: Callable[[], float]
) -> list[LayoutTimes]:
    """Time every ensemble, pure and through ``Ensemble.forward``, interleaved within each run.

    Each run starts with ``probe()`` (a short matmul, GFLOP/s), then times all of them one after the
    other, so a slow spell of the machine hits every configuration alike; the first ``plan.warmup`` runs
    are not kept.
    """
    kept: list[dict[tuple[str, int], list[float]]] = [defaultdict(list) for _ in placed]
    matmul: dict[int, list[float]] = defaultdict(list)
    for batch in batches:
        inputs = [e.prepare(random_images(batch, plan.size)) for e in placed]
        for run in range(plan.warmup + plan.repeats(batch)):
            if run >= plan.warmup:
                matmul[batch].append(probe())
            for ensemble, x, runs in zip(placed, inputs, kept, strict=True):
                pure, node = time_once(ensemble, x)
                if run >= plan.warmup:
                    for name, seconds in [*pure.items(), (PURE, sum(pure.values())), (NODE, node)]:
                        runs[name, batch].append(seconds)
        for e, runs in zip(placed, kept, strict=True):
            medians = ", ".join(f"{n} {statistics.median(runs[n, batch]):.3f} s" for n in (PURE, NODE))
            print(f"  {layout_label(e.options.channels_last)} batch {batch}: {medians}", file=sys.stderr)
    return [
        LayoutTimes(layout_label(e.options.channels_last), tuple(e.names), runs, matmul)
        for e, runs in zip(placed, kept, strict=True)
    ]


# ------------------------------------------------------------------------------------ time by layer


@dataclass
class LayerClock:
    """Seconds and FLOPs per kind of leaf module, collected by forward hooks during one pass."""

    seconds: dict[str, float]
    flops: dict[str, float]
    calls: dict[str, int]
    start: float = 0.0

    @classmethod
    def empty(cls) -> LayerClock:
        """A clock with nothing recorded."""
        return cls(defaultdict(float), defaultdict(float), defaultdict(int))

    def before(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        """Forward pre-hook: start the clock (leaf modules never nest)."""
        self.start = time.perf_counter()

    def after(self, module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> None:
        """Forward hook: charge the time and FLOPs to the module's kind."""
        kind = layer_kind(module)
        self.seconds[kind] += time.perf_counter() - self.start
        self.flops[kind] += layer_flops(module, output)
        self.calls[kind] += 1


def layer_kind(module: nn.Module) -> str:
    """The row a leaf module is counted in."""
    if isinstance(module, nn.Conv2d):
        if module.in_channels == 3:
            return f"first conv {module.kernel_size[0]}x{module.kernel_size[1]} (3 input channels)"
        return f"conv {module.kernel_size[0]}x{module.kernel_size[1]}"
    kinds = {
        nn.Linear: "linear",
        nn.BatchNorm2d: "batch norm",
        nn.ReLU: "ReLU",
        nn.MaxPool2d: "pooling",
        nn.AdaptiveAvgPool2d: "pooling",
    }
    return next((name for cls, name in kinds.items() if isinstance(module, cls)), "other modules")


def layer_flops(module: nn.Module, output: torch.Tensor) -> float:
    """FLOPs (2 per multiply-add) of a convolution or linear layer that produced ``output``; 0 for others."""
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return 2.0 * output.numel() * per_output
    if isinstance(module, nn.Linear):
        return 2.0 * output.numel() * module.in_features
    return 0.0


@contextlib.contextmanager
def clocked(model: nn.Module) -> Iterator[LayerClock]:
    """Time every leaf module of ``model`` during the forward passes run inside the block."""
    clock = LayerClock.empty()
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(clock.before) for m in leaves]
    handles += [m.register_forward_hook(clock.after) for m in leaves]
    try:
        yield clock
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class LayerRow:
    """One kind of layer of one member: its share of a batch's time and its throughput."""

    model: str
    kind: str
    calls: int
    seconds: float
    share: float
    gflop: float


def time_by_layer(ensemble: Ensemble, plan: Plan) -> list[LayerRow]:
    """Return, per member and kind of layer, the time of one hooked pass at the target batch (after a warm-up)."""
    options = ensemble.options
    x = ensemble.prepare(random_images(TARGET_BATCH, plan.size)).contiguous(memory_format=options.memory_format)
    rows: list[LayerRow] = []
    for name, module in ensemble.members.items():
        classify_only(module, x, options)
        with clocked(module) as clock:
            total = timed(lambda m=module: classify_only(m, x, options), options.device)
        rest = max(total - sum(clock.seconds.values()), 0.0)
        kinds = sorted(clock.seconds, key=clock.seconds.__getitem__, reverse=True)
        rows += [
            LayerRow(name, k, clock.calls[k], clock.seconds[k], clock.seconds[k] / total, clock.flops[k] / GB)
            for k in kinds
        ]
        rows.append(LayerRow(name, "rest (residual adds, flatten, Python)", 0, rest, rest / total, 0.0))
    return rows


# ------------------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    """An alternative way to run the same ensemble on the CPU, with its batch-8 time and its set-up time."""

    name: str
    seconds: float
    setup_s: float


def _traced(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """TorchScript trace + freeze (folds batch norm, fuses conv + ReLU, pre-packs oneDNN weights)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(module, x).eval())  # type: ignore[no-any-return]


def _folded(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch norm folded into the preceding convolutions by ``torch.fx``."""
    from torch.fx.experimental.optimization import fuse

    return fuse(module, inplace=False)


def _compiled(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """``torch.compile`` (inductor; C++ kernels built with the local compiler)."""
    return torch.compile(module)  # type: ignore[return-value]


def _eager(module: nn.Module, x: torch.Tensor) -> nn.Module:
    return module


VARIANTS: Final[dict[str, tuple[Callable[[nn.Module, torch.Tensor], nn.Module], bool, dict[str, object]]]] = {
    # name: (transform, channels_last, settings)
    "eager, channels_last (as the node runs it)": (_eager, True, {}),
    "eager, 1 thread": (_eager, True, {"threads": 1}),
    "eager, oneDNN off (ATen im2col + MKL sgemm)": (_eager, False, {"mkldnn": False}),
    "eager, batch norm folded into conv (torch.fx fuse)": (_folded, True, {}),
    "TorchScript trace + freeze": (_traced, True, {}),
    "torch.compile (inductor)": (_compiled, True, {}),
}


@contextlib.contextmanager
def cpu_settings(threads: int | None = None, mkldnn: bool = True) -> Iterator[None]:
    """Run the block with another thread count and/or oneDNN switched off, then restore both."""
    saved = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(threads or saved[0])
    torch.backends.mkldnn.enabled = mkldnn  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.mkldnn.enabled = saved[1]  # type: ignore[assignment]


@dataclass(frozen=True)
class _Prepared:
    """One variant's transformed copies of the members, its input and settings."""

    name: str
    models: list[nn.Module]
    x: torch.Tensor
    settings: dict[str, object]
    setup_s: float


def prepare_variant(name: str, members: Mapping[str, nn.Module], batch: torch.Tensor) -> _Prepared:
    """Copy, convert and transform the members as variant ``name`` says, and run them once (that builds them)."""
    transform, channels_last, settings = VARIANTS[name]
    x = batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with cpu_settings(**settings):  # type: ignore[arg-type]
        start = time.perf_counter()
        models = [transform(copy.deepcopy(m).to(memory_format=x_format(x)), x) for m in members.values()]
        _run_all(models, x)
        return _Prepared(name, models, x, settings, time.perf_counter() - start)


def x_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a 4-d tensor."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def measure_variants(members: Mapping[str, nn.Module], batch: torch.Tensor, plan: Plan) -> list[Variant]:
    """Time the ensemble on ``batch`` under each of :data:`VARIANTS`, on copies, interleaved within each run."""
    prepared = [prepare_variant(name, members, batch) for name in VARIANTS]
    runs: dict[str, list[float]] = defaultdict(list)
    for run in range(plan.warmup + 1 + plan.repeat_variants):
        for p in prepared:
            with cpu_settings(**p.settings):  # type: ignore[arg-type]
                seconds = timed(lambda p=p: _run_all(p.models, p.x), CPU)
            if run > plan.warmup:
                runs[p.name].append(seconds)
    for p in prepared:
        print(
            f"  variant {p.name}: {statistics.median(runs[p.name]):.3f} s (set-up {p.setup_s:.1f} s)", file=sys.stderr
        )
    return [Variant(p.name, statistics.median(runs[p.name]), p.setup_s) for p in prepared]


def _run_all(models: Sequence[nn.Module], x: torch.Tensor) -> None:
    with torch.no_grad():
        for model in models:
            model(x)


# --------------------------------------------------------------------------------------- demo engine


@dataclass(frozen=True)
class DemoTimes:
    """The demo engine at one batch size: medians per image, in milliseconds."""

    batch: int
    wall_ms: float
    segment_ms: float
    classify_ms: float
    analysed: int
    images: int


def measure_demo(plan: Plan, options: RuntimeOptions, batches: Sequence[int]) -> list[DemoTimes]:
    """Load the demo models as the node does and time ``Engine.analyse`` on phantoms at each batch size."""
    engine = Engine.from_manifest(load_manifest(DEMO_MANIFEST), options)
    images = [make_phantom(seed, seed % 2, size=plan.phantom_size).image for seed in range(plan.phantoms)]
    return [demo_batch(engine, images, batch, plan) for batch in batches]


def demo_batch(engine: Engine, images: Sequence[np.ndarray], batch: int, plan: Plan) -> DemoTimes:
    """Analyse ``images`` in groups of ``batch``, ``plan.repeat_one`` times over, after a warm-up."""
    groups = [list(images[i : i + batch]) for i in range(0, len(images), batch)]
    for _ in range(plan.warmup):
        engine.analyse(groups[0])
    wall, segment, classify, analysed = [], [], [], 0
    for _ in range(plan.repeat_one):
        for group in groups:
            start = time.perf_counter()
            results = engine.analyse(group)
            wall.append((time.perf_counter() - start) * 1000 / len(group))
            segment += [r.timings_ms["segment"] for r in results]
            classify += [r.timings_ms["classify"] for r in results if r.analysed]
            analysed += sum(r.analysed for r in results)
    median_classify = statistics.median(classify) if classify else float("nan")
    total = plan.repeat_one * len(images)
    return DemoTimes(batch, statistics.median(wall), statistics.median(segment), median_classify, analysed, total)


# ------------------------------------------------------------------------------------ CPU precision

PRECISIONS: Final = ("fp32", "bf16")


@dataclass(frozen=True)
class PrecisionSweep:
    """The paper's ensemble at fp32 and bf16 autocast, both layouts, several batches, with matmul probes.

    Every timed run starts with a best-of-3 matmul probe in fp32 and in bf16, then times every
    configuration one after the other. On a machine others load too, the least disturbed run is the
    measure: rates are the best run's, ratios the best run's rate over the best probe in those runs.
    """

    batches: tuple[int, ...]
    matmul: Mapping[str, list[float]]  # precision -> GFLOP/s of the probe at the start of each run, all batches
    runs: Mapping[tuple[str, str, int], list[float]]  # (precision, layout, batch) -> pure ensemble seconds per run
    probes: Mapping[tuple[str, int], list[float]]  # (precision, batch) -> the probe of each run at that batch
    node: Mapping[str, list[float]]  # precision -> Ensemble.forward seconds per run at node_batch, channels_last
    node_batch: int  # the node's default batch (TARGET_BATCH) if swept, else the largest swept

    def rate(self, key: tuple[str, str, int]) -> float:
        """Best images/s over the runs."""
        return key[2] / min(self.runs[key])

    def ratio(self, key: tuple[str, str, int], flops: int, reference: str) -> float:
        """The best GFLOP/s of the ensemble over the best ``reference`` matmul probe of the same runs."""
        return flops * self.rate(key) / GB / max(self.probes[reference, key[2]])

    def best(self) -> tuple[str, str, int]:
        """The fastest configuration (images/s)."""
        return max(self.runs, key=self.rate)


def _options(precision: str, channels_last: bool) -> RuntimeOptions:
    return RuntimeOptions(CPU, channels_last, "fp32", cpu_precision="bf16" if precision == "bf16" else "fp32")


def measure_precisions(members: Mapping[str, nn.Module], plan: Plan) -> PrecisionSweep:
    """Time the pure ensemble in every (precision, layout, batch) of the plan, interleaved within each run."""
    configs = [(p, cl) for p in PRECISIONS for cl in (True, False)]
    copies = {name: copy.deepcopy(module) for name, module in members.items()}
    placed = ensembles(copies, [_options(p, cl) for p, cl in configs])
    runs: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    probes: dict[tuple[str, int], list[float]] = defaultdict(list)
    node: dict[str, list[float]] = defaultdict(list)
    node_batch = TARGET_BATCH if TARGET_BATCH in plan.sweep_batches else max(plan.sweep_batches)
    for ensemble in placed:  # warm-up: oneDNN creates and caches its kernels on the first passes
        warm = ensemble.prepare(random_images(1, plan.size))
        _pure_seconds(ensemble, warm)
        ensemble.forward(warm)
    for batch in plan.sweep_batches:
        inputs = [e.prepare(random_images(batch, plan.size)) for e in placed]
        for _ in range(plan.repeat_sweep):
            for precision, dtype in zip(PRECISIONS, (torch.float32, torch.bfloat16), strict=True):
                probes[precision, batch].append(matmul_gflops(plan.matmul_n, 3, CPU, dtype))
            for (precision, cl), ensemble, x in zip(configs, placed, inputs, strict=True):
                runs[precision, layout_label(cl), batch].append(_pure_seconds(ensemble, x))
                if batch == node_batch and cl:
                    node[precision].append(timed(lambda e=ensemble, x=x: e.forward(x), CPU))
        line = ", ".join(f"{p} {layout_label(cl)} {min(runs[p, layout_label(cl), batch]):.3f} s"
                         for p, cl in configs)  # fmt: skip
        print(f"  precision sweep batch {batch}: {line}", file=sys.stderr)
    matmul = {p: [v for (q, _), values in probes.items() if q == p for v in values] for p in PRECISIONS}
    return PrecisionSweep(tuple(plan.sweep_batches), matmul, runs, probes, node, node_batch)


def _pure_seconds(ensemble: Ensemble, batch: torch.Tensor) -> float:
    """Seconds of the members' pure passes on ``batch``, one after the other."""
    pure, _ = time_once(ensemble, batch, with_forward=False)
    return sum(pure.values())


def precision_table(sweep: PrecisionSweep, flops: int) -> str:
    """Per (precision, layout, batch): images/s, GFLOP/s and the ratios to the same runs' matmul rates."""
    cells = ["precision", "layout", "batch", "images/s", "min-max", "GFLOP/s", "/ fp32 matmul", "/ bf16 matmul"]
    lines = _header(cells, left=3)
    for key in sorted(sweep.runs, key=lambda k: (PRECISIONS.index(k[0]), k[1] != "channels_last", k[2])):
        runs, rate = sweep.runs[key], sweep.rate(key)
        spread = f"{key[2] / max(runs):.2f}-{key[2] / min(runs):.2f}"
        ratios = [f"{sweep.ratio(key, flops, ref):.2f}" for ref in PRECISIONS]
        bold = "**" if key == sweep.best() else ""
        row = [*key[:2], str(key[2]), f"{bold}{rate:.2f}{bold}", spread, f"{flops * rate / GB:.1f}", *ratios]
        lines.append(_row(row))
    return "\n".join(lines)


def precision_text(sweep: PrecisionSweep, flops: int, plan: Plan) -> str:
    """The "### CPU precision" subsection: what was run, the table and what the node takes from it."""
    fp32, bf16 = (max(sweep.matmul[p]) for p in PRECISIONS)
    best = sweep.best()
    node = {p: sweep.node_batch / min(v) for p, v in sweep.node.items()}
    at_default = {p: sweep.rate((p, "channels_last", sweep.node_batch)) for p in PRECISIONS}
    return "\n\n".join(
        [
            CPU_PRECISION_SUBSECTION,
            f"The same four members (random weights, {plan.size} px) placed by the node's `Ensemble` four times: "
            '`RuntimeOptions(cpu, channels_last or not, cpu_precision="fp32" or "bf16")`; bf16 is '
            '`torch.autocast("cpu", dtype=torch.bfloat16)` around each member\'s forward pass, as the node runs it. '
            f"Pure classification (the members one after the other under `torch.inference_mode`), batches "
            f"{', '.join(map(str, sweep.batches))}, after one warm-up pass of each configuration. For each batch "
            f"{plan.repeat_sweep} timed runs; each starts with a best-of-3 matmul probe in fp32 and in bf16 "
            f"(n = {plan.matmul_n}, 2n^3/t), then times all four configurations one after the other. "
            "Others load this machine too, so the least disturbed run is the measure: images/s of the best run "
            "(min-max over the runs beside it), ratios = the ensemble's best GFLOP/s over the best matmul probe "
            f"of the same runs; the ensemble's GFLOP count is the fp32 one ({flops / GB:.2f} GFLOP/image). "
            "Fastest configuration in bold.",
            f"Matmul probes, best over the runs: fp32 **{fp32:.1f} GFLOP/s**, bf16 **{bf16:.1f} GFLOP/s** "
            f"(bf16 / fp32 = {bf16 / fp32:.2f}).",
            precision_table(sweep, flops),
            "\n".join(
                [
                    f"- Fastest: {best[0]}, {best[1]}, batch {best[2]}, {sweep.rate(best):.2f} images/s.",
                    f"- channels_last, batch {sweep.node_batch}: fp32 {at_default['fp32']:.2f}, "
                    f"bf16 {at_default['bf16']:.2f} images/s (bf16 / fp32 = "
                    f"{at_default['bf16'] / at_default['fp32']:.2f}); `Ensemble.forward` with Grad-CAM under "
                    f"autocast: fp32 {node['fp32']:.2f}, bf16 {node['bf16']:.2f} images/s.",
                    f"- `compute.cpu_precision: auto` on this CPU ({CpuFeatures.detect().describe()}) runs a checked "
                    f"model in **{resolve_cpu_precision('auto', model_checked=True)}** (bf16 only with AMX-BF16).",
                ]
            ),
        ]
    )


# ----------------------------------------------------------------------------------------------- GPU


@dataclass(frozen=True)
class GpuResults:
    """The paper's ensemble and the demo engine at bf16 autocast on one CUDA device."""

    device: str
    matmul_bf16: float
    layouts: list[LayoutTimes]
    demo: list[DemoTimes]


def measure_gpu(members: Mapping[str, nn.Module], plan: Plan) -> GpuResults | None:
    """Measure on the first CUDA device at bf16 autocast; None when there is none."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", 0)
    print(f"GPU: {torch.cuda.get_device_name(device)}, bf16 autocast", file=sys.stderr)
    matmul = matmul_gflops(plan.gpu_matmul_n, plan.matmul_repeat, device, torch.bfloat16)
    placed = ensembles(members, [RuntimeOptions(device, cl, "bf16") for cl in (True, False)])
    layouts = measure_layouts(
        placed, plan, plan.gpu_batches, lambda: matmul_gflops(plan.gpu_matmul_n, 3, device, torch.bfloat16)
    )
    del placed
    matmul = max(matmul, matmul_gflops(plan.gpu_matmul_n, plan.matmul_repeat, device, torch.bfloat16))
    demo = measure_demo(plan, RuntimeOptions(device, True, "bf16"), plan.batches)
    return GpuResults(torch.cuda.get_device_name(device), matmul, layouts, demo)


# -------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class CpuResults:
    """Everything measured on the CPU in one run."""

    matmul: tuple[float, float]  # GFLOP/s before and after the network timings
    flops: Mapping[str, int]  # member, PURE or NODE -> FLOPs per image
    layouts: list[LayoutTimes]
    layers: list[LayerRow]
    demo: list[DemoTimes]
    variants: list[Variant]
    sweep: PrecisionSweep

    @property
    def reference(self) -> float:
        """The matmul GFLOP/s efficiencies are taken against: the better of the two measurements."""
        return max(self.matmul)

    @property
    def efficiency(self) -> float:
        """The target figure: pure ensemble, batch 8, the node's default layout, against the matmul reference."""
        seconds = self.layouts[0].median(PURE, TARGET_BATCH)
        return efficiency(self.flops[PURE], TARGET_BATCH, seconds, self.reference)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: Sequence[str], left: int = 2) -> list[str]:
    """A Markdown header; the first ``left`` columns left-aligned, the others right-aligned."""
    return [_row(cells), "|" + "|".join(["---"] * left + ["---:"] * (len(cells) - left)) + "|"]


def ensemble_table(
    layouts: Sequence[LayoutTimes], flops: Mapping[str, int], batches: Sequence[int], matmul: float, reference: str
) -> str:
    """Per member, the ensemble and Ensemble.forward: latency, throughput, GFLOP/s and efficiency (medians)."""
    many = [b for b in batches if b > 1]
    cells = ["layout", "model", "GFLOP/image"] + (["batch 1: ms/image"] if 1 in batches else [])
    cells += [c for b in many for c in (f"batch {b}: images/s", "min-max")]
    cells += [c for b in many for c in (f"batch {b}: GFLOP/s", f"batch {b}: % of {reference}")]
    labels = {PURE: "**ensemble** (pure classification)", NODE: f"Ensemble.forward (Grad-CAM on {EXPLAIN})"}
    lines = _header(cells)
    for t in layouts:
        for name in [*t.members, PURE, NODE]:
            row = [t.label, labels.get(name, name), f"{flops[name] / GB:.2f}"]
            row += [f"{t.median(name, 1) * 1000:.1f}"] if 1 in batches else []
            row += [c for b in many for c in (f"{b / t.median(name, b):.2f}", t.rate_range(name, b))]
            for b in many:
                achieved = flops[name] * b / t.median(name, b) / GB
                row += [
                    f"{achieved:.1f}",
                    f"**{100 * achieved / matmul:.0f}%**" if name == PURE else f"{100 * achieved / matmul:.0f}%",
                ]
            lines.append(_row(row))
    return "\n".join(lines)


def overhead_table(layouts: Sequence[LayoutTimes], batches: Sequence[int]) -> str:
    """What the node's Ensemble.forward costs over the pure classification passes of the same runs."""
    cells = ["layout", "batch", "pure ensemble ms/image", "Ensemble.forward ms/image", "overhead ms/image", "overhead"]
    lines = _header(cells)
    for t in layouts:
        for b in batches:
            pure, node, extra = (1000 * x / b for x in (t.median(PURE, b), t.median(NODE, b), t.overhead(b)))
            cells = [f"{pure:.1f}", f"{node:.1f}", f"{extra:+.1f}", f"{100 * extra / pure:+.1f}%"]
            lines.append(_row([t.label, str(b), *cells]))
    return "\n".join(lines)


def layer_table(rows: Sequence[LayerRow], matmul: float) -> str:
    """Per member and kind of layer: calls, time, share, GFLOP and GFLOP/s at the target batch."""
    lines = _header(["model", "layers", "calls", "ms", "% of time", "GFLOP", "GFLOP/s", "% of matmul"])
    for r in rows:
        rate = r.gflop / r.seconds if r.gflop and r.seconds else 0.0
        flop_cells = [f"{r.gflop:.1f}", f"{rate:.1f}", f"{100 * rate / matmul:.0f}%"] if r.gflop else ["-"] * 3
        calls = str(r.calls) if r.calls else "-"
        lines.append(_row([r.model, r.kind, calls, f"{r.seconds * 1000:.0f}", f"{100 * r.share:.1f}%", *flop_cells]))
    return "\n".join(lines)


def variants_table(variants: Sequence[Variant], flops: int, matmul: float) -> str:
    """Each variant's batch-8 throughput against the first one (eager, channels_last: what the node runs)."""
    cells = [f"variant (batch {TARGET_BATCH}, all members)", "images/s", "GFLOP/s", "% of matmul", "x eager"]
    lines = _header([*cells, "set-up s"], left=1)
    for v in variants:
        achieved = flops * TARGET_BATCH / v.seconds / GB
        rate, speedup = f"{TARGET_BATCH / v.seconds:.2f}", f"{variants[0].seconds / v.seconds:.2f}"
        cells = [v.name, rate, f"{achieved:.1f}", f"{100 * achieved / matmul:.0f}%", speedup, f"{v.setup_s:.1f}"]
        lines.append(_row(cells))
    return "\n".join(lines)


def demo_table(rows: Sequence[DemoTimes]) -> str:
    """The demo engine per image: wall, segment, classify, the rest, and throughput."""
    lines = _header(
        [
            "batch",
            "images analysed",
            "end to end ms/image",
            "segment ms/image",
            "classify ms/image",
            "rest ms/image",
            "images/s",
        ],
        left=1,
    )
    for r in rows:
        rest = r.wall_ms - r.segment_ms - r.classify_ms
        lines.append(
            _row(
                [
                    str(r.batch),
                    f"{r.analysed}/{r.images}",
                    f"{r.wall_ms:.1f}",
                    f"{r.segment_ms:.1f}",
                    f"{r.classify_ms:.1f}",
                    f"{rest:.1f}",
                    f"{1000 / r.wall_ms:.1f}",
                ]
            )
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ findings


def efficiency(flops: int, batch: int, seconds: float, matmul: float) -> float:
    """Achieved FLOP rate of ``batch`` images of ``flops`` each in ``seconds``, as a fraction of ``matmul``."""
    return flops * batch / seconds / GB / matmul


def layer_summary(rows: Sequence[LayerRow]) -> dict[str, tuple[float, float]]:
    """Seconds and GFLOP over all members by group: convolutions, linear, batch norm/ReLU/pooling, the rest."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        group = (
            "convolutions"
            if "conv" in r.kind
            else "linear"
            if r.kind == "linear"
            else "rest"
            if r.kind.startswith("rest")
            else "batch norm, ReLU, pooling"
        )
        groups[group][0] += r.seconds
        groups[group][1] += r.gflop
    return {name: (seconds, gflop) for name, (seconds, gflop) in groups.items()}


def findings(cpu: CpuResults, linear_mb: Mapping[str, float]) -> list[str]:
    """The efficiency verdict and the reasons the numbers give, one bullet each."""
    default, matmul = cpu.layouts[0], cpu.reference

    def percent(t: LayoutTimes, name: str) -> str:
        return f"{100 * efficiency(cpu.flops[name], TARGET_BATCH, t.median(name, TARGET_BATCH), matmul):.0f}%"

    met = "met" if cpu.efficiency >= TARGET_EFFICIENCY else "**not met**"
    lines = [
        f"**Efficiency** (pure ensemble, batch {TARGET_BATCH}, node default {default.label}): "
        f"**{100 * cpu.efficiency:.0f}%** of the fp32 matmul's {matmul:.1f} GFLOP/s; target "
        f"{100 * TARGET_EFFICIENCY:.0f}% {met}. "
        + ", ".join(f"{t.label}: {percent(t, PURE)}" for t in cpu.layouts)
        + f". Per member ({default.label}): "
        + ", ".join(f"{n} {percent(default, n)}" for n in default.members)
        + ".",
        "Same-run efficiency (median over the runs of the ensemble's rate over a best-of-3 matmul timed at the "
        "start of that run, so a drift of the shared machine cancels out): "
        + ", ".join(f"{t.label} {100 * t.same_run_efficiency(cpu.flops[PURE], TARGET_BATCH):.0f}%" for t in cpu.layouts)
        + ".",
    ]
    groups = layer_summary(cpu.layers)
    total = sum(seconds for seconds, _ in groups.values())
    shares = ", ".join(f"{name} {100 * seconds / total:.0f}%" for name, (seconds, _) in groups.items())
    conv_s, conv_gflop = groups.get("convolutions", (0.0, 0.0))
    lines.append(
        f"Where the time goes (all members, batch {TARGET_BATCH}, hooked pass): {shares}. The convolutions alone run "
        f"at {conv_gflop / conv_s:.1f} GFLOP/s = {100 * conv_gflop / conv_s / matmul:.0f}% of matmul; with every "
        f"other layer free the ensemble would reach "
        f"{100 * sum(g for _, g in groups.values()) / (conv_s + groups.get('linear', (0.0, 0.0))[0]) / matmul:.0f}%."
    )
    lines.append(slowest_layers(cpu.layers, matmul))
    lines += [linear_finding(cpu.layers, name, mb) for name, mb in linear_mb.items() if mb > 50]
    if cpu.variants:
        best = min(cpu.variants[1:], key=lambda v: v.seconds)
        best_eff = efficiency(cpu.flops[PURE], TARGET_BATCH, best.seconds, matmul)
        lines.append(
            f"Best alternative tried (`--variants`): {best.name}, {100 * best_eff:.0f}% of matmul, "
            f"{cpu.variants[0].seconds / best.seconds:.2f}x eager in the same runs (not what the node runs)."
        )
    return lines


def slowest_layers(rows: Sequence[LayerRow], matmul: float, share: float = 0.02) -> str:
    """The kinds of convolution and linear layer with at least ``share`` of a member's time, slowest first."""
    heavy = [r for r in rows if r.gflop and r.share >= share]
    heavy.sort(key=lambda r: r.gflop / r.seconds)
    listed = ", ".join(
        f"{r.model} {r.kind} {100 * r.gflop / r.seconds / matmul:.0f}% ({100 * r.share:.0f}% of its time)"
        for r in heavy
        if r.gflop / r.seconds < 0.9 * matmul
    )
    elementwise = sum(r.seconds for r in rows if not r.gflop) / sum(r.seconds for r in rows)
    return (
        f"Below 90% of matmul, among layers with at least {100 * share:.0f}% of a member's time: {listed or 'none'}. "
        f"Layers without FLOPs (batch norm, ReLU, pooling, residual adds: separate passes over memory in eager "
        f"mode) take {100 * elementwise:.0f}% of the ensemble's time."
    )


def linear_finding(rows: Sequence[LayerRow], model: str, weight_mb: float) -> str:
    """How a member with large linear layers spends on them: share of time and weight bandwidth."""
    linear = [r for r in rows if r.model == model and r.kind == "linear"]
    seconds = sum(r.seconds for r in linear)
    share = sum(r.share for r in linear)
    return (
        f"{model}'s linear layers read {weight_mb:.0f} MB of weights per batch for "
        f"{sum(r.gflop for r in linear):.1f} GFLOP: {1000 * seconds:.0f} ms, {100 * share:.1f}% of its time "
        f"({weight_mb / 1000 / seconds:.1f} GB/s of weights): at batch {TARGET_BATCH} each weight serves "
        f"{2 * TARGET_BATCH} FLOPs, so these layers run at the pace of memory, not of the FMA units."
    )


def linear_weight_mb(members: Mapping[str, nn.Module]) -> dict[str, float]:
    """Megabytes of fp32 linear-layer weights per member."""
    return {
        name: sum(4 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear)) / 1e6
        for name, module in members.items()
    }


# --------------------------------------------------------------------------------------- the section


def busy_processes() -> list[str]:
    """Command lines of other processes that would compete for the CPU (training runs, test suites)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if re.search(r"cxr[-_]node train|pytest", cmdline):
                found.append(f"{entry.name} {cmdline}")
    return found


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _onednn() -> str:
    match = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return match.group(1) if match else "unknown"


def _loads(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


@dataclass(frozen=True)
class CpuClock:
    """Seconds of CPU time spent machine-wide and by this process, and of steal, at one moment."""

    wall: float
    busy: float
    own: float
    steal: float

    @classmethod
    def now(cls) -> CpuClock:
        """Read ``/proc/stat`` and this process's times (busy = user, nice, system, irq, softirq)."""
        tick = os.sysconf("SC_CLK_TCK")
        ticks = [0] * 8
        with contextlib.suppress(OSError, ValueError):
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _, _, irq, softirq, steal = ticks
        times = os.times()
        return cls(
            time.monotonic(), (user + nice + system + irq + softirq) / tick, times.user + times.system, steal / tick
        )


@dataclass(frozen=True)
class RunStart:
    """What makes the numbers comparable, taken at the start: when, threads, load, competitors, the command."""

    started: dt.datetime
    threads: int
    load: tuple[float, float, float]
    busy: list[str]
    clock: CpuClock
    command: str

    @classmethod
    def now(cls, threads: int, command: str) -> RunStart:
        """The facts of this moment."""
        return cls(dt.datetime.now(dt.UTC), threads, os.getloadavg(), busy_processes(), CpuClock.now(), command)

    def facts(self, compiled: bool = False) -> list[str]:
        """The machine facts from the start until now, one Markdown bullet each (``compiled``: torch.compile ran)."""
        end = CpuClock.now()
        wall, others = end.wall - self.clock.wall, (end.busy - self.clock.busy) - (end.own - self.clock.own)
        busy = "; ".join(self.busy) if self.busy else "none"
        return [
            f"- date: {self.started.strftime('%Y-%m-%d %H:%M UTC')}",
            f"- CPU: {_cpu_model()}, {len(os.sched_getaffinity(0))} cores available (sched_getaffinity); "
            f"torch CPU capability and bf16 features (/proc/cpuinfo): {CpuFeatures.detect().describe()}",
            f"- threads: `torch.set_num_threads({self.threads})` (intra-op, OpenMP), "
            f"{torch.get_num_interop_threads()} inter-op",
            f"- torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {np.__version__}, "
            f"oneDNN {_onednn()}, Python {platform.python_version()}",
            f"- load average (1, 5, 15 min): {_loads(self.load)} at the start, {_loads(os.getloadavg())} at the end "
            f"(the benchmark included); `cxr-node train` or pytest processes at the start: {busy}",
            "- CPU time used by everything else"
            + (" (torch.compile's worker processes included)" if compiled else "")
            + f" during the {wall:.0f} s run: {max(others, 0.0):.1f} s; steal {end.steal - self.clock.steal:.1f} s",
            f"\n```\n{self.command}\n```",
        ]


def intro(plan: Plan, explain_layer: str) -> str:
    """What the section measures, in one paragraph."""
    return (
        f"The paper's ensemble ({', '.join(PAPER)}; torchvision, 2-class heads, random weights, {plan.size} px) "
        f"placed by the node's `Ensemble` (`RuntimeOptions(cpu, channels_last, fp32)`), timed two ways: **pure "
        f"classification** (each member's `module(x)` under `torch.inference_mode`, one after the other; the "
        f"ensemble's time of a repeat is the sum of its members') and the node's **`Ensemble.forward`** (the explain "
        f"member, {EXPLAIN}, runs with gradients for Grad-CAM at `{explain_layer}`; concat embedding; numpy "
        f"copies). Median of {plan.repeat_one} timed runs at batch 1 and {plan.repeat_many} at batch "
        f"{TARGET_BATCH}, after {plan.warmup} warm-up run(s); each run starts with a short matmul probe, then times "
        "both layouts (each on its own copy of the members), pure then `Ensemble.forward`, one after the other, so "
        "a slow spell of this shared machine hits every configuration alike. FLOPs counted with `FlopCounterMode` "
        "(convolutions and linear layers; **1 multiply-add = 2 FLOPs**; batch norm, ReLU, pooling and additions "
        f"not counted). Efficiency = achieved GFLOP/s / fp32 `torch.matmul` GFLOP/s (n = {plan.matmul_n}, 2n^3/t, "
        f"best of {plan.matmul_repeat}, same threads, measured before and after; the higher is the reference)."
    )


def cpu_section(
    cpu: CpuResults, plan: Plan, explain_layer: str, facts: list[str], linear_mb: Mapping[str, float], gpu_text: str
) -> str:
    """The whole "## Inference" section."""
    default = cpu.layouts[0].label
    parts = [
        SECTION,
        intro(plan, explain_layer),
        f"fp32 matmul: {cpu.matmul[0]:.1f} GFLOP/s before, {cpu.matmul[1]:.1f} after; reference "
        f"**{cpu.reference:.1f} GFLOP/s**.",
        ensemble_table(cpu.layouts, cpu.flops, plan.batches, cpu.reference, "matmul"),
        "\n".join(f"- {line}" for line in findings(cpu, linear_mb)),
        "### Grad-CAM overhead of `Ensemble.forward`",
        f"Explained member: {EXPLAIN} (layer `{explain_layer}`). `Ensemble.forward` does "
        f"{cpu.flops[NODE] / GB:.3f} GFLOP per image against {cpu.flops[PURE] / GB:.3f} for the pure passes "
        f"(Grad-CAM's backward pass stops at that layer), so any overhead is autograd's bookkeeping, the "
        "saved activations and the numpy copies, not arithmetic. Overhead = median over the runs of "
        "(`Ensemble.forward` - pure passes) of the same run; the runs' spread (min-max above) is the noise.",
        overhead_table(cpu.layouts, plan.batches),
        f"### Where the time goes (batch {TARGET_BATCH}, {default})",
        "Forward hooks time each leaf module during one extra pass per member (pure classification); GFLOP "
        "counted per layer with the same 2-per-multiply-add convention.",
        layer_table(cpu.layers, cpu.reference),
        precision_text(cpu.sweep, cpu.flops[PURE], plan),
    ]
    if cpu.variants:
        parts += [
            "### What else the same CPU could do (`--variants`)",
            f"The same members on the same batch, each variant on its own copy of the modules under "
            f"`torch.no_grad`; every run times all variants one after the other, median of {plan.repeat_variants} "
            f"runs after {plan.warmup + 1} warm-ups. Set-up = copying, transforming, tracing or compiling, plus "
            "the first run. Only the first row is what the node runs.",
            variants_table(cpu.variants, cpu.flops[PURE], cpu.reference),
        ]
    parts += [
        "### Demo engine end to end",
        f'`Engine.from_manifest(load_manifest("models/demo/manifest.yaml"))` (U-Net + '
        f"{', '.join(m.architecture for m in load_manifest(DEMO_MANIFEST).classifier.members)}), CPU, "
        f"channels_last, fp32, on {plan.phantoms} phantoms of {plan.phantom_size} px (`make_phantom(seed, seed % 2)`); "
        f"medians per image over {plan.repeat_one} passes. Segment and classify are `Analysis.timings_ms` "
        "(segment includes normalisation); rest = mask checks, region crops and the numpy round trips.",
        demo_table(cpu.demo),
        "### Machine and command",
        "\n".join(facts),
        gpu_text,
    ]
    return "\n\n".join(parts) + "\n"


def gpu_section(gpu: GpuResults | None, flops: Mapping[str, int], plan: Plan, facts: list[str]) -> str:
    """The "### GPU (bf16)" subsection: the figures, or the line saying they are still to be measured."""
    if gpu is None:
        return (
            f"{GPU_SUBSECTION}\n\nNot measured: the machine of this run has no CUDA device. On a machine with one, "
            "`.venv/bin/python bench/inference.py --gpu-only --write-docs` fills this subsection in (images/s of the "
            "paper ensemble at bf16 autocast, batches 1, 8 and 32) and leaves the CPU figures above as they are. "
            "`bench/gpu/check.sh` runs it with the CUDA tests and `bench/cost.py` in one go on a machine whose Python "
            "has torch but not cxr-node's other packages (`make gpu-kit` first, where pip works: it puts their wheels "
            "and the radiographs in `.gpu/`).\n"
        )
    cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return (
        "\n\n".join(
            [
                GPU_SUBSECTION,
                f'{gpu.device}, {cuda}; `RuntimeOptions(cuda, channels_last, precision="bf16")` (autocast); '
                "the pure passes take inputs already on the device, `Ensemble.forward` copies them from the host "
                "as the node does. "
                f"bf16 matmul reference ({plan.gpu_matmul_n}^3, best of {plan.matmul_repeat}): **{gpu.matmul_bf16:.0f} "
                "GFLOP/s**.",
                ensemble_table(gpu.layouts, flops, plan.gpu_batches, gpu.matmul_bf16, "bf16 matmul"),
                overhead_table(gpu.layouts, plan.gpu_batches),
                "Demo engine on the GPU (same phantoms, bf16):",
                demo_table(gpu.demo),
                "\n".join(facts),
            ]
        )
        + "\n"
    )


def write_docs(text: str, heading: str = SECTION, path: Path = DOCS) -> None:
    """Replace the ``heading`` part of ``path`` with ``text``: the whole section, or its GPU subsection."""
    current = path.read_text() if path.exists() else "# Benchmarks\n\n"
    section = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = section.search(current)
    if heading != SECTION:
        if found is None:
            text = f"{SECTION}\n\n{text}"
        else:
            sub = re.compile(rf"^{re.escape(heading)}\n.*?(?=^### |^## |\Z)", re.S | re.M)
            old = found.group(0)
            text = (
                sub.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
                if sub.search(old)
                else (old.rstrip("\n") + "\n\n" + text)
            )
    if found is not None:
        updated = current[: found.start()] + text.rstrip("\n") + "\n\n" + current[found.end() :]
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    path.write_text(updated.rstrip("\n") + "\n")


# ---------------------------------------------------------------------------------------------- main


def measure_cpu(members: Mapping[str, nn.Module], plan: Plan, variants: bool) -> CpuResults:
    """Every CPU measurement, the matmul reference first and last."""
    before = matmul_gflops(plan.matmul_n, plan.matmul_repeat, CPU)
    print(f"fp32 matmul {plan.matmul_n}: {before:.1f} GFLOP/s", file=sys.stderr)
    placed = ensembles(members, [RuntimeOptions(CPU, cl, "fp32") for cl in (True, False)])
    flops = count_flops(placed[0], plan.size)
    layouts = measure_layouts(placed, plan, plan.batches, lambda: matmul_gflops(plan.matmul_n, 3, CPU))
    del placed[1:]
    layers = time_by_layer(placed[0], plan)
    sweep = measure_precisions(placed[0].members, plan)
    batch = placed[0].prepare(random_images(TARGET_BATCH, plan.size))
    tried = measure_variants(placed[0].members, batch, plan) if variants else []
    demo = measure_demo(plan, RuntimeOptions(CPU, True, "fp32"), plan.batches)
    after = matmul_gflops(plan.matmul_n, plan.matmul_repeat, CPU)
    print(f"fp32 matmul {plan.matmul_n}: {after:.1f} GFLOP/s", file=sys.stderr)
    return CpuResults((before, after), flops, layouts, layers, demo, tried, sweep)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sanity run: 64 px, single repeats (< 30 s)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable cores)")
    parser.add_argument("--variants", action="store_true", help="also time alternatives to eager mode (minutes)")
    parser.add_argument("--gpu-only", action="store_true", help="measure only the CUDA device (bf16)")
    parser.add_argument(
        "--precision-only",
        action="store_true",
        help="measure only the CPU fp32/bf16 sweep (layouts, batches; about 5 minutes on 2 cores)",
    )
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section {SECTION!r} of {DOCS}")
    args = parser.parse_args(argv)
    if (args.repeat is not None and args.repeat < 1) or (args.threads is not None and args.threads < 1):
        parser.error("--repeat and --threads must be at least 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan the arguments ask for."""
    plan = QUICK if args.quick else Plan()
    if args.repeat is None:
        return plan
    return replace(plan, repeat_one=args.repeat, repeat_many=args.repeat, repeat_sweep=args.repeat)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the section; optionally write it into docs/benchmarks.md."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    plan = make_plan(args)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    start = RunStart.now(threads, shlex.join([".venv/bin/python", "bench/inference.py", *argv]))
    for line in start.busy:
        print(f"warning: competing process running: {line}", file=sys.stderr)
    torch.manual_seed(0)
    members = {arch: build_classifier(arch) for arch in PAPER}
    if args.gpu_only:
        flops = count_flops(Ensemble(members, explain=EXPLAIN), plan.size)
        gpu = measure_gpu(members, plan)
        if gpu is None:
            print("inference.py: no CUDA device: nothing measured", file=sys.stderr)
            return 2
        return report(gpu_section(gpu, flops, plan, start.facts()), GPU_SUBSECTION, args.write_docs)
    if args.precision_only:
        flops = count_flops(Ensemble(members, explain=EXPLAIN), plan.size)
        sweep = measure_precisions(members, plan)
        text = precision_text(sweep, flops[PURE], plan) + "\n\n" + "\n".join(start.facts()) + "\n"
        return report(text, CPU_PRECISION_SUBSECTION, args.write_docs)
    linear_mb = linear_weight_mb(members)
    explain_layer = Ensemble(members, explain=EXPLAIN).gradcam.layer_name
    cpu = measure_cpu(members, plan, args.variants)
    facts = start.facts(compiled=args.variants)
    gpu = measure_gpu(members, plan)
    if gpu is None:
        print("no CUDA device: GPU (bf16) figures not measured", file=sys.stderr)
    gpu_text = gpu_section(gpu, cpu.flops, plan, start.facts() if gpu else facts)
    return report(cpu_section(cpu, plan, explain_layer, facts, linear_mb, gpu_text), SECTION, args.write_docs)


def report(text: str, heading: str, write: bool) -> int:
    """Print ``text``; write it into the docs when asked."""
    print(text)
    if write:
        write_docs(text, heading)
        print(f"wrote {heading!r} of {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
