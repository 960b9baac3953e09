"""The worker with its decoding and output writing in a pool of processes (``worker.cpu_processes`` > 0)."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

from pydicom import dcmread

from cxr_node.app import Receiver, build_worker, start_pool_child
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.jobs.records import Job
from cxr_node.jobs.states import JobState
from cxr_node.results.findings import Provenance
from cxr_node.work import pool
from cxr_node.work.load import Loaded
from cxr_node.work.pool import StepPool
from tests.integration.helpers import small_cr, store_all

POISON_ROWS = 200
"""An image of this many rows kills the pool child that decodes it (see :func:`crashing_child`)."""


def crashing_child(settings: Settings, made_by: Provenance) -> None:
    """A pool child as the node makes it, except that decoding an image of POISON_ROWS rows aborts the process,
    the way a decoder crashing on a hostile file would."""
    start_pool_child(settings, made_by)
    real_load = pool.load

    def load(root: Path, job: Job, max_side: int) -> Loaded:
        if job.path is not None and dcmread(root / job.path, stop_before_pixels=True).Rows == POISON_ROWS:
            os.abort()
        return real_load(root, job, max_side)

    pool.load = load


def outputs_of(receiver: Receiver) -> dict[str, list[str]]:
    """Each written job's output kinds, by SOP Instance UID."""
    return {
        job.sop_instance_uid: [output.kind for output in receiver.store.results.outputs(job.id)]
        for job in receiver.store.jobs.query(JobState.WRITTEN)
    }


def test_a_pool_worker_writes_every_output_the_inline_worker_writes(receiver: Receiver, chest_cr: Path) -> None:
    images = [small_cr(chest_cr, f"p{i}", size=256) for i in range(5)]
    assert store_all(receiver.port, images) == [status.SUCCESS] * 5
    settings = receiver.settings.with_overrides({"worker.cpu_processes": 2, "worker.batch_size": 2})
    worker = build_worker(settings, receiver.store)
    try:
        assert not worker.pool.inline
        while jobs := worker.take_batch(threading.Event()):
            worker.process(jobs)
    finally:
        worker.close()
    written = outputs_of(receiver)
    assert sorted(written) == sorted(str(ds.SOPInstanceUID) for ds in images)
    assert all(kinds and kinds[0] == "sr" for kinds in written.values()), written
    for job in receiver.store.jobs.query(JobState.WRITTEN):
        for output in receiver.store.results.outputs(job.id):
            assert dcmread(receiver.settings.storage.root / output.path).SOPInstanceUID == output.sop_instance_uid


def test_a_decoder_crash_costs_only_the_image_that_caused_it(receiver: Receiver, chest_cr: Path) -> None:
    """A pool child dying on one image: the others of its batch are decoded again, alone, and written; the one
    that kills a child by itself is quarantined with the reason; the worker goes on."""
    poison = small_cr(chest_cr, "poison", size=POISON_ROWS)
    others = [small_cr(chest_cr, f"ok{i}", size=256) for i in range(3)]
    assert store_all(receiver.port, [others[0], poison, *others[1:]]) == [status.SUCCESS] * 4
    worker = build_worker(receiver.settings, receiver.store)
    worker.pool = StepPool(1, crashing_child, (receiver.settings, worker.provenance))
    try:
        worker.process(worker.take_batch(threading.Event()))
    finally:
        worker.close()
    jobs = {job.sop_instance_uid: job for job in receiver.store.jobs.query()}
    dead = jobs[str(poison.SOPInstanceUID)]
    assert dead.state is JobState.QUARANTINED
    assert dead.reason == "stored file cannot be read: the decoder's process died on this image"
    assert [jobs[str(ds.SOPInstanceUID)].state for ds in others] == [JobState.WRITTEN] * 3


def test_warm_starts_every_child_before_the_first_batch(receiver: Receiver) -> None:
    worker = build_worker(receiver.settings, receiver.store)
    before = {child.pid for child in multiprocessing.active_children()}
    pool_ = StepPool(2, start_pool_child, (receiver.settings, worker.provenance))
    try:
        pool_.warm()
        started = {child.pid for child in multiprocessing.active_children()} - before
        assert len(started) == 2
    finally:
        pool_.close()
        worker.close()
