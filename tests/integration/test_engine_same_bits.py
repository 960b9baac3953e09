"""The demo engine after the CPU cut gives, bit for bit, what the earlier numerics gave (tests/previous_numerics.py),
bar the heatmap, now made on the stored grid at once: within a few levels of 255 of the earlier one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from cxr_node.dicom.pixels import decode
from cxr_node.imaging.resample import resize
from cxr_node.infer import preprocess
from cxr_node.infer.classify import EnsembleOutput, RuntimeOptions
from cxr_node.infer.engine import Analysis, Engine, _Region
from cxr_node.infer.registry import Manifest, load_manifest
from cxr_node.infer.segment import MaskQuality
from cxr_node.jobs import codec
from cxr_node.training.phantoms import make_phantom
from tests import previous_numerics as previous

HEAT_MEDIAN_LEVELS = 0.5
HEAT_MAX_LEVELS = 2.0
"""How far (in levels of 255, inside the lungs) the heatmap made on the stored grid may be from the earlier one made
on the image's grid and reduced: the crop's edges move to the nearest stored pixel, one resampling instead of two."""
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"


class EarlierEngine(Engine):
    """The engine with its earlier region (mask the whole image, then crop), image statistics and full-grid heatmap."""

    def _region(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, _Region]:
        classifier = self.manifest.classifier
        canvas, box, placement = previous.region(image, mask, classifier.region, classifier.input_size)
        return canvas, _Region(box, placement)

    def _analysed(
        self, output: EnsembleOutput, k: int, region: _Region, mask: np.ndarray, quality: MaskQuality
    ) -> Analysis:
        found = super()._analysed(output, k, region, mask, quality)
        return replace(found, heatmap=previous.full_heatmap(output.heatmap[k], region.fit, region.box))

    def _scored(self, analysis: Analysis, normalised: np.ndarray, reduced: np.ndarray) -> Analysis:
        statistics = previous.image_statistics(normalised, analysis.lung_mask)
        domain = None
        if self.domain is not None and analysis.embedding is not None:
            domain = self.domain.judge(analysis.embedding, statistics)
        return replace(analysis, statistics=statistics, domain=domain)


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The demo models, loaded once with their checksums verified."""
    return Engine.from_manifest(load_manifest(DEMO), RuntimeOptions())


@pytest.fixture(scope="module")
def images(wg04: Path) -> list[np.ndarray]:
    """The real chest CR (uncompressed and JPEG 2000) reduced as the worker does, and two phantoms."""
    radiographs = [decode(dcmread(wg04 / name), max_side=1024).pixels for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm")]
    return radiographs + [make_phantom(90_000 + i, label=i, size=384).image.copy() for i in range(2)]


def with_region(manifest: Manifest, region: str) -> Manifest:
    """``manifest`` with the classifier fed ``region``."""
    return manifest.model_copy(update={"classifier": manifest.classifier.model_copy(update={"region": region})})


@pytest.mark.parametrize("region", ["crop+mask", "crop", "mask"])
def test_analyses_and_stored_arrays_are_the_earlier_bits(
    engine: Engine, images: list[np.ndarray], region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probabilities, embeddings, masks, heatmaps, statistics, domain scores and unpacked arrays are the same bytes."""
    manifest = with_region(engine.manifest, region)
    found = Engine(manifest, engine.segmenter, engine.ensemble, engine.domain).analyse(images)
    monkeypatch.setattr(preprocess, "normalise", previous.normalise)
    expected = EarlierEngine(manifest, engine.segmenter, engine.ensemble, engine.domain).analyse(images)
    assert all(a.analysed for a in found[:2]), "the real CR must reach the classifier for this test to mean anything"
    for new, old in zip(found, expected, strict=True):
        assert (new.analysed, new.probability, new.member_probs, new.domain) == (
            old.analysed,
            old.probability,
            old.member_probs,
            old.domain,
        )
        for name in ("lung_mask", "embedding", "statistics"):
            assert previous.same(getattr(new, name), getattr(old, name)), name
        if new.analysed:
            unpacked = codec.unpack_arrays(codec.pack_arrays(new.lung_mask, new.heatmap))
            earlier = previous.unpack_arrays(previous.pack_arrays(old.lung_mask, old.heatmap))
            assert previous.same(unpacked[0], earlier[0])
            assert unpacked[1] is not None and earlier[1] is not None
            drawn = resize(unpacked[1], new.lung_mask.shape)  # as the Secondary Capture draws it
            levels = np.abs(drawn - earlier[1])[new.lung_mask] * 255  # heat is drawn inside the lungs only
            assert float(np.median(levels)) <= HEAT_MEDIAN_LEVELS and float(levels.max()) <= HEAT_MAX_LEVELS, (
                float(np.median(levels)),
                float(levels.max()),
            )


def test_prepare_gives_the_earlier_network_input(engine: Engine) -> None:
    """Ensemble.prepare (dividing in place) gives the tensor ``(grey - mean) / std`` gave."""
    canvases = np.random.default_rng(3).random((3, 64, 64)).astype(np.float32)
    grey = torch.from_numpy(canvases)[:, None].expand(-1, 3, -1, -1)
    expected = (grey - engine.ensemble.mean) / engine.ensemble.std
    found = engine.ensemble.prepare(canvases)
    assert found.dtype == expected.dtype and torch.equal(found, expected)
    assert found.numpy().tobytes() == expected.numpy().tobytes()
