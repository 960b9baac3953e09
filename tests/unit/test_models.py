"""Stage 2 models: manifests, checksums, U-Net, lung masks, the ensemble, its embeddings and Grad-CAM."""

from __future__ import annotations

import copy
import datetime
import shutil
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cxr_node.errors import ModelError
from cxr_node.imaging.masks import label_components
from cxr_node.infer import registry
from cxr_node.infer.classify import Ensemble, FeatureHook, RuntimeOptions
from cxr_node.infer.device import resolve_device
from cxr_node.infer.explain import GradCam, cam, default_layer
from cxr_node.infer.registry import (
    Manifest,
    build_classifier,
    imagenet_start,
    load_into,
    load_manifest,
    load_weights,
    save_manifest,
    sha256_file,
)
from cxr_node.infer.segment import LungSegmenter, mask_quality
from cxr_node.infer.unet import UNet, parameter_bytes

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Run these small-tensor tests on one intra-op thread, then restore the setting.

    Tiny convolutions gain nothing from a second thread, and on a shared 2-core runner two spinning
    OpenMP threads per process made the suite ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def _random_model(architecture: str) -> nn.Module:
    """Return one seeded, random-weight 2-class model per architecture (shared: building vgg11 takes seconds)."""
    torch.manual_seed(0)
    return build_classifier(architecture).eval()


def _batch(n: int, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    """Return a seeded ``(n, 3, size, size)`` standard-normal batch."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- manifests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with small real weights: a U-Net and two tiny classifiers, saved as state dicts."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(UNet(4, 3).state_dict(), folder / "unet.pt")
    torch.save(build_classifier("squeezenet1_1").state_dict(), folder / "squeeze.pt")
    torch.save(build_classifier("shufflenet_v2_x0_5").state_dict(), folder / "shuffle.pt")
    return folder


def _manifest_data(folder: Path) -> dict[str, Any]:
    """Return a valid manifest (as YAML data) for the weights in ``folder``."""
    member = {"version": "1", "weights": "", "sha256": "", "metrics": {"auc": 0.9}}
    return {
        "name": "demo",
        "version": "0.1",
        "intended_use": "demo: synthetic training data, not for clinical use",
        "provenance": {"training_data": "phantoms 0-999", "command": "cxr-node train",
                       "date": datetime.date(2025, 1, 2)},
        "segmentation": {
            "name": "lungs", "version": "1", "architecture": "unet", "input_size": SIZE, "base_channels": 4,
            "depth": 3, "weights": "unet.pt", "sha256": sha256_file(folder / "unet.pt"), "mask_threshold": 0.5,
        },
        "classifier": {
            "input_size": SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "region": "crop+mask",
            "threshold": 0.4, "embedding": {"member": "concat"}, "explain": {"member": "squeeze"},
            "members": [
                {**member, "name": "squeeze", "architecture": "squeezenet1_1", "weights": "squeeze.pt",
                 "sha256": sha256_file(folder / "squeeze.pt")},
                {**member, "name": "shuffle", "architecture": "shufflenet_v2_x0_5", "weights": "shuffle.pt",
                 "sha256": sha256_file(folder / "shuffle.pt")},
            ],
        },
        "metrics": {"auc": 0.91},
    }  # fmt: skip


@pytest.fixture
def model_dir(tmp_path: Path, weights_dir: Path) -> Path:
    """A fresh folder holding copies of the small weights, for a manifest to sit beside."""
    for file in weights_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    return tmp_path


def _write(folder: Path, data: Any, name: str = "manifest.yaml") -> Path:
    """Write ``data`` as YAML into ``folder`` and return the file."""
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_manifest_round_trip(model_dir: Path) -> None:
    """A manifest saved and loaded again is equal, and its weights resolve beside the file."""
    manifest = load_manifest(_write(model_dir, _manifest_data(model_dir)))
    again = load_manifest(save_manifest(manifest, model_dir / "copy.yaml"))
    assert again == manifest
    assert manifest.resolve(manifest.segmentation.weights) == model_dir.resolve() / "unet.pt"
    assert manifest.provenance["date"] == datetime.date(2025, 1, 2)
    assert manifest.classifier.member("shuffle").architecture == "shufflenet_v2_x0_5"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Return a mutation that sets the dotted ``path`` (list indices as numbers) of manifest data."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target: Any = data
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("name", _DELETE), "name: required key is missing"),
        (_set("classifier.colour", "red"), "classifier.colour: unknown key"),
        (_set("classifier.threshold", 1.5), "classifier.threshold: Input should be less than or equal to 1"),
        (_set("classifier.members.1.architecture", "resnet35"), "classifier.members.1.architecture: unknown architec"),
        (_set("segmentation.architecture", "segformer"), "segmentation.architecture: Input should be 'unet'"),
        (_set("segmentation.mask_threshold", 1.0), "segmentation.mask_threshold: Input should be less than 1"),
        (_set("segmentation.input_size", 8), "segmentation.input_size: Input should be greater than or equal to 16"),
        (_set("classifier.mean", [0.5, 0.5]), "classifier.mean: List should have at least 3 items"),
        (_set("classifier.std", [0.2, 0.0, 0.2]), "classifier.std: every std must be > 0"),
        (_set("classifier.region", "bbox"), "classifier.region: Input should be 'crop', 'mask' or 'crop+mask'"),
        (_set("classifier.embedding.member", "densenet"), "classifier.embedding.member: 'densenet' is not"),
        (_set("classifier.explain.member", "vgg"), "classifier.explain.member: 'vgg' is not one of"),
        (_set("classifier.members.1.name", "squeeze"), "classifier.members: member names must be unique"),
        (_set("classifier.members.0.sha256", "abc"), "classifier.members.0.sha256: String should match pattern"),
        (_set("classifier.members", []), "classifier.members: List should have at least 1 item"),
        (_set("classifier.members.0.weights", "gone.pt"), "classifier.members.0.weights: weights file"),
        (_set("segmentation.weights", "gone.pt"), "segmentation.weights: weights file"),
    ],
)
def test_manifest_problems_are_one_line_naming_file_and_key(
    model_dir: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    """Every invalid manifest is refused with one line that names the file and the key."""
    data = copy.deepcopy(_manifest_data(model_dir))
    mutate(data)
    path = _write(model_dir, data)
    with pytest.raises(ModelError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_manifest_too_small_for_its_depth(model_dir: Path) -> None:
    """A segmentation input smaller than the U-Net's coarsest level is refused under input_size."""
    data = _manifest_data(model_dir)
    data["segmentation"].update(depth=7, input_size=32)
    with pytest.raises(ModelError, match=r"segmentation\.input_size: 32 is smaller than 2\*\*\(depth-1\) = 64"):
        load_manifest(_write(model_dir, data))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "model manifest .* not found"),
        ("name: [unclosed\n", "not valid YAML: .* at line 2"),
        ("- a list\n", "expected a mapping of keys at the top; found list"),
    ],
)
def test_manifest_file_problems(tmp_path: Path, text: str | None, expected: str) -> None:
    """A missing file, bad YAML or a non-mapping is one ModelError line naming the file."""
    path = tmp_path / "manifest.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ModelError, match=expected) as caught:
        load_manifest(path)
    assert "\n" not in str(caught.value)
    assert str(path) in str(caught.value)


def test_checksum_mismatch_is_refused(weights_dir: Path) -> None:
    """Weights whose SHA-256 differs from the manifest's are refused, naming file, expected and found."""
    path = weights_dir / "squeeze.pt"
    wrong = "0" * 64
    with pytest.raises(ModelError) as caught:
        load_weights(path, wrong)
    message = str(caught.value)
    assert str(path) in message
    assert wrong in message
    assert sha256_file(path) in message
    assert "\n" not in message


def test_weights_that_do_not_fit_are_refused(weights_dir: Path) -> None:
    """A state dict for another architecture is one ModelError line, not a torch traceback."""
    path = weights_dir / "shuffle.pt"
    state = load_weights(path, sha256_file(path))
    with pytest.raises(ModelError, match=r"do not fit SqueezeNet: missing features\.0\.weight"):
        load_into(build_classifier("squeezenet1_1"), state, path)


def test_models_load_from_manifest(model_dir: Path) -> None:
    """The manifest's segmenter and ensemble load checksummed weights and reproduce the saved networks."""
    manifest = load_manifest(_write(model_dir, _manifest_data(model_dir)))
    ensemble = Ensemble.from_manifest(manifest)
    segmenter = LungSegmenter.from_manifest(manifest)
    reference = load_into(build_classifier("squeezenet1_1"), torch.load(model_dir / "squeeze.pt"), "squeeze").eval()
    batch = _batch(2)
    with torch.inference_mode():
        expected = torch.softmax(reference(batch), dim=1)[:, 1].numpy()
    out = ensemble(batch)
    np.testing.assert_allclose(out.member_probs["squeeze"], expected, atol=1e-6)
    assert out.embedding.shape == (2, 512 + 1024)
    assert segmenter(np.full((2, SIZE, SIZE), 0.5, np.float32)).shape == (2, SIZE, SIZE)
    assert segmenter.threshold == 0.5


def test_tampered_weights_refuse_to_load(model_dir: Path) -> None:
    """Changing one byte of a member's weights makes the ensemble refuse to load."""
    manifest = load_manifest(_write(model_dir, _manifest_data(model_dir)))
    with (model_dir / "shuffle.pt").open("r+b") as stream:
        stream.seek(100)
        byte = stream.read(1)
        stream.seek(100)
        stream.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError, match=r"shuffle\.pt refused: sha256 expected [0-9a-f]{64}, found [0-9a-f]{64}"):
        Ensemble.from_manifest(manifest)


# --- construction and ImageNet starts -----------------------------------------------------------------


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, via TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"
    return tmp_path / "hub" / "checkpoints"


def test_imagenet_start_without_cached_weights_says_where_to_put_them(hub_dir: Path) -> None:
    """Without the cached file, imagenet_start names the file and folder and downloads nothing."""
    expected = (
        f"ImageNet weights for resnet34 not in {hub_dir}; put resnet34-b627a593.pth there"
        " or train from scratch with --no-pretrained"
    )
    with pytest.raises(ModelError) as caught:
        imagenet_start("resnet34")
    assert str(caught.value) == expected
    assert not hub_dir.exists() or not any(hub_dir.iterdir())


def test_imagenet_start_uses_the_cache_and_replaces_the_head(hub_dir: Path) -> None:
    """A cached ImageNet file is loaded and the 1000-class head becomes a 2-class one."""
    hub_dir.mkdir(parents=True)
    torch.manual_seed(3)
    imagenet = torchvision_model("squeezenet1_1")
    torch.save(imagenet.state_dict(), hub_dir / "squeezenet1_1-b8a52dc0.pth")
    model = imagenet_start("squeezenet1_1")
    assert torch.equal(model.features[0].weight, imagenet.features[0].weight)
    assert model(_batch(1)).shape == (1, 2)


def torchvision_model(architecture: str) -> nn.Module:
    """Return a 1000-class torchvision model with random weights (what an ImageNet file fits)."""
    return build_classifier(architecture, num_classes=1000)


def test_unknown_architecture_is_a_model_error() -> None:
    """Building an architecture torchvision does not have is a one-line ModelError."""
    with pytest.raises(ModelError, match="unknown architecture 'resnet35'"):
        build_classifier("resnet35")


def test_architecture_names_come_from_torchvision() -> None:
    """The paper's networks and the small test networks are all known classification architectures."""
    names = registry.classification_architectures()
    assert {"resnet34", "resnet50", "resnet152", "vgg16", "mobilenet_v3_small", "squeezenet1_1"} <= names
    assert "fcn_resnet50" not in names


# --- device ------------------------------------------------------------------------------------------


def _cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend this machine has ``count`` CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [("cpu", 0, "cpu"), ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), (" CUDA ", 1, "cuda:0"), ("cuda:1", 2, "cuda:1")],
)
def test_resolve_device(monkeypatch: pytest.MonkeyPatch, spec: str, count: int, expected: str) -> None:
    """auto picks CUDA when present, else the CPU; explicit devices are returned as named."""
    _cuda(monkeypatch, count)
    assert resolve_device(spec) == torch.device(expected)


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("cuda", 0, "no CUDA device is available; set compute.device: cpu"),
        ("cuda:2", 2, r"has 2 CUDA device\(s\) \(cuda:0..cuda:1\); set compute.device: cpu"),
        ("gpu", 1, "compute.device must be auto, cpu, cuda or cuda:N; found 'gpu'"),
    ],
)
def test_resolve_device_refuses(monkeypatch: pytest.MonkeyPatch, spec: str, count: int, expected: str) -> None:
    """An absent CUDA device or an unknown spec is one ModelError line saying what to set."""
    _cuda(monkeypatch, count)
    with pytest.raises(ModelError, match=expected) as caught:
        resolve_device(spec)
    assert "\n" not in str(caught.value)


# --- U-Net and lung segmentation -----------------------------------------------------------------------


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
@pytest.mark.parametrize("size", [64, 50])
def test_unet_keeps_the_input_size(upsample: str, size: int) -> None:
    """The U-Net maps (N, 1, H, W) to (N, 1, H, W) logits, odd sizes included."""
    net = UNet(8, 4, upsample).eval()  # type: ignore[arg-type]
    assert net(torch.rand(2, 1, size, size)).shape == (2, 1, size, size)


def test_unet_parameter_budget() -> None:
    """A depth-4, base-16 U-Net stores under 2 MB of float32 weights."""
    net = UNet(base_channels=16, depth=4)
    assert parameter_bytes(net) < 2_000_000
    assert 400_000 < sum(p.numel() for p in net.parameters()) < 500_000


@pytest.mark.parametrize(("base", "depth", "expected"), [(0, 4, "base_channels"), (8, 1, "depth")])
def test_unet_refuses_bad_shapes(base: int, depth: int, expected: str) -> None:
    """A U-Net without channels or without a pooling level cannot be built."""
    with pytest.raises(ValueError, match=expected):
        UNet(base, depth)


@pytest.fixture(scope="module")
def segmenter() -> LungSegmenter:
    """A random-weight lung segmenter on 64-pixel images."""
    torch.manual_seed(0)
    return LungSegmenter(UNet(4, 3), input_size=SIZE, threshold=0.5)


def test_segmenter_returns_boolean_masks(segmenter: LungSegmenter) -> None:
    """Masks are (N, S, S) bool and equal the probabilities above the threshold."""
    images = np.random.default_rng(0).random((3, SIZE, SIZE), dtype=np.float32)
    masks = segmenter(images)
    assert masks.dtype == np.bool_
    assert masks.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(masks, segmenter.probabilities(images) > 0.5)


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (np.zeros((1, SIZE, SIZE), np.float64), "float32 numpy array; found float64"),
        (np.zeros((SIZE, SIZE), np.float32), r"shape \(N, 64, 64\) with N >= 1; found \(64, 64\)"),
        (np.zeros((1, 32, 32), np.float32), r"found \(1, 32, 32\)"),
        (np.full((1, SIZE, SIZE), 1.5, np.float32), r"finite and in \[0, 1\]"),
        (np.full((1, SIZE, SIZE), np.nan, np.float32), r"finite and in \[0, 1\]"),
    ],
)
def test_segmenter_checks_its_input(segmenter: LungSegmenter, images: np.ndarray, expected: str) -> None:
    """A wrong dtype, shape or value range is a ValueError naming the argument."""
    with pytest.raises(ValueError, match="batch .*" + expected):
        segmenter(images)


def _lungs(centres: list[tuple[float, float]], radii: tuple[float, float], size: int = 256) -> np.ndarray:
    """Return a ``(size, size)`` mask of ellipses at fractional ``(x, y)`` centres with fractional radii."""
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    mask = np.zeros((size, size), dtype=bool)
    for cx, cy in centres:
        mask |= ((xx - cx) / radii[0]) ** 2 + ((yy - cy) / radii[1]) ** 2 < 1
    return mask


@pytest.mark.parametrize(
    ("mask", "ok", "components", "reason"),
    [
        (_lungs([(0.3, 0.45), (0.7, 0.45)], (0.12, 0.25)), True, 2, "plausible"),
        (_lungs([(0.3, 0.45), (0.7, 0.45)], (0.12, 0.25)) | _lungs([(0.5, 0.85)], (0.02, 0.02)), True, 2, "plausible"),
        (_lungs([(0.35, 0.45)], (0.15, 0.3)), False, 1, "1 sizeable lung region(s) found; expected 2"),
        (_lungs([(0.3, 0.45), (0.7, 0.45)], (0.05, 0.1)), False, 0, "below 8%"),
        (_lungs([(0.25, 0.5), (0.75, 0.5)], (0.24, 0.45)), False, 2, "above 60%"),
        (_lungs([(0.3, 0.13), (0.7, 0.13)], (0.12, 0.12)), False, 2, "outside the central region"),
        (_lungs([(0.32, 0.3), (0.32, 0.72)], (0.12, 0.15)), False, 2, "on the same side"),
        (np.random.default_rng(0).random((256, 256)) < 0.3, False, 0, "sizeable lung region"),
        (np.zeros((256, 256), bool), False, 0, "lung area 0.0% of the image is below 8%"),
    ],
    ids=["two-lungs", "two-lungs-and-speck", "one-lung", "tiny", "huge", "off-centre", "same-side", "noise", "empty"],
)  # fmt: skip
def test_mask_quality_verdicts(mask: np.ndarray, ok: bool, components: int, reason: str) -> None:
    """Two lungs pass; one lung, tiny, huge, off-centre, one-sided, noisy and empty masks fail with a reason."""
    quality = mask_quality(mask)
    assert (quality.ok, quality.components) == (ok, components)
    assert reason in quality.reason
    assert quality.area_fraction == pytest.approx(mask.mean())


def test_mask_quality_is_fast() -> None:
    """Judging a 256x256 mask takes under 20 ms (best of five)."""
    mask = _lungs([(0.3, 0.45), (0.7, 0.45)], (0.12, 0.25))
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        mask_quality(mask)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.020


@pytest.mark.parametrize("mask", [np.zeros((4, 4), np.uint8), np.zeros((2, 4, 4), bool), np.zeros((0, 4), bool)])
def test_mask_quality_checks_its_input(mask: np.ndarray) -> None:
    """Anything but a non-empty 2-D bool array is a ValueError naming the argument."""
    with pytest.raises(ValueError, match="mask must be a non-empty"):
        mask_quality(mask)


def test_label_components_joins_across_rows_and_not_diagonally() -> None:
    """A U shape is one component, and pixels touching only at a corner are separate ones."""
    mask = np.zeros((8, 10), dtype=bool)
    mask[1:6, 1] = mask[1:6, 4] = mask[5, 1:5] = True  # a U: the arms meet only at the bottom row
    mask[0, 7] = mask[1, 8] = True  # diagonal neighbours
    labels, count = label_components(mask)
    assert count == 3
    assert len(np.unique(labels[:, :6][mask[:, :6]])) == 1
    assert labels[0, 7] != labels[1, 8]
    assert (labels > 0).sum() == mask.sum()
    assert set(np.unique(labels)) == {0, 1, 2, 3}


# --- ensemble: embeddings -------------------------------------------------------------------------------


def _resnet_features(m: Any, x: torch.Tensor) -> torch.Tensor:
    """ResNet's pooled layer4 output."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(x))))), 1)


def _classifier_trunk_features(m: Any, x: torch.Tensor) -> torch.Tensor:
    """VGG's and MobileNet's classifier without its last Linear, on the pooled features."""
    return m.classifier[:-1](torch.flatten(m.avgpool(m.features(x)), 1))


def _shufflenet_features(m: Any, x: torch.Tensor) -> torch.Tensor:
    """ShuffleNet's globally pooled conv5 output."""
    return m.conv5(m.stage4(m.stage3(m.stage2(m.maxpool(m.conv1(x)))))).mean([2, 3])


def _squeezenet_features(m: Any, x: torch.Tensor) -> torch.Tensor:
    """SqueezeNet's globally pooled features (the input of its final classifier convolution)."""
    return torch.flatten(F.adaptive_avg_pool2d(m.features(x), 1), 1)


@pytest.mark.parametrize(
    ("architecture", "manual", "dim"),
    [
        ("resnet18", _resnet_features, 512),
        ("vgg11", _classifier_trunk_features, 4096),
        ("mobilenet_v3_small", _classifier_trunk_features, 1024),
        ("shufflenet_v2_x0_5", _shufflenet_features, 1024),
        ("squeezenet1_1", _squeezenet_features, 512),
    ],
)
def test_embedding_hook_captures_penultimate_features(
    architecture: str, manual: Callable[[Any, torch.Tensor], torch.Tensor], dim: int
) -> None:
    """The hook's features equal the hand-computed penultimate layer, and the embedding is them normalised."""
    model = _random_model(architecture)
    x = _batch(2)
    hook = FeatureHook(model)
    with torch.inference_mode(), hook.attached():
        model(x)
        expected = manual(model, x)
    assert hook.features is not None
    assert hook.features.shape == (2, dim)
    torch.testing.assert_close(hook.features, expected, atol=1e-5, rtol=1e-5)
    out = Ensemble({architecture: model}, explain=architecture, embedding=architecture)(x)
    np.testing.assert_allclose(out.embedding, F.normalize(expected, dim=1).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    """Three small random-weight members; Grad-CAM on the ResNet; the concatenated embedding."""
    members = {name: _random_model(name) for name in ("resnet18", "squeezenet1_1", "shufflenet_v2_x0_5")}
    return Ensemble(members, explain="resnet18")


def test_ensemble_probability_is_the_mean_of_members(ensemble: Ensemble) -> None:
    """Each member's probability is its own softmax[:, 1], and the ensemble's is their mean."""
    x = _batch(4)
    out = ensemble(x)
    assert list(out.member_probs) == ["resnet18", "squeezenet1_1", "shufflenet_v2_x0_5"]
    for name, model in ensemble.members.items():
        with torch.inference_mode():
            expected = torch.softmax(model(x), dim=1)[:, 1].numpy()
        np.testing.assert_allclose(out.member_probs[name], expected, atol=1e-6)
    np.testing.assert_allclose(out.probability, np.mean(list(out.member_probs.values()), axis=0), atol=1e-7)
    assert out.probability.dtype == np.float32


def test_ensemble_embedding_has_unit_norm(ensemble: Ensemble) -> None:
    """The concatenated embedding has unit L2 norm and each member's block weighs the same."""
    out = ensemble(_batch(3))
    assert out.embedding.shape == (3, 512 + 512 + 1024)
    np.testing.assert_allclose(np.linalg.norm(out.embedding, axis=1), 1.0, atol=1e-6)
    block_norms = np.linalg.norm(out.embedding[:, :512], axis=1)
    np.testing.assert_allclose(block_norms, 1 / np.sqrt(3), atol=1e-6)


def test_ensemble_batch_equals_single_forwards(ensemble: Ensemble) -> None:
    """A batch of 8 gives what 8 single-image forwards give, heatmaps included, within 1e-5."""
    x = _batch(8, seed=5)
    batch = ensemble(x)
    singles = [ensemble(x[i : i + 1]) for i in range(8)]
    for field in ("probability", "embedding", "heatmap"):
        joined = np.concatenate([getattr(single, field) for single in singles])
        np.testing.assert_allclose(getattr(batch, field), joined, atol=1e-5, err_msg=field)
    for name in ensemble.names:
        joined = np.concatenate([single.member_probs[name] for single in singles])
        np.testing.assert_allclose(batch.member_probs[name], joined, atol=1e-5, err_msg=name)
    assert not any(module._forward_hooks for model in ensemble.members.values() for module in model.modules())


def test_ensemble_heatmap_shape_and_range(ensemble: Ensemble) -> None:
    """Heatmaps are (N, S, S) float32 in [0, 1] with a peak of 1, also when called in inference mode."""
    x = _batch(2, size=96)
    with torch.inference_mode():
        out = ensemble(x)
    assert out.heatmap.shape == (2, 96, 96)
    assert out.heatmap.dtype == np.float32
    assert out.heatmap.min() >= 0.0
    np.testing.assert_allclose(out.heatmap.max(axis=(1, 2)), 1.0, atol=1e-6)


def test_ensemble_prepare_normalises_grey_images(ensemble: Ensemble) -> None:
    """prepare repeats a grey image over three channels and applies the mean and std."""
    x = ensemble.prepare(np.full((2, SIZE, SIZE), 0.5, np.float32))
    assert x.shape == (2, 3, SIZE, SIZE)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 0, 0], expected)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (torch.zeros(1, 1, SIZE, SIZE), r"\(N, 3, S, S\) with N >= 1; found \(1, 1, 64, 64\)"),
        (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), "floating-point torch.Tensor; found torch.uint8"),
        (np.zeros((1, 3, SIZE, SIZE), np.float32), "floating-point torch.Tensor; found ndarray"),
    ],
)
def test_ensemble_checks_its_input(ensemble: Ensemble, batch: Any, expected: str) -> None:
    """A batch of the wrong type or shape is a ValueError naming the argument."""
    with pytest.raises(ValueError, match="batch must .*" + expected):
        ensemble(batch)


def test_ensemble_refuses_bad_roles_and_heads() -> None:
    """Unknown explain/embedding members, a missing layer and a 1000-class head are ModelErrors."""
    members = {"squeeze": _random_model("squeezenet1_1")}
    with pytest.raises(ModelError, match="explain member 'vgg' is not one of"):
        Ensemble(members, explain="vgg")
    with pytest.raises(ModelError, match="embedding member 'vgg' is not 'concat' or one of"):
        Ensemble(members, explain="squeeze", embedding="vgg")
    with pytest.raises(ModelError, match=r"Grad-CAM layer 'features\.99' is not a module"):
        Ensemble(members, explain="squeeze", explain_layer="features.99")
    with pytest.raises(ModelError, match="has 1000 outputs; a 2-class head is needed"):
        Ensemble({"big": torchvision_model("squeezenet1_1")}, explain="big")


def test_runtime_options_refuse_unknown_precision() -> None:
    """Only bf16, fp16 and fp32 are precisions."""
    with pytest.raises(ValueError, match="precision must be bf16, fp16 or fp32; found 'fp8'"):
        RuntimeOptions(precision="fp8")  # type: ignore[arg-type]


# --- Grad-CAM -------------------------------------------------------------------------------------------


def test_default_gradcam_layer_is_the_last_non_head_convolution() -> None:
    """The default Grad-CAM layer is the last Conv2d, skipping SqueezeNet's classifier convolution."""
    assert default_layer(_random_model("resnet18")) == "layer4.1.conv2"
    assert default_layer(_random_model("squeezenet1_1")) == "features.12.expand3x3"


def test_cam_of_no_evidence_is_all_zero() -> None:
    """Zero activations give an all-zero map, not NaN."""
    maps = cam(torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3), (12, 12))
    assert maps.shape == (2, 12, 12)
    assert torch.count_nonzero(maps) == 0


def test_cam_checks_shapes() -> None:
    """Activations and gradients of different shapes are a ValueError."""
    with pytest.raises(ValueError, match="activations and gradients must be"):
        cam(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 2, 2), (8, 8))


def _blob_images(n: int, positive: bool, rng: np.random.Generator, size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Return noisy images (with a bright Gaussian blob at a random spot when ``positive``) and blob centres."""
    images = rng.normal(0.0, 0.2, (n, 1, size, size)).astype(np.float32)
    centres = rng.integers(6, size - 6, (n, 2))
    if positive:
        yy, xx = np.mgrid[:size, :size]
        for image, (cy, cx) in zip(images, centres, strict=True):
            image[0] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0**2))
    return torch.from_numpy(images), centres


class _Tiny(nn.Module):
    """A small blob detector: two convolutions, global average pooling, a 2-class Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (N, 2) logits."""
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def blob_detector() -> _Tiny:
    """A tiny CNN trained for a few steps to tell images with a bright blob from those without."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _Tiny()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    labels = torch.tensor([0] * 16 + [1] * 16)
    for _ in range(80):
        images = torch.cat([_blob_images(16, False, rng)[0], _blob_images(16, True, rng)[0]])
        loss = F.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def test_gradcam_points_at_the_blob(blob_detector: _Tiny) -> None:
    """On a toy task, the Grad-CAM peak lies within 3 pixels of the blob that makes an image positive."""
    images, centres = _blob_images(16, True, np.random.default_rng(1))
    with torch.no_grad():
        assert (blob_detector(images).argmax(dim=1) == 1).all()
    maps = GradCam(blob_detector)(images)
    assert maps.shape == (16, 32, 32)
    assert maps.min() >= 0.0
    assert maps.max() <= 1.0
    peaks = np.array(np.unravel_index(maps.reshape(16, -1).argmax(axis=1), (32, 32))).T
    assert np.abs(peaks - centres).max() <= 3, (peaks, centres)


def test_gradcam_leaves_no_parameter_gradients(blob_detector: _Tiny) -> None:
    """Grad-CAM differentiates with respect to activations only; no parameter .grad is written."""
    for parameter in blob_detector.parameters():
        parameter.grad = None
    GradCam(blob_detector)(_blob_images(2, True, np.random.default_rng(2))[0])
    assert all(parameter.grad is None for parameter in blob_detector.parameters())


def test_manifest_is_frozen(model_dir: Path) -> None:
    """A loaded manifest cannot be changed."""
    manifest = load_manifest(_write(model_dir, _manifest_data(model_dir)))
    with pytest.raises(ValueError, match="frozen"):
        manifest.name = "other"  # type: ignore[misc]
    assert isinstance(manifest, Manifest)


def test_weights_keep_their_metadata(tmp_path: Path) -> None:
    """Loaded weights keep the state dict's metadata, so versioned modules (MNASNet) load them back."""
    path = tmp_path / "mnasnet.pt"
    torch.save(build_classifier("mnasnet0_5").state_dict(), path)
    state = load_weights(path, sha256_file(path))
    load_into(build_classifier("mnasnet0_5"), state, path)
    assert hasattr(state, "_metadata")
