"""Triage rules: which instances are analysed, skipped or malformed, from the header alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from cxr_node.config import TriageSettings
from cxr_node.receive.filters import triage

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
RULES = TriageSettings()


def chest(**changes: object) -> Dataset:
    """Return a minimal valid 16-bit CR chest PA header with pixel data, with ``changes`` applied."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality, ds.BodyPartExamined, ds.ViewPosition = CR, "CR", "CHEST", "PA"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 4, 5, 16, 12
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\x00" * (4 * 5 * 2)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def test_frontal_chest_cr_is_eligible() -> None:
    """A CR chest PA with consistent pixel data is analysed."""
    assert triage(chest(), RULES).kind == "eligible"


@pytest.mark.parametrize(
    "changes",
    [
        {"SOPClassUID": DX, "Modality": "DX", "ViewPosition": "AP"},
        {"ViewPosition": None},
        {"ViewPosition": ""},
        {"BodyPartExamined": None},
        {"BodyPartExamined": "chest"},
        {"PhotometricInterpretation": "MONOCHROME1"},
        {"BitsAllocated": 8, "BitsStored": 8, "PixelData": b"\x00" * 20},
        {"Modality": None},  # a CR image without its (Type 1) Modality: the SOP class says CR
        {"SOPClassUID": DX, "Modality": ""},
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_eligible_variants(changes: dict[str, object]) -> None:
    """DX, AP, missing view or body part, lower-case values, MONOCHROME1 and 8-bit are all analysed."""
    assert triage(chest(**changes), RULES).kind == "eligible"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"SOPClassUID": CT, "Modality": "CT"}, "is not CR or DX"),
        ({"Modality": "OT"}, "modality OT"),
        ({"ViewPosition": "LL"}, "view position LL is not frontal"),
        ({"ViewPosition": "LATERAL"}, "not frontal"),
        ({"BodyPartExamined": "HAND"}, "body part HAND"),
        ({"NumberOfFrames": 3}, "multi-frame (3 frames)"),
    ],
)
def test_skipped_with_reason(changes: dict[str, object], reason: str) -> None:
    """Instances the node does not analyse are skipped, and the reason says why."""
    verdict = triage(chest(**changes), RULES)
    assert verdict.kind == "skipped"
    assert reason in verdict.reason


def test_a_colour_chest_radiograph_is_queued_to_be_reported_not_analysed() -> None:
    """A chest CR in RGB is not skipped silently: it is queued, and the worker reports it as not analysed."""
    ds = chest(PhotometricInterpretation="RGB", SamplesPerPixel=3, BitsStored=8, BitsAllocated=8)
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)
    assert triage(ds, RULES).kind == "eligible"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Rows": 0}, "missing or zero"),
        ({"Columns": None}, "missing or zero"),
        ({"Rows": 20000}, "exceed triage.max_dimension"),
        ({"BitsStored": 17}, "not a valid grayscale layout"),
        ({"BitsAllocated": 12}, "not a valid grayscale layout"),
        ({"PixelData": b"\x00" * 10}, "pixel data has 10 bytes, 40 expected"),
        ({"PixelData": None}, "no pixel data"),
        ({"PhotometricInterpretation": None}, "PhotometricInterpretation missing"),
    ],
)
def test_malformed_with_reason(changes: dict[str, object], reason: str) -> None:
    """Headers that cannot describe the pixel data are malformed, with the inconsistency named."""
    verdict = triage(chest(**changes), RULES)
    assert verdict.kind == "malformed"
    assert reason in verdict.reason


def test_skip_wins_over_malformed() -> None:
    """A lateral with truncated pixels is simply skipped: the node would not analyse it anyway."""
    assert triage(chest(ViewPosition="LL", PixelData=b""), RULES).kind == "skipped"


def test_encapsulated_pixel_data_is_not_length_checked() -> None:
    """Compressed pixel data cannot be length-checked from the header; only emptiness is malformed."""
    ds = chest(PixelData=b"\xfe\xff\x00\xe0\x00\x00\x00\x00")
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    assert triage(ds, RULES).kind == "eligible"


def test_site_lists_are_configurable() -> None:
    """A site can analyse laterals or other body parts, or refuse images without a view position."""
    rules = TriageSettings(
        view_positions=["PA", "AP", "LL"], body_parts=["CHEST", "THORAX"], accept_missing_view_position=False
    )
    assert triage(chest(ViewPosition="LL"), rules).eligible
    assert triage(chest(BodyPartExamined="THORAX"), rules).eligible
    assert triage(chest(ViewPosition=None), rules).reason == "view position missing"


def test_deferred_pixel_data_is_measured_not_read(tmp_path: Path) -> None:
    """The receiver parses headers with large values deferred: triage takes the pixel data's length from the
    header, without reading megabytes of pixels back from the file (the file may even be gone by then)."""
    path = tmp_path / "chest.dcm"
    ds = chest(Rows=512, Columns=512)
    ds.PixelData = b"\x00" * (512 * 512 * 2)
    ds.save_as(path, implicit_vr=False, little_endian=True)
    header = dcmread(path, defer_size=1024, force=True)
    path.unlink()
    assert triage(header, RULES).kind == "eligible"
    short = chest(Rows=512, Columns=512)
    short.PixelData = b"\x00" * 1000
    short.save_as(path, implicit_vr=False, little_endian=True)
    header = dcmread(path, defer_size=64, force=True)
    path.unlink()
    assert triage(header, RULES).reason == "pixel data has 1000 bytes, 524288 expected"
