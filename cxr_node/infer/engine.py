"""The inference engine: grey images in, one :class:`Analysis` each out (preprocess → segment → classify).

For a batch of presentation images (float32 in [0, 1], any size) the engine normalises each, segments the
lungs with the U-Net, judges the mask, feeds the lung region (as the manifest says: crop, mask or both) to
the ensemble, and maps the lung mask back to each image's own grid and the Grad-CAM heatmap onto that grid
reduced to at most 256 pixels a side. An image whose
mask is implausible is not classified: its Analysis says why. When the manifest has a domain description, each
classified image also gets its out-of-domain score (:mod:`cxr_node.infer.domain`); what to do with an image
outside the domain is the worker's policy, not the engine's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from cxr_node.imaging.resample import HEATMAP_SIDE, scaled_shape
from cxr_node.infer import preprocess
from cxr_node.infer.classify import Ensemble, EnsembleOutput, RuntimeOptions
from cxr_node.infer.device import CpuFeatures
from cxr_node.infer.domain import (
    STATISTICS_GRID,
    DomainDescription,
    DomainScore,
    image_statistics,
    load_description,
)
from cxr_node.infer.registry import Manifest
from cxr_node.infer.segment import LungSegmenter, MaskQuality, mask_quality

CROP_MARGIN = 0.05
"""Margin added around the lung bounding box, as a fraction of its size (the costophrenic angles)."""


@dataclass(frozen=True)
class Analysis:
    """What the engine found in one image.

    Attributes
    ----------
    analysed : bool
        False when the image was not classified (``reason`` says why).
    reason : str
        Empty when analysed; otherwise one line for the "not analysed" report.
    probability : float or None
        The ensemble's positive-class probability (mean of the members).
    member_probs : dict[str, float]
        Each member's positive-class probability.
    threshold : float
        The manifest's operating point.
    positive : bool or None
        ``probability >= threshold``.
    embedding : numpy.ndarray or None
        (D,) float32, unit norm: the retrieval embedding.
    lung_mask : numpy.ndarray
        (H, W) bool on the grid of the image given.
    heatmap : numpy.ndarray or None
        float32 in [0, 1] on the image's grid reduced to at most :data:`~cxr_node.imaging.resample.HEATMAP_SIDE`
        a side (:func:`~cxr_node.imaging.resample.scaled_shape`); zero outside the region the ensemble saw.
    quality : MaskQuality
        The lung mask's plausibility verdict.
    timings_ms : dict[str, float]
        This image's share of each step's wall time.
    statistics : numpy.ndarray or None
        (len(domain.STATISTICS),) float64 image statistics inside and outside the lung mask (classified images).
    domain : DomainScore or None
        The out-of-domain score and bound; None without a domain description or when not classified.
    """

    analysed: bool
    reason: str
    probability: float | None
    member_probs: dict[str, float]
    threshold: float
    positive: bool | None
    embedding: NDArray[np.float32] | None
    lung_mask: NDArray[np.bool_]
    heatmap: NDArray[np.float32] | None
    quality: MaskQuality
    timings_ms: dict[str, float] = field(default_factory=dict)
    statistics: NDArray[np.float64] | None = None
    domain: DomainScore | None = None


@dataclass(frozen=True)
class _Region:
    """Where the classifier input of one image came from."""

    box: preprocess.Box
    fit: preprocess.Fit


class Engine:
    """Segmentation, the ensemble and the manifest's choices, loaded once.

    Parameters
    ----------
    manifest : Manifest
        The models' description (region, threshold, input sizes).
    segmenter : LungSegmenter
        The lung U-Net.
    ensemble : Ensemble
        The classifier members.
    domain : DomainDescription or None
        The manifest's domain description (None: images are not scored).
    """

    def __init__(
        self, manifest: Manifest, segmenter: LungSegmenter, ensemble: Ensemble, domain: DomainDescription | None = None
    ) -> None:
        self.manifest = manifest
        self.segmenter = segmenter
        self.ensemble = ensemble
        self.domain = domain

    @classmethod
    def from_manifest(cls, manifest: Manifest, options: RuntimeOptions | None = None) -> Engine:
        """Load both networks of ``manifest`` with their checksummed weights onto ``options.device``."""
        options = options or RuntimeOptions()
        segmenter = LungSegmenter.from_manifest(manifest, device=options.device)
        return cls(manifest, segmenter, Ensemble.from_manifest(manifest, options), manifest_domain(manifest))

    @property
    def runtime(self) -> dict[str, str | bool]:
        """How the networks run, for the start-up log: device, the ensemble's precision and memory format.

        The U-Net always runs in float32 (``segmentation_precision``); on the CPU ``cpu`` names the vector
        capability and the bf16 features found.
        """
        options = self.ensemble.options
        found: dict[str, str | bool] = {
            "device": str(options.device),
            "precision": options.active_precision,
            "segmentation_precision": "fp32",
            "channels_last": options.channels_last,
        }
        if options.device.type == "cpu":
            found["cpu"] = CpuFeatures.detect().describe()
        return found

    @property
    def model(self) -> tuple[str, str]:
        """The manifest's (name, version): what every result records."""
        return self.manifest.name, self.manifest.version

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]:
        """Analyse a batch of (H, W) float32 images in [0, 1]; return one Analysis per image, in order."""
        if not images:
            return []
        clock = time.perf_counter()
        normalised = [preprocess.normalise(image) for image in images]
        masks, reduced = self._segment(normalised)
        segment_ms = _elapsed_ms(clock) / len(images)
        qualities = [mask_quality(mask) for mask in masks]
        chosen = [i for i, quality in enumerate(qualities) if quality.ok]
        clock = time.perf_counter()
        found = self._classify(
            [normalised[i] for i in chosen],
            [masks[i] for i in chosen],
            [qualities[i] for i in chosen],
            [reduced[i] for i in chosen],
        )
        analysed = dict(zip(chosen, found, strict=True))
        classify_ms = _elapsed_ms(clock) / max(len(chosen), 1)
        results = []
        for i, (mask, quality) in enumerate(zip(masks, qualities, strict=True)):
            result = analysed.get(i) or self._not_analysed(mask, quality)
            timings = {"segment": segment_ms, "classify": classify_ms if i in analysed else 0.0}
            results.append(replace(result, timings_ms=timings))
        return results

    def _segment(self, normalised: Sequence[np.ndarray]) -> tuple[list[NDArray[np.bool_]], list[np.ndarray]]:
        """Return each normalised image's lung mask, (H, W) bool on its own grid, and the image reduced to the
        statistics' grid (made with the segmentation's input: they share the pass over the whole image)."""
        size = self.segmenter.input_size
        fitted = [preprocess.fit_and_reduce(image, size, STATISTICS_GRID) for image in normalised]
        batch = np.stack([canvas for canvas, _, _ in fitted]).astype(np.float32, copy=False)
        probabilities = self.segmenter.probabilities(np.clip(batch, 0.0, 1.0))
        masks = [
            preprocess.unfit_above(p, fit, self.segmenter.threshold)
            for p, (_, fit, _) in zip(probabilities, fitted, strict=True)
        ]
        return masks, [reduced for _, _, reduced in fitted]

    def _classify(
        self,
        normalised: Sequence[np.ndarray],
        masks: Sequence[NDArray[np.bool_]],
        qualities: Sequence[MaskQuality],
        reduced: Sequence[np.ndarray],
    ) -> list[Analysis]:
        """Run the ensemble on the lung regions of the images; one Analysis each, in order."""
        if not normalised:
            return []
        fitted = [self._region(image, mask) for image, mask in zip(normalised, masks, strict=True)]
        canvases = np.stack([canvas for canvas, _ in fitted]).astype(np.float32, copy=False)
        output = self.ensemble(self.ensemble.prepare(canvases))
        found = [self._analysed(output, k, fitted[k][1], masks[k], qualities[k]) for k in range(len(normalised))]
        return [self._scored(*each) for each in zip(found, normalised, reduced, strict=True)]

    def _scored(self, analysis: Analysis, normalised: np.ndarray, reduced: np.ndarray) -> Analysis:
        """Add the image statistics and, with a domain description, the out-of-domain score."""
        statistics = image_statistics(normalised, analysis.lung_mask, reduced)
        domain = None
        if self.domain is not None and analysis.embedding is not None:
            domain = self.domain.judge(analysis.embedding, statistics)
        return replace(analysis, statistics=statistics, domain=domain)

    def _region(self, image: np.ndarray, mask: NDArray[np.bool_]) -> tuple[np.ndarray, _Region]:
        """Return the classifier canvas for one image and where it came from, per the manifest's region."""
        how = self.manifest.classifier.region
        if "crop" in how:  # crop first, then mask only the crop: the same pixels as masking the whole image
            crop, box = preprocess.crop_to_mask(image, mask, CROP_MARGIN)
        else:
            crop, box = image, preprocess.Box(0, image.shape[0], 0, image.shape[1], source_shape=image.shape)
        if "mask" in how:  # a new C-ordered array: no further copy below
            crop = preprocess.mask_outside(crop, mask[box.slices])
        canvas, fit = preprocess.fit(np.ascontiguousarray(crop, dtype=np.float32), self.manifest.classifier.input_size)
        return canvas, _Region(box, fit)

    def _analysed(
        self, output: EnsembleOutput, k: int, region: _Region, mask: NDArray[np.bool_], quality: MaskQuality
    ) -> Analysis:
        """Return the Analysis of the ``k``-th image of an ensemble batch."""
        probability = float(output.probability[k])
        threshold = self.manifest.classifier.threshold
        grid = scaled_shape(mask.shape, HEATMAP_SIDE)
        heat = preprocess.unfit_onto(output.heatmap[k], region.fit, region.box, grid)
        np.clip(heat, 0.0, 1.0, out=heat)
        return Analysis(
            analysed=True,
            reason="",
            probability=probability,
            member_probs={name: float(p[k]) for name, p in output.member_probs.items()},
            threshold=threshold,
            positive=probability >= threshold,
            embedding=np.asarray(output.embedding[k], dtype=np.float32),
            lung_mask=mask,
            heatmap=heat,
            quality=quality,
        )

    def _not_analysed(self, mask: NDArray[np.bool_], quality: MaskQuality) -> Analysis:
        return Analysis(
            analysed=False,
            reason=f"lung mask implausible: {quality.reason}",
            probability=None,
            member_probs={},
            threshold=self.manifest.classifier.threshold,
            positive=None,
            embedding=None,
            lung_mask=mask,
            heatmap=None,
            quality=quality,
        )


def manifest_domain(manifest: Manifest) -> DomainDescription | None:
    """The manifest's domain description, its checksum verified; None when the manifest has none.

    Raises
    ------
    ModelError
        The file is missing, its checksum differs, or it was written for other features.
    """
    if manifest.domain is None:
        return None
    return load_description(manifest.resolve(manifest.domain.file), manifest.domain.sha256)


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
