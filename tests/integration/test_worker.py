"""The inference worker on real stored instances: results recorded, broken images quarantined, batches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import structlog
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from cxr_node.app import Receiver, build_worker
from cxr_node.dicom import status
from cxr_node.infer.classify import RuntimeOptions
from cxr_node.infer.engine import Analysis, Engine
from cxr_node.infer.registry import load_manifest
from cxr_node.jobs.states import VALUES_REPAIRED, JobState
from cxr_node.results.findings import Summary
from tests.integration.helpers import small_cr, store_all


@pytest.fixture
def engine(tiny_manifest: Path) -> Engine:
    """The real engine on tiny random models."""
    return Engine.from_manifest(load_manifest(tiny_manifest), RuntimeOptions())


def broken_j2k(wg04: Path) -> object:
    """A JPEG 2000 chest CR whose compressed stream is garbage: its header is fine, its pixels are not."""
    ds = dcmread(wg04 / "RG1_J2KR.dcm")
    ds.PixelData = encapsulate([b"\x00\x01garbage" * 64])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["broken j2k"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_worker_records_results_and_an_undecodable_image_as_not_analysed(
    receiver: Receiver, engine: Engine, chest_cr: Path, wg04: Path
) -> None:
    """Queued images end inferred with a summary; an undecodable one is recorded not analysed, with the reason."""
    good = [small_cr(chest_cr, f"w{i}", size=256) for i in range(3)]
    assert store_all(receiver.port, good) == [status.SUCCESS] * 3
    store_broken(receiver, wg04)
    worker = build_worker(receiver.settings, receiver.store, engine)
    worker.process(worker.take_batch(threading.Event()))
    worker.close()
    counts = receiver.store.jobs.counts()
    assert (counts[JobState.WRITTEN], counts[JobState.QUARANTINED]) == (4, 0)
    broken = summary_of(receiver, receiver.store.jobs.query(JobState.WRITTEN)[-1].id)
    assert not broken.analysed
    assert broken.reason.startswith("pixels cannot be decoded")
    summary = summary_of(receiver, receiver.store.jobs.query(JobState.WRITTEN)[0].id)
    assert (summary.model_name, summary.model_version) == ("tiny-test", "0.0.1")
    assert summary.analysed_shape == (256, 256)


def summary_of(receiver: Receiver, job_id: int) -> Summary:
    """The stored summary of one job."""
    stored = receiver.store.results.result(job_id)
    assert stored is not None
    return stored.summary


def store_broken(receiver: Receiver, wg04: Path) -> None:
    """Send the broken JPEG 2000 image over a JPEG 2000 context."""
    from pynetdicom import AE

    ds = broken_j2k(wg04)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CXR_NODE")
    assert int(assoc.send_c_store(ds).Status) == status.SUCCESS
    assoc.release()


class FailsOnLargeImages:
    """A real engine that raises for any batch holding an image wider than 300 pixels (a fault injection)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def model(self) -> tuple[str, str]:
        """The wrapped engine's identity."""
        return self.engine.model

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]:
        """Analyse, or raise like a model error on a large image."""
        if any(image.shape[1] > 300 for image in images):
            raise RuntimeError("simulated out of memory")
        return self.engine.analyse(images)


def test_one_failing_image_does_not_sink_its_batch(receiver: Receiver, engine: Engine, chest_cr: Path) -> None:
    """When a batch fails, each image is retried alone: the bad one is quarantined, the others inferred."""
    images = [small_cr(chest_cr, "big", size=400)] + [small_cr(chest_cr, f"b{i}", size=128) for i in range(3)]
    assert store_all(receiver.port, images) == [status.SUCCESS] * 4
    worker = build_worker(receiver.settings, receiver.store, FailsOnLargeImages(engine))
    worker.process(worker.take_batch(threading.Event()))
    worker.close()
    counts = receiver.store.jobs.counts()
    assert (counts[JobState.WRITTEN], counts[JobState.QUARANTINED]) == (3, 1)
    reason = receiver.store.jobs.query(JobState.QUARANTINED)[0].reason
    assert reason is not None and "analysis failed: RuntimeError: simulated out of memory" in reason


def test_batches_fill_up_to_the_batch_size(receiver: Receiver, engine: Engine, chest_cr: Path) -> None:
    """take_batch claims at most worker.batch_size jobs, oldest first, and run() drains the queue then idles."""
    images = [small_cr(chest_cr, f"q{i}", size=96) for i in range(11)]
    assert store_all(receiver.port, images) == [status.SUCCESS] * 11
    worker = build_worker(receiver.settings, receiver.store, engine)
    first = worker.take_batch(threading.Event())
    assert len(first) == receiver.settings.worker.batch_size
    assert [j.id for j in first] == sorted(j.id for j in first)
    worker.process(first)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        for _ in range(200):
            if receiver.store.jobs.counts()[JobState.WRITTEN] == 11:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(30)
        worker.close()
    assert receiver.store.jobs.counts()[JobState.WRITTEN] == 11


def test_job_events_carry_the_job_and_store_events_the_association(
    receiver: Receiver, engine: Engine, chest_cr: Path
) -> None:
    """Log events are bound through structlog contextvars: the association's on receipt, the job's in the worker."""
    merge = [structlog.contextvars.merge_contextvars]
    with capture_logs(processors=merge) as received:
        assert store_all(receiver.port, [small_cr(chest_cr, "ctx", size=128)]) == [status.SUCCESS]
    [accepted] = [e for e in received if e["event"] == "store.accepted"]
    assert accepted["calling_aet"] == "PACS" and isinstance(accepted["assoc"], int)
    worker = build_worker(receiver.settings, receiver.store, engine)
    with capture_logs(processors=merge) as logged:
        worker.process(worker.take_batch(threading.Event()))
    worker.close()
    [job] = receiver.store.jobs.query()
    assert [e.get("job_id") for e in logged if e["event"] in ("job.inferred", "job.written")] == [job.id, job.id]
    assert "job_id" not in structlog.contextvars.get_contextvars()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_unwritable_accession_number_costs_the_patient_nothing(
    receiver: Receiver, engine: Engine, chest_cr: Path
) -> None:
    """An accession number with a control character is left out of the index and the outputs, the job is
    written, and the store counts it among the jobs whose values were repaired."""
    assert store_all(receiver.port, [small_cr(chest_cr, "acc", AccessionNumber="ACC\x01X")]) == [status.SUCCESS]
    worker = build_worker(receiver.settings, receiver.store, engine)
    worker.process(worker.take_batch(threading.Event()))
    worker.close()
    [job] = receiver.store.jobs.query()
    assert job.state is JobState.WRITTEN
    assert receiver.store.jobs.moves(JobState.WRITTEN, VALUES_REPAIRED) == 1
    assert any(reason and "AccessionNumber" in reason for _, _, reason in receiver.store.jobs.history(job.id))
