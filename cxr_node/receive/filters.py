"""Pure eligibility rules: is a received instance a frontal chest radiograph the node should analyse?

:func:`triage` reads header attributes only (no pixel decoding) and returns a :class:`Verdict`:
``eligible``, ``skipped`` (a valid instance the node does not analyse) or ``malformed`` (an instance
whose header or pixel data cannot be right).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from cxr_node.config import TriageSettings
from cxr_node.dicom.codes import MODALITY_OF_CLASS
from cxr_node.dicom.sop import RADIOGRAPH_CLASSES
from cxr_node.dicom.uids import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PRIVATE_KIND,
    PRIVATE_MODEL,
    PRIVATE_SOURCE_UID,
    is_own_output,
)

PIXEL_DATA: Final = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH: Final = 0xFFFFFFFF
GRAYSCALE: Final = ("MONOCHROME1", "MONOCHROME2")

Kind = Literal["eligible", "skipped", "malformed"]


@dataclass(frozen=True)
class Verdict:
    """The triage result: what to do with an instance, and why in one line."""

    kind: Kind
    reason: str = ""

    @property
    def eligible(self) -> bool:
        """True when the instance is to be analysed."""
        return self.kind == "eligible"


ELIGIBLE: Final = Verdict("eligible")


def triage(ds: Dataset, rules: TriageSettings) -> Verdict:
    """Decide whether ``ds`` (a header; pixel data may be present but is not decoded) is analysed.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The received data set.
    rules : TriageSettings
        The site's lists of modalities, view positions and body parts.

    Returns
    -------
    Verdict
        Skips are checked first (a lateral with broken pixels is simply skipped), then integrity.
    """
    for check in (_own_output, _sop_class, _modality, _body_part, _view_position, _frames):
        reason = check(ds, rules)
        if reason:
            return Verdict("skipped", reason)
    reason = _integrity(ds, rules)
    return Verdict("malformed", reason) if reason else ELIGIBLE


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value not in (None, "") else ""


def _own_output(ds: Dataset, _rules: TriageSettings) -> str:
    """An output of this node routed back: its private block is there and its SOP Instance UID is the one the
    block's source UID, model and kind derive. The Manufacturer alone proves nothing (anyone may write it)."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        source, model, kind = (_private_text(ds, block.get_tag(offset)) for offset in _OWN_BLOCK)
    except (KeyError, ValueError, TypeError, AttributeError):
        return ""
    own = is_own_output(str(ds.get("SOPInstanceUID", "") or ""), source, model, kind)
    return "own output routed back" if own else ""


_OWN_BLOCK: Final = (PRIVATE_SOURCE_UID, PRIVATE_MODEL, PRIVATE_KIND)


def _private_text(ds: Dataset, tag: int) -> str:
    """A private element's text: read as its VR (explicit VR) or as raw bytes (implicit VR gives UN)."""
    value = ds[tag].value
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value or "").strip(" \0")


def _sop_class(ds: Dataset, _rules: TriageSettings) -> str:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in RADIOGRAPH_CLASSES:
        return ""
    name = getattr(ds.get("SOPClassUID"), "name", sop_class)
    return f"SOP class {name} is not CR or DX"


def _modality(ds: Dataset, rules: TriageSettings) -> str:
    """The Modality must be one of ``triage.modalities``; a radiograph without one (Type 1, yet some send none)
    has the modality its SOP class implies (CR Image Storage is CR, the DX Image Storage classes DX)."""
    modality = _text(ds, "Modality") or MODALITY_OF_CLASS.get(str(ds.get("SOPClassUID", "")).strip(" \0"), "")
    allowed = {m.upper() for m in rules.modalities}
    return "" if modality in allowed else f"modality {modality or '(missing)'} not in triage.modalities"


def _body_part(ds: Dataset, rules: TriageSettings) -> str:
    part = _text(ds, "BodyPartExamined")
    if not part:
        return "" if rules.accept_missing_body_part else "body part missing"
    return "" if part in {p.upper() for p in rules.body_parts} else f"body part {part} not in triage.body_parts"


def _view_position(ds: Dataset, rules: TriageSettings) -> str:
    view = _text(ds, "ViewPosition")
    if not view:
        return "" if rules.accept_missing_view_position else "view position missing"
    allowed = {v.upper() for v in rules.view_positions}
    return "" if view in allowed else f"view position {view} is not frontal (triage.view_positions)"


def _frames(ds: Dataset, _rules: TriageSettings) -> str:
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return "NumberOfFrames is not a number"
    return "" if frames == 1 else f"multi-frame ({frames} frames)"


def _grayscale(ds: Dataset) -> bool:
    """Whether the image is single-sample greyscale; a colour chest radiograph is still queued, so that the
    radiologist gets a "not analysed" report saying why, instead of silence."""
    photometric = _text(ds, "PhotometricInterpretation")
    return photometric in GRAYSCALE and ds.get("SamplesPerPixel", 1) == 1


def _integrity(ds: Dataset, rules: TriageSettings) -> str:
    """Return why the image header or pixel data cannot be right, or an empty string."""
    if "PhotometricInterpretation" not in ds:
        return "PhotometricInterpretation missing"
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        return f"image dimensions {rows}x{cols} are missing or zero"
    if rows > rules.max_dimension or cols > rules.max_dimension:
        return f"image dimensions {rows}x{cols} exceed triage.max_dimension {rules.max_dimension}"
    allocated, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if not _grayscale(ds):
        samples = ds.get("SamplesPerPixel", 1) or 1
        return _pixel_length(ds, rows * cols * samples * int(allocated or 8) // 8)
    if allocated not in (8, 16) or not stored or not 1 <= stored <= allocated:
        return f"bits allocated/stored {allocated}/{stored} are not a valid grayscale layout"
    return _pixel_length(ds, rows * cols * allocated // 8)


def _deferred_length(ds: Dataset, element: object, declared: int) -> int:
    """The bytes of a deferred value that the file holds: its declared length, less what a file cut short lacks
    (a last P-DATA fragment can end the data set before its Pixel Data does)."""
    tell, name = getattr(element, "value_tell", None), getattr(ds, "filename", None)
    if declared == UNDEFINED_LENGTH or tell is None or not isinstance(name, str | os.PathLike):
        return declared
    try:
        return min(declared, max(0, Path(name).stat().st_size - int(tell)))
    except OSError:
        return declared


def _pixel_length(ds: Dataset, expected: int) -> str:
    if PIXEL_DATA not in ds:
        return "no pixel data"
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)  # a deferred value is measured, never read
    length = getattr(element, "length", None)  # a raw element read from a file, its value possibly deferred
    value = element.value
    found = len(value) if value is not None else _deferred_length(ds, element, int(length or 0))
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if length == UNDEFINED_LENGTH or (syntax is not None and UID(syntax).is_encapsulated):
        return "" if found else "encapsulated pixel data is empty"
    return "" if found >= expected else f"pixel data has {found} bytes, {expected} expected"
