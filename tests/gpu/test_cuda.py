"""CPU and CUDA agree: the paper's ensemble gives the same probabilities, embeddings and heatmaps on both.

Tolerances, and why:

* fp32 on CUDA (TF32 switched off) differs from the CPU only in the order of floating-point sums
  (cuDNN's algorithms against oneDNN's), about 1e-7 relative per operation; even amplified a
  hundredfold through 152 layers, logits of order 1 move by ~1e-5 and a probability (softmax slope
  <= 1/4) by less. 1e-4 leaves a factor of ten.
* Autocast keeps 8 (bf16) or 11 (fp16) significant bits with float32 accumulation. Measured with
  CPU autocast on these very networks (96 px, 16 images) as a proxy: largest member-probability
  error 0.018 (bf16) / 0.005 (fp16), ensemble 0.004 / 0.001, embedding cosine >= 0.968 / 0.987,
  mean heatmap difference 0.038 / 0.010. The bounds below keep a factor of about 3 (5 for the
  ensemble, whose 2e-2 is also the margin inside which a decision may flip).

The members are the paper's (ResNet34, ResNet50, ResNet152, VGG16) with random weights made to
behave like trained ones: batch-norm statistics measured on the test distribution, and each head
replaced by the first principal direction of that member's features (signed to follow image
brightness) scaled to logits of standard deviation 2. Plain random heads give probabilities of ~0.5
or saturated ones, and random directions amplify rounding far more than a trained head would; either
way the comparison would prove little.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxr_node.infer.classify import Ensemble, EnsembleOutput, FeatureHook, Precision, RuntimeOptions
from cxr_node.infer.registry import build_classifier, final_layer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PAPER: Final = ("resnet34", "resnet50", "resnet152", "vgg16")
EXPLAIN: Final = "resnet50"
SIZE: Final = 224
IMAGES: Final = 16
FP32_TOLERANCE: Final = 1e-4


@dataclass(frozen=True)
class Tolerance:
    """How far an autocast run may stray from the float32 CPU reference."""

    member: float
    ensemble: float
    cosine: float
    heatmap: float


TOLERANCES: Final = {
    "bf16": Tolerance(member=5e-2, ensemble=2e-2, cosine=0.95, heatmap=0.1),
    "fp16": Tolerance(member=2e-2, ensemble=1e-2, cosine=0.97, heatmap=0.03),
}


def _images(n: int, seed: int) -> torch.Tensor:
    """Return ``(n, 3, SIZE, SIZE)`` normalised-looking images: a brightness offset, a smooth field, fine noise."""
    generator = torch.Generator().manual_seed(seed)
    offset = torch.randn(n, 1, 1, 1, generator=generator)
    coarse = torch.randn(n, 1, 8, 8, generator=generator)
    smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    fine = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    return (offset + smooth + fine).expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def exact_fp32() -> Iterator[None]:
    """Switch TF32 off for convolutions and matrix products (it rounds fp32 inputs to 10 bits), then restore."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _recalibrate(model: nn.Module, images: torch.Tensor) -> None:
    """Replace batch-norm running statistics by the exact statistics of ``images``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in images.split(8):
            model(chunk)
    model.eval()


def _principal_head(model: nn.Module, images: torch.Tensor) -> None:
    """Make the head score the first principal direction of the features of ``images`` (std 2, mean 0)."""
    hook = FeatureHook(model)
    with torch.no_grad(), hook.attached():
        model(images)
    assert hook.features is not None
    features = hook.features
    centre = features.mean(dim=0)
    direction = torch.linalg.svd(features - centre, full_matrices=False).Vh[0]
    projection = (features - centre) @ direction
    brightness = images.mean(dim=(1, 2, 3))
    if torch.corrcoef(torch.stack([projection, brightness]))[0, 1] < 0:
        direction, projection = -direction, -projection
    weight = direction * (2.0 / projection.std())
    _, head = final_layer(model)
    assert isinstance(head, nn.Linear)
    assert head.bias is not None
    with torch.no_grad():
        head.weight.zero_()
        head.weight[1], head.weight[0] = weight / 2, -weight / 2
        offset = float(centre @ weight) / 2
        head.bias[1], head.bias[0] = -offset, offset


@pytest.fixture(scope="module")
def members(exact_fp32: None) -> dict[str, nn.Module]:
    """The paper's four architectures with calibrated random weights, on the CPU."""
    calibration = _images(32, seed=7).cuda()
    models = {}
    for index, name in enumerate(PAPER):
        torch.manual_seed(index)
        model = build_classifier(name).cuda()
        _recalibrate(model, calibration)
        _principal_head(model, calibration)
        models[name] = model.cpu()
    return models


def _ensemble(members: dict[str, nn.Module], options: RuntimeOptions) -> Ensemble:
    """Return an ensemble of copies of ``members`` (an ensemble moves its modules to its device)."""
    return Ensemble(copy.deepcopy(members), explain=EXPLAIN, options=options)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    """The test images (a different draw from the calibration images)."""
    return _images(IMAGES, seed=11)


@pytest.fixture(scope="module")
def on_cpu(members: dict[str, nn.Module], inputs: torch.Tensor) -> EnsembleOutput:
    """The CPU reference output (float32)."""
    return _ensemble(members, RuntimeOptions())(inputs)


def _cuda(members: dict[str, nn.Module], inputs: torch.Tensor, precision: Precision, nhwc: bool) -> EnsembleOutput:
    """Run the ensemble on CUDA with the given precision and memory format."""
    options = RuntimeOptions(device=torch.device("cuda"), channels_last=nhwc, precision=precision)
    return _ensemble(members, options)(inputs)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two unit-norm embedding matrices."""
    return np.sum(a * b, axis=1)


def _threshold(on_cpu: EnsembleOutput) -> float:
    """The operating point of these tests: the mean CPU probability, so decisions fall on both sides."""
    return float(on_cpu.probability.mean())


def test_references_are_not_trivial(on_cpu: EnsembleOutput) -> None:
    """The members give spread-out probabilities and images fall clearly on both sides of the threshold."""
    for probs in on_cpu.member_probs.values():
        assert probs.max() - probs.min() > 0.2
    margin = TOLERANCES["bf16"].ensemble
    threshold = _threshold(on_cpu)
    assert (on_cpu.probability > threshold + margin).sum() >= 2
    assert (on_cpu.probability < threshold - margin).sum() >= 2


@pytest.mark.parametrize("nhwc", [False, True])
def test_fp32_cuda_matches_cpu(
    members: dict[str, nn.Module], inputs: torch.Tensor, on_cpu: EnsembleOutput, nhwc: bool
) -> None:
    """In fp32 (no TF32) every probability, the embedding and the heatmap match the CPU within 1e-4 / 1e-3."""
    out = _cuda(members, inputs, "fp32", nhwc)
    for name in PAPER:
        np.testing.assert_allclose(out.member_probs[name], on_cpu.member_probs[name], atol=FP32_TOLERANCE)
    np.testing.assert_allclose(out.probability, on_cpu.probability, atol=FP32_TOLERANCE)
    np.testing.assert_allclose(out.embedding, on_cpu.embedding, atol=FP32_TOLERANCE)
    np.testing.assert_allclose(out.heatmap, on_cpu.heatmap, atol=1e-3)


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_cuda_matches_cpu(
    members: dict[str, nn.Module], inputs: torch.Tensor, on_cpu: EnsembleOutput, precision: Precision, nhwc: bool
) -> None:
    """Under autocast, probabilities stay within tolerance, no decision outside the margin flips, embeddings agree."""
    tolerance = TOLERANCES[precision]
    out = _cuda(members, inputs, precision, nhwc)
    for name in PAPER:
        np.testing.assert_allclose(out.member_probs[name], on_cpu.member_probs[name], atol=tolerance.member)
    np.testing.assert_allclose(out.probability, on_cpu.probability, atol=tolerance.ensemble)
    threshold = _threshold(on_cpu)
    far = np.abs(on_cpu.probability - threshold) > tolerance.ensemble
    np.testing.assert_array_equal((out.probability >= threshold)[far], (on_cpu.probability >= threshold)[far])
    assert _cosines(out.embedding, on_cpu.embedding).min() > tolerance.cosine
    assert out.heatmap.dtype == np.float32
    assert np.abs(out.heatmap - on_cpu.heatmap).mean() < tolerance.heatmap


def test_cuda_batch_equals_single_forwards(members: dict[str, nn.Module], inputs: torch.Tensor) -> None:
    """On CUDA in fp32, a batch of 4 gives what 4 single forwards give, within the fp32 tolerance."""
    ensemble = _ensemble(members, RuntimeOptions(device=torch.device("cuda"), precision="fp32"))
    batch = ensemble(inputs[:4])
    singles = [ensemble(inputs[i : i + 1]) for i in range(4)]
    joined = np.concatenate([single.probability for single in singles])
    np.testing.assert_allclose(batch.probability, joined, atol=FP32_TOLERANCE)
