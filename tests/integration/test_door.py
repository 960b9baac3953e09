"""The door: unusable identifiers are refused at C-STORE; a SOP Instance UID re-sent with other content is a
conflict, never a silent overwrite, while an identical re-send stays one job."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pynetdicom import AE

from cxr_node.app import Receiver
from cxr_node.dicom import status
from cxr_node.jobs.states import JobState
from tests.integration.helpers import echo, small_cr, store_all


def store_with_comment(port: int, ds: object) -> tuple[int, str]:
    """C-STORE one data set; return the status and the ErrorComment the node sent."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])  # type: ignore[attr-defined]
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    try:
        reply = assoc.send_c_store(ds)
        return int(reply.Status), str(reply.get("ErrorComment", ""))
    finally:
        assoc.release()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SOPInstanceUID", "1.2.3.abc"),
        ("SOPInstanceUID", "1.2.03"),
        ("StudyInstanceUID", "1." + "2" * 298),
        ("SeriesInstanceUID", "1.02.3"),
        ("SeriesInstanceUID", ""),
    ],
)
def test_unusable_identifiers_are_refused_and_nothing_is_kept(
    receiver: Receiver, chest_cr: Path, keyword: str, value: str
) -> None:
    """Each identifying UID that is missing or not a valid UID gets 0xC001 naming it; no job, no file.

    (A SOP Class UID the node does not know is refused earlier, at association negotiation, and pynetdicom will
    not send a SOP Instance UID over 64 characters, so those two are not sent here.)
    """
    ds = small_cr(chest_cr, f"door-{keyword}-{len(value)}")
    setattr(ds, keyword, value)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = value
    code, comment = store_with_comment(receiver.port, ds)
    assert code == status.IDENTIFIER_INVALID
    assert comment.startswith(keyword) and ("valid UID" in comment or "missing" in comment)
    assert receiver.store.jobs.query() == []
    assert not any(p.is_file() for p in (receiver.settings.storage.root / "inbox").rglob("*"))
    assert echo(receiver.port) == status.SUCCESS


def test_the_same_uid_for_another_patient_is_a_conflict(receiver: Receiver, chest_cr: Path) -> None:
    """A second patient's image with the first one's SOP Instance UID is refused (0xC002) and the first is kept."""
    first = small_cr(chest_cr, "shared-uid", PatientID="PAT-A")
    second = small_cr(chest_cr, "shared-uid", PatientID="PAT-B")
    assert store_all(receiver.port, [first]) == [status.SUCCESS]
    [job] = receiver.store.jobs.query()
    kept = (receiver.settings.storage.root / str(job.path)).read_bytes()
    code, comment = store_with_comment(receiver.port, second)
    assert code == status.INSTANCE_CONFLICT and "another patient" in comment
    assert receiver.store.jobs.query() == [job]
    assert (receiver.settings.storage.root / str(job.path)).read_bytes() == kept


def test_the_same_uid_with_other_pixels_is_a_conflict_and_a_re_send_is_not(receiver: Receiver, chest_cr: Path) -> None:
    """Same patient, study and series but other pixel data is a conflict; the identical instance again is Success."""
    first = small_cr(chest_cr, "pixels")
    other = small_cr(chest_cr, "pixels")
    other.PixelData = bytes(255 - b for b in other.PixelData)
    assert store_all(receiver.port, [first, first]) == [status.SUCCESS, status.SUCCESS]
    code, comment = store_with_comment(receiver.port, other)
    assert code == status.INSTANCE_CONFLICT and "pixel data" in comment
    [job] = receiver.store.jobs.query()
    assert job.state is JobState.QUEUED
    stored = (receiver.settings.storage.root / str(job.path)).read_bytes()
    assert hashlib.sha256(stored).digest() != b"" and first.PixelData in stored
