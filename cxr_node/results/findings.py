"""The contract between inference and the output writers: what was found, by which model, on which image.

Everything the SR, SC, SEG and GSPS builders need, and nothing about how it was computed. Arrays are
at the analysed resolution; :attr:`Findings.source_shape` maps them back to the source image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

Label = Literal["covid", "non-covid"]
LABELS: Final[tuple[str, ...]] = ("covid", "non-covid")


@dataclass(frozen=True)
class Provenance:
    """Who made the result: the model (name, version, members, intended use) and the node (version, device UID)."""

    model_name: str
    model_version: str
    intended_use: str
    members: tuple[str, ...]
    software_version: str
    device_uid: str
    manufacturer: str = "cxr-node"

    @property
    def model_key(self) -> str:
        """The model as output UIDs are derived from it: name and version (two models never share UIDs)."""
        return f"{self.model_name}/{self.model_version}"

    @property
    def algorithm(self) -> str:
        """The model as one short string, e.g. ``cxr-demo 1.0.0``."""
        return f"{self.model_name} {self.model_version}"


@dataclass(frozen=True)
class SimilarCase:
    """One nearest neighbour as the outputs show it; identifiers are ``None`` where site policy withholds them."""

    rank: int
    similarity: float
    case_number: str
    label: str | None = None
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None
    study_date: str | None = None

    def __post_init__(self) -> None:
        if self.label is not None and self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS} or None, found {self.label!r}")
        if not -1.0 - 1e-6 <= self.similarity <= 1.0 + 1e-6:
            raise ValueError(f"similarity must be in [-1, 1], found {self.similarity}")

    @property
    def display_id(self) -> str:
        """The accession number when the policy allows it, else the de-identified case number."""
        return self.accession_number or self.case_number


@dataclass(frozen=True)
class Findings:
    """The result of analysing one image (or the reason it could not be analysed).

    Parameters
    ----------
    provenance : Provenance
        The model and node that made it.
    analysed : bool
        False when the image could not be analysed; ``reason`` then says why.
    source_shape : tuple[int, int]
        Rows and columns of the source image.
    image : numpy.ndarray or None
        float32 (H, W) in [0, 1], MONOCHROME2 sense, the analysed image; None when it could not be decoded.
    lung_mask, heatmap : numpy.ndarray or None
        bool (H, W) and float32 (H, W) in [0, 1], same shape as ``image``; None when not analysed.
    """

    provenance: Provenance
    analysed: bool
    source_shape: tuple[int, int]
    reason: str = ""
    probability: float | None = None
    threshold: float = 0.5
    members: tuple[tuple[str, float], ...] = ()
    mask_plausible: bool | None = None
    mask_verdict: str = ""
    similar: tuple[SimilarCase, ...] = ()
    image: np.ndarray | None = field(default=None, repr=False)
    lung_mask: np.ndarray | None = field(default=None, repr=False)
    heatmap: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.analysed and (self.probability is None or self.lung_mask is None):
            raise ValueError("analysed findings need probability and lung_mask")
        if not self.analysed and not self.reason:
            raise ValueError("findings that were not analysed need a reason")
        for name, value in (("probability", self.probability), ("threshold", self.threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], found {value}")
        _check_arrays(self.image, self.lung_mask, self.heatmap)

    @property
    def positive(self) -> bool | None:
        """The decision at the operating point; None when not analysed."""
        return None if self.probability is None or not self.analysed else self.probability >= self.threshold

    @property
    def decision(self) -> str:
        """The decision in words, as the outputs print it."""
        if not self.analysed:
            return "not analysed"
        return "COVID-19 pneumonia suggested" if self.positive else "COVID-19 pneumonia not suggested"

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per analysed pixel, (rows, columns)."""
        if self.image is None:
            return (1.0, 1.0)
        return (self.source_shape[0] / self.image.shape[0], self.source_shape[1] / self.image.shape[1])


def _check_arrays(image: np.ndarray | None, mask: np.ndarray | None, heatmap: np.ndarray | None) -> None:
    if image is not None and (image.ndim != 2 or image.dtype != np.float32):
        raise ValueError(f"image must be float32 (H, W), found {image.dtype} {image.shape}")
    for name, array, dtype in (("lung_mask", mask, np.bool_), ("heatmap", heatmap, np.float32)):
        if array is None:
            continue
        if image is None or array.shape != image.shape or array.dtype != dtype:
            expected = None if image is None else image.shape
            raise ValueError(
                f"{name} must be {np.dtype(dtype)} of the image's shape {expected}, found {array.dtype} {array.shape}"
            )
