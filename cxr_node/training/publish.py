"""Writing a trained ensemble: float32 state dicts, and a manifest with checksums, provenance and metrics."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from cxr_node.infer.registry import (
    ClassifierSpec,
    EmbeddingSpec,
    ExplainSpec,
    Manifest,
    MemberSpec,
    SegmentationSpec,
    StateDict,
    load_manifest,
    load_weights,
    save_manifest,
    sha256_file,
)
from cxr_node.training.datasets import Row, split_hash
from cxr_node.training.inputs import ClassifierInputs
from cxr_node.training.metrics import binary_metrics, pick_threshold
from cxr_node.training.recipe import EnsembleRecipe, command_line, software_versions, today

if TYPE_CHECKING:
    from cxr_node.training.train import ClassifierResult, SegmentationResult

MANIFEST_NAME = "manifest.yaml"
UNET_WEIGHTS = "unet.pt"


@dataclass(frozen=True)
class TrainedEnsemble:
    """Everything a training run produced that the manifest records.

    Attributes
    ----------
    rows : list of Row
        The whole set with its split.
    unet : SegmentationResult
        The U-Net.
    members : Mapping[str, ClassifierResult]
        Each member by name, in recipe order.
    threshold : float
        The ensemble's operating threshold, chosen on the validation set.
    val_scores : numpy.ndarray
        The ensemble's validation probabilities (mean of the members').
    val : ClassifierInputs
        The validation canvases and labels.
    fallbacks : tuple of int
        (training, validation) images whose region was cut with the ground truth because the U-Net's
        mask was implausible.
    """

    rows: list[Row]
    unet: SegmentationResult
    members: Mapping[str, ClassifierResult]
    threshold: float
    val_scores: NDArray[np.float64]
    val: ClassifierInputs
    fallbacks: tuple[int, int]


def save_state(state: StateDict, path: Path) -> Path:
    """Write a state dict with floating tensors as float32 on the CPU (small, loadable anywhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: (v.float() if v.is_floating_point() else v).cpu().contiguous() for k, v in state.items()}, path)
    return path


def write_ensemble(recipe: EnsembleRecipe, trained: TrainedEnsemble) -> Path:
    """Write the weights and ``manifest.yaml`` into ``recipe.out``; check that the manifest loads and verifies.

    Returns
    -------
    pathlib.Path
        The manifest.
    """
    out = recipe.out
    out.mkdir(parents=True, exist_ok=True)
    unet_file = save_state(trained.unet.state, out / UNET_WEIGHTS)
    members = [_member_spec(recipe, name, result, trained, out) for name, result in trained.members.items()]
    manifest = Manifest(
        name=recipe.name,
        version=recipe.version,
        intended_use=recipe.intended_use,
        provenance=provenance(recipe, trained),
        segmentation=_segmentation_spec(recipe, unet_file),
        classifier=_classifier_spec(recipe, trained.threshold, members),
        metrics={"validation": _validation_metrics(trained)},
    )
    path = save_manifest(manifest, out / MANIFEST_NAME)
    verify(path)
    return path


def verify(path: Path) -> Manifest:
    """Load a manifest and every weights file it names, checking their SHA-256 (ModelError if one differs)."""
    manifest = load_manifest(path)
    load_weights(manifest.resolve(manifest.segmentation.weights), manifest.segmentation.sha256)
    for member in manifest.classifier.members:
        load_weights(manifest.resolve(member.weights), member.sha256)
    return manifest


def _segmentation_spec(recipe: EnsembleRecipe, weights: Path) -> SegmentationSpec:
    """Return the manifest's segmentation entry."""
    spec = recipe.segmentation
    return SegmentationSpec(
        name=spec.name, version=spec.version, architecture="unet", input_size=spec.input_size,
        base_channels=spec.base_channels, depth=spec.depth, upsample=spec.upsample, weights=weights.name,
        sha256=sha256_file(weights), mask_threshold=0.5,
    )  # fmt: skip


def _classifier_spec(recipe: EnsembleRecipe, threshold: float, members: list[MemberSpec]) -> ClassifierSpec:
    """Return the manifest's classifier entry."""
    spec = recipe.classifier
    return ClassifierSpec(
        input_size=spec.input_size, mean=list(spec.mean), std=list(spec.std), region=spec.region,
        threshold=round(float(threshold), 6), embedding=EmbeddingSpec(),
        explain=ExplainSpec(member=spec.explain or spec.members[0].name), members=members,
    )  # fmt: skip


def _member_spec(
    recipe: EnsembleRecipe, name: str, result: ClassifierResult, trained: TrainedEnsemble, out: Path
) -> MemberSpec:
    """Write one member's weights and return its manifest entry with its validation metrics."""
    weights = save_state(result.state, out / f"{name}.pt")
    y = trained.val.labels
    metrics = {
        "validation": _clean(binary_metrics(y, result.val_probabilities, trained.threshold)),
        "own_threshold_youden": _number(pick_threshold(y, result.val_probabilities)),
        "epochs_run": len(result.fit.history),
        "best_epoch": result.fit.best_epoch,
    }
    return MemberSpec(
        name=name, version=recipe.version, architecture=result.architecture, weights=weights.name,
        sha256=sha256_file(weights), metrics=metrics,
    )  # fmt: skip


def _validation_metrics(trained: TrainedEnsemble) -> dict[str, Any]:
    """Return the ensemble's and the U-Net's validation metrics."""
    return {
        "ensemble": _clean(binary_metrics(trained.val.labels, trained.val_scores, trained.threshold)),
        "images": len(trained.val.labels),
        "unet_dice": _number(trained.unet.dice),
    }


def provenance(recipe: EnsembleRecipe, trained: TrainedEnsemble) -> dict[str, Any]:
    """Return where the weights came from: data and its checksum, split, seed, command, date, software."""
    rows = trained.rows
    return {
        "training_data": {
            "csv": str(recipe.data),
            "description": recipe.data_description,
            "sha256": sha256_file(recipe.data),
            "images": len(rows),
            "patients": len({row.patient_id for row in rows}),
            "positives": sum(row.label for row in rows),
        },
        "split": {
            "csv": str(recipe.split_path),
            "hash": split_hash(rows),
            "images": dict(sorted(Counter(str(row.split) for row in rows).items())),
        },
        "seed": recipe.seed,
        "command": recipe.command or command_line(),
        "date": today(),
        "software": software_versions(),
        "cpu_threads": torch.get_num_threads(),
        "classifier_regions": _regions_note(recipe, trained.fallbacks),
        "unet": {
            "val_dice": _number(trained.unet.dice),
            "epochs_run": len(trained.unet.fit.history),
            "best_epoch": trained.unet.fit.best_epoch,
        },
        "recipe": recipe.model_dump(mode="json"),
    }


def _regions_note(recipe: EnsembleRecipe, fallbacks: tuple[int, int]) -> str:
    """Return one line saying which masks cut the members' training regions."""
    if recipe.classifier.masks == "truth":
        return "ground-truth lung masks"
    return (
        "the trained U-Net's own masks, as in deployment; ground truth where implausible "
        f"({fallbacks[0]} training, {fallbacks[1]} validation images)"
    )


def _number(value: float) -> float | None:
    """Return ``value`` rounded to 6 decimals as a plain float, or None for nan."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def _clean(values: Mapping[str, float]) -> dict[str, float | None]:
    """Return a dict of plain, rounded floats (YAML-safe)."""
    return {key: _number(value) for key, value in values.items()}
