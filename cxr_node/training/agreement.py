"""``cxr-node evaluate --bf16-agreement``: whether bf16 autocast on the CPU changes a model's decisions.

The same images go through the engine twice, exactly as in service: once with the ensemble in float32 and
once under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the U-Net stays float32 both times, so both
passes classify the same lung regions). What is compared is what a reader of the outputs would see: the
decision at the manifest's threshold, the probabilities, the Grad-CAM heatmap and the retrieval embedding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.infer.classify import Ensemble, RuntimeOptions
from cxr_node.infer.device import CpuFeatures, CpuPrecision
from cxr_node.infer.engine import Analysis, Engine
from cxr_node.infer.registry import Manifest, load_manifest
from cxr_node.infer.segment import LungSegmenter
from cxr_node.training.datasets import read_image
from cxr_node.training.evaluate import split_rows
from cxr_node.training.metrics import roc_auc

_BATCH: Final = 16


@dataclass(frozen=True)
class Tolerance:
    """How far bf16 may move a model before it is not used in bf16.

    Attributes
    ----------
    decisions : float
        Largest share of the images analysed both ways whose decision (probability >= threshold) may change.
    probability : float
        Largest ``|p_bf16 - p_fp32|`` of the ensemble's probability on any image.
    """

    decisions: float = 0.01
    probability: float = 0.02

    def __post_init__(self) -> None:
        for name in ("decisions", "probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"tolerance {name} must be in [0, 1]; found {value}")


@dataclass(frozen=True)
class Agreement:
    """fp32 against bf16 autocast on one set of images.

    Attributes
    ----------
    model : str
        The manifest's name and version.
    images : int
        Images given.
    analysed : int
        Images both passes analysed (the comparisons are over these).
    analysed_changed : int
        Images one pass analysed and the other did not (0 while the U-Net runs in fp32 both times).
    decisions_changed : int
        Analysed images whose decision at ``threshold`` differs.
    threshold : float
        The manifest's operating point.
    max_abs_dp, mean_abs_dp : float
        Largest and mean ``|p_bf16 - p_fp32|`` of the ensemble's probability.
    member_max_abs_dp : dict[str, float]
        The same, largest, per member.
    auc_fp32, auc_bf16 : float
        The ensemble's ROC AUC each way (NaN without both classes).
    heatmap_correlation : tuple[float, float]
        Lowest and median Pearson correlation of the two Grad-CAM heatmaps of an image.
    embedding_cosine : float
        Lowest cosine similarity of an image's two embeddings.
    seconds : dict[str, float]
        Wall time of each pass over all images (segmentation included).
    tolerance : Tolerance
        What the figures are checked against.
    cpu : str
        :meth:`CpuFeatures.describe` of the machine.
    """

    model: str
    images: int
    analysed: int
    analysed_changed: int
    decisions_changed: int
    threshold: float
    max_abs_dp: float
    mean_abs_dp: float
    member_max_abs_dp: dict[str, float]
    auc_fp32: float
    auc_bf16: float
    heatmap_correlation: tuple[float, float]
    embedding_cosine: float
    seconds: dict[str, float]
    tolerance: Tolerance = field(default_factory=Tolerance)
    cpu: str = ""

    @property
    def changed_share(self) -> float:
        """Share of the images analysed both ways whose decision changed."""
        return self.decisions_changed / self.analysed if self.analysed else 0.0

    @property
    def within_tolerance(self) -> bool:
        """Whether bf16 stays within :attr:`tolerance` (and analysed every image fp32 analysed)."""
        return (
            self.analysed_changed == 0
            and self.changed_share <= self.tolerance.decisions
            and self.max_abs_dp <= self.tolerance.probability
        )

    def lines(self) -> list[str]:
        """The figures, one line each, for the terminal and reports."""
        tol = self.tolerance
        verdict = "within" if self.within_tolerance else "NOT within"
        low, median = self.heatmap_correlation
        return [
            f"{self.model}: fp32 against bf16 autocast (CPU {self.cpu}), {self.analysed}/{self.images} images "
            f"analysed both ways ({self.analysed_changed} analysed one way only)",
            f"decisions changed at threshold {self.threshold:.4f}: {self.decisions_changed} "
            f"({self.changed_share:.1%}; tolerance {tol.decisions:.1%})",
            f"ensemble |p_bf16 - p_fp32|: max {self.max_abs_dp:.4f} (tolerance {tol.probability:.4f}), "
            f"mean {self.mean_abs_dp:.4f}; per member max: "
            + ", ".join(f"{name} {dp:.4f}" for name, dp in self.member_max_abs_dp.items()),
            f"AUC fp32 {self.auc_fp32:.4f}, bf16 {self.auc_bf16:.4f}",
            f"Grad-CAM correlation min {low:.3f}, median {median:.3f}; "
            f"embedding cosine min {self.embedding_cosine:.4f}",
            f"wall time fp32 {self.seconds['fp32']:.1f} s, bf16 {self.seconds['bf16']:.1f} s",
            f"verdict: bf16 is {verdict} tolerance for this model",
        ]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (NaN as None)."""
        return {
            "model": self.model, "cpu": self.cpu, "images": self.images, "analysed": self.analysed,
            "analysed_changed": self.analysed_changed, "decisions_changed": self.decisions_changed,
            "changed_share": self.changed_share, "threshold": self.threshold, "max_abs_dp": self.max_abs_dp,
            "mean_abs_dp": self.mean_abs_dp, "member_max_abs_dp": self.member_max_abs_dp,
            "auc_fp32": _finite(self.auc_fp32), "auc_bf16": _finite(self.auc_bf16),
            "heatmap_correlation_min": self.heatmap_correlation[0],
            "heatmap_correlation_median": self.heatmap_correlation[1],
            "embedding_cosine_min": self.embedding_cosine, "seconds": self.seconds,
            "tolerance": {"decisions": self.tolerance.decisions, "probability": self.tolerance.probability},
            "within_tolerance": self.within_tolerance,
        }  # fmt: skip


def engines(manifest: Manifest, channels_last: bool = True) -> dict[CpuPrecision, Engine]:
    """The manifest's engine on the CPU twice, ensemble in fp32 and in bf16, sharing one fp32 U-Net."""
    segmenter = LungSegmenter.from_manifest(manifest)
    return {
        precision: Engine(
            manifest,
            segmenter,
            Ensemble.from_manifest(manifest, RuntimeOptions(channels_last=channels_last, cpu_precision=precision)),
        )
        for precision in ("fp32", "bf16")
    }


def compare_precisions(
    manifest: Manifest,
    images: Sequence[np.ndarray],
    labels: Sequence[int] | None = None,
    *,
    tolerance: Tolerance | None = None,
    channels_last: bool = True,
) -> Agreement:
    """Analyse ``images`` ((H, W) float32 in [0, 1]) at fp32 and at bf16 autocast and compare the results.

    ``labels`` (0/1 per image) give the AUC both ways; without them the AUCs are NaN.
    """
    found: dict[str, list[Analysis]] = {}
    seconds: dict[str, float] = {}
    for precision, engine in engines(manifest, channels_last).items():
        engine.analyse(images[:1])  # warm-up: oneDNN picks and caches its kernels on the first pass
        clock = time.perf_counter()
        found[precision] = [a for start in range(0, len(images), _BATCH)
                            for a in engine.analyse(images[start : start + _BATCH])]  # fmt: skip
        seconds[precision] = time.perf_counter() - clock
    y = np.asarray(labels if labels is not None else [], dtype=np.int64)
    return _compare(manifest, found["fp32"], found["bf16"], y, seconds, tolerance or Tolerance())


def _compare(
    manifest: Manifest,
    fp32: Sequence[Analysis],
    bf16: Sequence[Analysis],
    labels: NDArray[np.int64],
    seconds: dict[str, float],
    tolerance: Tolerance,
) -> Agreement:
    """Return the Agreement of two passes over the same images."""
    both = [i for i, (a, b) in enumerate(zip(fp32, bf16, strict=True)) if a.analysed and b.analysed]
    p32, p16 = (np.array([float(run[i].probability or 0.0) for i in both]) for run in (fp32, bf16))
    dp = np.abs(p16 - p32)
    threshold = manifest.classifier.threshold
    members = {name: max((abs(bf16[i].member_probs[name] - fp32[i].member_probs[name]) for i in both), default=0.0)
               for name in (m.name for m in manifest.classifier.members)}  # fmt: skip
    correlations = [_correlation(fp32[i].heatmap, bf16[i].heatmap) for i in both]
    cosines = [float(np.dot(_required(fp32[i].embedding), _required(bf16[i].embedding))) for i in both]
    y = labels[both] if labels.size else labels
    return Agreement(
        model=f"{manifest.name} {manifest.version}", images=len(fp32), analysed=len(both),
        analysed_changed=sum(a.analysed != b.analysed for a, b in zip(fp32, bf16, strict=True)),
        decisions_changed=int(np.count_nonzero((p32 >= threshold) != (p16 >= threshold))), threshold=threshold,
        max_abs_dp=float(dp.max(initial=0.0)), mean_abs_dp=float(dp.mean()) if dp.size else 0.0,
        member_max_abs_dp=members, auc_fp32=_auc(y, p32), auc_bf16=_auc(y, p16),
        heatmap_correlation=(min(correlations, default=1.0), float(np.median(correlations)) if correlations else 1.0),
        embedding_cosine=min(cosines, default=1.0), seconds=seconds, tolerance=tolerance,
        cpu=CpuFeatures.detect().describe(),
    )  # fmt: skip


def bf16_agreement(
    manifest_path: Path, data_csv: Path, *, split: str = "val", tolerance: Tolerance | None = None
) -> Agreement:
    """Compare fp32 and bf16 on the ``split`` part of a labelled set (see :func:`compare_precisions`)."""
    rows, _ = split_rows(data_csv, split)
    images = [read_image(row.path) for row in rows]
    return compare_precisions(load_manifest(manifest_path), images, [row.label for row in rows], tolerance=tolerance)


def _auc(labels: NDArray[np.int64], scores: NDArray[np.float64]) -> float:
    """ROC AUC, or NaN without labels of both classes."""
    if labels.size == 0 or len(np.unique(labels)) < 2:
        return math.nan
    return roc_auc(labels, scores)


def _correlation(a: NDArray[np.float32] | None, b: NDArray[np.float32] | None) -> float:
    """Pearson correlation of two heatmaps; 1.0 when both are constant and equal."""
    x, y = _required(a).ravel().astype(np.float64), _required(b).ravel().astype(np.float64)
    if x.std() == 0.0 or y.std() == 0.0:
        return 1.0 if np.array_equal(x, y) else 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _required(value: NDArray[np.float32] | None) -> NDArray[np.float32]:
    """Return ``value``; an analysed image always has a heatmap and an embedding."""
    if value is None:
        raise RuntimeError("an analysed image has no heatmap or embedding")
    return value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
