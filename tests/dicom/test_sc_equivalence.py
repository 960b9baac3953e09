"""The Secondary Capture overlay the node writes equals, element by element and byte for byte, the one highdicom
builds from the same inputs.

:func:`cxr_node.results.sc.build_sc` assembles the data set directly for speed;
:func:`cxr_node.results.sc_reference.build_sc_reference` builds it with highdicom's ``SCImage.from_ref_dataset``.
Both run with one frozen clock, through the same output path (checked source values, private block), on CR and
DX sources, MONOCHROME1 and MONOCHROME2, analysed and not analysed findings, with and without orientation,
acquisition equipment, other character sets, missing or repaired values, and a real CR header and image size.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import types
from pathlib import Path

import highdicom.base
import highdicom.base_content
import highdicom.sc.sop
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from cxr_node.results import kinds, outputs, sc
from cxr_node.results.common import Kind, OutputError, OutputOptions, encode, encode_reference
from cxr_node.results.findings import Findings
from cxr_node.results.sc_reference import build_sc_reference
from cxr_node.training.phantoms import make_phantom
from tests.conftest import require_tool
from tests.dicom.test_results import PROVENANCE
from tests.dicom.test_sr_equivalence import CASES, differences, findings_on, phantom_source

FROZEN = datetime.datetime(2026, 12, 3, 11, 22, 33, 456789)
CR = "1.2.840.10008.5.1.4.1.1.1"
EQUIPMENT = {
    "Manufacturer": "ACME", "ManufacturerModelName": "X1", "SoftwareVersions": ["1", "2"], "DeviceSerialNumber": "SN1",
    "InstitutionName": "Hosp", "InstitutionalDepartmentName": "Rad", "InstitutionAddress": "1 Main St",
    "StationName": "ST1", "AcquisitionDate": "20200301", "AcquisitionTime": "101010",
}  # fmt: skip


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both builders read the same instant: highdicom's clocks and the direct builder's."""

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Frozen:
            return cls.fromtimestamp(FROZEN.timestamp())

    fake = types.SimpleNamespace(datetime=Frozen, date=datetime.date, time=datetime.time, timedelta=datetime.timedelta)
    for module in (highdicom.base, highdicom.base_content, highdicom.sc.sop):
        monkeypatch.setattr(module, "datetime", fake)
    monkeypatch.setattr(sc, "now", lambda: FROZEN)


def _variants() -> list[tuple[str, Dataset, Findings]]:
    """(name, source, findings) of every case the equivalence must hold for."""
    found = []

    def add(name: str, source: Dataset, image: np.ndarray, mask: np.ndarray, **kw: object) -> None:
        found.append((name, source, findings_on(image, mask, **kw)))

    ds, image, mask = phantom_source()  # DX, MONOCHROME1
    add("DX MONOCHROME1, similar cases", ds, image, mask, similar=CASES)
    add("negative", ds, image, mask, probability=0.2)
    add("not analysed", ds, image, mask, analysed=False)
    add("empty lung mask", ds, image, np.zeros_like(mask))
    add("lungs touch the edges", ds, image, np.ones_like(mask))
    add("CR MONOCHROME2", *phantom_source(SOPClassUID=CR, Modality="CR", PhotometricInterpretation="MONOCHROME2"))
    add("DX MONOCHROME2", *phantom_source(PhotometricInterpretation="MONOCHROME2"))
    add("orientation P\\F", *phantom_source(PatientOrientation=["P", "F"]))
    add("orientation A\\R", *phantom_source(PatientOrientation=["A", "R"]))
    add("no orientation", *phantom_source(PatientOrientation=None))
    add("orientation half empty", *phantom_source(PatientOrientation=["", "F"]))
    add("orientation of three values", *phantom_source(PatientOrientation=["P", "F", "L"]))
    add("acquisition equipment", *phantom_source(**EQUIPMENT))
    add("acquisition date and time", *phantom_source(Manufacturer="ACME", AcquisitionDateTime="20200301101010"))
    add("no manufacturer", *phantom_source(Manufacturer=None))
    add("empty manufacturer", *phantom_source(Manufacturer=""))
    add("no body part", *phantom_source(BodyPartExamined=None))
    add("utf-8 name", *phantom_source(name="Müller^Jürgen"))
    add("latin-1", *phantom_source(name="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100"))
    add("greek", *phantom_source(SpecificCharacterSet="ISO_IR 126"))
    add("multi-valued charset", *phantom_source(SpecificCharacterSet=["ISO 2022 IR 6", "ISO 2022 IR 87"]))
    add("one-component name", *phantom_source(name="Bono"))
    messy = {
        "StudyDate": "2020.03.01", "StudyTime": "12:30:05", "AccessionNumber": "A" * 20, "BodyPartExamined": "chest",
        "PatientSex": "female", "PatientName": "Doe^Jane^^^^^", "PatientBirthDate": "1940-03-05",
        "Manufacturer": "M" * 70,
    }  # fmt: skip
    add("repaired values", *phantom_source(**messy))
    empties = dict.fromkeys(
        ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
         "PatientSex", "PatientBirthDate", "BodyPartExamined"),
    )  # fmt: skip
    add("type 2 values missing", *phantom_source(**empties))
    issuers = {
        "IssuerOfPatientID": "HOSPITAL A",
        "OtherPatientIDsSequence": DicomSequence([Dataset()]),
        "PatientAge": "080Y", "StudyDescription": "CHEST PA", "ReferringPhysicianName": "Who^Doctor",
    }  # fmt: skip
    add("more patient and study values", *phantom_source(**issuers))
    for mode in ("supervised", "shadow"):
        for name, source, findings in found[:3]:
            marked = dataclasses.replace(findings, provenance=dataclasses.replace(PROVENANCE, mode=mode))
            found.append((f"{name}, {mode} mode", source, marked))
    return found


VARIANTS = _variants()


def _build_both(source: Dataset, findings: Findings, options: OutputOptions) -> tuple[Dataset, Dataset]:
    """The overlay through the node's output path with the direct builder, then with highdicom's."""
    fast = outputs.build_dataset(source, findings, options, "sc")
    reference = outputs.build_dataset(source, findings, options, "sc", builder=build_sc_reference)
    return fast, reference


def _assert_equal(fast: Dataset, reference: Dataset, name: str) -> None:
    assert differences(fast, reference) == [], name
    assert differences(fast.file_meta, reference.file_meta) == [], name
    written = encode(fast)
    assert written == encode_reference(reference), name
    assert written == encode(reference), name


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "source", "findings"), VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("institution", ["", "St Elsewhere"])
def test_the_direct_sc_equals_highdicoms(name: str, source: Dataset, findings: Findings, institution: str) -> None:
    """Element for element (tags, VRs, values, items, file meta) and byte for byte, the SC equals highdicom's."""
    fast, reference = _build_both(source, findings, OutputOptions(institution_name=institution))
    _assert_equal(fast, reference, name)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_direct_sc_of_a_real_cr_equals_highdicoms(chest_cr: Path) -> None:
    """On the header of a real CR (RG1, MONOCHROME1, with its acquisition equipment) and an overlay of the size the
    worker draws (1024 rows, the source's aspect), the two builders agree byte for byte."""
    header = dcmread(chest_cr, stop_before_pixels=True)
    rows, cols = int(header.Rows), int(header.Columns)
    shape = (1024, round(1024 * cols / rows))
    rng = np.random.default_rng(5)
    mask = np.zeros(shape, bool)
    mask[200:800, 100:450] = mask[200:800, 520:880] = True
    image = rng.random(shape, dtype=np.float32)
    findings = findings_on(image, mask, similar=CASES)
    findings = dataclasses.replace(findings, summary=dataclasses.replace(findings.summary, source_shape=(rows, cols)))
    fast, reference = _build_both(header, findings, OutputOptions(institution_name="St Elsewhere"))
    _assert_equal(fast, reference, "RG1")
    assert fast.Rows > shape[0] and fast.Columns == shape[1]  # the banner is appended below the image
    assert fast.ContributingEquipmentSequence[0].Manufacturer == header.Manufacturer  # the acquisition entry


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_repeated_builds_do_not_share_items() -> None:
    """Contributing equipment items are built once per model and site, but each overlay gets its own copies."""
    source, image, mask = phantom_source(**EQUIPMENT)
    findings = findings_on(image, mask)
    first = outputs.build_dataset(source, findings, OutputOptions(), "sc")
    first.ContributingEquipmentSequence[1].Manufacturer = "changed"
    first.ContributingEquipmentSequence[-1].ContributionDescription = "changed"
    second, reference = _build_both(source, findings, OutputOptions())
    _assert_equal(second, reference, "after a change to an earlier overlay")


@pytest.mark.parametrize(
    ("changes", "options"),
    [
        ({}, {"series_numbers": {"sr": 9901, "sc": 0, "seg": 9903, "pr": 9904}}),  # series numbers start at 1
    ],
)
def test_both_builders_refuse_the_same_sources(changes: dict[str, object], options: dict[str, object]) -> None:
    """Where highdicom refuses a source or an option, the direct builder refuses it too."""
    source, image, mask = phantom_source(**changes)
    findings = findings_on(image, mask)
    chosen = OutputOptions(**options)  # type: ignore[arg-type]
    with pytest.raises(OutputError):
        outputs.build_dataset(source, findings, chosen, "sc")
    with pytest.raises(OutputError):
        outputs.build_dataset(source, findings, chosen, "sc", builder=build_sc_reference)


def test_both_builders_refuse_findings_without_an_image() -> None:
    """An overlay needs the decoded image: neither builder draws one without it."""
    source, image, mask = phantom_source()
    findings = dataclasses.replace(findings_on(image, mask, analysed=False), image=None)
    for builder in (sc.build_sc, build_sc_reference):
        with pytest.raises(OutputError, match="decoded image"):
            outputs.build_dataset(source, findings, OutputOptions(), "sc", builder=builder)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_direct_sc_passes_dciodvfy(tmp_path: Path, chest_cr: Path) -> None:
    """The overlay written from a real CR header, as the node encodes it, has no dciodvfy errors."""
    tool = require_tool("dciodvfy")
    header = dcmread(chest_cr, stop_before_pixels=True)
    image = make_phantom(3, 1, 256).image.astype(np.float32)
    findings = findings_on(image, make_phantom(3, 1, 256).lung_mask.astype(bool), similar=CASES)
    path = tmp_path / "sc.dcm"
    path.write_bytes(encode(outputs.build_dataset(header, findings, OutputOptions(), "sc")))
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_the_registry_builds_the_sc_directly() -> None:
    """The SC kind uses the direct builder (the reference builder is for these tests only)."""
    name: Kind = "sc"
    assert kinds.kind(name).build is sc.build_sc
