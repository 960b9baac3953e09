"""The node's own outputs routed back are recognised by their private block and derived UID, not by Manufacturer:
ours are skipped in every transfer syntax, a third party's object that merely says "cxr-node" is analysed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ImplicitVRLittleEndian

from cxr_node.config import TriageSettings
from cxr_node.dicom.uids import (
    NODE_MANUFACTURER,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PRIVATE_KIND,
    PRIVATE_MODEL,
    PRIVATE_SOURCE_UID,
    is_own_output,
    output_uid,
    uid_problem,
)
from cxr_node.receive.filters import triage
from cxr_node.results.common import OutputOptions
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, Summary
from cxr_node.results.outputs import build_outputs
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset

PROVENANCE = Provenance("cxr-demo", "1.0.0", "demo: not for clinical use", ("mobilenet",), "0.1.0", "2.25.42")
RULES = TriageSettings()


@pytest.fixture(scope="module")
def outputs() -> tuple[Dataset, dict[str, Dataset]]:
    """A phantom source and every output kind built on it, decoded from their bytes."""
    phantom = make_phantom(8, 0, 256)
    source = phantom_to_dataset(phantom, patient_id="P1", patient_name="Doe^John")
    summary = Summary(
        "cxr-demo", "1.0.0", True, (256, 256), probability=0.2, threshold=0.5, members=(("mobilenet", 0.2),),
        lung_mask=MaskVerdict(True, "plausible", 0.3, 2),
    )  # fmt: skip
    image = phantom.image.astype(np.float32)
    findings = Findings(PROVENANCE, summary, image=image, lung_mask=phantom.lung_mask.astype(bool), heatmap=image * 0)
    built = build_outputs(source, findings, OutputOptions(), ("sr", "sc", "seg", "pr"))
    return source, {item.kind: dcmread(io.BytesIO(item.data)) for item in built}


def implicit(ds: Dataset) -> Dataset:
    """``ds`` as a PACS may send it back: Implicit VR Little Endian, so private values arrive as UN bytes."""
    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def test_every_output_names_its_source_model_and_kind(outputs: tuple[Dataset, dict[str, Dataset]]) -> None:
    """Each output carries the private block, and its SOP Instance UID is the one those values derive."""
    source, built = outputs
    for kind, ds in built.items():
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert block[PRIVATE_SOURCE_UID].value == source.SOPInstanceUID
        assert block[PRIVATE_MODEL].value == PROVENANCE.model_key
        assert block[PRIVATE_KIND].value == kind.upper()
        assert ds.SOPInstanceUID == output_uid(str(source.SOPInstanceUID), PROVENANCE.model_key, kind, "instance")


@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
def test_own_outputs_routed_back_are_skipped(outputs: tuple[Dataset, dict[str, Dataset]], syntax: str) -> None:
    """Every output kind, as written or re-encoded Implicit VR, is skipped as the node's own."""
    for ds in outputs[1].values():
        received = implicit(ds) if syntax == "implicit" else ds
        assert triage(received, RULES).reason == "own output routed back"


def chest(**changes: object) -> Dataset:
    """A frontal chest CR phantom another system made, with ``changes``."""
    ds = phantom_to_dataset(make_phantom(9, 0, 128), patient_id="P2", patient_name="Roe^Richard")
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def test_a_third_party_image_that_says_cxr_node_is_analysed() -> None:
    """Manufacturer "cxr-node" alone does not make an image ours: a chest CR from elsewhere is still eligible."""
    assert triage(chest(Manufacturer=NODE_MANUFACTURER), RULES).eligible


def test_a_forged_or_copied_block_is_not_enough() -> None:
    """A block whose values do not derive the object's SOP Instance UID (copied from our output into another
    object, or written by someone else) does not make the object ours."""
    ds = chest(Manufacturer=NODE_MANUFACTURER)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_SOURCE_UID, "UI", "1.2.3.4")
    block.add_new(PRIVATE_MODEL, "UT", PROVENANCE.model_key)
    block.add_new(PRIVATE_KIND, "CS", "SC")
    assert triage(ds, RULES).eligible
    ds.SOPInstanceUID = output_uid("1.2.3.4", PROVENANCE.model_key, "sc", "instance")
    assert triage(ds, RULES).reason == "own output routed back"


def test_a_damaged_block_never_raises() -> None:
    """A block missing elements or holding odd values is simply not ours."""
    ds = chest()
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_SOURCE_UID, "OB", b"\xff\xfe")
    assert triage(ds, RULES).eligible


def test_is_own_output_needs_every_part() -> None:
    """The derivation needs the source UID, the model and the kind; any empty part is not ours."""
    uid = output_uid("1.2.3", "m/1", "sr", "instance")
    assert is_own_output(uid, "1.2.3", "m/1", "SR")
    assert not is_own_output(uid, "1.2.3", "m/2", "SR")
    assert not is_own_output(uid, "", "m/1", "SR")
    assert not is_own_output(uid, "1.2.3", "m/1", "")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("1.2.840.10008.5.1.4.1.1.1", ""),
        ("0.1.2", ""),
        ("2.25." + "9" * 59, ""),
        ("", "empty"),
        ("1.2.3.abc", "not digits and dots without leading zeros"),
        ("1.02.3", "not digits and dots without leading zeros"),
        ("1..3", "not digits and dots without leading zeros"),
        ("1.2.3.", "not digits and dots without leading zeros"),
        ("2.25." + "9" * 61, "over 64 characters"),
    ],
)
def test_uid_problem(value: str, problem: str) -> None:
    """UIDs are at most 64 characters of digit components without leading zeros (PS3.5 9.1)."""
    assert uid_problem(value) == problem
