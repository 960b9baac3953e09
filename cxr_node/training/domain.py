"""``cxr-node domain``: fit a model's domain description on its training and validation images, and score images.

The images are read as the node reads them and analysed by the node's own
:class:`~cxr_node.infer.engine.Engine` (so the features are exactly those the worker scores); the description
(:mod:`cxr_node.infer.domain`) is fitted on the training part and its bound calibrated on the validation part,
written beside the weights as :data:`DOMAIN_FILE` and named in the manifest with its SHA-256.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from cxr_node.infer.classify import Ensemble, RuntimeOptions
from cxr_node.infer.device import resolve_device
from cxr_node.infer.domain import DEFAULT_PASS_RATE, DomainDescription, fit_description, summarise
from cxr_node.infer.engine import Analysis, Engine
from cxr_node.infer.registry import DomainSpec, Manifest, load_manifest, save_manifest, sha256_file
from cxr_node.infer.segment import LungSegmenter
from cxr_node.training.datasets import DEFAULT_FRACTIONS, SPLIT_CSV, Row, load_split, read_image, read_rows, split_hash

DOMAIN_FILE: Final = "domain.npz"
"""The description's file name, beside the manifest."""
_BATCH: Final = 16

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Features:
    """The engine's features of a part of a set: embeddings and image statistics of the classified images."""

    embeddings: NDArray[np.float32]
    statistics: NDArray[np.float64]
    not_classified: int

    def pair(self) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
        """(embeddings, statistics), as :func:`~cxr_node.infer.domain.fit_description` takes them."""
        return self.embeddings, self.statistics


@dataclass(frozen=True)
class Fitted:
    """What :func:`fit_domain` wrote."""

    manifest: Path
    file: Path
    description: DomainDescription
    images: dict[str, int]


def engine_for(manifest: Manifest, device: str = "cpu", scored: bool = True) -> Engine:
    """The manifest's engine at fp32 (as evaluation runs it); ``scored=False``: without its domain description
    (not even read: it is about to be replaced)."""
    options = RuntimeOptions(device=resolve_device(device), precision="fp32")
    if scored:
        return Engine.from_manifest(manifest, options)
    segmenter = LungSegmenter.from_manifest(manifest, device=options.device)
    return Engine(manifest, segmenter, Ensemble.from_manifest(manifest, options))


def analyse_paths(engine: Engine, paths: Sequence[Path], progress: Progress | None = None) -> list[Analysis]:
    """The engine's analysis of each image file, in order, a batch at a time (progress every batch)."""
    analyses: list[Analysis] = []
    for start in range(0, len(paths), _BATCH):
        analyses += engine.analyse([read_image(path) for path in paths[start : start + _BATCH]])
        if progress is not None:
            progress(f"analysed {len(analyses)}/{len(paths)} images")
    return analyses


def features(analyses: Sequence[Analysis]) -> Features:
    """Embeddings and statistics of the classified analyses."""
    done = [a for a in analyses if a.embedding is not None and a.statistics is not None]
    if not done:
        return Features(np.zeros((0, 1), np.float32), np.zeros((0, 1)), len(analyses))
    return Features(
        np.stack([a.embedding for a in done if a.embedding is not None]).astype(np.float32),
        np.stack([a.statistics for a in done if a.statistics is not None]).astype(np.float64),
        len(analyses) - len(done),
    )


def manifest_rows(manifest: Manifest, data_csv: Path) -> list[Row]:
    """The set's rows with the split the model was trained on: the set's own, or ``split.csv`` beside it, or the
    split the manifest's provenance records (its seed and fractions), checked against the recorded split hash.

    Raises
    ------
    ValueError
        The split found is not the one the manifest records (other images, or another seed).
    """
    provenance = manifest.provenance
    recipe = provenance.get("recipe") or {}
    seed = int(provenance.get("seed", recipe.get("seed", 0)) or 0)
    fractions = tuple(recipe.get("fractions") or DEFAULT_FRACTIONS)
    rows = load_split(read_rows(data_csv), data_csv.parent / SPLIT_CSV, fractions, seed)
    recorded = (provenance.get("split") or {}).get("hash")
    if recorded and split_hash(rows) != recorded:
        raise ValueError(
            f"{data_csv}: its split (hash {split_hash(rows)[:12]}…) is not the one {manifest.name} was trained on"
            f" (hash {str(recorded)[:12]}…); give the set the model was trained on, with its split.csv"
        )
    return rows


def fit_domain(
    manifest_path: Path,
    data_csv: Path,
    *,
    pass_rate: float = DEFAULT_PASS_RATE,
    device: str = "cpu",
    progress: Progress | None = None,
    rows: Sequence[Row] | None = None,
) -> Fitted:
    """Fit the domain description of a manifest's models on their training and validation images; write
    :data:`DOMAIN_FILE` beside the manifest and name it (with its SHA-256) in the manifest.

    Parameters
    ----------
    manifest_path, data_csv : pathlib.Path
        The model and the labelled set it was trained on (its split is checked against the manifest's).
    pass_rate : float
        Share of validation images the bound lets pass.
    device : str
        auto | cpu | cuda | cuda:N.
    progress : callable, optional
        Receives a line per batch.
    rows : sequence of Row, optional
        The rows with their split, when the caller has them (training).

    Raises
    ------
    ValueError
        No training or validation images could be classified, or the split is not the model's.
    ModelError
        The manifest or its weights cannot be loaded.
    """
    manifest = load_manifest(manifest_path)
    rows = list(rows) if rows is not None else manifest_rows(manifest, data_csv)
    engine = engine_for(manifest, device, scored=False)
    parts: dict[str, Features] = {}
    for part in ("train", "val"):
        paths = [row.path for row in rows if row.split == part]
        if progress is not None:
            progress(f"{part}: {len(paths)} images")
        parts[part] = features(analyse_paths(engine, paths, progress))
        if len(parts[part].embeddings) == 0:
            raise ValueError(f"{data_csv}: no {part} image could be classified; cannot fit the domain")
    description = fit_description(parts["train"].pair(), parts["val"].pair(), pass_rate=pass_rate)
    file = description.save(manifest.directory / DOMAIN_FILE)
    updated = manifest.model_copy(update={"domain": DomainSpec(file=DOMAIN_FILE, sha256=sha256_file(file))})
    save_manifest(updated, manifest_path)
    load_manifest(manifest_path)  # it loads, and names a file that exists
    counts = {part: len(found.embeddings) for part, found in parts.items()}
    return Fitted(manifest_path, file, description, counts)


@dataclass(frozen=True)
class Scored:
    """The gate's view of some images: each one's score (None when not classified) against one bound."""

    names: list[str]
    scores: list[float | None]
    reasons: list[str]
    bound: float

    def lines(self) -> list[str]:
        """One line per image: name, score, verdict."""
        out = []
        for name, score, reason in zip(self.names, self.scores, self.reasons, strict=True):
            if score is None:
                out.append(f"{name}: not classified ({reason})")
            else:
                verdict = "inside" if score <= self.bound else "OUTSIDE"
                out.append(f"{name}: score {score:.2f} {verdict} (bound {self.bound:.2f})")
        return out

    def summary(self) -> dict[str, Any]:
        """Pass rate, median and largest score of the classified images; how many were not classified."""
        found = summarise([s for s in self.scores if s is not None], self.bound)
        return {**found, "not_classified": sum(s is None for s in self.scores), "bound": self.bound}


def score_images(
    manifest_path: Path,
    paths: Sequence[Path],
    *,
    pass_rate: float | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Scored:
    """Score image files against a manifest's domain description (at ``pass_rate``, else its own).

    Raises
    ------
    ValueError
        The manifest has no domain description.
    """
    manifest = load_manifest(manifest_path)
    engine = engine_for(manifest, device)
    if engine.domain is None:
        raise ValueError(f"{manifest_path}: no domain description (run `cxr-node domain fit` first)")
    bound = engine.domain.bound if pass_rate is None else engine.domain.bound_at(pass_rate)
    analyses = analyse_paths(engine, list(paths), progress)
    return Scored(
        [str(path) for path in paths],
        [None if a.domain is None else a.domain.score for a in analyses],
        [a.reason for a in analyses],
        bound,
    )
