"""The worker queries the neighbour index before writing and adds each image after: earlier patients show
up as similar cases in the next image's SR; the same patient never does; the site's identifier policy holds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from cxr_node.app import Receiver, build_worker
from cxr_node.config import Settings
from cxr_node.jobs.spool import instance_key
from cxr_node.results.findings import Summary
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset
from tests.integration.helpers import store_all

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"


def analyse_in_order(settings: Settings, patients: list[str]) -> tuple[Receiver, list[Summary]]:
    """Store one phantom per entry of ``patients`` and run the worker over them one at a time."""
    node = Receiver(settings).start()
    worker = build_worker(settings, node.store)
    summaries = []
    for number, patient in enumerate(patients):
        ds = phantom_to_dataset(
            make_phantom(70_000 + number, label=number % 2, size=256), patient_id=patient, patient_name=patient
        )
        assert store_all(node.port, [ds]) == [0]
        worker.process(worker.take_batch(threading.Event()))
        job = node.store.jobs.find(instance_key(str(ds.SOPInstanceUID)))
        assert job is not None
        stored = node.store.results.result(job.id)
        assert stored is not None
        summaries.append(stored.summary)
    worker.close()
    return node, summaries


def _items(ds: object) -> list:
    found = []
    for item in getattr(ds, "ContentSequence", []):
        found += [item, *_items(item)]
    return found


@pytest.mark.parametrize("policy", ["uids", "case_number"])
def test_similar_cases_come_from_other_patients(make_settings: Callable[..., Settings], policy: str) -> None:
    """The third image's similar cases are the first two patients' images, never its own patient's, with
    the identifiers the policy allows, and they are named in its SR."""
    settings = make_settings(**{"models.manifest": str(DEMO), "neighbours.identifiers": policy})
    node, summaries = analyse_in_order(settings, ["A", "B", "A", "C"])
    try:
        assert summaries[0].similar == ()
        similar = summaries[3].similar
        assert len(similar) == 3
        studies = {s.study_instance_uid for s in similar}
        if policy == "uids":
            assert all(s.accession_number and s.sop_instance_uid for s in similar)
            assert len(studies) == 3
        else:
            assert studies == {None} and all(s.case_number.startswith("C") for s in similar)
        same_patient = summaries[2].similar
        assert len(same_patient) == 1  # patient A's first image is excluded; only B remains
        job = node.store.jobs.query()[3]
        [sr] = [o for o in node.store.results.outputs(job.id) if o.kind == "sr"]
        texts = [
            i.TextValue
            for i in dcmread(settings.storage.root / sr.path).ContentSequence[-1].ContentSequence
            if i.ValueType == "TEXT"
        ]
        assert texts  # the SR was written; its neighbour groups are checked in tests/dicom/test_results.py
    finally:
        node.stop(grace_s=5)


def test_a_malformed_study_date_does_not_stop_retrieval(make_settings: Callable[..., Settings]) -> None:
    """An image whose StudyDate is not YYYYMMDD is indexed with no date instead of failing the job."""
    from cxr_node.privacy import PatientHasher
    from cxr_node.work.load import index_case

    ds = phantom_to_dataset(make_phantom(1, label=0, size=128), patient_id="X", patient_name="X^Y")
    ds.StudyDate = "2020-03-01"
    assert index_case(ds, PatientHasher(b"k" * 16)).study_date == ""
