"""The outputs of one set of findings, built and encoded: the single entry point of the results stage.

Every value an output copies from the source goes through :func:`~cxr_node.results.copied.copy_source`
first, and every similar case through :func:`writable_cases`: what cannot be written is repaired or left out,
never a reason to fail the report. What was changed comes back with the outputs as :class:`Outputs.notes`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import overload

from pydicom.dataset import Dataset

from cxr_node.dicom.uids import uid_problem
from cxr_node.neighbours.cases import accession_problem, date_problem
from cxr_node.results.common import Kind, OutputOptions, encode, identity, mark_as_own
from cxr_node.results.copied import Copied, Note, copy_source
from cxr_node.results.findings import Findings, SimilarCase
from cxr_node.results.kinds import Builder, kind


@dataclass(frozen=True)
class Built:
    """One output, encoded and ready to be written."""

    kind: Kind
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes


@dataclass(frozen=True)
class Outputs(Sequence[Built]):
    """The outputs of one image, in the order asked for, and what was repaired or left out to write them.

    Parameters
    ----------
    built : tuple of Built
        The encoded outputs.
    notes : tuple of Note
        Each source value repaired or left out, and each similar case left out; the same in every output.
    """

    built: tuple[Built, ...]
    notes: tuple[Note, ...] = ()

    @overload
    def __getitem__(self, index: int) -> Built: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Built]: ...
    def __getitem__(self, index: int | slice) -> Built | Sequence[Built]:
        return self.built[index]

    def __len__(self) -> int:
        return len(self.built)


def build_outputs(source: Dataset, findings: Findings, options: OutputOptions, kinds: Sequence[Kind]) -> Outputs:
    """Build and encode each of ``kinds``; any failure raises before anything is returned.

    Raises
    ------
    OutputError
        When an output cannot be built or fails pydicom's writing validation, or a UID identifying the
        source is unusable.
    """
    built = []
    with warnings.catch_warnings():
        # the source's names are copied as they are: a one-component name is valid DICOM, not our error
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        copied, findings, notes = _prepare(source, findings)
        for name in kinds:
            dataset = _build(copied, findings, options, name, notes)
            built.append(Built(name, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), encode(dataset)))
    return Outputs(tuple(built), notes)


def build_dataset(
    source: Dataset, findings: Findings, options: OutputOptions, name: Kind, builder: Builder | None = None
) -> Dataset:
    """Build the ``name`` output of ``findings`` on ``source`` as a data set, with its deterministic identity.

    ``builder`` replaces the kind's own builder (the tests pass the highdicom reference builder of the SR).

    Raises
    ------
    OutputError
        When the output cannot be built.
    """
    copied, findings, notes = _prepare(source, findings)
    return _build(copied, findings, options, name, notes, builder)


def _prepare(source: Dataset, findings: Findings) -> tuple[Copied, Findings, tuple[Note, ...]]:
    copied = copy_source(source)
    findings, left_out = writable_cases(findings)
    return copied, findings, copied.notes + left_out


def _build(
    copied: Copied,
    findings: Findings,
    options: OutputOptions,
    name: Kind,
    notes: tuple[Note, ...],
    builder: Builder | None = None,
) -> Dataset:
    """One output from the checked header: its builder, then the shared Patient and Study, then the private block."""
    entry = kind(name)
    description = options.description(entry.title)
    header = copied.header
    ids = identity(header, findings, name, options.series_numbers[name], description, tuple(map(str, notes)))
    dataset = (builder or entry.build)(header, findings, options, ids)
    copied.apply(dataset)
    mark_as_own(dataset, str(header.SOPInstanceUID), findings.provenance.model_key, name)
    return dataset


def writable_cases(findings: Findings) -> tuple[Findings, tuple[Note, ...]]:
    """Leave out the similar cases whose identifiers an output cannot write; return the findings without them
    and a note for each (ranks are kept, so the report's tracking UIDs do not move)."""
    kept: list[SimilarCase] = []
    notes: list[Note] = []
    for case in findings.summary.similar:
        problems = case_problems(case)
        if problems:
            notes.append(Note(f"similar case {case.rank}", "left out", ", ".join(problems)))
        else:
            kept.append(case)
    if not notes:
        return findings, ()
    return replace(findings, summary=replace(findings.summary, similar=tuple(kept))), tuple(notes)


def case_problems(case: SimilarCase) -> tuple[str, ...]:
    """Why a similar case's identifiers cannot be written (UIDs, accession number, study date); no values."""
    checks = (
        ("study_instance_uid", case.study_instance_uid, uid_problem),
        ("sop_instance_uid", case.sop_instance_uid, uid_problem),
        ("accession_number", case.accession_number, accession_problem),
        ("study_date", case.study_date, date_problem),
    )
    return tuple(
        f"{name}: {problem}" for name, value, check in checks if value is not None and (problem := check(value))
    )
