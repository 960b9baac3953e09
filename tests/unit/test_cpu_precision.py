"""CPU precision: detecting bf16 hardware, ``compute.cpu_precision``, bf16 autocast in the ensemble and engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cxr_node.app import load_model
from cxr_node.cli import main
from cxr_node.config import Settings, load_settings
from cxr_node.errors import ConfigError, ModelError
from cxr_node.infer.classify import Ensemble, RuntimeOptions
from cxr_node.infer.device import CpuFeatures, resolve_cpu_precision
from cxr_node.infer.engine import Engine
from cxr_node.infer.registry import build_classifier, load_manifest
from cxr_node.training.agreement import Tolerance, compare_precisions
from cxr_node.training.phantoms import make_phantom, write_phantom_set
from tests.models import write_tiny_manifest

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"
AMX = CpuFeatures("AVX512", frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), onednn=True)
AVX512_BF16 = CpuFeatures("AVX512", frozenset({"avx512f", "avx512_bf16"}), onednn=True)
AVX2 = CpuFeatures("AVX2", frozenset({"avx2", "fma"}), onednn=True)


@pytest.mark.parametrize(
    ("spec", "checked", "features", "expected"),
    [
        ("auto", True, AMX, "bf16"),
        ("auto", True, AVX512_BF16, "fp32"),
        ("auto", True, AVX2, "fp32"),
        ("auto", False, AMX, "fp32"),
        ("auto", True, CpuFeatures("AVX512", AMX.flags, onednn=False), "fp32"),
        ("bf16", False, AVX2, "bf16"),
        (" FP32 ", True, AMX, "fp32"),
    ],
)
def test_resolve_cpu_precision(spec: str, checked: bool, features: CpuFeatures, expected: str) -> None:
    """auto is bf16 only for a checked model on an AMX-BF16 CPU with oneDNN; bf16 and fp32 are taken as said."""
    assert resolve_cpu_precision(spec, model_checked=checked, features=features) == expected


def test_resolve_cpu_precision_refuses_unknown() -> None:
    """An unknown precision is a one-line ModelError naming the key."""
    with pytest.raises(ModelError, match=r"compute\.cpu_precision must be auto, bf16 or fp32; found 'fp16'"):
        resolve_cpu_precision("fp16", model_checked=True, features=AMX)


def test_cpu_features_read_the_kernel_flags(tmp_path: Path) -> None:
    """The flags come from the first processor of cpuinfo; a missing file means no flags."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    found = CpuFeatures.detect(cpuinfo)
    assert found.avx512_bf16 and found.amx_bf16
    assert "amx_bf16" in found.describe()
    absent = CpuFeatures.detect(tmp_path / "absent")
    assert absent.flags == frozenset() and not absent.native_bf16
    assert absent.describe().endswith("bf16: none")


def test_runtime_options_cpu_precision() -> None:
    """The CUDA precision never reaches the CPU: the CPU runs cpu_precision, bf16 there under CPU autocast."""
    assert RuntimeOptions().active_precision == "fp32"
    assert RuntimeOptions(precision="bf16").active_precision == "fp32"
    with RuntimeOptions().autocast():
        assert not torch.is_autocast_enabled("cpu")
    layer = nn.Linear(4, 2)
    with torch.inference_mode(), RuntimeOptions(cpu_precision="bf16").autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cpu_precision must be bf16 or fp32; found 'fp16'"):
        RuntimeOptions(cpu_precision="fp16")  # type: ignore[arg-type]


def test_config_cpu_precision(tmp_path: Path) -> None:
    """compute.cpu_precision defaults to auto and takes only auto, bf16 or fp32."""
    path = tmp_path / "node.yaml"
    path.write_text("compute: {cpu_precision: bf16}\n")
    assert load_settings(path, environ={}).compute.cpu_precision == "bf16"
    assert load_settings(path, environ={"CXR_NODE_COMPUTE__CPU_PRECISION": "auto"}).compute.cpu_precision == "auto"
    path.write_text("compute: {cpu_precision: fp16}\n")
    with pytest.raises(ConfigError, match=r"compute\.cpu_precision"):
        load_settings(path, environ={})


def test_gradcam_under_bf16_autocast_matches_fp32() -> None:
    """Under bf16 autocast the ensemble's outputs are float32, the heatmaps in [0, 1] and close to fp32's."""
    torch.manual_seed(0)
    model = build_classifier("resnet18")
    x = torch.randn(2, 3, 64, 64)
    out = {
        precision: Ensemble({"r": copy}, explain="r", options=RuntimeOptions(cpu_precision=precision))(x)
        for precision, copy in (("fp32", model), ("bf16", _copy(model)))
    }
    bf16 = out["bf16"]
    assert bf16.heatmap.dtype == bf16.probability.dtype == bf16.embedding.dtype == np.float32
    assert bf16.heatmap.min() >= 0.0 and np.allclose(bf16.heatmap.max(axis=(1, 2)), 1.0, atol=1e-6)
    for k in range(2):
        assert np.corrcoef(bf16.heatmap[k].ravel(), out["fp32"].heatmap[k].ravel())[0, 1] > 0.9
    np.testing.assert_allclose(bf16.probability, out["fp32"].probability, atol=0.02)
    assert all(p.grad is None for p in model.parameters())


def _copy(model: nn.Module) -> nn.Module:
    clone = build_classifier("resnet18")
    clone.load_state_dict(model.state_dict())
    return clone


def test_engine_runtime_names_device_and_precision(tmp_path: Path) -> None:
    """The real Engine (tiny manifest) reports where and at what precision it runs, and analyses in bf16."""
    manifest = load_manifest(write_tiny_manifest(tmp_path / "tiny"))
    engine = Engine.from_manifest(manifest, RuntimeOptions(channels_last=True, cpu_precision="bf16"))
    runtime = engine.runtime
    assert (runtime["device"], runtime["precision"], runtime["segmentation_precision"]) == ("cpu", "bf16", "fp32")
    assert runtime["channels_last"] is True
    assert "bf16:" in str(runtime["cpu"])
    results = engine.analyse([make_phantom(1, 1, size=128).image])
    assert len(results) == 1


@pytest.fixture(scope="module")
def demo_phantoms() -> tuple[list[np.ndarray], list[int]]:
    """Twelve held-out phantoms (seeds far from the training seeds), half positive, at 320 px."""
    labels = [i % 2 for i in range(12)]
    return [make_phantom(70_000 + i, label=y, size=320).image.copy() for i, y in enumerate(labels)], labels


def test_bf16_engine_agrees_with_fp32(demo_phantoms: tuple[list[np.ndarray], list[int]]) -> None:
    """The demo engine in bf16 makes the fp32 engine's decisions, probabilities within the default tolerance."""
    images, labels = demo_phantoms
    found = compare_precisions(load_manifest(DEMO), images, labels)
    assert found.analysed == found.images == 12
    assert found.analysed_changed == 0
    assert found.decisions_changed == 0
    assert found.max_abs_dp <= Tolerance().probability
    assert found.within_tolerance
    assert found.heatmap_correlation[0] > 0.9 and found.embedding_cosine > 0.99


def test_agreement_beyond_tolerance_is_reported() -> None:
    """A tolerance of zero change in probability is not met, and the verdict says so."""
    images = [make_phantom(70_100, 1, size=320).image.copy()]
    found = compare_precisions(load_manifest(DEMO), images, tolerance=Tolerance(decisions=0.0, probability=0.0))
    assert found.max_abs_dp > 0.0
    assert not found.within_tolerance
    assert "NOT within" in found.lines()[-1]


def test_cli_bf16_agreement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cxr-node evaluate --bf16-agreement` prints the figures, writes the JSON and exits 0 within tolerance."""
    data = write_phantom_set(tmp_path / "set", 6, seed=71, size=320)
    argv = ["evaluate", "--manifest", str(DEMO), "--data", str(data), "--split", "all", "--bf16-agreement"]
    code = main([*argv, "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "bf16_agreement.json").read_text())
    assert code == (0 if report["within_tolerance"] else 1)
    assert report["images"] == 6 and report["tolerance"] == {"decisions": 0.01, "probability": 0.02}
    assert "decisions changed at threshold" in capsys.readouterr().out


def test_load_model_resolves_compute_cpu_precision() -> None:
    """The node's own builder runs the demo ensemble at the configured CPU precision; auto follows the CPU rule."""
    manifest, engine = load_model(Settings(compute={"device": "cpu", "cpu_precision": "bf16"}))
    assert manifest.classifier.cpu_bf16 is True
    assert engine.runtime["precision"] == "bf16"
    _, engine = load_model(Settings(compute={"device": "cpu"}))
    assert engine.runtime["precision"] == resolve_cpu_precision("auto", model_checked=True)
