"""The outputs of one set of findings, built and encoded: the single entry point of the results stage."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from cxr_node.results.common import Kind, OutputOptions, encode, identity
from cxr_node.results.findings import Findings
from cxr_node.results.kinds import kind


@dataclass(frozen=True)
class Built:
    """One output, encoded and ready to be written."""

    kind: Kind
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes


def build_outputs(source: Dataset, findings: Findings, options: OutputOptions, kinds: Sequence[Kind]) -> list[Built]:
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
        for name in kinds:
            dataset = build_dataset(source, findings, options, name)
            built.append(Built(name, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), encode(dataset)))
    return built


def build_dataset(source: Dataset, findings: Findings, options: OutputOptions, name: Kind) -> Dataset:
    """Build the ``name`` output of ``findings`` on ``source`` as a data set, with its deterministic identity.

    Raises
    ------
    OutputError
        When the output cannot be built.
    """
    entry = kind(name)
    ids = identity(source, findings, name, options.series_numbers[name], options.description(entry.title))
    return entry.build(source, findings, options, ids)
