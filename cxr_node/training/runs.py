"""One typed function per ``cxr-node train`` subcommand, so the CLI stays a thin argument unpacker.

:func:`train_demo` is the one documented way to reproduce ``models/demo``: it writes the synthetic
phantoms, then trains :func:`demo_recipe` with :func:`~cxr_node.training.train.train_ensemble`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cxr_node.errors import ModelError
from cxr_node.infer.registry import load_manifest
from cxr_node.infer.segment import LungSegmenter
from cxr_node.training.inputs import classifier_inputs
from cxr_node.training.phantoms import LABELS_CSV, PHANTOM_VERSION, write_phantom_set
from cxr_node.training.publish import UNET_WEIGHTS, save_state
from cxr_node.training.recipe import DEMO_INTENDED_USE, EnsembleRecipe, MemberRecipe, make_recipe
from cxr_node.training.train import OnEpoch, prepare_sets, train_ensemble, train_member, train_unet

DEMO_SEED: Final = 2021
DEMO_IMAGES: Final = 600
DEMO_IMAGE_SIZE: Final = 320
DEMO_MAX_BYTES: Final = 25 * 1024 * 1024
"""The demo models live in git: manifest and weights together stay under 25 MiB."""


@dataclass(frozen=True)
class NetworkRun:
    """One network trained on its own: where its weights are and how it scored on validation."""

    weights: Path
    score_name: str
    score: float
    epochs_run: int


def run_segmentation(recipe: EnsembleRecipe, on_epoch: OnEpoch | None = None) -> NetworkRun:
    """Train the recipe's U-Net alone; write ``unet.pt`` into ``recipe.out``."""
    _, train_set, val_set = prepare_sets(recipe)
    result = train_unet(recipe, train_set, val_set, on_epoch)
    weights = save_state(result.state, recipe.out / UNET_WEIGHTS)
    return NetworkRun(weights, "dice", result.dice, len(result.fit.history))


def run_classifier(
    recipe: EnsembleRecipe, architecture: str, masks_from: Path | None = None, on_epoch: OnEpoch | None = None
) -> NetworkRun:
    """Train one classifier alone; write ``<architecture>.pt`` into ``recipe.out``.

    The lung regions are cut with the U-Net of the manifest ``masks_from`` (as the engine would), else
    with the set's ground-truth masks.
    """
    _, train_set, val_set = prepare_sets(recipe)
    segmenter = None
    if masks_from is not None:
        segmenter = LungSegmenter.from_manifest(load_manifest(masks_from))
    spec = recipe.classifier
    train_in, val_in = (
        classifier_inputs(part, spec.region, spec.input_size, segmenter) for part in (train_set, val_set)
    )
    member = MemberRecipe(name=architecture, architecture=architecture)
    result = train_member(recipe, member, train_in, val_in, on_epoch)
    weights = save_state(result.state, recipe.out / f"{architecture}.pt")
    return NetworkRun(weights, "auc", result.auc, len(result.fit.history))


def demo_recipe(data: Path, out: Path, checkpoints: Path, **overrides: Any) -> EnsembleRecipe:
    """Return the recipe of the demo models (small U-Net and three small members, from scratch)."""
    recipe: dict[str, Any] = {
        "data": str(data), "out": str(out), "checkpoints": str(checkpoints), "seed": DEMO_SEED,
        "name": "cxr-node-demo", "version": "1", "intended_use": DEMO_INTENDED_USE, "device": "cpu",
        # one CPU thread: the same weights on any machine with the same CPU kind (reductions depend on the
        # thread count), and no slowdown from spinning threads on a busy 2-core runner
        "threads": 1,
        "segmentation": {"input_size": 128, "base_channels": 8, "depth": 4, "epochs": 8, "lr": 3e-3,
                         "patience": 3},
        "classifier": {
            "input_size": 128, "region": "crop+mask", "masks": "unet", "epochs": 16, "lr": 2e-3, "patience": 5,
            "members": [{"name": "mobilenet", "architecture": "mobilenet_v3_small"},
                        {"name": "shufflenet", "architecture": "shufflenet_v2_x0_5"},
                        # no batch norm in SqueezeNet: from scratch at 2e-3 (even 3e-4) its last ReLU can die,
                        # leaving a constant 0.5
                        {"name": "squeezenet", "architecture": "squeezenet1_1", "lr": 1e-4}],
        },
    }  # fmt: skip
    return make_recipe(recipe, source="demo recipe", **overrides)


def train_demo(
    out: Path = Path("models/demo"),
    work: Path | None = None,
    *,
    images: int = DEMO_IMAGES,
    size: int = DEMO_IMAGE_SIZE,
    on_epoch: OnEpoch | None = None,
    **overrides: Any,
) -> Path:
    """Write the demo phantoms (seed :data:`DEMO_SEED`) into ``work``, train the demo models into ``out``.

    Parameters
    ----------
    out : pathlib.Path
        Where ``manifest.yaml`` and the weights go (only those: checkpoints stay in ``work``).
    work : pathlib.Path, optional
        Folder for the phantoms, their split and the checkpoints; a new temporary folder by default.
        Phantoms already there (``phantoms/labels.csv``) are reused.
    images, size : int
        Number and side of the phantoms.
    on_epoch : callable, optional
        Receives each epoch's log line.
    **overrides
        Recipe keys to change (e.g. ``resume=True``).

    Returns
    -------
    pathlib.Path
        The manifest.

    Raises
    ------
    ModelError
        The models written exceed :data:`DEMO_MAX_BYTES`.
    """
    work = work or Path(tempfile.mkdtemp(prefix="cxr-node-demo-"))
    labels = work / "phantoms" / LABELS_CSV
    if not labels.is_file():
        write_phantom_set(labels.parent, images, seed=DEMO_SEED, size=size)
    description = (
        f"synthetic chest phantoms: cxr_node.training.phantoms.write_phantom_set(n={images}, seed={DEMO_SEED},"
        f" size={size}), phantom version {PHANTOM_VERSION}"
    )
    recipe = demo_recipe(labels, out, work / "checkpoints", data_description=description, **overrides)
    manifest = train_ensemble(recipe, on_epoch)
    total = models_bytes(manifest)
    if total > DEMO_MAX_BYTES:
        raise ModelError(f"the demo models in {out} take {total / 2**20:.1f} MiB, above the 25 MiB allowed in git")
    return manifest


def models_bytes(manifest_path: Path) -> int:
    """Return the bytes of a manifest and every weights file it names (and its domain description)."""
    manifest = load_manifest(manifest_path)
    files = [manifest_path, manifest.resolve(manifest.segmentation.weights)]
    files += [manifest.resolve(member.weights) for member in manifest.classifier.members]
    files += [manifest.resolve(manifest.domain.file)] if manifest.domain is not None else []
    return sum(file.stat().st_size for file in files)
