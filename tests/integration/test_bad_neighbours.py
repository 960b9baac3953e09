"""Fault isolation in retrieval: a case whose identifiers cannot be written never costs another patient a result.

Reproduces issue 13: an image whose SOP Instance UID is not a valid UID was indexed, and from then on every
patient whose similar cases included it got no result ("output invalid, not sent: ... failed validation: UID").
Now such a case never enters the index, one already there is left out of reports, an index built by an older
version is cleaned when it is opened, and ``cxr-node index check`` / ``drop-invalid`` list and remove them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from cxr_node.app import Receiver, build_worker, open_index
from cxr_node.cli import main
from cxr_node.config import Settings
from cxr_node.jobs.records import Job, NewJob
from cxr_node.jobs.spool import INBOX, instance_key, relative_path
from cxr_node.jobs.states import JobState
from cxr_node.neighbours import DB_NAME, NewCase, SqliteNeighbourIndex
from cxr_node.neighbours.store import SCHEMA_VERSION
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset
from cxr_node.work.loop import Worker
from tests.integration.helpers import store_all, write_config

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"
BAD_UID = "1.2.3.abc"


@pytest.fixture
def node(make_settings: Callable[..., Settings]) -> Iterator[Receiver]:
    """A receiver with the demo models and retrieval on (k = 5)."""
    receiver = Receiver(make_settings(**{"models.manifest": str(DEMO)})).start()
    try:
        yield receiver
    finally:
        receiver.stop(grace_s=5)


def patient(number: int, **changes: object) -> Dataset:
    """A chest phantom of its own patient and study, with ``changes``."""
    ds = phantom_to_dataset(make_phantom(60_000 + number, label=number % 2, size=256), patient_id=f"P{number}",
                            patient_name=f"Patient^{number}")  # fmt: skip
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def keep_as_an_older_receiver_did(node: Receiver, ds: Dataset) -> None:
    """File ``ds`` and queue its job without today's door checks, as a node before them accepted it."""
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    key = instance_key(str(ds.SOPInstanceUID))
    relative = relative_path(INBOX, key)
    path = node.settings.storage.root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    new = NewJob(
        key, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
        str(ds.AccessionNumber), f"hash-of-{ds.PatientID}", "CR", str(ds.file_meta.TransferSyntaxUID),
        "PACS", "127.0.0.1", str(relative), path.stat().st_size,
    )  # fmt: skip
    node.store.jobs.record(new, JobState.QUEUED)


def run(worker: Worker) -> None:
    """Analyse and write every queued job."""
    while jobs := worker.take_batch(threading.Event()):
        worker.process(jobs)


def job_of(node: Receiver, ds: Dataset) -> Job:
    """The job of an instance."""
    job = node.store.jobs.find(instance_key(str(ds.SOPInstanceUID)))
    assert job is not None
    return job


def written_kinds(node: Receiver, ds: Dataset) -> list[str]:
    """The output kinds written for an instance, after checking its job is written."""
    job = job_of(node, ds)
    assert job.state is JobState.WRITTEN, (job.state, job.reason)
    return sorted(output.kind for output in node.store.results.outputs(job.id))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_image_with_an_invalid_uid_never_costs_later_patients_their_results(node: Receiver) -> None:
    """The image with SOP Instance UID 1.2.3.abc is analysed but not indexed; the next patients get SR and SC."""
    worker = build_worker(node.settings, node.store)
    try:
        bad = patient(1, SOPInstanceUID=BAD_UID)
        keep_as_an_older_receiver_did(node, bad)
        with capture_logs() as logs:
            run(worker)
        assert {"event": "index.case_skipped", "fields": ["sop_instance_uid"]}.items() <= next(
            e for e in logs if e["event"] == "index.case_skipped"
        ).items()
        later = [patient(2), patient(3), patient(4)]
        for ds in later:
            assert store_all(node.port, [ds]) == [0]
            run(worker)
        for ds in later:
            assert written_kinds(node, ds) == ["sc", "sr"]
        summary = node.store.results.result(job_of(node, later[-1]).id)
        assert summary is not None
        assert len(summary.summary.similar) == 2
        assert BAD_UID not in {case.sop_instance_uid for case in summary.summary.similar}
    finally:
        worker.close()
    with open_index(node.settings) as index:
        assert index.invalid_cases() == []


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_bad_case_already_indexed_is_left_out_of_reports(node: Receiver) -> None:
    """A case with an invalid UID in the index (stored by an older node) is left out of the next report, which
    is written; the log names the case number and the field, not the value."""
    worker = build_worker(node.settings, node.store)
    first, second = patient(11), patient(12)
    try:
        assert store_all(node.port, [first]) == [0]
        run(worker)
        with sqlite3.connect(node.settings.storage.root / "index" / DB_NAME) as db:
            db.execute("UPDATE cases SET sop_instance_uid = ?", (BAD_UID,))
        assert store_all(node.port, [second]) == [0]
        with capture_logs() as logs:
            run(worker)
    finally:
        worker.close()
    assert written_kinds(node, second) == ["sc", "sr"]
    left_out = [e for e in logs if e["event"] == "index.neighbour_left_out"]
    assert left_out and left_out[0]["fields"] == ["sop_instance_uid"] and left_out[0]["case"].startswith("C")
    assert BAD_UID not in str(logs)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_repaired_values_are_logged_by_name_and_the_outputs_written(node: Receiver) -> None:
    """A dotted study date and a 20-character accession number are repaired or left empty, the job is written,
    and job.values_repaired names the attributes without their values."""
    ds = patient(21, StudyDate="2020.03.01", AccessionNumber="ACC-1234567890123456")
    worker = build_worker(node.settings, node.store)
    try:
        assert store_all(node.port, [ds]) == [0]
        with capture_logs() as logs:
            run(worker)
    finally:
        worker.close()
    assert written_kinds(node, ds) == ["sc", "sr"]
    [event] = [e for e in logs if e["event"] == "job.values_repaired"]
    assert event["attributes"] == ["StudyDate", "AccessionNumber"]
    assert "2020.03.01" not in str(logs) and "ACC-1234567890123456" not in str(logs)


# ------------------------------------------------------------------------------------ the index itself


def cases() -> list[NewCase]:
    """A good case, one whose SOP Instance UID is invalid, one with a 20-character accession, one with a bad date."""
    return [
        NewCase("1.2.826.1.1", "1.2.826.2.1", "ACC1", "20200301", "p1"),
        NewCase(BAD_UID, "1.2.826.2.2", "ACC2", "20200301", "p2"),
        NewCase("1.2.826.1.3", "1.2.826.2.3", "A" * 20, "20200301", "p3"),
        NewCase("1.2.826.1.4", "1.2.826.2.4", "ACC4", "20201340", "p4"),
    ]


def filled_index(root: Path) -> np.ndarray:
    """Add :func:`cases` as an older node could (no identifier checks) and checkpoint; return the vectors."""
    vectors = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    with SqliteNeighbourIndex(root) as index:
        index.add_many("v1", vectors, cases())
        index.checkpoint("v1")
    return vectors


def test_an_index_of_an_older_version_is_cleaned_when_opened(tmp_path: Path) -> None:
    """Opening a schema-1 index deletes the case that cannot be named (from the database and, through the
    checkpoint's reconciliation, from searches) and clears the accession and date that cannot be written."""
    root = tmp_path / "index"
    vectors = filled_index(root)
    with sqlite3.connect(root / DB_NAME) as db:
        db.execute("PRAGMA user_version = 1")
    with SqliteNeighbourIndex(root) as index:
        assert index.invalid_cases() == []
        found = index.query("v1", vectors[1], 10, patient_hash=None, study_instance_uid=None)
        assert {n.case.sop_instance_uid for n in found} == {"1.2.826.1.1", "1.2.826.1.3", "1.2.826.1.4"}
        cleared = {n.case.sop_instance_uid: n.case for n in found}
        assert cleared["1.2.826.1.3"].accession_number == "" and cleared["1.2.826.1.4"].study_date == ""
        assert cleared["1.2.826.1.1"].accession_number == "ACC1"
    with sqlite3.connect(root / DB_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_the_cli_lists_and_drops_invalid_cases(
    make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr-node index check` lists the failing cases (exit 1) without their values; `drop-invalid` deletes or
    clears them; `check` then passes (exit 0)."""
    settings = make_settings()
    config = write_config(settings, tmp_path / "node.yaml")
    filled_index(settings.storage.root / "index")
    assert main(["index", "check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()[1:4]]
    assert [(line[0], line[2]) for line in lines] == [
        ("C0000002", "delete"),
        ("C0000003", "clear"),
        ("C0000004", "clear"),
    ]
    assert "sop_instance_uid: not digits and dots" in out and "accession_number: over 16 characters" in out
    assert BAD_UID not in out and "A" * 20 not in out
    assert main(["index", "drop-invalid", "--config", str(config)]) == 0
    assert "deleted 1 case(s)" in capsys.readouterr().out
    assert main(["index", "check", "--config", str(config)]) == 0
    with open_index(settings) as index:
        assert index.size("v1") == 3


def test_a_rebuild_leaves_out_cases_that_cannot_be_named(tmp_path: Path) -> None:
    """Re-embedding stored inputs never puts an unnameable case back, and stores unwritable identifiers empty."""
    vectors = np.random.default_rng(4).standard_normal((4, 16)).astype(np.float32)
    with SqliteNeighbourIndex(tmp_path / "index") as index:
        assert index.rebuild("v1", zip(cases(), vectors, strict=True)) == 3
        assert index.invalid_cases() == []
