"""The structured report the node writes equals, element by element, the one highdicom builds from the same inputs.

:func:`cxr_node.results.sr.build_sr` assembles the content tree and the document directly for speed;
:func:`cxr_node.results.sr_reference.build_sr_reference` builds them with highdicom's templates and
``ComprehensiveSR``. Both run with one frozen clock, through the same output path (checked source values,
private block), on analysed and not-analysed findings, with and without similar cases, repaired values,
unknown or invalid spacing, an image library, other character sets and a real CR header.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
from pathlib import Path

import highdicom.base
import highdicom.base_content
import highdicom.sr.sop
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from cxr_node.results import kinds, outputs, sr_document
from cxr_node.results.common import Kind, OutputError, OutputOptions, encode, encode_reference
from cxr_node.results.findings import Findings, MaskVerdict, SimilarCase, Summary
from cxr_node.results.sr_reference import build_sr_reference
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset
from tests.dicom import test_results
from tests.dicom.test_results import PROVENANCE

FROZEN = datetime.datetime(2026, 12, 3, 11, 22, 33, 456789)
CASES = (
    *test_results.CASES,
    SimilarCase(3, 0.61, "C0000041", "non-covid", "1.2.3", None, "ACC9", "2020"),
    SimilarCase(4, -0.25, "C0000042", None, "1.2.3.9", "1.2.3.9.1", None, "20191231"),
    SimilarCase(5, 1.0, "C0000043", "covid", None, "1.2.3.10", "A" * 16, None),
)
BAD_CASES = (
    SimilarCase(1, 0.9, "C0000001", "covid", "1.2.3", "1.2.3.abc", "ACC1", "20200301"),
    SimilarCase(2, 0.7, "C0000003", None, "1.2.3", "1.2.3.5", "A" * 17, "20200301"),
    SimilarCase(3, 0.5, "C0000005", "non-covid"),
)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both builders read the same instant: highdicom's clocks and the direct builder's."""

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Frozen:
            return cls.fromtimestamp(FROZEN.timestamp())

    fake = types.SimpleNamespace(datetime=Frozen, date=datetime.date, time=datetime.time, timedelta=datetime.timedelta)
    for module in (highdicom.base, highdicom.base_content, highdicom.sr.sop):
        monkeypatch.setattr(module, "datetime", fake)
    monkeypatch.setattr(sr_document, "now", lambda: FROZEN)


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def phantom_source(name: str = "Doe^Jane", **changes: object) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """A phantom chest image header (with ``changes``; None deletes), its image and lung mask."""
    phantom = make_phantom(5, 1, 256)
    ds = phantom_to_dataset(phantom, patient_id="P9", patient_name=name, photometric="MONOCHROME1")
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds, phantom.image.astype(np.float32), phantom.lung_mask.astype(bool)


def findings_on(
    image: np.ndarray, mask: np.ndarray, *, analysed: bool = True, similar: tuple[SimilarCase, ...] = (), **kw: object
) -> Findings:
    """Analysed (or not analysed) findings with ``similar`` cases on an image and its mask."""
    rows, cols = image.shape
    values: dict[str, object] = {"similar": similar}
    if analysed:
        values |= {
            "probability": 0.8123456,
            "threshold": 0.5,
            "members": (("mobilenet", 0.7), ("shufflenet", 0.92)),
            "lung_mask": MaskVerdict(True, "plausible", 0.3, 2),
        }
    else:
        values |= {
            "reason": "lung mask implausible: 1 component",
            "lung_mask": MaskVerdict(False, "implausible", 0.1, 1),
        }
    values |= kw
    summary = Summary(PROVENANCE.model_name, PROVENANCE.model_version, analysed, (rows, cols), **values)  # type: ignore[arg-type]
    heat = np.clip(image, 0, 1) if analysed else None
    return Findings(PROVENANCE, summary, image=image, lung_mask=mask if analysed else None, heatmap=heat)


def _variants() -> list[tuple[str, Dataset, Findings]]:
    """(name, source, findings) of every case the equivalence must hold for."""
    found = []

    def add(name: str, source: Dataset, image: np.ndarray, mask: np.ndarray, **kw: object) -> None:
        found.append((name, source, findings_on(image, mask, **kw)))

    ds, image, mask = phantom_source()
    add("analysed, similar cases", ds, image, mask, similar=CASES)
    add("analysed, no similar case", ds, image, mask)
    add("negative", ds, image, mask, probability=0.2)
    add("not analysed", ds, image, mask, analysed=False, similar=CASES[:2])
    add("not analysed, mask plausible", ds, image, mask, analysed=False, lung_mask=MaskVerdict(True, "ok", 0.3, 2))
    add("not analysed, no mask verdict", ds, image, mask, analysed=False, lung_mask=None)
    add("similar cases left out", ds, image, mask, similar=BAD_CASES)
    add("no members", ds, image, mask, members=())
    add("empty lung mask", ds, image, np.zeros_like(mask))
    add("utf-8 name", *phantom_source(name="Müller^Jürgen"), similar=CASES)
    add("latin-1", *phantom_source(name="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100"), similar=CASES)
    add("latin-1, ascii", *phantom_source(SpecificCharacterSet="ISO_IR 100"))
    add("greek", *phantom_source(SpecificCharacterSet="ISO_IR 126"))
    add("multi-valued charset", *phantom_source(SpecificCharacterSet=["ISO 2022 IR 6", "ISO 2022 IR 87"]))
    messy = {
        "StudyDate": "2020.03.01", "StudyTime": "12:30:05", "AccessionNumber": "A" * 20, "BodyPartExamined": "chest",
        "PatientSex": "female", "PatientName": "Doe^Jane^^^^^", "PatientBirthDate": "1940-03-05",
    }  # fmt: skip
    add("repaired values", *phantom_source(**messy), similar=BAD_CASES)
    add("spacing 0\\0", *phantom_source(PixelSpacing=[0, 0], ImagerPixelSpacing=[0, 0]))
    add("spacing unknown", *phantom_source(PixelSpacing=None, ImagerPixelSpacing=None))
    add("image library", *phantom_source(PatientOrientation=["P", "F"], ImagerPixelSpacing=[0.2, 0.2]), similar=CASES)
    add("no orientation", *phantom_source(PatientOrientation=None))
    equipment = {
        "Manufacturer": "ACME", "ManufacturerModelName": "X1", "SoftwareVersions": ["1", "2"],
        "DeviceSerialNumber": "SN1", "InstitutionName": "Hosp", "InstitutionalDepartmentName": "Rad",
        "StationName": "ST1",
        "AcquisitionDate": "20200301", "AcquisitionTime": "101010",
    }  # fmt: skip
    add("acquisition equipment", *phantom_source(**equipment))
    issuers = {
        "IssuerOfPatientID": "HOSPITAL A",
        "IssuerOfPatientIDQualifiersSequence": DicomSequence(
            [_item(UniversalEntityID="1.2.3.9", UniversalEntityIDType="ISO")]
        ),
        "OtherPatientIDsSequence": DicomSequence(
            [_item(PatientID="X77", IssuerOfPatientID="HOSPITAL B"), _item(PatientID="X" * 70, IssuerOfPatientID="C")]
        ),
        "IssuerOfAccessionNumberSequence": DicomSequence([_item(LocalNamespaceEntityID="RIS A")]),
        "PatientAge": "080Y", "StudyDescription": "CHEST PA", "ReferringPhysicianName": "Who^Doctor",
        "ClinicalTrialSponsorName": "Sp", "ClinicalTrialProtocolID": "P1", "ClinicalTrialSubjectID": "S9",
    }  # fmt: skip
    add("issuers and trials", *phantom_source(**issuers), similar=CASES[:1])
    empties = dict.fromkeys(
        ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
         "PatientSex", "PatientBirthDate", "BodyPartExamined"),
    )  # fmt: skip
    add("type 2 values missing", *phantom_source(**empties))
    add(
        "CR, MONOCHROME2",
        *phantom_source(SOPClassUID="1.2.840.10008.5.1.4.1.1.1", PhotometricInterpretation="MONOCHROME2"),
    )
    for mode in ("supervised", "shadow"):  # go-live modes: the impression and a TEXT item say so
        for name, source, findings in found[:4]:
            marked = dataclasses.replace(findings, provenance=dataclasses.replace(PROVENANCE, mode=mode))
            found.append((f"{name}, {mode} mode", source, marked))
    return found


VARIANTS = _variants()


def _build_both(source: Dataset, findings: Findings, options: OutputOptions) -> tuple[Dataset, Dataset]:
    """The SR through the node's output path with the direct builder, then with highdicom's."""
    fast = outputs.build_dataset(source, findings, options, "sr")
    reference = outputs.build_dataset(source, findings, options, "sr", builder=build_sr_reference)
    return fast, reference


def differences(fast: Dataset, reference: Dataset, path: str = "") -> list[str]:
    """Every element that differs in presence, VR or value, and every sequence whose items differ in number or
    order, recursively; empty when the data sets are equal."""
    found = []
    if sorted(fast.keys()) != sorted(reference.keys()):  # a data set is written in tag order
        found.append(f"{path or 'root'}: tags {sorted(set(fast.keys()) ^ set(reference.keys()))} differ")
    for tag in sorted(set(fast.keys()) & set(reference.keys())):
        a, b = fast[tag], reference[tag]
        where = f"{path}/{a.keyword or tag}"
        if a.VR != b.VR:
            found.append(f"{where}: VR {a.VR} != {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{where}: {len(a.value)} != {len(b.value)} items")
            for index, (x, y) in enumerate(zip(a.value, b.value, strict=False)):
                found += differences(x, y, f"{where}[{index}]")
        elif a.value != b.value:
            found.append(f"{where}: {a.value!r} != {b.value!r}")
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "source", "findings"), VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("institution", ["", "St Elsewhere"])
def test_the_direct_sr_equals_highdicoms(name: str, source: Dataset, findings: Findings, institution: str) -> None:
    """Element for element (tags, order, VRs, values, items) and byte for byte, the SR equals highdicom's; the
    node's writer (values validated as they are written) gives the bytes ``dcmwrite`` gives for highdicom's SR."""
    fast, reference = _build_both(source, findings, OutputOptions(institution_name=institution))
    assert differences(fast, reference) == [], name
    assert differences(fast.file_meta, reference.file_meta) == [], name
    assert encode_reference(fast) == encode_reference(reference), name
    assert encode(fast) == encode_reference(reference), name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_direct_sr_of_a_real_cr_equals_highdicoms(chest_cr: Path) -> None:
    """On the header of a real CR (RG1) at the analysed size, with five similar cases, the two builders agree."""
    header = dcmread(chest_cr, stop_before_pixels=True)
    rows, cols = int(header.Rows), int(header.Columns)
    small = make_phantom(3, 1, 256).lung_mask.astype(bool)
    image = np.zeros((256, 256), np.float32)
    findings = findings_on(image, small, similar=CASES)
    findings = dataclasses.replace(findings, summary=dataclasses.replace(findings.summary, source_shape=(rows, cols)))
    fast, reference = _build_both(header, findings, OutputOptions())
    assert differences(fast, reference) == []
    assert encode_reference(fast) == encode_reference(reference)


@pytest.mark.parametrize(
    ("changes", "analysed"),
    [
        ({"Modality": "SR"}, True),  # not an image a region can be drawn on
        ({"Rows": None, "Columns": None, "SamplesPerPixel": None, "PixelRepresentation": None}, True),
    ],
)
def test_both_builders_refuse_the_same_sources(changes: dict[str, object], analysed: bool) -> None:
    """Where highdicom refuses a source, the direct builder refuses it too."""
    source, image, mask = phantom_source(**changes)
    findings = findings_on(image, mask, analysed=analysed)
    with pytest.raises(OutputError):
        outputs.build_dataset(source, findings, OutputOptions(), "sr")
    with pytest.raises(OutputError):
        outputs.build_dataset(source, findings, OutputOptions(), "sr", builder=build_sr_reference)


def test_the_registry_builds_the_sr_directly() -> None:
    """The SR kind uses the direct builder (the reference builder is for this test only)."""
    name: Kind = "sr"
    assert kinds.kind(name).build.__name__ == "build_sr"
