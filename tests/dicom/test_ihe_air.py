"""The outputs meet the IHE AI Results table of docs/ihe-air.md, row by row.

Each row of the table (between ``<!-- checked: air -->`` and ``<!-- end: air -->``) has a check here, and each
check a row. The checks run on outputs built through the node's own output path with the demo manifest's
algorithms: the SR of an analysed phantom with similar cases, the SR of an image not analysed, the SR of a real
CR header (WG04 RG1: no Imager Pixel Spacing, Pixel Spacing 0\\0), and the SC and SEG of the analysed phantom.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from cxr_node.app import algorithms
from cxr_node.dicom import codes
from cxr_node.infer.registry import load_manifest
from cxr_node.results.common import OutputOptions
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, Summary
from cxr_node.results.outputs import build_dataset
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset

REPO: Final = Path(__file__).resolve().parents[2]
DOC: Final = REPO / "docs" / "ihe-air.md"
MANIFEST = load_manifest(REPO / "models" / "demo" / "manifest.yaml")
MEMBERS = tuple(member.name for member in MANIFEST.classifier.members)
PROVENANCE = Provenance(
    MANIFEST.name, MANIFEST.version, MANIFEST.intended_use, MEMBERS, "0.1.0", "2.25.42", algorithms=algorithms(MANIFEST)
)
CASES = (
    SimilarCase(1, 0.93, "C0000012", "covid", "1.2.3", "1.2.3.4", "ACC123", "20200301"),
    SimilarCase(2, 0.88, "C0000040"),
)
PROCESSING_ALGORITHM = ("Newcode1", "99IHE", "Processing Algorithm")


@dataclasses.dataclass(frozen=True)
class Made:
    """A source and the outputs built from it."""

    source: Dataset
    sr: Dataset
    others: dict[str, Dataset]


def _findings(source: Dataset, image: np.ndarray, mask: np.ndarray, analysed: bool) -> Findings:
    rows, cols = int(source.Rows), int(source.Columns)
    if analysed:
        members = tuple((name, 0.6 + 0.1 * i) for i, name in enumerate(MEMBERS))
        summary = Summary(
            MANIFEST.name, MANIFEST.version, True, (rows, cols), probability=0.7, threshold=0.5, members=members,
            lung_mask=MaskVerdict(True, "plausible", 0.3, 2), similar=CASES,
        )  # fmt: skip
        heat = np.clip(image, 0, 1)
        return Findings(PROVENANCE, summary, image=image, lung_mask=mask, heatmap=heat)
    summary = Summary(
        MANIFEST.name, MANIFEST.version, False, (rows, cols), reason="lung mask implausible: 1 component",
        lung_mask=MaskVerdict(False, "implausible", 0.1, 1),
    )  # fmt: skip
    return Findings(PROVENANCE, summary, image=image)


def _made(source: Dataset, image: np.ndarray, mask: np.ndarray, analysed: bool, kinds: tuple[str, ...]) -> Made:
    findings = _findings(source, image, mask, analysed)
    options = OutputOptions()
    built = {kind: build_dataset(source, findings, options, kind) for kind in ("sr", *kinds)}  # type: ignore[arg-type]
    return Made(source, built.pop("sr"), built)


@pytest.fixture(scope="module")
def outputs(chest_cr: Path) -> dict[str, Made]:
    """The analysed phantom (SR, SC, SEG), the phantom not analysed (SR), and a real CR header (SR)."""
    phantom = make_phantom(5, 1, 256)
    source = phantom_to_dataset(phantom, patient_id="P9", patient_name="Doe^Jane", photometric="MONOCHROME1")
    image, mask = phantom.image.astype(np.float32), phantom.lung_mask.astype(bool)
    real = dcmread(chest_cr, stop_before_pixels=True)
    small = np.zeros((256, 256), bool)
    small[40:200, 30:110] = small[40:200, 146:226] = True
    return {
        "analysed": _made(source, image, mask, True, ("sc", "seg")),
        "not analysed": _made(source, image, mask, False, ()),
        "real CR": _made(real, np.zeros((256, 256), np.float32), small, True, ()),
    }


def _rows() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- checked: air -->\n(.*?)<!-- end: air -->", text, re.S)
    assert block, "docs/ihe-air.md has no checked 'air' table"
    lines = [line for line in block.group(1).splitlines() if line.startswith("| AIR-")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _name(item: Dataset) -> tuple[str, str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.get("CodeValue", "")), str(code.CodingSchemeDesignator), str(code.CodeMeaning)


def _value(item: Dataset) -> tuple[str, str, str]:
    code = item.ConceptCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)


def _named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [item for item in _items(ds) if _name(item)[2] == meaning]


def _groups(sr: Dataset) -> list[Dataset]:
    return _named(sr, "Measurement Group")


def _children(item: Dataset, meaning: str) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", []) if _name(child)[2] == meaning]


def _algorithm_of(item: Dataset) -> tuple[str, str]:
    return (_children(item, "Algorithm Name")[0].TextValue, _children(item, "Algorithm Version")[0].TextValue)


def _every_sr(outputs: dict[str, Made]) -> Iterator[tuple[str, Made]]:
    yield from outputs.items()


def air_1(outputs: dict[str, Made]) -> None:
    for name, made in _every_sr(outputs):
        for output in (made.sr, *made.others.values()):
            assert output.StudyInstanceUID == made.source.StudyInstanceUID, name
            assert output.PatientID == made.source.PatientID, name


def air_2(outputs: dict[str, Made]) -> None:
    made = outputs["analysed"]
    series = {made.sr.SeriesInstanceUID, *(o.SeriesInstanceUID for o in made.others.values())}
    assert len(series) == 1 + len(made.others)
    assert made.source.SeriesInstanceUID not in series
    assert all(o.SeriesDescription.startswith("AI") for o in (made.sr, *made.others.values()))


def _algorithm_items(output: Dataset) -> list[Dataset]:
    return [
        item
        for item in output.ContributingEquipmentSequence
        if tuple(str(v) for v in _code(item.PurposeOfReferenceCodeSequence[0])) == PROCESSING_ALGORITHM
    ]


def _code(code: Dataset) -> tuple[str, str, str]:
    return str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)


def air_3(outputs: dict[str, Made]) -> None:
    expected = {(a.name, a.version, a.device_uid) for a in PROVENANCE.algorithms}
    assert len(expected) == 1 + len(MEMBERS) + 1  # the ensemble, each classifier, the U-Net
    for name, made in _every_sr(outputs):
        found = _algorithm_items(made.sr)
        assert {(i.ManufacturerModelName, i.SoftwareVersions, i.DeviceUID) for i in found} == expected, name
        assert all(i.Manufacturer for i in found), name
        node = [i for i in made.sr.ContributingEquipmentSequence if i.get("DeviceUID") == PROVENANCE.device_uid]
        assert _code(node[0].PurposeOfReferenceCodeSequence[0]) == ("109102", "DCM", "Processing Equipment")


def air_4(outputs: dict[str, Made]) -> None:
    again = algorithms(MANIFEST)
    assert again == PROVENANCE.algorithms  # the same weights give the same UIDs
    member = MANIFEST.classifier.members[0]
    retrained = MANIFEST.model_copy(
        update={
            "classifier": MANIFEST.classifier.model_copy(
                update={"members": [member.model_copy(update={"sha256": "0" * 64}), *MANIFEST.classifier.members[1:]]}
            )
        }
    )
    changed = {a.name: a.device_uid for a in algorithms(retrained)}
    before = {a.name: a.device_uid for a in PROVENANCE.algorithms}
    assert changed[MANIFEST.name] != before[MANIFEST.name]  # the ensemble runs the retrained weights
    assert changed[member.name] != before[member.name]
    assert all(changed[n] == before[n] for n in before if n not in (MANIFEST.name, member.name))
    assert len(set(before.values())) == len(before)


def air_5(outputs: dict[str, Made]) -> None:
    for name, made in _every_sr(outputs):
        assert made.sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33", name
        assert _code(made.sr.ConceptNameCodeSequence[0]) == ("126000", "DCM", "Imaging Measurement Report")
        assert made.sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def air_6(outputs: dict[str, Made]) -> None:
    for name, made in _every_sr(outputs):
        (procedure,) = _named(made.sr, "Procedure reported")
        plain = codes.PLAIN_CHEST_XRAY
        assert _value(procedure) == (plain.value, plain.scheme_designator, plain.meaning), name


def air_7(outputs: dict[str, Made]) -> None:
    for name, made in _every_sr(outputs):
        (observer,) = _named(made.sr, "Observer Type")
        assert _value(observer) == ("121007", "DCM", "Device"), name
        observer_uid = _named(made.sr, "Device Observer UID")[0].UID
        assert observer_uid == PROVENANCE.ensemble.device_uid, name
        assert _named(made.sr, "Device Observer Model Name")[0].TextValue == MANIFEST.name
        assert _named(made.sr, "Device Observer Manufacturer")[0].TextValue


def air_8(outputs: dict[str, Made]) -> None:
    for name, made in _every_sr(outputs):
        (library,) = _named(made.sr, "Image Library")
        images = [item for item in _items(library) if item.ValueType == "IMAGE"]
        assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [made.source.SOPInstanceUID]
        (evidence,) = made.sr.CurrentRequestedProcedureEvidenceSequence
        instance = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert instance.ReferencedSOPInstanceUID == made.source.SOPInstanceUID, name
    real = _named(outputs["real CR"].sr, "Image Library")[0]
    descriptors = {_name(i)[2] for i in _items(real)}
    assert "Patient Orientation Row" in descriptors  # RG1 has one, but no Imager Pixel Spacing (and 0\\0 spacing)
    assert not {"Horizontal Pixel Spacing", "Vertical Pixel Spacing"} & descriptors


def air_9(outputs: dict[str, Made]) -> None:
    uids: list[str] = []
    for name, made in _every_sr(outputs):
        groups = _groups(made.sr)
        assert groups, name
        for group in groups:
            assert _children(group, "Tracking Identifier")[0].TextValue, name
            uids.append(_children(group, "Tracking Unique Identifier")[0].UID)
    assert len(uids) == len(set(uids))
    again = build_dataset(
        outputs["analysed"].source,
        _findings(outputs["analysed"].source, *_phantom_arrays(), True),
        OutputOptions(),
        "sr",
    )
    assert [_children(g, "Tracking Unique Identifier")[0].UID for g in _groups(again)] == [
        _children(g, "Tracking Unique Identifier")[0].UID for g in _groups(outputs["analysed"].sr)
    ]


def _phantom_arrays() -> tuple[np.ndarray, np.ndarray]:
    phantom = make_phantom(5, 1, 256)
    return phantom.image.astype(np.float32), phantom.lung_mask.astype(bool)


def _finding_group(sr: Dataset) -> Dataset:
    return next(g for g in _groups(sr) if _children(g, "Finding"))


def air_10(outputs: dict[str, Made]) -> None:
    for name in ("analysed", "real CR"):
        group = _finding_group(outputs[name].sr)
        assert _value(_children(group, "Finding")[0]) == ("840539006", "SCT", "COVID-19")
        assert _value(_children(group, "Finding Site")[0]) == ("39607008", "SCT", "Lung structure")


def air_11(outputs: dict[str, Made]) -> None:
    group = _finding_group(outputs["analysed"].sr)
    (evaluation,) = _children(group, "COVID-19")
    assert evaluation.ValueType == "CODE" and _value(evaluation) == ("52101004", "SCT", "Present")
    (summary,) = _named(outputs["analysed"].sr, "CAD Processing and Findings Summary")
    assert _value(summary)[0] == "111242"


def air_12(outputs: dict[str, Made]) -> None:
    group = _finding_group(outputs["analysed"].sr)
    probabilities = [i for i in _children(group, "Probability") if i.ValueType == "NUM"]
    units = {_code(p.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]) for p in probabilities}
    assert units == {("{probability}", "UCUM", "probability")}
    expected = [(MANIFEST.name, MANIFEST.version), *((m.name, m.version) for m in MANIFEST.classifier.members)]
    assert [_algorithm_of(p) for p in probabilities] == expected


def air_13(outputs: dict[str, Made]) -> None:
    for name in ("analysed", "real CR"):
        made = outputs[name]
        (region,) = _children(_finding_group(made.sr), "Image Region")
        assert region.ValueType == "SCOORD" and region.GraphicType == "POLYLINE"
        (selected,) = region.ContentSequence
        assert selected.RelationshipType == "SELECTED FROM"
        assert selected.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == made.source.SOPInstanceUID


def air_14(outputs: dict[str, Made]) -> None:
    sr = outputs["not analysed"].sr
    summaries = _named(sr, "CAD Processing and Findings Summary")  # the group's and the report's
    assert {_value(s) for s in summaries} == {("111245", "DCM", "No algorithms succeeded; without findings")}
    assert "lung mask implausible" in _named(sr, "Reason not analysed")[0].TextValue


def air_15(outputs: dict[str, Made]) -> None:
    made = outputs["analysed"]

    def identified(output: Dataset) -> set[tuple[str, str, str]]:
        return {(i.ManufacturerModelName, i.SoftwareVersions, i.DeviceUID) for i in _algorithm_items(output)}

    assert set(made.others) == {"sc", "seg"}
    for kind, output in made.others.items():
        assert identified(output) == identified(made.sr), kind


def air_16(outputs: dict[str, Made]) -> None:
    segment = outputs["analysed"].others["seg"].SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    unet = MANIFEST.segmentation
    assert segment.SegmentAlgorithmName == unet.name
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (unet.name, unet.version)
    assert _code(algorithm.AlgorithmFamilyCodeSequence[0])[0] == "123110"


def air_17(outputs: dict[str, Made]) -> None:
    for name, made in _every_sr(outputs):
        assert (made.sr.VerificationFlag, made.sr.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY"), name
    assert outputs["analysed"].others["sc"].BurnedInAnnotation == "YES"


CHECKS: Final[dict[str, Callable[[dict[str, Made]], None]]] = {
    f"AIR-{n}": check
    for n, check in enumerate(
        (air_1, air_2, air_3, air_4, air_5, air_6, air_7, air_8, air_9, air_10, air_11, air_12, air_13, air_14,
         air_15, air_16, air_17),
        start=1,
    )
}  # fmt: skip


def test_every_row_has_a_check_and_every_check_a_row() -> None:
    rows = _rows()
    assert [row[0] for row in rows] == list(CHECKS)
    assert all(len(row) == 3 and row[1] and row[2] for row in rows)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("requirement", list(CHECKS))
def test_the_outputs_meet_the_air_table(requirement: str, outputs: dict[str, Made]) -> None:
    CHECKS[requirement](outputs)
