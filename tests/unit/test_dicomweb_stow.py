"""STOW-RS answers judged per instance (cxr_node.send.stow): the data set first, then the HTTP status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cxr_node.dicom import status
from cxr_node.send import stow

UID = "2.25.299325984863717723235759049990200688547"
OTHER = "2.25.1"
ORTHANC_OK = {  # what Orthanc 1.10 with DICOMweb 1.7 answers (trimmed)
    "00080005": {"Value": ["ISO_IR 100"], "vr": "CS"},
    "00081190": {"Value": ["http://127.0.0.1:8042/dicom-web/studies/2.25.3"], "vr": "UR"},
    "00081198": {"vr": "SQ"},
    "00081199": {"vr": "SQ", "Value": [{
        "00081150": {"Value": ["1.2.840.10008.5.1.4.1.1.7"], "vr": "UI"},
        "00081155": {"Value": [UID], "vr": "UI"},
    }]},
}  # fmt: skip


def failed(uid: str, reason: int | None) -> bytes:
    """A DICOM JSON answer whose Failed SOP Sequence holds ``uid`` with ``reason``."""
    item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return json.dumps({"00081198": {"vr": "SQ", "Value": [item]}, "00081199": {"vr": "SQ"}}).encode()


def test_orthanc_success_is_delivered() -> None:
    """Orthanc's 200 with the instance in the Referenced SOP Sequence is Success."""
    verdict = stow.judge(200, stow.DICOM_JSON, json.dumps(ORTHANC_OK).encode(), UID)
    assert verdict == stow.Verdict(status.SUCCESS, "", ok=True)


def test_a_warning_reason_is_kept() -> None:
    """A 202 whose entry for the instance carries a Warning Reason is delivered with that warning."""
    data = json.loads(json.dumps(ORTHANC_OK))
    data["00081199"]["Value"][0]["00081196"] = {"vr": "US", "Value": [status.COERCION_OF_DATA_ELEMENTS]}
    verdict = stow.judge(202, "application/dicom+json; charset=utf-8", json.dumps(data).encode(), UID)
    assert verdict.ok and verdict.status == status.COERCION_OF_DATA_ELEMENTS and "0xB000" in verdict.comment


@pytest.mark.parametrize(
    ("reason", "refused", "permanent"),
    [
        (stow.SOP_CLASS_NOT_SUPPORTED, True, False),
        (status.OUT_OF_RESOURCES, False, False),
        (0xA7FF, False, False),
        (stow.PROCESSING_FAILURE, False, False),
        (None, False, False),
        (status.DATASET_DOES_NOT_MATCH_SOP_CLASS, False, True),
        (status.CANNOT_UNDERSTAND, False, True),
        (stow.TRANSFER_SYNTAX_NOT_SUPPORTED, False, True),
    ],
)
def test_failure_reasons(reason: int | None, refused: bool, permanent: bool) -> None:
    """0x0122 is a refused SOP class; 0xA7xx and 0x0110 are retried; other reasons are permanent; whatever the
    HTTP status says (409, 202)."""
    for code in (409, 202):
        verdict = stow.judge(code, stow.DICOM_JSON, failed(UID, reason), UID)
        assert (verdict.ok, verdict.refused, verdict.permanent, verdict.down) == (False, refused, permanent, False)
        assert verdict.status == (reason if reason is not None else stow.PROCESSING_FAILURE)


@pytest.mark.parametrize(
    ("code", "down", "permanent"),
    [
        (401, True, False),
        (403, True, False),
        (404, True, False),
        (429, True, False),
        (503, True, False),
        (302, True, False),
        (400, False, True),
        (406, False, True),
        (409, False, True),
        (413, False, True),
        (415, False, True),
        (408, False, False),
        (500, False, False),
        (507, False, False),
        (202, False, False),
    ],
)
def test_http_status_without_an_entry(code: int, down: bool, permanent: bool) -> None:
    """With no entry for the instance the HTTP status decides: the destination's problem (down), a permanent
    failure, or a retry; the comment names the status."""
    verdict = stow.judge(code, "text/html", b"<html>oops</html>", UID)
    assert (verdict.ok, verdict.down, verdict.permanent, verdict.status) == (False, down, permanent, None)
    assert verdict.comment.startswith(f"HTTP {code}")


def test_200_without_a_readable_answer_is_success() -> None:
    """200 means every instance was stored (PS3.18 10.5.3), even with an empty or foreign answer."""
    assert stow.judge(200, "", b"", UID).ok
    assert stow.judge(200, stow.DICOM_JSON, b"not json", UID).ok


def test_an_answer_about_other_instances_falls_back_to_the_status() -> None:
    """An entry for another instance says nothing about ours."""
    assert stow.judge(409, stow.DICOM_JSON, failed(OTHER, stow.SOP_CLASS_NOT_SUPPORTED), UID).permanent


def test_xml_answers_are_read() -> None:
    """The Native DICOM Model answer (application/dicom+xml) is parsed like JSON."""
    xml = f"""<?xml version="1.0" encoding="utf-8"?>
<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
  <DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">{UID}</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">290</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
  <DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">
    <Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">{OTHER}</Value></DicomAttribute>
    </Item>
  </DicomAttribute>
</NativeDicomModel>""".encode()
    assert stow.parse(stow.DICOM_XML, xml) == ({OTHER: None}, {UID: stow.SOP_CLASS_NOT_SUPPORTED})
    assert stow.judge(409, stow.DICOM_XML, xml, UID).refused


@pytest.mark.parametrize("answer", [b"[]", b'{"00081199": 5}', b"[1, 2]", b"\xff\xfe", b'{"00081199": {"Value": [7]}}'])
def test_odd_json_is_no_entry(answer: bytes) -> None:
    """Malformed or unexpected JSON never raises: it is no entry, and the HTTP status decides."""
    try:
        stored, failures = stow.parse(stow.DICOM_JSON, answer)
    except ValueError:
        return
    assert stored == {} and failures == {}


def test_body_is_one_part_and_refuses_a_boundary_in_the_data() -> None:
    """The body holds the file as one application/dicom part; a boundary found in the file is refused."""
    data = b"\x00" * 128 + b"DICM" + b"payload"
    made = stow.body(data, "abc123")
    assert made == b"--abc123\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--abc123--\r\n"
    assert stow.content_type("abc123") == 'multipart/related; type="application/dicom"; boundary=abc123'
    with pytest.raises(ValueError, match="boundary"):
        stow.body(b"xxabc123xx", "abc123")
    with pytest.raises(ValueError, match="boundary"):
        stow.body(data, "bad boundary\r\n")


def test_explain_names_what_to_check() -> None:
    """A probe's failure says what to check for the statuses that are the destination's problem."""
    assert stow.explain(401).startswith("HTTP 401 Unauthorized: the server refused the node's credentials")
    assert stow.explain(418) == "HTTP 418 I'm a Teapot"
    assert stow.explain(599) == "HTTP 599"
