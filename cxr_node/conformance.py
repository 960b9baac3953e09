"""The tables of the DICOM Conformance Statement (docs/conformance.md), as data derived from the code.

The statement's long tables (SOP classes, transfer syntaxes, status codes, coded terminology) sit in the
Markdown between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->`` markers and are produced here from
:mod:`cxr_node.dicom.sop`, :mod:`cxr_node.dicom.status`, :mod:`cxr_node.dicom.codes` and pynetdicom, so
they cannot drift: ``tests/unit/test_conformance.py`` fails when a block is stale, and also checks the
parsed tables against the running SCP, the output builders and the sender. Regenerate with::

    python -m cxr_node.conformance docs/conformance.md          # rewrite the blocks
    python -m cxr_node.conformance --check docs/conformance.md  # exit 1 when a block is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.sr.coding import Code
from pydicom.uid import UID
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from cxr_node.dicom import codes, sop, status
from cxr_node.results.kinds import OUTPUT_TRANSFER_SYNTAXES, REGISTRY

IMPLEMENTATION_CLASS_UID: Final = str(PYNETDICOM_IMPLEMENTATION_UID)
"""Implementation Class UID the node sends in every association (pynetdicom's; the AE does not change it)."""
IMPLEMENTATION_VERSION_NAME: Final = str(PYNETDICOM_IMPLEMENTATION_VERSION)
"""Implementation Version Name the node sends in every association (pynetdicom's)."""

OUTPUT_SOP_CLASSES: Final[Mapping[str, UID]] = {kind.name: UID(kind.sop_class_uid) for kind in REGISTRY}
"""The SOP class of each output kind the node creates and sends (as a Storage SCU)."""
VERIFICATION_SCU_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = tuple(UID(ts) for ts in DEFAULT_TRANSFER_SYNTAXES)
"""What ``cxr-node echo`` proposes for Verification: pynetdicom's default transfer syntaxes."""

RADIOGRAPH_SYNTAX_TABLE: Final = "Table 4.2-12"
OTHER_SYNTAX_TABLE: Final = "Table 8.7-2"
"""How the statement names the two transfer syntax tables the storage classes refer to."""


@dataclass(frozen=True)
class StatusRow:
    """One status the C-STORE SCP answers with: the :mod:`~cxr_node.dicom.status` constant and when it is sent."""

    constant: str
    meaning: str
    when: str

    @property
    def value(self) -> int:
        """The status code, read from :mod:`cxr_node.dicom.status`."""
        return int(getattr(status, self.constant))


SCP_STATUSES: Final[tuple[StatusRow, ...]] = (
    StatusRow(
        "SUCCESS",
        "Success",
        "The instance is durably recorded: its job row is committed, after its file (when kept) is fsynced "
        "and renamed into place. This holds for instances that are analysed (job `queued`), not analysed "
        "(job `skipped` with the reason) and re-sent identically (same SOP Instance UID, patient, study, series "
        "and pixel data: the existing job is kept).",
    ),
    StatusRow(
        "OUT_OF_RESOURCES",
        "Refused: Out of Resources",
        "Writing, fsyncing or committing failed (disk full, I/O or database error); or the node applies "
        "back-pressure: queue, disk space, inodes (see Back-pressure in 4.2.1.4.1). Nothing is kept; the sender "
        "is expected to retry later.",
    ),
    StatusRow(
        "DATASET_DOES_NOT_MATCH_SOP_CLASS",
        "Error: Data Set does not match SOP Class",
        "A CR/DX image that passed triage but whose header and pixel data cannot be right (no or zero "
        "Rows/Columns, dimensions above `triage.max_dimension`, invalid bit depths, no or truncated Pixel "
        "Data, no Photometric Interpretation, unparsable header). The file is kept in `quarantine/`. Also when "
        "the command's Affected SOP Class UID is not the data set's SOP Class UID: then nothing is kept.",
    ),
    StatusRow(
        "CANNOT_UNDERSTAND",
        "Error: Cannot understand",
        "The data set cannot be decoded at all; the C-STORE-RQ carries no data set; or the command's Affected "
        "SOP Instance UID is not the data set's SOP Instance UID (Success would confirm an instance the node did "
        "not keep). Nothing is kept.",
    ),
    StatusRow(
        "IDENTIFIER_INVALID",
        "Error: Cannot understand (identifier)",
        "SOP Instance UID, SOP Class UID, Study Instance UID or Series Instance UID is missing or not a valid "
        "UID (PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters); the ErrorComment names the "
        "attribute. Nothing is kept, queued or indexed; a re-send fails the same way.",
    ),
    StatusRow(
        "INSTANCE_CONFLICT",
        "Error: Cannot understand (conflicting instance)",
        "An instance with this SOP Instance UID was already received with another patient, study, series, SOP "
        "class or pixel data; the ErrorComment says which. The new one is refused (never stored over the first, "
        "never combined with it); an identical re-send is answered Success.",
    ),
    StatusRow(
        "INSTANCE_TOO_LARGE",
        "Error: Cannot understand (instance too large)",
        "The data set is larger than `node.max_instance_mb` as received, or once inflated (Deflated Explicit VR "
        "Little Endian, inflated as a stream and counted before anything is parsed). Receiving stops writing at "
        "the limit; the rest of the data set is read and dropped, then this is answered. Nothing is kept; a "
        "re-send fails the same way (a failure, not 0xA7xx, so the sender does not retry it forever).",
    ),
    StatusRow(
        "HEADER_TOO_COMPLEX",
        "Error: Cannot understand (header over bounds)",
        "The header, walked before it is parsed, has more than 50,000 sequence items, sequences nested more than "
        "32 deep, more than 200,000 elements or 100,000 pixel data fragments, or over 64 MB of values to hold in "
        "memory; the ErrorComment says which. Nothing is kept.",
    ),
    StatusRow(
        "UNEXPECTED_FAILURE",
        "Error: Cannot understand (unexpected processing failure)",
        "An unexpected error in the node's own handler (a bug). Nothing is kept; the error is logged.",
    ),
)
"""Every status the C-STORE SCP can return, in the order of the statement's table."""


@dataclass(frozen=True)
class TemplateCode:
    """A code the outputs carry that the node does not choose itself: written by a template or module."""

    code: Code
    where: str


TEMPLATE_CODES: Final[tuple[TemplateCode, ...]] = (
    TemplateCode(Code("126000", "DCM", "Imaging Measurement Report"), "SR document title (TID 1500)"),
    TemplateCode(Code("121049", "DCM", "Language of Content Item and Descendants"), "SR, TID 1204"),
    TemplateCode(Code("en-US", "RFC5646", "English (United States)"), "SR, TID 1204 value"),
    TemplateCode(Code("121005", "DCM", "Observer Type"), "SR, TID 1002"),
    TemplateCode(Code("121007", "DCM", "Device"), "SR, TID 1002 value (CID 270)"),
    TemplateCode(Code("121012", "DCM", "Device Observer UID"), "SR, TID 1004"),
    TemplateCode(Code("121013", "DCM", "Device Observer Name"), "SR, TID 1004"),
    TemplateCode(Code("121014", "DCM", "Device Observer Manufacturer"), "SR, TID 1004"),
    TemplateCode(Code("121015", "DCM", "Device Observer Model Name"), "SR, TID 1004"),
    TemplateCode(Code("121058", "DCM", "Procedure reported"), "SR, TID 1500"),
    TemplateCode(Code("126010", "DCM", "Imaging Measurements"), "SR, TID 1500"),
    TemplateCode(Code("125007", "DCM", "Measurement Group"), "SR, TID 1410 / TID 1501"),
    TemplateCode(Code("112039", "DCM", "Tracking Identifier"), "SR, TID 1410 / TID 1501"),
    TemplateCode(Code("112040", "DCM", "Tracking Unique Identifier"), "SR, TID 1410 / TID 1501"),
    TemplateCode(Code("121071", "DCM", "Finding"), "SR, TID 1410"),
    TemplateCode(Code("363698007", "SCT", "Finding Site"), "SR, TID 1410"),
    TemplateCode(Code("111001", "DCM", "Algorithm Name"), "SR, TID 4019"),
    TemplateCode(Code("111003", "DCM", "Algorithm Version"), "SR, TID 4019"),
    TemplateCode(Code("111030", "DCM", "Image Region"), "SR, TID 1410 (SCOORD)"),
    TemplateCode(Code("260753009", "SCT", "Source"), "SR, image the SCOORD is selected from"),
    TemplateCode(Code("111028", "DCM", "Image Library"), "SR, TID 1600"),
    TemplateCode(Code("126200", "DCM", "Image Library Group"), "SR, TID 1600"),
    TemplateCode(Code("121139", "DCM", "Modality"), "SR, TID 1602"),
    TemplateCode(Code("CR", "DCM", "Computed Radiography"), "SR, TID 1602 value: the source's modality"),
    TemplateCode(Code("DX", "DCM", "Digital Radiography"), "SR, TID 1602 value: the source's modality"),
    TemplateCode(Code("111044", "DCM", "Patient Orientation Row"), "SR, TID 1602"),
    TemplateCode(Code("111043", "DCM", "Patient Orientation Column"), "SR, TID 1602"),
    TemplateCode(Code("110910", "DCM", "Pixel Data Rows"), "SR, TID 1602"),
    TemplateCode(Code("110911", "DCM", "Pixel Data Columns"), "SR, TID 1602"),
    TemplateCode(Code("111026", "DCM", "Horizontal Pixel Spacing"), "SR, TID 1602"),
    TemplateCode(Code("111066", "DCM", "Vertical Pixel Spacing"), "SR, TID 1602"),
    TemplateCode(Code("mm", "UCUM", "mm"), "SR, TID 1602 unit"),
    TemplateCode(Code("{pixels}", "UCUM", "Pixels"), "SR, TID 1602 unit"),
    TemplateCode(Code("109101", "DCM", "Acquisition Equipment"), "Contributing Equipment of the source, copied"),
    TemplateCode(Code("109102", "DCM", "Processing Equipment"), "Contributing Equipment: cxr-node, highdicom"),
    TemplateCode(
        Code("121322", "DCM", "Source image for image processing operation"), "SC, SEG: Source Image Sequence"
    ),
    TemplateCode(Code("113076", "DCM", "Segmentation"), "SEG: Derivation Code Sequence"),
    TemplateCode(Code("91772007", "SCT", "Organ"), "SEG: Segmented Property Category"),
    TemplateCode(Code("123110", "DCM", "Artificial Intelligence"), "SEG: Algorithm Family (CID 7162)"),
)
"""Codes in the outputs that come from the templates and modules highdicom writes, not from :mod:`codes`."""

PRIVATE_DEFINITIONS: Final[Mapping[str, str]] = {
    "CXRN001": "Concept name: whether the lung segmentation passed the node's plausibility checks "
    "(two lungs of sensible size inside the thorax).",
    "CXRN002": "Value of CXRN001: the lung mask passed the checks (only then is the image analysed).",
    "CXRN003": "Value of CXRN001: the lung mask failed the checks; the image is not analysed.",
    "CXRN004": "Concept name of a NUM: cosine similarity (-1 to 1) between the retrieval embeddings of "
    "this image and a similar past case.",
    "CXRN005": "Concept name of a TEXT: the model manifest's intended-use statement.",
    "CXRN006": "Concept name of a TEXT: why the image was not analysed.",
    "CXRN007": "Concept name of a UIDREF: SOP Instance UID of a similar past case's image.",
    "CXRN008": "Concept name of a TEXT: the node's de-identified number of a similar past case.",
    "CXRN009": "Concept name of a TEXT: the image was analysed although the out-of-domain gate scored it outside "
    "the model's validated domain (domain.gate: flag); the text gives the score and the bound.",
    "CXRN010": "Concept name of a CONTAINER at the report's root holding one TID 1501 group per similar past "
    "case (kept out of Imaging Measurements: a group without an image region there stops OHIF drawing the report).",
    "CXRN011": "Concept name of a TEXT: the go-live mode the report was written in (shadow, supervised or live; "
    "shadow and supervised add that the result is for QA review, not for diagnosis).",
}
"""What each private (99CXRNODE) code means; the statement must define every private code."""


Table = tuple[tuple[str, ...], Sequence[tuple[str, ...]]]
"""A Markdown table as (header cells, rows of cells)."""


def _uid(uid: str) -> str:
    return f"`{uid}`"


def _name(uid: str) -> str:
    return UID(uid).name


def scp_contexts() -> dict[UID, tuple[UID, ...]]:
    """The SCP's presentation contexts as ``{abstract syntax: transfer syntaxes in preference order}``."""
    return {UID(abstract): tuple(syntaxes) for abstract, syntaxes in sop.scp_contexts()}


def code_constants() -> list[tuple[str, Code]]:
    """Every :class:`Code` defined in :mod:`cxr_node.dicom.codes`, with its constant name, in file order."""
    return [(name, value) for name, value in vars(codes).items() if isinstance(value, Code)]


def _syntax_rows(syntaxes: Sequence[str]) -> list[tuple[str, ...]]:
    return [(str(n), _name(ts), _uid(ts)) for n, ts in enumerate(syntaxes, start=1)]


def tables() -> dict[str, Table]:
    """Every generated table of the statement, by block name."""
    contexts = scp_contexts()
    storage = [uid for uid in contexts if uid != sop.VERIFICATION_CLASS]
    others = len([uid for uid in storage if uid not in sop.RADIOGRAPH_CLASSES])
    scp_classes: list[tuple[str, ...]] = [(_name(sop.VERIFICATION_CLASS), _uid(sop.VERIFICATION_CLASS), "SCP", "-")]
    scp_classes += [(_name(uid), _uid(uid), "SCP", "analysed") for uid in sop.RADIOGRAPH_CLASSES]
    every_other = f"every other Storage SOP Class ({others}), listed in Table 8.7-1"
    scp_classes.append((every_other, "", "SCP", "stored, skipped"))
    scu_classes: list[tuple[str, ...]] = [(_name(sop.VERIFICATION_CLASS), _uid(sop.VERIFICATION_CLASS), "SCU")]
    scu_classes += [(_name(uid), _uid(uid), "SCU") for uid in OUTPUT_SOP_CLASSES.values()]
    proposed = [
        (_name(uid), _uid(uid), _name(ts), _uid(ts), "SCU", "None")
        for uid in OUTPUT_SOP_CLASSES.values()
        for ts in OUTPUT_TRANSFER_SYNTAXES
    ]
    proposed_echo = [
        (_name(sop.VERIFICATION_CLASS), _uid(sop.VERIFICATION_CLASS), _name(ts), _uid(ts), "SCU", "None")
        for ts in VERIFICATION_SCU_TRANSFER_SYNTAXES
    ]
    accepted = [
        (_name(sop.VERIFICATION_CLASS), _uid(sop.VERIFICATION_CLASS), _name(ts), _uid(ts), "SCP", "None")
        for ts in contexts[sop.VERIFICATION_CLASS]
    ]
    accepted += [(_name(uid), _uid(uid), RADIOGRAPH_SYNTAX_TABLE, "", "SCP", "None") for uid in sop.RADIOGRAPH_CLASSES]
    accepted.append(("every other Storage SOP Class (Table 8.7-1)", "", OTHER_SYNTAX_TABLE, "", "SCP", "None"))
    annex = [
        (
            _name(uid),
            _uid(uid),
            RADIOGRAPH_SYNTAX_TABLE if uid in sop.RADIOGRAPH_CLASSES else OTHER_SYNTAX_TABLE,
            "analysed" if uid in sop.RADIOGRAPH_CLASSES else "stored, skipped",
        )
        for uid in storage
    ]
    outputs = [(kind, _name(uid), _uid(uid)) for kind, uid in OUTPUT_SOP_CLASSES.items()]
    statuses = [(f"0x{row.value:04X}", f"`{row.constant}`", row.meaning, row.when) for row in SCP_STATUSES]
    standard = [
        (f"`{name}`", code.value, code.scheme_designator, code.meaning)
        for name, code in code_constants()
        if code.scheme_designator != codes.PRIVATE_SCHEME
    ]
    private = [
        (f"`{name}`", code.value, code.scheme_designator, code.meaning, PRIVATE_DEFINITIONS[code.value])
        for name, code in code_constants()
        if code.scheme_designator == codes.PRIVATE_SCHEME
    ]
    template = [(t.code.value, t.code.scheme_designator, t.code.meaning, t.where) for t in TEMPLATE_CODES]
    identification = [
        ("Implementation Class UID", _uid(IMPLEMENTATION_CLASS_UID)),
        ("Implementation Version Name", f"`{IMPLEMENTATION_VERSION_NAME}`"),
    ]
    context_header = ("Abstract Syntax", "SOP Class UID", "Transfer Syntax", "Transfer Syntax UID", "Role", "Ext. Neg.")
    return {
        "scp-sop-classes": (("SOP Class", "SOP Class UID", "Role", "Instances"), scp_classes),
        "scu-sop-classes": (("SOP Class", "SOP Class UID", "Role"), scu_classes),
        "implementation": (("Item", "Value"), identification),
        "scu-contexts": (context_header, proposed),
        "scu-echo-contexts": (context_header, proposed_echo),
        "scp-contexts": (context_header, accepted),
        "scp-radiograph-syntaxes": (
            ("Preference", "Transfer Syntax", "Transfer Syntax UID"),
            _syntax_rows(sop.DECODABLE_TRANSFER_SYNTAXES),
        ),
        "scp-statuses": (("Status", "`cxr_node.dicom.status`", "Meaning", "When"), statuses),
        "output-classes": (("Output", "SOP Class", "SOP Class UID"), outputs),
        "codes-standard": (("Constant", "Code Value", "Coding Scheme", "Code Meaning"), standard),
        "codes-private": (("Constant", "Code Value", "Coding Scheme", "Code Meaning", "Definition"), private),
        "codes-template": (("Code Value", "Coding Scheme", "Code Meaning", "Where"), template),
        "scp-storage-classes": (("SOP Class", "SOP Class UID", "Transfer Syntaxes", "Instances"), annex),
        "scp-other-syntaxes": (
            ("Preference", "Transfer Syntax", "Transfer Syntax UID"),
            _syntax_rows(sop.ANY_TRANSFER_SYNTAX),
        ),
    }


def render(table: Table) -> str:
    """Return ``table`` as a GitHub-flavoured Markdown table (pipes in cells escaped)."""
    header, rows = table

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def update(text: str) -> str:
    """Return ``text`` with every generated block replaced by the current table.

    Raises
    ------
    KeyError
        When a block names a table that does not exist.
    """
    current = tables()

    def replace(match: re.Match[str]) -> str:
        return f"{match.group(1)}{render(current[match.group('name')])}\n{match.group(4)}"

    return _BLOCK.sub(replace, text)


def block_names(text: str) -> list[str]:
    """The names of the generated blocks in ``text``, in order."""
    return [match.group("name") for match in _BLOCK.finditer(text)]


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` verify) the generated tables of a conformance statement."""
    parser = argparse.ArgumentParser(prog="python -m cxr_node.conformance", description=main.__doc__)
    parser.add_argument("document", type=Path, help="the Markdown conformance statement")
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated table is stale")
    args = parser.parse_args(argv)
    text = args.document.read_text(encoding="utf-8")
    fresh = update(text)
    if args.check:
        if fresh != text:
            print(f"{args.document}: generated tables are stale; run without --check", file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        args.document.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
