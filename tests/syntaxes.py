"""Test data: one real chest radiograph in every transfer syntax the node decodes, encoded by DCMTK.

:func:`make_variants` writes one file per syntax in :data:`SYNTAXES`, each with its own SOP Instance UID
(the node dedupes on it) and the source's Study/Series. JPEG baseline and extended need 8- and 12-bit
input, so the 15-bit source is first rescaled to those depths (the *references* of those two variants);
JPEG 2000 comes from NEMA WG04's own J2KR/J2KI files beside the source when they exist (an encoder
independent of the decoder under test), from pydicom with openjpeg otherwise. :func:`variants` adds
what each file is; the session fixture :func:`syntax_variants` builds them once per test session.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from tests.conftest import require_tool

NEAR: Final = 2
"""The JPEG-LS near-lossless NEAR parameter: no decoded pixel is further than this from its source."""


@dataclass(frozen=True)
class Syntax:
    """How one variant is made: its transfer syntax, the depth of its input, the DCMTK command."""

    uid: UID
    lossless: bool
    bits: int | None
    """BitsStored of the uncompressed input it encodes; None for the source's own depth (15 for RG1)."""
    command: tuple[str, ...]
    """DCMTK tool and options (input and output files appended); empty for JPEG 2000."""


SYNTAXES: Final[dict[str, Syntax]] = {
    "explicit_le": Syntax(ExplicitVRLittleEndian, True, None, ("dcmconv", "+te")),
    "implicit_le": Syntax(ImplicitVRLittleEndian, True, None, ("dcmconv", "+ti")),
    "explicit_be": Syntax(ExplicitVRBigEndian, True, None, ("dcmconv", "+tb")),
    "deflated_le": Syntax(DeflatedExplicitVRLittleEndian, True, None, ("dcmconv", "+td")),
    "jpeg_baseline": Syntax(JPEGBaseline8Bit, False, 8, ("dcmcjpeg", "+eb", "+sr", "+un")),
    "jpeg_extended": Syntax(JPEGExtended12Bit, False, 12, ("dcmcjpeg", "+ee", "+sr", "+un")),
    "jpeg_lossless": Syntax(JPEGLossless, True, None, ("dcmcjpeg", "+el", "+sv", "6")),
    "jpeg_lossless_sv1": Syntax(JPEGLosslessSV1, True, None, ("dcmcjpeg", "+e1")),
    "jpegls_lossless": Syntax(JPEGLSLossless, True, None, ("dcmcjpls", "+el")),
    "jpegls_near": Syntax(JPEGLSNearLossless, False, None, ("dcmcjpls", "+en", "+md", str(NEAR), "+un")),
    "j2k_lossless": Syntax(JPEG2000Lossless, True, None, ()),
    "j2k": Syntax(JPEG2000, False, None, ()),
    "rle": Syntax(RLELossless, True, None, ("dcmcrle",)),
}
"""Every transfer syntax the receiver accepts for radiographs (``cxr_node.dicom.sop``), by variant name."""

_WG04_J2K: Final = {"j2k_lossless": "J2KR", "j2k": "J2KI"}
_COMPLETE: Final = ".complete"


@dataclass(frozen=True)
class Variant:
    """One encoded file and what it is."""

    name: str
    path: Path
    transfer_syntax: UID
    lossless: bool
    reference: Path
    """An uncompressed file with the pixels this variant encodes (exactly when ``lossless``)."""


def make_variants(source: Path, out_dir: Path) -> dict[str, Path]:
    """Write ``source`` (an uncompressed grayscale radiograph) in every syntax of :data:`SYNTAXES`.

    Parameters
    ----------
    source : Path
        An uncompressed single-frame MONOCHROME image, 16 bits allocated (RG1_UNCR.dcm).
    out_dir : Path
        Created if missing; receives ``<name>.dcm`` per variant and ``reference-<bits>bit.dcm`` per depth.

    Returns
    -------
    dict of str to Path
        The file of each variant, keyed as :data:`SYNTAXES`.
    """
    tools = {spec.command[0]: require_tool(spec.command[0]) for spec in SYNTAXES.values() if spec.command}
    out_dir.mkdir(parents=True, exist_ok=True)
    source_uid = str(dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    for bits in {s.bits for s in SYNTAXES.values()} - {None}:
        reference = _relabel(_rescaled(dcmread(source), bits), variant_uid(source_uid, f"reference-{bits}bit"))
        reference.save_as(reference_path(source, out_dir, bits), enforce_file_format=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = {name: pool.submit(_make_one, name, source, source_uid, out_dir, tools) for name in SYNTAXES}
        return {name: job.result() for name, job in jobs.items()}


def variants(source: Path, out_dir: Path) -> dict[str, Variant]:
    """Return every variant of ``source``, making them unless ``out_dir`` already holds a complete set."""
    marker = out_dir / _COMPLETE
    if marker.exists():
        paths = {name: out_dir / f"{name}.dcm" for name in SYNTAXES}
    else:
        paths = make_variants(source, out_dir)
        marker.touch()
    return {
        name: _describe(name, path, reference_path(source, out_dir, SYNTAXES[name].bits))
        for name, path in paths.items()
    }


def _describe(name: str, path: Path, reference: Path) -> Variant:
    spec = SYNTAXES[name]
    return Variant(name, path, spec.uid, spec.lossless, reference)


def reference_path(source: Path, out_dir: Path, bits: int | None) -> Path:
    """Return the uncompressed input of the variants encoded at ``bits`` (the source itself for None)."""
    return source if bits is None else out_dir / f"reference-{bits}bit.dcm"


@cache
def pixels(path: Path) -> np.ndarray:
    """Return the decoded pixels of ``path``, decoded once per session (read-only: do not modify)."""
    array = dcmread(path).pixel_array
    array.flags.writeable = False
    return array


def variant_uid(source_uid: str, name: str) -> UID:
    """Return the deterministic SOP Instance UID of variant ``name`` of the instance ``source_uid``."""
    return generate_uid(entropy_srcs=[source_uid, name])


@pytest.fixture(scope="session")
def syntax_variants(tmp_path_factory: pytest.TempPathFactory, chest_cr: Path) -> dict[str, Variant]:
    """The real chest CR in every transfer syntax the node accepts, built once per session."""
    return variants(chest_cr, tmp_path_factory.getbasetemp() / "syntax-variants")


def _make_one(name: str, source: Path, source_uid: str, out_dir: Path, tools: dict[str, str]) -> Path:
    """Write variant ``name``: relabel its input, then encode it with its DCMTK command."""
    spec = SYNTAXES[name]
    out = out_dir / f"{name}.dcm"
    if not spec.command:
        return _j2k(name, source, variant_uid(source_uid, name), out)
    staged = out_dir / f"{name}.input.dcm"
    ds = dcmread(reference_path(source, out_dir, spec.bits))
    _relabel(ds, variant_uid(source_uid, name)).save_as(staged, enforce_file_format=True)
    command = [tools[spec.command[0]], *spec.command[1:], str(staged), str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    staged.unlink()
    return out


def _relabel(ds: Dataset, uid: UID) -> Dataset:
    """Give ``ds`` the SOP Instance UID ``uid``; Patient, Study and Series stay."""
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def _rescaled(ds: Dataset, bits: int) -> Dataset:
    """Return ``ds`` with its pixels mapped linearly onto ``0 .. 2**bits - 1`` and the window to match."""
    values = ds.pixel_array.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scale = (2**bits - 1) / (high - low)
    dtype = np.uint8 if bits <= 8 else np.uint16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = dtype().itemsize * 8, bits, bits - 1, 0
    ds.PixelData = np.rint((values - low) * scale).astype(dtype).tobytes()
    ds["PixelData"].VR = "OB" if bits <= 8 else "OW"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        ds.WindowCenter = round((float(ds.WindowCenter) - low) * scale)
        ds.WindowWidth = max(1, round(float(ds.WindowWidth) * scale))
    ds.pop(0xFFFCFFFC, None)  # DataSetTrailingPadding describes the old encoding
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _j2k(name: str, source: Path, uid: UID, out: Path) -> Path:
    """Write the JPEG 2000 variant ``name``: WG04's file beside ``source`` if any, else openjpeg's."""
    sibling = source.with_name(source.name.replace("_UNCR", f"_{_WG04_J2K[name]}"))
    if sibling != source and sibling.exists():
        ds = dcmread(sibling)
    else:
        ds = dcmread(source)
        lossless = SYNTAXES[name].lossless
        ds.compress(SYNTAXES[name].uid, **({} if lossless else {"j2k_cr": [20]}))
    _relabel(ds, uid).save_as(out, enforce_file_format=True)
    return out
