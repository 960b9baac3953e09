"""The output builders on synthetic findings: deterministic UIDs, the SR's content, character sets, validation."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from cxr_node.config import ResultsSettings
from cxr_node.dicom.uids import derived_uid, output_uid
from cxr_node.results.common import OutputError, OutputOptions, encode
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, Summary
from cxr_node.results.kinds import kinds_for
from cxr_node.results.outputs import build_dataset, build_outputs
from cxr_node.results.sr import impression
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset

PROVENANCE = Provenance(
    "cxr-demo",
    "1.0.0",
    "demo: synthetic training data, not for clinical use",
    ("mobilenet", "shufflenet"),
    "0.1.0",
    "2.25.42",
)
CASES = (
    SimilarCase(1, 0.93, "C0000012", "covid", "1.2.3", "1.2.3.4", "ACC123", "20200301"),
    SimilarCase(2, 0.88, "C0000040", None, None, None, None, None),
)


def source_and_findings(name: str = "Doe^Jane", **changes: object) -> tuple[Dataset, Findings]:
    """A phantom source header and analysed findings on it."""
    phantom = make_phantom(5, 1, 256)
    source = phantom_to_dataset(phantom, patient_id="P9", patient_name=name, photometric="MONOCHROME1")
    arrays: dict[str, object] = {
        "image": phantom.image.astype(np.float32),
        "lung_mask": phantom.lung_mask.astype(bool),
        "heatmap": np.zeros((256, 256), np.float32),
    }
    values: dict[str, object] = {
        "probability": 0.81,
        "threshold": 0.5,
        "members": (("mobilenet", 0.7), ("shufflenet", 0.92)),
        "lung_mask": MaskVerdict(True, "plausible", 0.3, 2),
        "similar": CASES,
    }
    for key, value in changes.items():
        (arrays if key in arrays else values)[key] = value
    summary = Summary(PROVENANCE.model_name, PROVENANCE.model_version, True, (256, 256), **values)  # type: ignore[arg-type]
    return source, Findings(PROVENANCE, summary, **arrays)  # type: ignore[arg-type]


def items(ds: Dataset) -> list[Dataset]:
    """Every content item of an SR, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found += [item, *items(item)]
    return found


def test_uids_are_deterministic_and_distinct_per_kind() -> None:
    """The same source, version and kind give the same UID; any change gives another."""
    assert output_uid("1.2.3", "1.0", "sr", "instance") == output_uid("1.2.3", "1.0", "sr", "instance")
    uids = {output_uid("1.2.3", v, k, p) for v in ("1.0", "1.1") for k in ("sr", "sc") for p in ("series", "instance")}
    assert len(uids) == 8
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in uids)
    with pytest.raises(ValueError, match="parts"):
        derived_uid("")


def test_rebuilding_gives_byte_identical_uids() -> None:
    """Building every output twice gives the same SOP and Series Instance UIDs (idempotent re-sends)."""
    source, findings = source_and_findings()
    first = build_outputs(source, findings, OutputOptions(), ("sr", "sc", "seg", "pr"))
    second = build_outputs(source, findings, OutputOptions(), ("sr", "sc", "seg", "pr"))
    assert [b.sop_instance_uid for b in first] == [b.sop_instance_uid for b in second]
    assert len({b.sop_instance_uid for b in first}) == 4


def test_sr_holds_probabilities_threshold_neighbours_and_intended_use() -> None:
    """The SR names the ensemble and member probabilities, the operating point, the decision, the neighbours
    (with the identifiers given) and the intended-use text, and references the source image."""
    source, findings = source_and_findings()
    sr = build_dataset(source, findings, OutputOptions(), "sr")
    content = items(sr)
    numbers = [
        (i.ConceptNameCodeSequence[0].CodeMeaning, float(i.MeasuredValueSequence[0].NumericValue))
        for i in content
        if i.ValueType == "NUM"
    ]
    assert ("Probability", 0.81) in numbers and ("Probability", 0.92) in numbers
    assert ("CAD Operating Point", 0.5) in numbers and ("Embedding similarity", 0.93) in numbers
    texts = [i.TextValue for i in content if i.ValueType == "TEXT"]
    assert any(t.startswith("Similar case 1: ACC123, 2020-03-01, confirmed covid") for t in texts)
    assert "Similar case 2: C0000040" in texts
    assert PROVENANCE.intended_use in texts and impression(findings) in texts
    assert {i.UID for i in content if i.ValueType == "UIDREF"} >= {"1.2.3", "1.2.3.4"}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    region = next(i for i in content if i.ValueType == "SCOORD")
    assert region.GraphicType == "POLYLINE" and len(region.GraphicData) >= 8


def test_not_analysed_findings_get_a_short_sr_and_an_overlay() -> None:
    """An image that was not analysed gets the SR (and the overlay when there is an image), saying why."""
    source, analysed = source_and_findings()
    summary = Summary(
        PROVENANCE.model_name,
        PROVENANCE.model_version,
        False,
        (256, 256),
        reason="lung mask implausible: 1 component",
        lung_mask=MaskVerdict(False, "1 component", 0.2, 1),
    )
    findings = Findings(PROVENANCE, summary, image=analysed.image)
    assert kinds_for(findings, ResultsSettings(segmentation=True, presentation_state=True)) == ("sr", "sc")
    assert kinds_for(findings, ResultsSettings(not_analysed_report=False)) == ()
    built = build_outputs(source, findings, OutputOptions(), ("sr", "sc"))
    sr = dcmread(__import__("io").BytesIO(built[0].data))
    assert "lung mask implausible: 1 component" in [i.TextValue for i in items(sr) if i.ValueType == "TEXT"]


def test_non_latin1_text_switches_the_character_set_to_utf8() -> None:
    """A source in ISO 8859-1 keeps its character set; text it cannot encode makes the output UTF-8."""
    source, findings = source_and_findings(name="Müller^Jürgen")
    assert source.SpecificCharacterSet == "ISO_IR 100"
    assert build_dataset(source, findings, OutputOptions(), "sr").SpecificCharacterSet == "ISO_IR 100"
    greek = Provenance(**{**PROVENANCE.__dict__, "intended_use": "δοκιμή: not for clinical use"})
    sr = build_dataset(source, Findings(**{**findings.__dict__, "provenance": greek}), OutputOptions(), "sr")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(dcmread(__import__("io").BytesIO(encode(sr))).PatientName) == "Müller^Jürgen"


def test_invalid_values_are_refused_before_anything_is_written() -> None:
    """A value pydicom's strict writing refuses raises OutputError instead of producing a file."""
    source, findings = source_and_findings()
    sr = build_dataset(source, findings, OutputOptions(), "sr")
    sr.PatientSex = "not a code string value longer than sixteen"
    with pytest.raises(OutputError, match="failed validation"):
        encode(sr)


@pytest.mark.parametrize(
    ("bad", "message"), [({"probability": 1.5}, "probability"), ({"lung_mask": np.zeros((5, 5), bool)}, "lung_mask")]
)
def test_findings_check_their_values(bad: dict[str, object], message: str) -> None:
    """Findings refuse out-of-range probabilities and arrays that do not match the image."""
    with pytest.raises(ValueError, match=message):
        source_and_findings(**bad)


def test_options_insist_on_an_ai_series_description() -> None:
    """Every output series must say it is AI output."""
    with pytest.raises(ValueError, match="start with 'AI'"):
        OutputOptions(series_description="CXR analysis")
