"""Which outputs one set of findings gets, built and encoded: the single entry point of the results stage."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset

from cxr_node.results.common import Kind, OutputOptions, encode
from cxr_node.results.findings import Findings
from cxr_node.results.pr import build_pr
from cxr_node.results.sc import build_sc
from cxr_node.results.seg import build_seg
from cxr_node.results.sr import build_sr

Builder = Callable[[Dataset, Findings, OutputOptions], Dataset]
BUILDERS: Final[Mapping[Kind, Builder]] = {"sr": build_sr, "sc": build_sc, "seg": build_seg, "pr": build_pr}


@dataclass(frozen=True)
class Enabled:
    """The site's output switches (``results.*`` in the configuration)."""

    structured_report: bool = True
    secondary_capture: bool = True
    segmentation: bool = False
    presentation_state: bool = False
    not_analysed_report: bool = True


@dataclass(frozen=True)
class Built:
    """One output, encoded and ready to be written."""

    kind: Kind
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes


def kinds_for(findings: Findings, enabled: Enabled) -> tuple[Kind, ...]:
    """The outputs ``findings`` get: all enabled ones when analysed; the short SR (and the overlay, when
    there is an image to draw on) when not analysed and the site wants to be told."""
    if findings.analysed:
        wanted = (
            ("sr", enabled.structured_report),
            ("sc", enabled.secondary_capture),
            ("seg", enabled.segmentation),
            ("pr", enabled.presentation_state),
        )
        return tuple(kind for kind, on in wanted if on)
    if not enabled.not_analysed_report:
        return ()
    has_image = findings.image is not None and enabled.secondary_capture
    return ("sr", "sc") if has_image else ("sr",)


def build_outputs(source: Dataset, findings: Findings, options: OutputOptions, kinds: tuple[Kind, ...]) -> list[Built]:
    """Build and encode each of ``kinds``; any failure raises before anything is returned.

    Raises
    ------
    OutputError
        When an output cannot be built or fails pydicom's writing validation.
    """
    built = []
    with warnings.catch_warnings():
        # the source's names are copied as they are: a one-component name is valid DICOM, not our error
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        for kind in kinds:
            dataset = BUILDERS[kind](source, findings, options)
            built.append(Built(kind, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), encode(dataset)))
    return built
