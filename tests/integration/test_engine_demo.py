"""The demo models through the real engine: batching, the mask guard, every transfer syntax, the phantom task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cxr_node.dicom.pixels import decode
from cxr_node.imaging.resample import HEATMAP_SIDE, scaled_shape
from cxr_node.infer.classify import RuntimeOptions
from cxr_node.infer.engine import Engine
from cxr_node.infer.registry import load_manifest
from cxr_node.training.phantoms import make_phantom
from tests.syntaxes import Variant

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The demo models, loaded once with their checksums verified."""
    return Engine.from_manifest(load_manifest(DEMO), RuntimeOptions())


@pytest.fixture(scope="module")
def phantoms() -> list[np.ndarray]:
    """Eight held-out phantoms (seeds far from the training seeds), half positive, at 384 px."""
    return [make_phantom(90_000 + i, label=i % 2, size=384).image.copy() for i in range(8)]


def test_demo_manifest_says_not_for_clinical_use() -> None:
    """The demo manifest marks itself as demo output on synthetic data."""
    manifest = load_manifest(DEMO)
    assert "not for clinical use" in manifest.intended_use
    assert "demo" in manifest.intended_use


def test_batch_of_8_equals_8_singles(engine: Engine, phantoms: list[np.ndarray]) -> None:
    """Analysing 8 images in one batch gives what 8 single analyses give (CPU, within float tolerance)."""
    batch = engine.analyse(phantoms)
    singles = [engine.analyse([image])[0] for image in phantoms]
    for together, alone in zip(batch, singles, strict=True):
        assert together.analysed == alone.analysed
        assert together.probability == pytest.approx(alone.probability, abs=1e-5)
        assert np.allclose(together.embedding, alone.embedding, atol=1e-5)
        assert np.array_equal(together.lung_mask, alone.lung_mask)
        assert np.allclose(together.heatmap, alone.heatmap, atol=1e-4)


def test_phantoms_are_analysed_and_separated(engine: Engine, phantoms: list[np.ndarray]) -> None:
    """Held-out phantoms get plausible masks, and positives score above negatives on average."""
    results = engine.analyse(phantoms)
    assert all(r.analysed and r.quality.ok for r in results)
    positives = [r.probability for r in results[1::2]]
    negatives = [r.probability for r in results[0::2]]
    assert np.mean(positives) > np.mean(negatives) + 0.3
    for result, image in zip(results, phantoms, strict=True):
        assert result.lung_mask.shape == image.shape
        assert result.heatmap.shape == scaled_shape(image.shape, HEATMAP_SIDE)  # the stored grid, <= 256 a side
        assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
        assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-4)


def test_implausible_mask_is_not_classified(engine: Engine) -> None:
    """An image with no chest in it (uniform noise) is reported as not analysed, with the reason."""
    noise = np.random.default_rng(0).random((300, 300), dtype=np.float32)
    [result] = engine.analyse([noise])
    assert not result.analysed
    assert result.probability is None
    assert result.reason.startswith("lung mask implausible")


def test_every_transfer_syntax_decodes_and_is_analysed(engine: Engine, syntax_variants: dict[str, Variant]) -> None:
    """A real chest CR in each accepted transfer syntax decodes and runs through the engine to a result."""
    images = [decode(dcmread(v.path), max_side=1024).pixels for v in syntax_variants.values()]
    results = engine.analyse(images)
    assert len(results) == len(syntax_variants)
    for name, result in zip(syntax_variants, results, strict=True):
        assert result.lung_mask.shape == images[0].shape, name
        assert result.analysed == result.quality.ok, name
