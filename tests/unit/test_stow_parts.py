"""STOW-RS pieces free of HTTP: the part spool, the DICOM JSON answer, the HTTP status, the settings, the token."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import Dataset

from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.errors import ConfigError
from cxr_node.receive.stow import read_token
from cxr_node.receive.stow_parts import CappedSpool, PartResult, http_status, response_body, warnings

META = b"\x02\x00\x00\x00UL\x04\x00" + b"\x00" * 4 + b"\x02\x00\x10\x00UI\x14\x00" + b"1.2.840.10008.1.2.1\x00"


def spool(pieces: list[bytes], max_bytes: int = 1 << 20) -> tuple[CappedSpool, bytes]:
    """Spool ``pieces`` as a part arriving; return the spool and the bytes written."""
    handle = io.BytesIO()
    capped = CappedSpool(handle, max_bytes)
    for piece in pieces:
        capped.write(memoryview(piece))
    capped.finish()
    return capped, handle.getvalue()


def test_a_part_in_the_file_format_is_spooled_as_received() -> None:
    """A part with its preamble and DICM prefix is written byte for byte, however it arrives."""
    part = bytes(128) + b"DICM" + META + b"rest"
    assert spool([part[:5], part[5:140], part[140:]])[1] == part


def test_file_meta_without_preamble_gets_one() -> None:
    """File Meta Information without the preamble (pydicom.dcmwrite of a data set read without one) is
    written after a 128-byte preamble and DICM, as the DICOM file format wants."""
    part = META + b"rest of the data set" * 10
    assert spool([part[:3], part[3:]])[1] == bytes(128) + b"DICM" + part


def test_short_parts_and_non_dicom_are_written_unchanged() -> None:
    """A part shorter than a preamble, or not starting with group 0002, is left as it is (refused later)."""
    assert spool([b"\x02\x00ab"])[1] == b"\x02\x00ab"
    assert spool([b"x" * 300])[1] == b"x" * 300


def test_a_part_over_the_cap_stops_growing() -> None:
    """Past max_bytes the file is emptied and later bytes are only counted."""
    capped, written = spool([bytes(128) + b"DICM", b"a" * 100, b"b" * 100], max_bytes=200)
    assert capped.overflowed
    assert written == b""
    assert capped.received == 332


def test_the_answer_lists_stored_and_failed_instances_in_dicom_json() -> None:
    """ReferencedSOPSequence and FailedSOPSequence (with FailureReason) round-trip through pydicom's JSON."""
    results = [
        PartResult(status.SUCCESS, "", "1.2.840.10008.5.1.4.1.1.1", "1.2.3.4"),
        PartResult(status.OUT_OF_RESOURCES, "disk full", "1.2.840.10008.5.1.4.1.1.1", "1.2.3.5"),
        PartResult(status.CANNOT_UNDERSTAND, "not DICOM"),
    ]
    answer = Dataset.from_json(response_body(results))
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == ["1.2.3.4"]
    assert [i.FailureReason for i in answer.FailedSOPSequence] == [0xA700, 0xC000]
    assert answer.FailedSOPSequence[1].ReferencedSOPInstanceUID in (None, "")


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([status.SUCCESS, status.COERCION_OF_DATA_ELEMENTS], 200),
        ([status.SUCCESS, status.CANNOT_UNDERSTAND], 202),
        ([status.CANNOT_UNDERSTAND, status.OUT_OF_RESOURCES], 409),
        ([status.OUT_OF_RESOURCES, status.OUT_OF_RESOURCES], 503),
        ([], 409),
    ],
)
def test_http_status_follows_the_instances(codes: list[int], expected: int) -> None:
    """200 all stored, 202 some, 409 none, 503 none for lack of resources (retry later)."""
    assert http_status([PartResult(code) for code in codes]) == expected


def test_warnings_name_each_reason_once_in_ascii() -> None:
    """Warning header values are distinct, printable ASCII, bounded in number."""
    results = [PartResult(status.CANNOT_UNDERSTAND, 'bad "part" é')] * 3
    results += [PartResult(status.CANNOT_UNDERSTAND, f"r{i}") for i in range(20)]
    found = warnings(results)
    assert found[0] == "299 cxr-node \"bad 'part' ?\""
    assert len(found) == 8


def test_stow_is_off_and_on_loopback_by_default() -> None:
    """STOW-RS is off by default and binds 127.0.0.1."""
    stow = Settings().stow
    assert (stow.enabled, stow.host) == (False, "127.0.0.1")


def test_stow_off_loopback_needs_authentication(tmp_path: Path) -> None:
    """Listening beyond loopback without a token or client certificates is refused at load, naming the key."""
    with pytest.raises(ConfigError, match=r"stow\.host is not a loopback address"):
        Settings().with_overrides({"stow.enabled": True, "stow.host": "0.0.0.0"})
    token = tmp_path / "t"
    settings = Settings().with_overrides({"stow.enabled": True, "stow.host": "0.0.0.0", "stow.token_file": str(token)})
    assert settings.stow.token_file == token


def test_token_file_is_checked_like_the_database_password_file(tmp_path: Path) -> None:
    """The token file must be private and hold a long enough token; its first line is the token."""
    path = tmp_path / "token"
    path.write_text("x" * 20 + "\nignored\n")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == b"x" * 20
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "missing")
    assert read_token(None) is None
