"""Training the lung U-Net, the classifier members, and a whole ensemble with its manifest.

:func:`train_segmentation` and :func:`train_classifier` train one network on arrays prepared exactly as the
engine prepares them (:mod:`cxr_node.training.inputs`); :func:`train_ensemble` runs a whole
:class:`~cxr_node.training.recipe.EnsembleRecipe`: split by patient, U-Net, members (their lung regions
cut with the trained U-Net's own masks by default), the operating threshold on the validation set, then
the weights and a manifest with checksums, provenance and validation metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from cxr_node.infer.device import resolve_device
from cxr_node.infer.registry import StateDict, build_classifier, imagenet_start
from cxr_node.infer.segment import LungSegmenter
from cxr_node.infer.unet import UNet, Upsample
from cxr_node.training.augment import AugmentConfig, augment
from cxr_node.training.datasets import LabelledSet, Row, check_no_leak, load_split, read_rows
from cxr_node.training.inputs import ClassifierInputs, classifier_inputs, segmentation_inputs
from cxr_node.training.loop import EpochLog, FitOptions, FitResult, fit
from cxr_node.training.metrics import pick_threshold, roc_auc
from cxr_node.training.publish import TrainedEnsemble, write_ensemble
from cxr_node.training.recipe import EnsembleRecipe, MemberRecipe

__all__ = [
    "ClassifierResult",
    "SegmentationResult",
    "pick_threshold",
    "train_classifier",
    "train_ensemble",
    "train_segmentation",
]

OnEpoch = Callable[[EpochLog], None]
_EVAL_BATCH = 32


# ------------------------------------------------------------------------------------ segmentation


def dice_scores(probabilities: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Return the Dice coefficient of each ``(N, 1, S, S)`` thresholded prediction (1 when both are empty)."""
    predicted = (probabilities > threshold).float().flatten(1)
    truth = (targets > 0.5).float().flatten(1)
    overlap = (predicted * truth).sum(dim=1)
    total = predicted.sum(dim=1) + truth.sum(dim=1)
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return binary cross-entropy plus soft Dice loss (1 - soft Dice, per image, averaged)."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    p = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    soft_dice = (2 * (p * t).sum(dim=1) + 1) / (p.sum(dim=1) + t.sum(dim=1) + 1)
    return bce + (1 - soft_dice).mean()


class SegmentationTask:
    """Image and mask pairs for the U-Net; validation score: mean Dice at probability 0.5."""

    name = "unet"
    score_name = "dice"

    def __init__(
        self, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], augment_config: AugmentConfig
    ) -> None:
        self.images, self.targets = (torch.from_numpy(a)[:, None] for a in train)
        self.val_images, self.val_targets = (torch.from_numpy(a)[:, None] for a in val)
        self.augment_config = augment_config
        self.n_train = self.images.shape[0]

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return augmented (images, masks) of the training pairs ``indices``."""
        images, masks = augment(self.images[indices], self.targets[indices], generator, self.augment_config)
        assert masks is not None  # given masks, augment returns them
        return images, masks

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the Dice + BCE loss."""
        return dice_bce_loss(output, target)

    def validate(self, model: nn.Module, device: torch.device) -> tuple[float, float]:
        """Return (mean Dice, mean loss) on the validation pairs."""
        dice, losses = [], []
        for start in range(0, self.val_images.shape[0], _EVAL_BATCH):
            x = self.val_images[start : start + _EVAL_BATCH].to(device)
            y = self.val_targets[start : start + _EVAL_BATCH].to(device)
            logits = model(x).float()
            dice.append(dice_scores(torch.sigmoid(logits), y).cpu())
            losses.append(float(dice_bce_loss(logits, y)) * x.shape[0])
        return float(torch.cat(dice).mean()), sum(losses) / self.val_images.shape[0]


@dataclass(frozen=True)
class SegmentationResult:
    """A trained U-Net: its best weights, validation Dice and training history."""

    state: StateDict
    dice: float
    fit: FitResult


def train_segmentation(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    base_channels: int = 8,
    depth: int = 4,
    upsample: Upsample = "bilinear",
    options: FitOptions | None = None,
    augment_config: AugmentConfig | None = None,
    on_epoch: OnEpoch | None = None,
) -> SegmentationResult:
    """Train a :class:`~cxr_node.infer.unet.UNet` on image and mask pairs; keep the best by validation Dice.

    Parameters
    ----------
    train, val : tuple of numpy.ndarray
        ``(images, masks)``, each ``(N, S, S)`` float32 in [0, 1], from
        :func:`cxr_node.training.inputs.segmentation_inputs` at the manifest's input size.
    base_channels, depth, upsample
        The U-Net's shape (as in the manifest).
    options : FitOptions
        Epochs, batch size, learning rate, patience, seed, device, checkpoint and resume.
    augment_config : AugmentConfig
        Applied identically to images and masks.
    on_epoch : callable, optional
        Receives each epoch's log.

    Returns
    -------
    SegmentationResult
        The best weights (float32, CPU) and their validation Dice.
    """
    options = options or FitOptions()
    torch.manual_seed(options.seed)
    model = UNet(base_channels, depth, upsample)
    task = SegmentationTask(train, val, augment_config or AugmentConfig())
    result = fit(model, task, options, on_epoch)
    return SegmentationResult(result.best_state, result.best_score, result)


# -------------------------------------------------------------------------------------- classifier


class ClassifierTask:
    """Lung-region canvases and labels for one member; validation score: ROC AUC.

    The loss is cross-entropy weighted by inverse class frequency (class-balanced), and each grey canvas
    is repeated to three channels and normalised with ``mean``/``std``, as
    :meth:`cxr_node.infer.classify.Ensemble.prepare` does.
    """

    score_name = "auc"

    def __init__(
        self,
        name: str,
        train: ClassifierInputs,
        val: ClassifierInputs,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment_config: AugmentConfig,
    ) -> None:
        self.name = name
        self.images = torch.from_numpy(train.images)[:, None]
        self.labels = torch.from_numpy(train.labels)
        self.val_images = torch.from_numpy(val.images)[:, None]
        self.val_labels = torch.from_numpy(val.labels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.augment_config = augment_config
        self.n_train = self.images.shape[0]
        counts = torch.bincount(self.labels, minlength=2).float().clamp(min=1)
        self.class_weights = counts.sum() / (2 * counts)

    def prepare(self, grey: torch.Tensor) -> torch.Tensor:
        """Return ``(N, 3, S, S)`` normalised input from ``(N, 1, S, S)`` grey canvases."""
        return (grey.expand(-1, 3, -1, -1) - self.mean) / self.std

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return augmented, normalised inputs and the labels of the training canvases ``indices``."""
        images, _ = augment(self.images[indices], None, generator, self.augment_config)
        return self.prepare(images), self.labels[indices]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the class-weighted cross-entropy."""
        return F.cross_entropy(output.float(), target, weight=self.class_weights.to(output.device))

    def probabilities(self, model: nn.Module, device: torch.device) -> NDArray[np.float64]:
        """Return the positive-class probability of each validation canvas."""
        out = []
        for start in range(0, self.val_images.shape[0], _EVAL_BATCH):
            logits = model(self.prepare(self.val_images[start : start + _EVAL_BATCH]).to(device)).float()
            out.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        return torch.cat(out).double().numpy()

    def validate(self, model: nn.Module, device: torch.device) -> tuple[float, float]:
        """Return (ROC AUC, unweighted cross-entropy) on the validation canvases."""
        p = self.probabilities(model, device)
        y = self.val_labels.numpy()
        eps = 1e-7
        loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
        return roc_auc(y, p), float(loss)


@dataclass(frozen=True)
class ClassifierResult:
    """A trained member: best weights, validation AUC and probabilities, training history."""

    architecture: str
    state: StateDict
    auc: float
    val_probabilities: NDArray[np.float64]
    fit: FitResult


def train_classifier(
    architecture: str,
    train: ClassifierInputs,
    val: ClassifierInputs,
    *,
    pretrained: bool = False,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    options: FitOptions | None = None,
    augment_config: AugmentConfig | None = None,
    on_epoch: OnEpoch | None = None,
    name: str | None = None,
    bn_momentum: float | None = 0.1,
) -> ClassifierResult:
    """Train a torchvision ``architecture`` with a 2-class head; keep the best weights by validation AUC.

    Parameters
    ----------
    architecture : str
        A torchvision classification model name.
    train, val : ClassifierInputs
        Canvases from :func:`cxr_node.training.inputs.classifier_inputs` and their labels.
    pretrained : bool
        Start from ImageNet weights in the local torch hub cache
        (:func:`~cxr_node.infer.registry.imagenet_start`, a ModelError when absent); else from scratch.
    mean, std : sequence of float
        Input normalisation (the manifest's).
    options, augment_config, on_epoch
        As for :func:`train_segmentation`; ties in AUC go to the lower validation loss.
    name : str, optional
        Name in the log lines (default ``architecture``).
    bn_momentum : float or None
        Batch-norm momentum used while training (at least this; None leaves the architecture's). Some
        torchvision models use slow running statistics (MobileNetV3 0.01, MNASNet 0.0003) that lag far
        behind a short from-scratch run, so validation in eval mode looks random for epochs. The
        momentum is not part of the weights: inference is unaffected.

    Returns
    -------
    ClassifierResult
        Best weights (float32, CPU), their validation AUC and validation probabilities.
    """
    options = options or FitOptions()
    torch.manual_seed(options.seed)
    model = imagenet_start(architecture) if pretrained else build_classifier(architecture)
    if bn_momentum is not None:
        _faster_batch_norm(model, bn_momentum)
    task = ClassifierTask(
        name or architecture, train, val, mean=mean, std=std, augment_config=augment_config or AugmentConfig()
    )
    result = fit(model, task, options, on_epoch)
    model.load_state_dict(result.best_state)
    model.eval()
    with torch.no_grad():
        probabilities = task.probabilities(model.to(options.device), torch.device(options.device))
    return ClassifierResult(architecture, result.best_state, result.best_score, probabilities, result)


def _faster_batch_norm(model: nn.Module, momentum: float) -> None:
    """Raise every batch-norm layer's momentum to at least ``momentum``."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and module.momentum is not None:
            module.momentum = max(module.momentum, momentum)


def train_ensemble(recipe: EnsembleRecipe, on_epoch: OnEpoch | None = None) -> Path:
    """Train a recipe's U-Net and members, pick the operating threshold, write the weights and manifest.

    Steps: read the set and its patient-level split (reused from ``recipe.split_path`` when present);
    train the U-Net on the training images' ground-truth masks; cut every image's lung region with the
    trained U-Net's own mask (``classifier.masks: unet``, the default and closest to deployment; the
    ground truth where that mask is implausible) or with the ground truth (``truth``); train each
    member; average the members' validation probabilities and choose the threshold on them
    (Youden's J by default); write ``unet.pt``, ``<member>.pt`` and ``manifest.yaml`` into ``recipe.out``; then fit
    the models' domain description (the out-of-domain gate, :func:`cxr_node.training.domain.fit_domain`) on the
    training and validation images and name it in the manifest (when too few of them can be classified to fit
    one, the manifest stays without: the node then runs that model with no gate, and warns).

    Returns
    -------
    pathlib.Path
        The manifest written.
    """
    from cxr_node.training.domain import fit_domain

    with cpu_threads(recipe.threads):
        trained = _train_all(recipe, on_epoch)
        path = write_ensemble(recipe, trained)
        try:
            fit_domain(path, recipe.data, device=str(resolve_device(recipe.device)), rows=trained.rows)
        except ValueError as exc:
            print(f"no domain description: {exc}", flush=True)
        return path


def _train_all(recipe: EnsembleRecipe, on_epoch: OnEpoch | None) -> TrainedEnsemble:
    """Train every network of the recipe and choose the threshold."""
    rows, train_set, val_set = prepare_sets(recipe)
    unet = train_unet(recipe, train_set, val_set, on_epoch)
    spec = recipe.classifier
    segmenter = recipe_segmenter(recipe, unet.state) if spec.masks == "unet" else None
    train_in, val_in = (
        classifier_inputs(part, spec.region, spec.input_size, segmenter) for part in (train_set, val_set)
    )
    members = {member.name: train_member(recipe, member, train_in, val_in, on_epoch) for member in spec.members}
    scores = np.mean([result.val_probabilities for result in members.values()], axis=0)
    threshold = pick_threshold(val_in.labels, scores, spec.threshold_method, spec.target_sensitivity)
    return TrainedEnsemble(rows, unet, members, threshold, scores, val_in, (train_in.fallbacks, val_in.fallbacks))


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch CPU threads for the duration (None: leave the setting), then restore it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_sets(recipe: EnsembleRecipe) -> tuple[list[Row], LabelledSet, LabelledSet]:
    """Return the recipe's rows with their patient-level split, and its training and validation sets."""
    rows = load_split(read_rows(recipe.data), recipe.split_path, recipe.fractions, recipe.seed)
    check_no_leak(rows)
    data = LabelledSet(rows, max_side=recipe.max_side)
    train_set, val_set = (
        data.subset(i for i, row in enumerate(rows) if row.split == part) for part in ("train", "val")
    )
    return rows, train_set, val_set


def _options(recipe: EnsembleRecipe, name: str, epochs: int, batch_size: int, lr: float, patience: int) -> FitOptions:
    """Return the fit options of one network of the recipe (its checkpoint under ``checkpoints/``)."""
    return FitOptions(
        epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=recipe.seed,
        device=str(resolve_device(recipe.device)), checkpoint=recipe.checkpoint_dir / f"{name}.ckpt",
        resume=recipe.resume,
    )  # fmt: skip


def train_unet(
    recipe: EnsembleRecipe, train_set: LabelledSet, val_set: LabelledSet, on_epoch: OnEpoch | None
) -> SegmentationResult:
    """Train the recipe's U-Net on (at most ``max_train_images`` of) the training images' ground-truth masks."""
    spec = recipe.segmentation
    limit = spec.max_train_images or len(train_set)
    train_pairs = segmentation_inputs(train_set.subset(range(min(limit, len(train_set)))), spec.input_size)
    val_pairs = segmentation_inputs(val_set, spec.input_size)
    options = _options(recipe, "unet", spec.epochs, spec.batch_size, spec.lr, spec.patience)
    return train_segmentation(
        train_pairs, val_pairs, base_channels=spec.base_channels, depth=spec.depth, upsample=spec.upsample,
        options=options, augment_config=recipe.augment, on_epoch=on_epoch,
    )  # fmt: skip


def recipe_segmenter(recipe: EnsembleRecipe, state: StateDict) -> LungSegmenter:
    """Return the trained U-Net as the engine runs it."""
    spec = recipe.segmentation
    module = UNet(spec.base_channels, spec.depth, spec.upsample)
    module.load_state_dict(state)
    return LungSegmenter(module, input_size=spec.input_size, device=resolve_device(recipe.device))


def train_member(
    recipe: EnsembleRecipe,
    member: MemberRecipe,
    train: ClassifierInputs,
    val: ClassifierInputs,
    on_epoch: OnEpoch | None,
) -> ClassifierResult:
    """Train one member of the recipe."""
    spec = recipe.classifier
    return train_classifier(
        member.architecture, train, val, pretrained=spec.pretrained, mean=spec.mean, std=spec.std,
        options=_options(recipe, member.name, spec.epochs, spec.batch_size, member.lr or spec.lr, spec.patience),
        augment_config=recipe.augment, on_epoch=on_epoch, name=member.name,
    )  # fmt: skip
