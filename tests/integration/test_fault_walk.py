"""The fault walk: one case per fault, against one real ``cxr-node serve`` and a PACS on loopback.

Each case sends a clean image, injects its fault (a process killed alone with work in flight, the PACS refusing
or down, the disk full, or a bad instance of each class the door knows), sends another clean image, and checks:
the status the sender saw, the final state and reason of the fault's job, that the node still answers C-ECHO,
and that every clean image's SR and SC reached the PACS. The two model faults (a model that raises, one that
kills its process) need a model of their own and are walked in tests/integration/test_worker.py and
tests/integration/test_leases.py.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE, _config

from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import JobState
from tests.integration.helpers import echo, small_cr, write_config
from tests.integration.pacs import Pacs
from tests.integration.test_fuzz import source_uids
from tests.integration.test_hostile_peers import dataset_bytes, deflate_bomb, deflated_file

DELIVERY_S = 120
ROLES = {"receiver": 0, "worker": 2, "sender": 3}
"""Line of each role's child in the pids file (two receivers, then the worker, then the sender)."""


@dataclass
class Walk:
    """The running node, its PACS, and what the walk has sent."""

    settings: Settings
    node: subprocess.Popen[bytes]
    pacs: Pacs
    folder: Path
    refusing: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    def send(self, path: Path) -> tuple[int | None, str]:
        """C-STORE one file as it is; the status and ErrorComment, or None when no answer came."""
        header = dcmread(path, stop_before_pixels=True, force=True)
        ae = AE(ae_title="WALKER")
        ae.add_requested_context(str(header.SOPClassUID), [str(header.file_meta.TransferSyntaxUID)])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            assoc = ae.associate("127.0.0.1", self.settings.node.port, ae_title="CXR_NODE")
            if not assoc.is_established:
                return None, "no association"
            try:
                reply = assoc.send_c_store(path)
            finally:
                if assoc.is_established:
                    assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        return (int(reply.Status), str(reply.get("ErrorComment", ""))) if "Status" in reply else (None, "no reply")

    def write(self, ds: Dataset, name: str) -> Path:
        """Save ``ds`` as a file of the walk."""
        path = self.folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    def clean(self, chest_cr: Path) -> str:
        """Send a clean image (Success expected); return its SOP Instance UID."""
        self.sent += 1
        ds = small_cr(chest_cr, f"walk-clean-{self.sent}-{time.monotonic_ns()}")
        code, comment = self.send(self.write(ds, f"clean-{self.sent}"))
        assert code == status.SUCCESS, comment
        return str(ds.SOPInstanceUID)

    def delivered(self, uids: list[str], seconds: float = DELIVERY_S) -> bool:
        """Wait (bounded) until each image's SR and SC are at the PACS."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            arrived = {(str(ds.Modality), uid) for ds in list(self.pacs.received) for uid in source_uids(ds)}
            if all(("SR", uid) in arrived and ("OT", uid) in arrived for uid in uids):
                return True
            time.sleep(0.3)
        return False

    def job(self, sop_instance_uid: str) -> tuple[JobState, str] | None:
        """The state and reason of the job of one instance, or None when the node kept none."""
        store = SqliteStore(self.settings.storage.root / "jobs.sqlite3", readonly=True)
        try:
            found = [job for job in store.jobs.query(limit=100000) if job.sop_instance_uid == sop_instance_uid]
        finally:
            store.close()
        return (found[0].state, found[0].reason or "") if found else None

    def pid(self, role: str) -> int:
        """The pid of one role's child (the first receiver for ``receiver``)."""
        lines = (self.settings.storage.root / "run/receiver+worker+sender.pids").read_text().splitlines()
        return int(lines[ROLES[role]].split()[0])


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory, tiny_manifest: Path) -> Iterator[Walk]:
    """One node for the whole walk: two receivers, the worker, the sender, and a PACS that can refuse."""
    from tests.conftest import free_port

    folder = tmp_path_factory.mktemp("walk")
    refusing: dict[str, int] = {}
    pacs = Pacs(folder / "pacs", answer=lambda ds: refusing.get("status", 0)).start()
    settings = Settings().with_overrides(
        {
            "node.host": "127.0.0.1",
            "node.port": free_port(),
            "node.receiver_processes": 2,
            "storage.root": str(folder / "state"),
            "models.manifest": str(tiny_manifest),
            "metrics.port": free_port(),
            "logging.format": "console",
            "worker.batch_wait_ms": 2000,
            "delivery.poll_interval_ms": 200,
            "delivery.backoff_initial_s": 0.2,
            "delivery.backoff_max_s": 1.0,
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        }
    )
    config = write_config(settings, folder / "node.yaml")
    node = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
        stdout=(folder / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state = Walk(settings, node, pacs, folder, refusing)
    deadline = time.monotonic() + 90
    ready = settings.storage.root / "run/receiver+worker+sender.ready"
    while not (ready.exists() and echo(settings.node.port) == status.SUCCESS) and time.monotonic() < deadline:
        assert node.poll() is None, (folder / "serve.log").read_text()[-3000:]
        time.sleep(0.3)
    try:
        yield state
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        pacs.stop()


def kill_role(role: str) -> Callable[[Walk, Path], tuple[str, int | None]]:
    """A fault: SIGKILL one child with work in flight (an image just sent: the worker holds it for 2 s)."""

    def fault(walk: Walk, chest_cr: Path) -> tuple[str, int | None]:
        ds = small_cr(chest_cr, f"walk-{role}-in-flight")
        code, _ = walk.send(walk.write(ds, f"{role}-in-flight"))
        os.kill(walk.pid(role), signal.SIGKILL)
        return str(ds.SOPInstanceUID), code

    return fault


def pacs_refusing(walk: Walk, chest_cr: Path) -> tuple[str, int | None]:
    """A fault: the PACS answers 0xA700 for a while, then takes the results (retries with backoff)."""
    walk.refusing["status"] = 0xA700
    ds = small_cr(chest_cr, "walk-pacs-refusing")
    code, _ = walk.send(walk.write(ds, "pacs-refusing"))
    time.sleep(3)
    walk.refusing.clear()
    return str(ds.SOPInstanceUID), code


def pacs_down(walk: Walk, chest_cr: Path) -> tuple[str, int | None]:
    """A fault: the PACS stops listening, then comes back on the same port."""
    walk.pacs.stop()
    ds = small_cr(chest_cr, "walk-pacs-down")
    code, _ = walk.send(walk.write(ds, "pacs-down"))
    time.sleep(3)
    walk.pacs.start()  # the same port again
    return str(ds.SOPInstanceUID), code


def disk_full(walk: Walk, chest_cr: Path) -> tuple[str, int | None]:
    """A fault: the storage filesystem over its limit (back-pressure): the instance is refused, nothing kept."""
    from cxr_node.app import Receiver
    from tests.conftest import free_port

    full = walk.settings.with_overrides({"storage.max_disk_percent": 0.01, "node.port": free_port()})

    receiver = Receiver(full).start()  # a receiver of the same store, on another port, that sees the disk full
    try:
        ds = small_cr(chest_cr, "walk-disk-full")
        path = walk.write(ds, "disk-full")
        ae = AE(ae_title="WALKER")
        ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CXR_NODE")
        reply = assoc.send_c_store(path)
        assoc.release()
        return str(ds.SOPInstanceUID), int(reply.Status)
    finally:
        receiver.stop(grace_s=5)


def bad(make: Callable[[Walk, Path], Path]) -> Callable[[Walk, Path], tuple[str, int | None]]:
    """A fault: one bad instance sent into the flow."""

    def fault(walk: Walk, chest_cr: Path) -> tuple[str, int | None]:
        path = make(walk, chest_cr)
        uid = str(dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID", ""))
        return uid, walk.send(path)[0]

    return fault


def invalid_uid(walk: Walk, chest_cr: Path) -> Path:
    """A Series Instance UID that is not a UID."""
    return walk.write(small_cr(chest_cr, "walk-bad-uid", SeriesInstanceUID="1.2.3.x"), "bad-uid")


def conflicting_uid(walk: Walk, chest_cr: Path) -> Path:
    """A second patient's image with the first clean image's SOP Instance UID."""
    first = small_cr(chest_cr, "walk-conflict", PatientID="WALK-A")
    assert walk.send(walk.write(first, "conflict-first"))[0] == status.SUCCESS
    return walk.write(small_cr(chest_cr, "walk-conflict", PatientID="WALK-B"), "conflict-second")


def truncated_pixels(walk: Walk, chest_cr: Path) -> Path:
    """Pixel data shorter than Rows x Columns."""
    ds = small_cr(chest_cr, "walk-truncated")
    ds.PixelData = ds.PixelData[:1000]
    return walk.write(ds, "truncated")


def undecodable_j2k(walk: Walk, chest_cr: Path) -> Path:
    """A JPEG 2000 CR whose codestream is garbage (stored, then answered with a not-analysed SR)."""
    ds = small_cr(chest_cr, "walk-j2k")
    ds.PixelData = encapsulate([b"\x00\x01garbage" * 64])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return walk.write(ds, "j2k")


def messy_values(walk: Walk, chest_cr: Path) -> Path:
    """A dotted study date and an accession number over 16 characters (repaired or left out, never fatal)."""
    ds = small_cr(chest_cr, "walk-messy", StudyDate="2004.08.26", AccessionNumber="A" * 22)
    return walk.write(ds, "messy")


def deflate_too_big(walk: Walk, chest_cr: Path) -> Path:
    """A deflated data set that inflates past node.max_instance_mb."""
    ds = small_cr(chest_cr, "walk-bomb")
    del ds.PixelData
    header = dataset_bytes(walk.write(ds, "bomb-header"))
    size = 1024**3
    stream = deflate_bomb(header + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size), size)
    return deflated_file(walk.folder / "bomb.dcm", ds.file_meta, stream)


def nested_header(walk: Walk, chest_cr: Path) -> Path:
    """Sequences nested 1000 deep."""
    path = walk.write(small_cr(chest_cr, "walk-nested"), "nested")
    body = b""
    for _ in range(1000):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        body = struct.pack("<HH2sHL", 0xFFFA, 0xFFFA, b"SQ", 0, 0xFFFFFFFF) + item
        body += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    with path.open("ab") as fp:
        fp.write(body)
    return path


FAULTS: dict[str, tuple[Callable[[Walk, Path], tuple[str, int | None]], int | None, tuple[JobState, ...] | None]] = {
    # name: (fault, status the sender sees, states the fault's job may end in; None = no job kept)
    "kill the worker": (kill_role("worker"), status.SUCCESS, (JobState.DELIVERED,)),
    "kill a receiver": (kill_role("receiver"), status.SUCCESS, (JobState.DELIVERED,)),
    "kill the sender": (kill_role("sender"), status.SUCCESS, (JobState.DELIVERED,)),
    "PACS refusing": (pacs_refusing, status.SUCCESS, (JobState.DELIVERED,)),
    "PACS down": (pacs_down, status.SUCCESS, (JobState.DELIVERED,)),
    "disk full": (disk_full, status.OUT_OF_RESOURCES, None),
    "invalid UID": (bad(invalid_uid), status.IDENTIFIER_INVALID, None),
    "conflicting UID": (bad(conflicting_uid), status.INSTANCE_CONFLICT, (JobState.DELIVERED,)),
    "truncated pixels": (bad(truncated_pixels), status.DATASET_DOES_NOT_MATCH_SOP_CLASS, (JobState.QUARANTINED,)),
    "undecodable JPEG 2000": (bad(undecodable_j2k), status.SUCCESS, (JobState.DELIVERED,)),
    "messy values": (bad(messy_values), status.SUCCESS, (JobState.DELIVERED,)),
    "deflate bomb": (bad(deflate_too_big), status.INSTANCE_TOO_LARGE, None),
    "nested header": (bad(nested_header), status.HEADER_TOO_COMPLEX, None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_walk(walk: Walk, chest_cr: Path, fault: str) -> None:
    """One fault between two clean images: the sender's status, the fault's job, the node up, all outputs out."""
    inject, expected_status, expected_states = FAULTS[fault]
    before = walk.clean(chest_cr)
    uid, code = inject(walk, chest_cr)
    assert code == expected_status, f"{fault}: the sender saw {code}"
    after = walk.clean(chest_cr)
    assert echo(walk.settings.node.port) == status.SUCCESS
    assert walk.delivered([before, after]), f"{fault}: a clean image's SR or SC never reached the PACS"
    if expected_states is None:
        assert walk.job(uid) is None, f"{fault}: the refused instance left a job"
    else:
        deadline = time.monotonic() + DELIVERY_S
        while (found := walk.job(uid)) is not None and found[0] not in expected_states and time.monotonic() < deadline:
            time.sleep(0.3)
        assert found is not None and found[0] in expected_states, f"{fault}: {found}"
    assert walk.node.poll() is None
