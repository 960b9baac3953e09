"""The one registry of output kinds: what each is, how it is built, which switch turns it on, when it is sent.

Every place that needs the list of outputs reads :data:`REGISTRY`: the writers (which kinds an image gets),
the sender (which SOP classes to propose, in which order to send), the conformance statement and the demo
PACS. The order of :data:`REGISTRY` is the send order: the SR first, then the overlay, the SEG, the GSPS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from cxr_node.config import ResultsSettings
from cxr_node.results.common import Identity, Kind, OutputOptions
from cxr_node.results.findings import Findings
from cxr_node.results.pr import build_pr
from cxr_node.results.sc import build_sc
from cxr_node.results.seg import build_seg
from cxr_node.results.sr import build_sr

Builder = Callable[[Dataset, Findings, OutputOptions, Identity], Dataset]

OUTPUT_TRANSFER_SYNTAXES: Final[tuple[str, ...]] = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
"""The transfer syntaxes proposed for every output SOP class (the files are written Explicit VR Little Endian)."""


@dataclass(frozen=True)
class OutputKind:
    """One kind of output.

    Parameters
    ----------
    name : Kind
        The short name used in the store, file names and configuration (``sr``, ``sc``, ``seg``, ``pr``).
    title : str
        How its SeriesDescription names it, after ``results.series_description``.
    sop_class_uid : str
        The SOP class it is written and sent as.
    modality : str
        The Modality its objects carry (how a PACS or the demo files them).
    switch : str
        The ``results.*`` setting that turns it on for analysed images (its Series Number is
        ``results.series_numbers.<name>``).
    build : Builder
        Source header, findings, site options and identity in; the pydicom data set out.
    """

    name: Kind
    title: str
    sop_class_uid: str
    modality: str
    switch: str
    build: Builder


REGISTRY: Final[tuple[OutputKind, ...]] = (
    OutputKind("sr", "structured report", str(ComprehensiveSRStorage), "SR", "structured_report", build_sr),
    OutputKind("sc", "overlay", str(SecondaryCaptureImageStorage), "OT", "secondary_capture", build_sc),
    OutputKind("seg", "lung segmentation", str(SegmentationStorage), "SEG", "segmentation", build_seg),
    OutputKind(
        "pr", "presentation state", str(GrayscaleSoftcopyPresentationStateStorage), "PR", "presentation_state", build_pr
    ),
)
"""Every output kind, in send order."""
BY_NAME: Final[dict[str, OutputKind]] = {kind.name: kind for kind in REGISTRY}
NOT_ANALYSED: Final[tuple[Kind, ...]] = ("sr", "sc")
"""What an image that could not be analysed gets (the SC only when there is an image to draw on)."""


def kind(name: str) -> OutputKind:
    """Return the output kind called ``name``.

    Raises
    ------
    ValueError
        When no kind has that name.
    """
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"output kind must be one of {tuple(BY_NAME)}, found {name!r}") from None


def send_rank(name: str) -> int:
    """The position of an output kind in the send order (0 is sent first)."""
    return REGISTRY.index(kind(name))


def enabled(results: ResultsSettings) -> tuple[Kind, ...]:
    """The kinds an analysed image gets under ``results``."""
    return tuple(entry.name for entry in REGISTRY if getattr(results, entry.switch))


def producible(results: ResultsSettings) -> tuple[Kind, ...]:
    """Every kind the node may write under ``results``, in send order (what a destination must accept)."""
    extra = NOT_ANALYSED[:1] if results.not_analysed_report else ()
    wanted = set(enabled(results)) | set(extra)
    return tuple(entry.name for entry in REGISTRY if entry.name in wanted)


def kinds_for(findings: Findings, results: ResultsSettings) -> tuple[Kind, ...]:
    """The outputs ``findings`` get: all enabled ones when analysed; the short SR (and the overlay, when
    there is an image to draw on) when not analysed and the site wants to be told."""
    if findings.summary.analysed:
        return enabled(results)
    if not results.not_analysed_report:
        return ()
    has_image = findings.image is not None and results.secondary_capture
    return NOT_ANALYSED if has_image else NOT_ANALYSED[:1]


def options_from(results: ResultsSettings) -> OutputOptions:
    """The writers' options from the ``results`` settings."""
    return OutputOptions(
        series_numbers=results.series_numbers.model_dump(),
        series_description=results.series_description,
        institution_name=results.institution_name,
    )
