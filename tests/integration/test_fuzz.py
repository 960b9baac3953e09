"""A bounded mutation fuzzer over DICOM, against the real service: real CR headers with elements deleted,
replaced by garbage of their VR, truncated and inflated, sent over real associations between clean images.

The node must answer every association, never die, and give every clean image its SR and SC at the PACS.
``CXR_NODE_FUZZ_CASES`` sets how many mutants are sent (default 200; the seed is fixed, so a failure repeats).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, _config

from cxr_node.config import Settings
from cxr_node.dicom import status
from tests.integration.helpers import echo, small_cr, wait_for, write_config
from tests.integration.pacs import Pacs

SEED = 2026
CASES = int(os.environ.get("CXR_NODE_FUZZ_CASES", "200"))
CLEAN_EVERY = 20
STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
INTEGER_LIMITS = {"US": (0, 65535), "SS": (-32768, 32767), "UL": (0, 2**32 - 1), "SL": (-(2**31), 2**31 - 1)}
GARBAGE_TEXT = (
    "x" * 300,
    "2020.03.01",
    "abc\\def\\",
    "\x01\x02\x7f",
    "Müller^Jürgen",
    "",
    " " * 70,
    "1.2.03.abc",
    "-1e400",
)


@dataclass
class Mutant:
    """One mutated instance, as a file ready to send, and what was done to it."""

    path: Path
    what: str


@contextlib.contextmanager
def lenient_pydicom() -> Iterator[None]:
    """Let pydicom write invalid values (the point of the exercise), and pynetdicom send files as they are."""
    settings = pydicom.config.settings
    reading, writing = settings.reading_validation_mode, settings.writing_validation_mode
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = reading, writing
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def garbage(rng: random.Random, element: DataElement) -> object:
    """A value of ``element``'s VR that a careless or hostile sender might put there."""
    vr = str(element.VR)
    if vr in STRING_VRS:
        return rng.choice(GARBAGE_TEXT)
    if vr in INTEGER_LIMITS:
        low, high = INTEGER_LIMITS[vr]
        return rng.choice((low, 0, 1, high))
    if vr in ("FL", "FD"):
        return rng.choice((float("nan"), float("inf"), -1e300, 0.0))
    if vr == "SQ":
        return DicomSequence([Dataset() for _ in range(rng.choice((0, 1, 500)))])
    return bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 1, 3, 1001))))


def mutate(rng: random.Random, base: Dataset, folder: Path, number: int) -> Mutant:
    """Write one mutant of ``base`` (a fresh SOP Instance UID, then one mutation) to ``folder``."""
    ds = copy.deepcopy(base)
    uid = pydicom.uid.generate_uid(entropy_srcs=[f"fuzz-{SEED}-{number}"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = folder / f"mutant-{number:04d}.dcm"
    tags = [element.tag for element in ds if element.tag.group > 0x0002]
    kind = rng.choice(("delete", "garbage", "garbage", "truncate", "inflate"))
    tag = rng.choice(tags)
    what = f"{kind} {tag}"
    if kind == "delete":
        del ds[tag]
    elif kind == "garbage":
        element = ds[tag]
        with contextlib.suppress(Exception):
            ds[tag] = DataElement(tag, element.VR, garbage(rng, element))
    try:
        ds.save_as(path, enforce_file_format=True)
    except (OSError, ValueError, TypeError, OverflowError, struct.error):  # pydicom cannot even encode it: drop it
        del ds[tag]
        ds.save_as(path, enforce_file_format=True)
        what = f"delete {tag} (garbage not encodable)"
    raw = path.read_bytes()
    if kind == "truncate":
        cut = rng.randrange(200, len(raw))
        path.write_bytes(raw[:cut])
        what = f"truncate at {cut} of {len(raw)}"
    elif kind == "inflate":
        extra = bytes(rng.getrandbits(8) for _ in range(rng.choice((7, 1024, 65536))))
        path.write_bytes(raw + extra)
        what = f"inflate by {len(extra)} bytes"
    return Mutant(path, what)


def send(port: int, path: Path) -> int | None:
    """C-STORE one file as it is (bytes not re-encoded); the status, or None when no answer came."""
    return send_with_comment(port, path)[0]


def send_with_comment(port: int, path: Path) -> tuple[int | None, str]:
    """:func:`send`, with the ErrorComment the node sent."""
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(str(header.SOPClassUID), [str(header.file_meta.TransferSyntaxUID)])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    if not assoc.is_established:
        return None, "no association"
    try:
        reply = assoc.send_c_store(path)
        return (int(reply.Status), str(reply.get("ErrorComment", ""))) if "Status" in reply else (None, "no reply")
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()


def source_uids(ds: Dataset) -> set[str]:
    """The SOP Instance UIDs an output names as its source (an SC's source images, an SR's evidence)."""
    found = {str(item.ReferencedSOPInstanceUID) for item in ds.get("SourceImageSequence", [])}
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            found |= {str(item.ReferencedSOPInstanceUID) for item in series.get("ReferencedSOPSequence", [])}
    return found


@pytest.mark.filterwarnings("ignore")
def test_mutants_never_stop_the_node_and_clean_images_get_their_outputs(
    settings: Settings, chest_cr: Path, tmp_path: Path
) -> None:
    """Mutants of a real CR mixed into a normal flow: every association answered, the node always up, and every
    clean image sent between them delivered as SR and SC to the PACS."""
    pacs = Pacs(tmp_path / "pacs").start()
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    settings = settings.with_overrides(
        {"destinations": [destination], "delivery.poll_interval_ms": 200, "node.max_associations": 16}
    )
    config = write_config(settings, tmp_path / "node.yaml")
    node = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
        stdout=(tmp_path / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rng = random.Random(SEED)
    folder = tmp_path / "mutants"
    folder.mkdir()
    answers: list[tuple[str, int | None]] = []
    clean: list[str] = []
    try:
        ready = settings.storage.root / "run/receiver+worker+sender.ready"
        assert wait_for(lambda: ready.exists() and echo(settings.node.port) == status.SUCCESS, 90)
        base = small_cr(chest_cr, "fuzz-base", size=160)
        with lenient_pydicom():
            for number in range(CASES):
                if number % CLEAN_EVERY == 0:
                    image = small_cr(chest_cr, f"fuzz-clean-{number}", size=128)
                    path = tmp_path / f"clean-{number}.dcm"
                    image.save_as(path, enforce_file_format=True)
                    assert send(settings.node.port, path) == status.SUCCESS, f"clean image {number}"
                    clean.append(str(image.SOPInstanceUID))
                mutant = mutate(rng, base, folder, number)
                code, comment = send_with_comment(settings.node.port, mutant.path)
                answers.append((f"{mutant.what}: {comment}", code))
                assert node.poll() is None, f"the node died after mutant {number}: {mutant.what}"
        assert echo(settings.node.port) == status.SUCCESS

        def delivered() -> bool:
            arrived = {(str(ds.Modality), uid) for ds in list(pacs.received) for uid in source_uids(ds)}
            return all(("SR", uid) in arrived and ("OT", uid) in arrived for uid in clean)

        assert wait_for(delivered, 240), "a clean image's SR or SC never reached the PACS"
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        pacs.stop()
    unanswered = [what for what, code in answers if code is None]
    failed = sum(1 for _, code in answers if code is not None and status.is_failure(code))
    print(f"{CASES} mutants: {len(answers) - len(unanswered) - failed} accepted, {failed} refused, "
          f"{len(unanswered)} without a C-STORE answer (association refused or aborted)")  # fmt: skip
    if os.environ.get("CXR_NODE_FUZZ_VERBOSE"):
        for what, code in answers:
            print(f"  {'----' if code is None else f'{code:04X}'}  {what}")
    assert not unanswered, unanswered[:20]
