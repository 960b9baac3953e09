"""The contract between inference and the output writers: what was found, by which model, on which image.

:class:`Summary` is what inference found (or why it could not analyse the image), without arrays: it is
kept for good, in the jobs store as JSON (:mod:`cxr_node.jobs.codec`). :class:`Findings` adds what the
writers need to draw and name it: the model and node (:class:`Provenance`), the analysed image, the lung
mask and the heatmap. Both check themselves on construction, so an inconsistent result cannot be built.
Arrays are at the analysed resolution; :attr:`Summary.source_shape` maps them back to the source's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

from cxr_node.dicom.uids import NODE_MANUFACTURER, algorithm_uid
from cxr_node.neighbours.cases import LABELS, Label

DECISIONS: Final = ("COVID-19 pneumonia suggested", "COVID-19 pneumonia not suggested", "not analysed")


AlgorithmRole = Literal["ensemble", "classifier", "segmentation"]

Mode = Literal["shadow", "supervised", "live"]
"""A model version's go-live stage (docs/operations.md): shadow (QA destinations only), supervised (every
destination, marked for QA review), live."""
MODES: Final[tuple[Mode, ...]] = ("shadow", "supervised", "live")
MODE_NOTICES: Final[dict[Mode, str]] = {
    "shadow": "SHADOW MODE - QA ONLY, NOT FOR DIAGNOSIS",
    "supervised": "SUPERVISED MODE - FOR QA REVIEW, NOT FOR DIAGNOSIS",
    "live": "",
}
"""What an output written in each mode says on it (ASCII: it is burnt into the overlay and written in the SR)."""


@dataclass(frozen=True)
class Algorithm:
    """One trained algorithm a result came from, identified as IHE AI Results asks: its name, its version and a
    Device UID that changes whenever its weights change (a retraining under the same version included,
    :func:`cxr_node.dicom.uids.algorithm_uid`)."""

    name: str
    version: str
    device_uid: str
    role: AlgorithmRole


@dataclass(frozen=True)
class SiteOperatingPoint:
    """An operating point a site calibration chose for the model (``cxr-node calibrate``), used instead of the
    manifest's threshold; ``source`` says where it came from, e.g. ``site calibration of 2026-12-03 for
    sensitivity 0.90``."""

    threshold: float
    source: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or not self.source:
            raise ValueError(f"need a threshold in [0, 1] and a source; found {self.threshold}, {self.source!r}")


MANIFEST_SOURCE: Final = "model manifest"
"""Where the operating point of a result comes from when no site calibration set it."""


@dataclass(frozen=True)
class Provenance:
    """Who made the result: the model (name, version, members, intended use), the node (version, device UID) and
    the algorithms behind it (the ensemble first, then each classifier and the lung segmentation).

    ``algorithms`` comes from the manifest, with Device UIDs derived from the weights' checksums
    (:func:`cxr_node.app.provenance`); when it is not given, it is derived from the names and versions alone.
    ``mode`` is the go-live mode the outputs are written in (the writer sets it from the jobs store per job).
    ``site_operating_point`` is the site calibration's threshold and source when ``models.calibration`` is set.
    """

    model_name: str
    model_version: str
    intended_use: str
    members: tuple[str, ...]
    software_version: str
    device_uid: str
    manufacturer: str = NODE_MANUFACTURER
    algorithms: tuple[Algorithm, ...] = ()
    site_operating_point: SiteOperatingPoint | None = None
    mode: Mode = "live"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, found {self.mode!r}")
        if not self.algorithms:
            ensemble = Algorithm(
                self.model_name, self.model_version, algorithm_uid(self.model_name, self.model_version), "ensemble"
            )
            members = tuple(
                Algorithm(name, self.model_version, algorithm_uid(name, self.model_version), "classifier")
                for name in self.members
            )
            object.__setattr__(self, "algorithms", (ensemble, *members))
        first = self.algorithms[0]
        if first.role != "ensemble" or (first.name, first.version) != (self.model_name, self.model_version):
            raise ValueError(f"the first algorithm must be the ensemble {self.algorithm}, found {first}")

    @property
    def ensemble(self) -> Algorithm:
        """The ensemble as one algorithm: the model the manifest names."""
        return self.algorithms[0]

    @property
    def segmentation(self) -> Algorithm | None:
        """The lung segmentation network, when the provenance names it."""
        return next((found for found in self.algorithms if found.role == "segmentation"), None)

    def member_version(self, name: str) -> str:
        """The version of the classifier ``name`` (the model's version when the provenance does not name it)."""
        found = next((a for a in self.algorithms if a.role == "classifier" and a.name == name), None)
        return found.version if found is not None else self.model_version

    @property
    def model_key(self) -> str:
        """The model as output UIDs are derived from it: name and version (two models never share UIDs)."""
        return f"{self.model_name}/{self.model_version}"

    @property
    def algorithm(self) -> str:
        """The model as one short string, e.g. ``cxr-demo 1.0.0``."""
        return f"{self.model_name} {self.model_version}"

    @property
    def mode_text(self) -> str:
        """What the outputs say about the go-live mode they were written in, e.g. ``live`` or ``supervised:
        SUPERVISED MODE - FOR QA REVIEW, NOT FOR DIAGNOSIS``."""
        notice = MODE_NOTICES[self.mode]
        return f"{self.mode}: {notice}" if notice else self.mode


@dataclass(frozen=True)
class SimilarCase:
    """One nearest neighbour as the outputs show it; identifiers are ``None`` where site policy withholds them."""

    rank: int
    similarity: float
    case_number: str
    label: Label | None = None
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

    @property
    def label_text(self) -> str:
        """``confirmed covid`` / ``confirmed non-covid`` for a case whose outcome is known (a site's report fed
        back, an operator's label, the labelled reference library), "" otherwise."""
        return f"confirmed {self.label}" if self.label else ""


@dataclass(frozen=True)
class MaskVerdict:
    """Whether the lung mask was anatomically plausible, and what it measured."""

    plausible: bool
    verdict: str
    area_fraction: float
    components: int


@dataclass(frozen=True)
class Summary:
    """What inference found in one image, or why it could not be analysed; no arrays.

    Parameters
    ----------
    model_name, model_version : str
        The model (manifest) that produced it.
    analysed : bool
        False when the image could not be analysed; ``reason`` then says why.
    source_shape : tuple[int, int]
        Rows and columns of the source image.
    reason : str
        Empty when analysed.
    probability, threshold : float or None
        The ensemble's probability and the operating point, both in [0, 1]; required when analysed.
    members : tuple of (name, probability)
        Each member's probability, sorted by name.
    lung_mask : MaskVerdict or None
        The lung mask's verdict; None when no mask was computed (pixels not decoded).
    analysed_shape : tuple[int, int] or None
        The shape of the image inference saw; None when the pixels could not be decoded.
    pixel_spacing_mm : tuple[float, float] or None
        The source's (row, column) spacing when it is known and valid.
    photometric : str
        The source's PhotometricInterpretation.
    similar : tuple[SimilarCase, ...]
        The nearest past cases, best first.
    timings_ms : tuple of (step, milliseconds)
        This image's share of each inference step.
    domain_score, domain_bound : float or None
        The out-of-domain gate's score of the image and the bound it was judged against (both or neither; None
        when the model has no domain description or the gate is off). A score above the bound is outside the
        model's validated domain: refused (not analysed), or analysed and flagged.
    """

    model_name: str
    model_version: str
    analysed: bool
    source_shape: tuple[int, int]
    reason: str = ""
    probability: float | None = None
    threshold: float | None = None
    members: tuple[tuple[str, float], ...] = ()
    lung_mask: MaskVerdict | None = None
    analysed_shape: tuple[int, int] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    photometric: str = ""
    similar: tuple[SimilarCase, ...] = ()
    timings_ms: tuple[tuple[str, float], ...] = ()
    domain_score: float | None = None
    domain_bound: float | None = None

    def __post_init__(self) -> None:
        if self.analysed and (self.probability is None or self.threshold is None or self.lung_mask is None):
            raise ValueError("analysed findings need probability, threshold and a lung mask verdict")
        if not self.analysed and not self.reason:
            raise ValueError("findings that were not analysed need a reason")
        for name, value in (("probability", self.probability), ("threshold", self.threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], found {value}")
        if len(self.source_shape) != 2 or min(self.source_shape) < 0:
            raise ValueError(f"source_shape must be (rows, columns), found {self.source_shape}")
        if (self.domain_score is None) != (self.domain_bound is None):
            raise ValueError("domain_score and domain_bound go together: give both or neither")
        for name, value in (("domain_score", self.domain_score), ("domain_bound", self.domain_bound)):
            if value is not None and not value >= 0.0:
                raise ValueError(f"{name} must be a number >= 0, found {value}")

    @property
    def model_key(self) -> str:
        """The model that found this, as ``name/version``."""
        return f"{self.model_name}/{self.model_version}"

    @property
    def outside_domain(self) -> bool:
        """Whether the gate scored the image outside the model's validated domain (score above the bound)."""
        return self.domain_score is not None and self.domain_bound is not None and self.domain_score > self.domain_bound

    @property
    def domain_text(self) -> str:
        """``outside the validated domain (score X, bound Y)`` for an image outside it; "" otherwise."""
        if not self.outside_domain:
            return ""
        return f"outside the validated domain (score {self.domain_score:.2f}, bound {self.domain_bound:.2f})"

    @property
    def positive(self) -> bool | None:
        """The decision at the operating point; None when not analysed."""
        if not self.analysed or self.probability is None or self.threshold is None:
            return None
        return self.probability >= self.threshold

    @property
    def decision(self) -> str:
        """The decision in words, as the outputs print it."""
        if not self.analysed:
            return DECISIONS[2]
        return DECISIONS[0] if self.positive else DECISIONS[1]

    @property
    def mask_plausible(self) -> bool | None:
        """The lung mask's verdict; None when no mask was computed."""
        return None if self.lung_mask is None else self.lung_mask.plausible

    @property
    def operating_point(self) -> float:
        """The threshold of an analysed result.

        Raises
        ------
        ValueError
            When the image was not analysed (it has no operating point).
        """
        if self.threshold is None:
            raise ValueError("a result that was not analysed has no operating point")
        return self.threshold


@dataclass(frozen=True)
class Findings:
    """A :class:`Summary` with what the writers need to draw and name it.

    Parameters
    ----------
    provenance : Provenance
        The model and node that made it; its model must be the summary's.
    summary : Summary
        What was found.
    image : numpy.ndarray or None
        float32 (H, W) in [0, 1], MONOCHROME2 sense, the analysed image; None when it could not be decoded.
    lung_mask : numpy.ndarray or None
        bool (H, W), the shape of ``image``; required when analysed.
    heatmap : numpy.ndarray or None
        float32 in [0, 1] over the same picture, on ``image``'s grid or a coarser one (the engine's: at most 256
        a side); optional. The Secondary Capture resamples it to the image where it shows.
    """

    provenance: Provenance
    summary: Summary
    image: np.ndarray | None = field(default=None, repr=False)
    lung_mask: np.ndarray | None = field(default=None, repr=False)
    heatmap: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        made_by = (self.summary.model_name, self.summary.model_version)
        if made_by != (self.provenance.model_name, self.provenance.model_version):
            raise ValueError(
                f"the summary was made by {made_by}, not by the provenance's model {self.provenance.algorithm}"
            )
        if self.summary.analysed and self.lung_mask is None:
            raise ValueError("analysed findings need the lung mask")
        _check_arrays(self.image, self.lung_mask, self.heatmap)

    @property
    def operating_point_source(self) -> str:
        """Where the result's operating point came from: the site calibration's source when the result was
        judged at its threshold, else :data:`MANIFEST_SOURCE`."""
        site, threshold = self.provenance.site_operating_point, self.summary.threshold
        if site is not None and threshold is not None and abs(threshold - site.threshold) <= 1e-9:
            return site.source
        return MANIFEST_SOURCE

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per analysed pixel, (rows, columns)."""
        if self.image is None:
            return (1.0, 1.0)
        source = self.summary.source_shape
        return (source[0] / self.image.shape[0], source[1] / self.image.shape[1])


def _check_arrays(image: np.ndarray | None, mask: np.ndarray | None, heatmap: np.ndarray | None) -> None:
    if image is not None and (image.ndim != 2 or image.dtype != np.float32):
        raise ValueError(f"image must be float32 (H, W), found {image.dtype} {image.shape}")
    expected = None if image is None else image.shape
    if mask is not None and (expected is None or mask.shape != expected or mask.dtype != np.bool_):
        raise ValueError(f"lung_mask must be bool of the image's shape {expected}, found {mask.dtype} {mask.shape}")
    if heatmap is not None and (
        expected is None
        or heatmap.ndim != 2
        or heatmap.dtype != np.float32
        or not (1 <= heatmap.shape[0] <= expected[0] and 1 <= heatmap.shape[1] <= expected[1])
    ):
        raise ValueError(
            f"heatmap must be float32 (h, w), no side longer than the image's {expected}, found "
            f"{heatmap.dtype} {heatmap.shape}"
        )
