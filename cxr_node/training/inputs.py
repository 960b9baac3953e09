"""What the networks see during training: the engine's preprocessing, reproduced step for step.

The engine (:class:`cxr_node.infer.engine.Engine`) normalises each image, fits it to the U-Net's square
input, thresholds the U-Net's probability mapped back to the image grid, then cuts the lung region (crop,
mask or both, crop margin :data:`~cxr_node.infer.engine.CROP_MARGIN`) and fits it to the classifier's
input. These functions do the same with the same :mod:`cxr_node.infer.preprocess` calls, so a network
is trained on exactly the arrays it will be given (a unit test compares them with the engine's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cxr_node.infer import preprocess
from cxr_node.infer.engine import CROP_MARGIN
from cxr_node.infer.registry import Region
from cxr_node.infer.segment import LungSegmenter, mask_quality
from cxr_node.training.datasets import LabelledSet

Images = NDArray[np.float32]
MaskSource = Callable[[int], NDArray[np.bool_]]


def fitted_images(data: LabelledSet, size: int) -> Images:
    """Return the images of a set as the U-Net sees them, ``(N, size, size)`` float32 in [0, 1]."""
    images = np.empty((len(data), size, size), dtype=np.float32)
    for i in range(len(data)):
        images[i] = np.clip(preprocess.fit(data.image(i), size)[0], 0.0, 1.0)
    return images


def segmentation_inputs(data: LabelledSet, size: int) -> tuple[Images, Images]:
    """Return the U-Net inputs and targets of a set, each ``(N, size, size)`` float32 in [0, 1].

    The targets are the ground-truth masks fitted like the images (area averaged, so border pixels are
    fractional): soft targets that line up with the inputs pixel for pixel.
    """
    images = fitted_images(data, size)
    targets = np.empty_like(images)
    for i in range(len(data)):
        targets[i] = np.clip(preprocess.fit(data.mask(i).astype(np.float32), size)[0], 0.0, 1.0)
    return images, targets


def predict_masks(segmenter: LungSegmenter, images: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
    """Return the engine's lung mask of each normalised image, ``(H, W)`` bool on the image's own grid."""
    masks: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        fitted = [preprocess.fit(image, segmenter.input_size) for image in images[start : start + batch_size]]
        batch = np.clip(np.stack([canvas for canvas, _ in fitted]), 0.0, 1.0).astype(np.float32)
        probabilities = segmenter.probabilities(batch)
        masks += [
            preprocess.unfit(p, fit) > segmenter.threshold for p, (_, fit) in zip(probabilities, fitted, strict=True)
        ]
    return masks


def classifier_input(image: np.ndarray, mask: NDArray[np.bool_], region: Region, size: int) -> Images:
    """Return the classifier canvas of one normalised image and its lung mask, as the engine builds it.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` float32 in [0, 1], normalised.
    mask : numpy.ndarray
        ``(H, W)`` bool lung mask with at least one pixel set when ``region`` crops.
    region : {"crop", "mask", "crop+mask"}
        What the manifest feeds: the lung bounding box, the image with everything outside the lungs
        zeroed, or both.
    size : int
        The classifier's square input side.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float32.
    """
    if "mask" in region:
        image = preprocess.mask_outside(image, mask)
    if "crop" in region:
        image, _ = preprocess.crop_to_mask(image, mask, CROP_MARGIN)
    canvas, _ = preprocess.fit(np.ascontiguousarray(image, dtype=np.float32), size)
    return canvas


@dataclass(frozen=True)
class ClassifierInputs:
    """A set's classifier canvases, labels and patients, and how many masks fell back to the truth.

    Attributes
    ----------
    images : numpy.ndarray
        ``(N, S, S)`` float32 canvases.
    labels : numpy.ndarray
        ``(N,)`` int64, 0/1.
    patients : list of str
        Patient ID of each image.
    fallbacks : int
        Images whose U-Net mask was implausible, so the ground-truth mask was used instead.
    """

    images: Images
    labels: NDArray[np.int64]
    patients: list[str]
    fallbacks: int = 0


def classifier_inputs(
    data: LabelledSet, region: Region, size: int, segmenter: LungSegmenter | None = None
) -> ClassifierInputs:
    """Return the classifier canvases of a set, cut with the U-Net's masks or the ground truth.

    With a ``segmenter`` (closest to deployment) each image's region comes from the U-Net's own mask;
    where that mask fails the engine's plausibility check (the engine would not classify the image) the
    ground-truth mask is used if the set has one, so that training keeps the image. Without a
    ``segmenter`` the ground-truth masks are used.
    """
    images = [data.image(i) for i in range(len(data))]
    masks = predict_masks(segmenter, images) if segmenter is not None else [data.mask(i) for i in range(len(data))]
    fallbacks = 0
    canvases = np.empty((len(data), size, size), dtype=np.float32)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        if segmenter is not None and data.has_masks and not mask_quality(mask).ok:
            mask, fallbacks = data.mask(i), fallbacks + 1
        if not mask.any():
            mask = np.ones_like(mask)
        canvases[i] = classifier_input(image, mask, region, size)
    return ClassifierInputs(canvases, data.labels, data.patients, fallbacks)
