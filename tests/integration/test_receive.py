"""The receive path end to end over real associations: durability, triage, failures, concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom import dcmread
from structlog.testing import capture_logs

from cxr_node.app import Receiver, recover
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.jobs import spool
from cxr_node.jobs.states import JobState
from cxr_node.receive.intake import Intake, Peer
from tests.conftest import require_tool
from tests.integration.helpers import echo, small_cr, store_all, write_config


def test_echo_with_pynetdicom_and_echoscu(receiver: Receiver) -> None:
    """The SCP answers C-ECHO from pynetdicom and from DCMTK echoscu."""
    assert echo(receiver.port) == status.SUCCESS
    out = subprocess.run(
        [require_tool("echoscu"), "-v", "-aec", "CXR_NODE", "127.0.0.1", str(receiver.port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Received Echo Response (Success)" in out.stdout + out.stderr


def test_chest_radiograph_is_stored_durably_and_queued(receiver: Receiver, chest_cr: Path) -> None:
    """A real chest CR is answered Success only with its file and queued job in place, bytes intact."""
    assert store_all(receiver.port, [chest_cr]) == [status.SUCCESS]
    [job] = receiver.store.jobs.query()
    assert job.state is JobState.QUEUED and job.calling_aet == "PACS"
    stored = receiver.settings.storage.root / job.path
    assert stored.parent.parent.name == spool.INBOX
    assert dcmread(stored).PixelData == dcmread(chest_cr).PixelData
    assert receiver.store.jobs.history(job.id) == [(None, "received", None), ("received", "queued", None)]


def test_storescu_then_status_json(receiver: Receiver, chest_cr: Path, tmp_path: Path) -> None:
    """DCMTK storescu's instance shows up as queued in `cxr-node status --json`."""
    out = subprocess.run(
        [require_tool("storescu"), "-v", "-aec", "CXR_NODE", "127.0.0.1", str(receiver.port), str(chest_cr)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Received Store Response (Success)" in out.stdout + out.stderr
    config = write_config(receiver.settings, tmp_path / "node.yaml")
    report = subprocess.run(
        [sys.executable, "-m", "cxr_node", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(report.stdout)["jobs"]["queued"] == 1


def test_lateral_view_is_skipped_and_not_kept(receiver: Receiver, chest_cr: Path) -> None:
    """A lateral view is acknowledged, recorded as skipped with the reason, and its file not kept."""
    lateral = small_cr(chest_cr, "lateral", ViewPosition="LL")
    assert store_all(receiver.port, [lateral]) == [status.SUCCESS]
    [job] = receiver.store.jobs.query()
    assert (job.state, job.reason, job.path) == (
        JobState.SKIPPED,
        "view position LL is not frontal (triage.view_positions)",
        None,
    )
    assert not any((receiver.settings.storage.root / spool.INBOX).rglob("*.dcm"))


def test_malformed_pixel_data_is_refused_and_quarantined(receiver: Receiver, chest_cr: Path) -> None:
    """Pixel data shorter than Rows x Columns is answered 0xA900, kept in quarantine, and the SCP stays up."""
    broken = small_cr(chest_cr, "truncated")
    broken.PixelData = broken.PixelData[:1000]
    assert store_all(receiver.port, [broken]) == [status.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    [job] = receiver.store.jobs.query()
    assert job.state is JobState.QUARANTINED and "pixel data has 1000 bytes" in job.reason
    assert (receiver.settings.storage.root / job.path).parent.parent.name == spool.QUARANTINE
    assert echo(receiver.port) == status.SUCCESS


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_uid_is_refused_at_the_door(receiver: Receiver, chest_cr: Path) -> None:
    """A SOP Instance UID made of path characters is refused (0xC001) before anything is stored."""
    hostile = small_cr(chest_cr, "hostile", SOPInstanceUID="../../../../tmp/cxr-escape")
    hostile.file_meta.MediaStorageSOPInstanceUID = hostile.SOPInstanceUID
    assert store_all(receiver.port, [hostile]) == [status.IDENTIFIER_INVALID]
    assert receiver.store.jobs.query() == []
    assert not any((receiver.settings.storage.root / spool.INBOX).rglob("*"))
    assert not Path("/tmp/cxr-escape").exists()
    assert spool.relative_path(spool.INBOX, spool.instance_key("../../etc")).parts[0] == spool.INBOX


def test_duplicate_send_keeps_one_job(receiver: Receiver, chest_cr: Path) -> None:
    """A PACS re-sending the same instance gets Success again and the node keeps one job."""
    ds = small_cr(chest_cr, "dup")
    assert store_all(receiver.port, [ds, ds]) == [status.SUCCESS, status.SUCCESS]
    assert receiver.store.jobs.counts()[JobState.QUEUED] == 1


def test_concurrent_senders_lose_and_duplicate_nothing(receiver: Receiver, chest_cr: Path) -> None:
    """Four associations of 25 images each, at once, give 100 queued jobs and 100 files."""
    batches = [[small_cr(chest_cr, f"c{a}-{i}", size=64) for i in range(25)] for a in range(4)]
    results: dict[int, list[int]] = {}
    threads = [
        threading.Thread(target=lambda a=a: results.__setitem__(a, store_all(receiver.port, batches[a])))
        for a in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[a] == [status.SUCCESS] * 25 for a in range(4))
    jobs = receiver.store.jobs.query()
    assert len(jobs) == 100 and len({j.sop_instance_uid for j in jobs}) == 100
    assert len(spool.iter_spooled(receiver.settings.storage.root, spool.INBOX)) == 100


def test_unwritable_storage_answers_out_of_resources(receiver: Receiver, chest_cr: Path) -> None:
    """When the file cannot be written the PACS gets 0xA700 (retry later), and a retry later succeeds."""
    inbox = receiver.settings.storage.root / spool.INBOX
    inbox.parent.mkdir(parents=True, exist_ok=True)
    inbox.write_bytes(b"not a folder")  # any write under inbox/ now fails, as with a full or broken disk
    ds = small_cr(chest_cr, "retry")
    assert store_all(receiver.port, [ds]) == [status.OUT_OF_RESOURCES]
    assert receiver.store.jobs.query() == []
    inbox.unlink()
    assert store_all(receiver.port, [ds]) == [status.SUCCESS]


def test_orphan_file_is_adopted_on_recovery(settings: Settings, chest_cr: Path) -> None:
    """A stored file whose job commit never happened (crash) is recorded at the next start."""
    ds = small_cr(chest_cr, "orphan")
    key = spool.instance_key(ds.SOPInstanceUID)
    target = settings.storage.root / spool.relative_path(spool.INBOX, key)
    target.parent.mkdir(parents=True)
    ds.save_as(target, enforce_file_format=True)
    (target.parent / f".leftover{spool.TMP_SUFFIX}").write_bytes(b"partial")
    recover(settings)
    node = Receiver(settings)
    try:
        [job] = node.store.jobs.query()
        assert job.state is JobState.QUEUED and job.instance_key == key and target.exists()
        assert not list(target.parent.glob(f"*{spool.TMP_SUFFIX}"))
    finally:
        node.stop()


def test_receiver_never_imports_torch() -> None:
    """The receiver process imports no torch (DESIGN.md §3), so a CUDA fault cannot touch it."""
    code = (
        "import sys, cxr_node.app, cxr_node.cli, cxr_node.receive.scp, cxr_node.receive.intake;"
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_events_are_logged_without_patient_identifiers(receiver: Receiver, chest_cr: Path) -> None:
    """Association and store events are logged with their context, and no patient identifier in clear."""
    ds = small_cr(chest_cr, "logged", PatientID="PAT-777", PatientName="Doe^Jane")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as captured:
        store_all(receiver.port, [ds, small_cr(chest_cr, "logged-lateral", ViewPosition="LL")])
        deadline = time.monotonic() + 5
        while not any(e["event"] == "assoc.closed" for e in captured) and time.monotonic() < deadline:
            time.sleep(0.05)
    events = [e["event"] for e in captured]
    assert events[:1] == ["assoc.opened"] and "assoc.closed" in events
    accepted = next(e for e in captured if e["event"] == "store.accepted")
    assert accepted["calling_aet"] == "PACS" and accepted["state"] == "queued"
    skipped = next(e for e in captured if e["event"] == "store.skipped")
    assert "view position LL" in skipped["reason"]
    assert "PAT-777" not in repr(captured) and "Doe" not in repr(captured)


def test_a_disk_error_while_receiving_is_refused_not_acknowledged(
    receiver: Receiver, chest_cr: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 7 MB radiograph's spool file is flushed to disk while it arrives; when the disk reports an error on
    one of those flushes the C-STORE is answered 0xA700 (the PACS retries) and nothing is recorded; once the disk
    is well the same instance is stored."""
    import errno
    import os

    from cxr_node.receive import guards

    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(guards.os, "fdatasync", failing)
    assert store_all(receiver.port, [chest_cr]) == [status.OUT_OF_RESOURCES]
    assert receiver.store.jobs.query() == []
    assert list((receiver.settings.storage.root / spool.RECEIVING).iterdir()) == []
    monkeypatch.setattr(guards.os, "fdatasync", real)
    assert store_all(receiver.port, [chest_cr]) == [status.SUCCESS]
    [job] = receiver.store.jobs.query()
    assert dcmread(receiver.settings.storage.root / job.path).PixelData == dcmread(chest_cr).PixelData


def test_the_same_instance_with_other_content_at_once_keeps_the_first(receiver: Receiver, chest_cr: Path) -> None:
    """Two receives of one SOP Instance UID with different patients arrive together (two associations, two STOW
    requests): one is stored and answered Success, the other refused as a conflict (0xC002); never both Success
    with the second file over the first and the job describing the other (8 rounds, the two released at once)."""
    intake, root = receiver.intake, receiver.settings.storage.root
    receiving = root / spool.RECEIVING
    receiving.mkdir(parents=True, exist_ok=True)
    for round_ in range(8):
        first = small_cr(chest_cr, f"race-{round_}", PatientID=f"A{round_}")
        second = small_cr(chest_cr, f"race-{round_}", PatientID=f"B{round_}", StudyInstanceUID=f"2.25.{round_ + 7}")
        paths = []
        for name, ds in (("a", first), ("b", second)):
            path = receiving / f"race-{round_}-{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        start, outcomes = threading.Barrier(2), {}
        threads = [
            threading.Thread(target=_receive_at, args=(intake, name, path, start, outcomes))
            for name, path in zip("ab", paths, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(o.status for o in outcomes.values()) == [status.SUCCESS, status.INSTANCE_CONFLICT], round_
        winner = next(name for name, o in outcomes.items() if o.status == status.SUCCESS)
        job = receiver.store.jobs.find(spool.instance_key(str(first.SOPInstanceUID)))
        assert job is not None and job.path is not None
        kept = dcmread(root / job.path, stop_before_pixels=True)
        assert kept.PatientID == (first if winner == "a" else second).PatientID, round_
        assert job.study_instance_uid == str(kept.StudyInstanceUID)
        assert not any(path.exists() for path in paths)


def _receive_at(intake: Intake, name: str, path: Path, start: threading.Barrier, outcomes: dict[str, Any]) -> None:
    """Hand the spooled file ``path`` to the intake as soon as the other thread is ready too."""
    ds = dcmread(path, defer_size=64 * 1024)
    start.wait()
    outcomes[name] = intake.accept(ds, path, str(ds.file_meta.TransferSyntaxUID), Peer("PACS", name))
