"""docs/conformance.md against the code: its tables are parsed and compared with the real SCP, sender and outputs."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE

from cxr_node import conformance
from cxr_node.config import Settings
from cxr_node.dicom import codes, sop, status, uids
from cxr_node.receive.scp import build_ae
from cxr_node.results.common import OutputOptions
from cxr_node.results.findings import Findings, MaskVerdict, SimilarCase, Summary
from cxr_node.results.kinds import BY_NAME, OUTPUT_TRANSFER_SYNTAXES
from cxr_node.results.outputs import build_outputs
from cxr_node.send import deliver, scu
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset
from tests.dicom.test_results import PROVENANCE

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "conformance.md"
OUTPUTS_DOC = REPO / "docs" / "outputs.md"
CASES = (
    SimilarCase(1, 0.93, "C0000012", "covid", "1.2.3", "1.2.3.4", "ACC123", "20200301"),
    SimilarCase(2, 0.88, "C0000040", "non-covid", None, None, None, None),
)


@pytest.fixture(scope="module")
def text() -> str:
    """The conformance statement."""
    return DOC.read_text(encoding="utf-8")


def rows(text: str, name: str, kind: str = "generated") -> list[list[str]]:
    """The body rows (cells stripped, pipes unescaped) of the Markdown table in block ``name``."""
    match = re.search(rf"<!-- {kind}: {re.escape(name)} -->\n(.*?)<!-- end: {re.escape(name)} -->", text, re.S)
    assert match, f"no {kind} block {name!r} in {DOC}"
    lines = [line.strip() for line in match.group(1).splitlines() if line.strip().startswith("|")]
    assert len(lines) > 2, f"block {name!r} holds no table rows"
    return [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line[1:-1])] for line in lines[2:]]


def code(cell: str) -> str:
    """The text of a cell that is one backticked value; an empty string for an empty cell."""
    if not cell:
        return ""
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected a backticked value, found {cell!r}"
    return match.group(1)


def syntax_tables(text: str) -> dict[str, list[str]]:
    """The two transfer syntax tables the SOP class rows refer to, by their table names."""
    return {
        conformance.RADIOGRAPH_SYNTAX_TABLE: [code(r[2]) for r in rows(text, "scp-radiograph-syntaxes")],
        conformance.OTHER_SYNTAX_TABLE: [code(r[2]) for r in rows(text, "scp-other-syntaxes")],
    }


def documented_scp_contexts(text: str) -> dict[str, list[str]]:
    """Every (SOP class → transfer syntaxes, in order) the statement says the SCP accepts."""
    tables = syntax_tables(text)
    contexts: dict[str, list[str]] = {}
    for row in rows(text, "scp-contexts"):
        uid = code(row[1])
        if uid and code(row[3]):
            contexts.setdefault(uid, []).append(code(row[3]))
        elif uid:
            contexts[uid] = tables[row[2]]
    for row in rows(text, "scp-storage-classes"):
        contexts.setdefault(code(row[1]), tables[row[2]])
        assert contexts[code(row[1])] == tables[row[2]], row
    return contexts


def source_and_findings(analysed: bool = True) -> tuple[Dataset, Findings]:
    """A phantom chest header and findings on it (analysed, or not analysed with the image kept)."""
    phantom = make_phantom(5, 1, 256)
    source = phantom_to_dataset(phantom, patient_id="P9", patient_name="Doe^Jane", photometric="MONOCHROME1")
    image = phantom.image.astype(np.float32)
    model = (PROVENANCE.model_name, PROVENANCE.model_version)
    if not analysed:
        summary = Summary(*model, False, (256, 256), reason="lung mask implausible: 1 component",
                          lung_mask=MaskVerdict(False, "1 component", 0.2, 1))  # fmt: skip
        return source, Findings(PROVENANCE, summary, image=image)
    summary = Summary(
        *model, True, (256, 256), probability=0.81, threshold=0.5, members=(("mobilenet", 0.7), ("shufflenet", 0.92)),
        lung_mask=MaskVerdict(True, "plausible", 0.3, 2), similar=CASES,
    )  # fmt: skip
    arrays = {"lung_mask": phantom.lung_mask.astype(bool), "heatmap": np.zeros((256, 256), np.float32)}
    return source, Findings(PROVENANCE, summary, image=image, **arrays)


@pytest.fixture(scope="module")
def outputs() -> dict[str, Dataset]:
    """Every output kind built from analysed findings, plus the not-analysed SR and SC, decoded from their bytes."""
    built: dict[str, Dataset] = {}
    source, findings = source_and_findings()
    for item in build_outputs(source, findings, OutputOptions(), tuple(BY_NAME)):
        built[item.kind] = dcmread(io.BytesIO(item.data))
    source, findings = source_and_findings(analysed=False)
    for item in build_outputs(source, findings, OutputOptions(), ("sr", "sc")):
        built[f"not-analysed-{item.kind}"] = dcmread(io.BytesIO(item.data))
    return built


def test_generated_tables_are_current(text: str) -> None:
    """Every generated block of both documents holds exactly what the generator makes from the code today."""
    assert sorted(conformance.block_names(text)) == sorted(conformance.tables())
    assert conformance.update(text) == text, "run: python -m cxr_node.conformance docs/conformance.md"
    outputs_text = OUTPUTS_DOC.read_text(encoding="utf-8")
    assert "codes-private" in conformance.block_names(outputs_text)
    assert conformance.update(outputs_text) == outputs_text, "run: python -m cxr_node.conformance docs/outputs.md"


def test_scp_contexts_are_those_of_the_running_ae(text: str) -> None:
    """The SOP classes and transfer syntaxes (in preference order) documented are those of build_ae's AE."""
    ae = build_ae(Settings().node)
    real = {str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax] for cx in ae.supported_contexts}
    assert documented_scp_contexts(text) == real


def test_radiographs_are_accepted_in_the_decodable_syntaxes(text: str) -> None:
    """The analysed classes are CR and DX, accepted in exactly sop.DECODABLE_TRANSFER_SYNTAXES, in that order."""
    radiograph = syntax_tables(text)[conformance.RADIOGRAPH_SYNTAX_TABLE]
    assert radiograph == [str(ts) for ts in sop.DECODABLE_TRANSFER_SYNTAXES]
    analysed = [code(r[1]) for r in rows(text, "scp-storage-classes") if r[3] == "analysed"]
    assert analysed == [str(uid) for uid in sop.RADIOGRAPH_CLASSES]
    for row in rows(text, "scp-radiograph-syntaxes"):
        assert row[1] == UID(code(row[2])).name


def test_every_storage_class_uid_is_in_the_document(text: str) -> None:
    """Each of the storage SOP classes the SCP accepts appears, backticked, in the statement."""
    missing = [uid for uid in sop.STORAGE_CLASSES if f"`{uid}`" not in text]
    assert missing == []
    assert len(rows(text, "scp-storage-classes")) == len(sop.STORAGE_CLASSES) == 170


def test_statuses_are_those_the_receiver_returns(text: str) -> None:
    """The status table names each dicom.status constant the receiver uses, with its value, and no other."""
    documented = {code(r[1]): int(r[0], 16) for r in rows(text, "scp-statuses")}
    for name, value in documented.items():
        assert getattr(status, name) == value, name
    used: set[str] = set()
    for path in (REPO / "cxr_node" / "receive").glob("*.py"):
        used |= set(re.findall(r"\bstatus\.([A-Z][A-Z0-9_]*)\b", path.read_text(encoding="utf-8")))
    assert set(documented) == used


def test_output_classes_are_those_built_and_sent(text: str, outputs: dict[str, Dataset]) -> None:
    """The output SOP classes documented are those the builders produce and the sender proposes, in its syntaxes."""
    built = {kind: str(outputs[kind].SOPClassUID) for kind in BY_NAME}
    assert {r[0]: code(r[2]) for r in rows(text, "output-classes")} == built
    assert {r[0]: code(r[1]) for r in rows(text, "output-series", "checked")} == built
    assert {kind: str(uid) for kind, uid in deliver.OUTPUT_CLASSES.items()} == built
    proposed: dict[str, list[str]] = {}
    for row in rows(text, "scu-contexts"):
        proposed.setdefault(code(row[1]), []).append(code(row[3]))
    assert proposed == {uid: list(OUTPUT_TRANSFER_SYNTAXES) for uid in built.values()}
    scu_classes = [code(r[1]) for r in rows(text, "scu-sop-classes")]
    assert scu_classes == [str(sop.VERIFICATION_CLASS), *built.values()]


def test_output_series_match_the_built_outputs(text: str, outputs: dict[str, Dataset]) -> None:
    """Modality, Series Number and Series Description of each output are those the statement lists."""
    for kind, _uid, modality, number, description, _when in rows(text, "output-series", "checked"):
        ds = outputs[kind]
        assert (ds.Modality, int(ds.SeriesNumber), ds.SeriesDescription) == (modality, int(number), description)
        assert ds.Manufacturer == uids.NODE_MANUFACTURER
    assert outputs["sc"].BurnedInAnnotation == "YES" and "PixelSpacing" not in outputs["sc"]


def test_codes_module_is_documented(text: str) -> None:
    """Every code in dicom/codes.py is listed with its value, scheme and meaning; the private ones as private."""
    standard = {code(r[0]): tuple(r[1:4]) for r in rows(text, "codes-standard")}
    private = {code(r[0]): tuple(r[1:4]) for r in rows(text, "codes-private")}
    constants = dict(conformance.code_constants())
    assert set(standard) | set(private) == set(constants)
    for name, value in constants.items():
        assert (standard.get(name) or private[name]) == (value.value, value.scheme_designator, value.meaning), name
    assert {constants[name] for name in private} == set(codes.PRIVATE_CODES)
    assert all(r[4] for r in rows(text, "codes-private")), "every private code needs a definition"


def _codes_in(ds: Dataset) -> Iterator[tuple[str, str, str]]:
    for element in ds:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if "CodeValue" in item:
                yield (str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))
            yield from _codes_in(item)


def test_every_code_in_the_outputs_is_documented(text: str, outputs: dict[str, Dataset]) -> None:
    """Each code any output carries (concept names, values, units, purposes) is in one of the code tables."""
    documented = {tuple(r[1:4]) for name in ("codes-standard", "codes-private") for r in rows(text, name)}
    documented |= {tuple(r[0:3]) for r in rows(text, "codes-template")}
    found = {c for ds in outputs.values() for c in _codes_in(ds)}
    assert found - documented == set()


def test_implementation_identification_is_pynetdicoms(text: str) -> None:
    """The Implementation Class UID and Version Name documented are those the AE sends."""
    documented = {r[0]: code(r[1]) for r in rows(text, "implementation")}
    ae = build_ae(Settings().node)
    assert documented == {
        "Implementation Class UID": ae.implementation_class_uid,
        "Implementation Version Name": ae.implementation_version_name,
    }


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data


def test_configuration_defaults_are_the_settings_defaults(text: str) -> None:
    """Each configuration parameter in the statement exists and has the default Settings gives it."""
    defaults = Settings().model_dump(mode="json")
    for row in rows(text, "configuration", "checked"):
        key, value = code(row[0]), yaml.safe_load(code(row[1]))
        assert _lookup(defaults, key) == value, key


def test_pdu_and_association_limits_are_documented(text: str) -> None:
    """The maximum PDU sizes and association limit stated are those of the SCP's and pynetdicom's AEs."""
    node = Settings().node
    ae = build_ae(node)
    assert ae.maximum_pdu_size == node.max_pdu and ae.maximum_associations == node.max_associations
    assert f"`node.max_pdu`, default {node.max_pdu} bytes" in text
    assert f"`node.max_associations` (default {node.max_associations}) **per receiver process**" in text
    assert f"| Maximum PDU size received, as SCU | {AE().maximum_pdu_size} bytes" in text


class _Captured(Exception):
    """Raised by the fake associate once the requested contexts are seen."""


def test_echo_proposes_the_documented_contexts(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """cxr-node echo requests Verification in exactly the transfer syntaxes of the statement's table."""
    requested: list[tuple[str, str]] = []

    def fake_associate(self: AE, *args: object, **kwargs: object) -> None:
        contexts = self.requested_contexts
        requested.extend((str(cx.abstract_syntax), str(ts)) for cx in contexts for ts in cx.transfer_syntax)
        raise _Captured

    monkeypatch.setattr(scu.AE, "associate", fake_associate)
    with pytest.raises(_Captured):
        scu.echo(scu.PeerAddress("PACS", "127.0.0.1", 104))
    assert requested == [(code(r[1]), code(r[3])) for r in rows(text, "scu-echo-contexts")]
