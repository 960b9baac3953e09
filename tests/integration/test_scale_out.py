"""Scale-out: receivers, workers and senders on six "hosts" sharing one PostgreSQL and one storage root, with a
real Orthanc as the PACS; a worker host dies holding a batch and a sender host dies mid-delivery. Every image
still gets exactly one SR and one SC, and nothing stays leased by a dead holder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.orthanc import netns_available, run_in_netns
from tests.postgres import available
from tests.scale_out_scenario import can_rename_host

COUNT = 16


def test_two_hosts_die_and_every_image_still_gets_one_sr_and_one_sc(tmp_path: Path) -> None:
    """Two receivers, two workers, two senders as separate hosts; SIGKILL of worker A holding jobs and of sender A
    delivering: every job ends delivered, each study holds one SR and one SC at Orthanc, the dead worker's jobs
    were taken back when its lease ran out (not before: no host can see another's processes) and inferred by
    worker B."""
    require_tool("storescu")
    for reason in (netns_available(), available() or "", can_rename_host()):
        if reason:
            pytest.skip(reason)
    report = run_in_netns("scale_out", str(tmp_path), str(COUNT), timeout=600)
    assert report["sources"] == COUNT
    assert report["worker_held_jobs_when_killed"] and report["sender_was_delivering_when_killed"], report
    assert report["finished"], report
    assert report["jobs"] == {"delivered": COUNT}, report
    assert len(report["per_study"]) == COUNT and all(k == {"SR": 1, "OT": 1} for k in report["per_study"].values())
    assert report["running_left"] == []
    assert report["storescu_rc"] == [0, 0]
    for history in report["held_by_dead_worker"].values():
        taken_back = [e for e in history if e[:3] == ["running", "queued", "its worker stopped while it ran"]]
        assert taken_back, history
        assert any(e[1] == "inferred" and str(e[3]).startswith("worker-b:") for e in history), history
    assert set(report["inferred_by_host"]) <= {"worker-a", "worker-b"}
    # one neighbour index for all workers: every analysed image is a case in PostgreSQL, none in a SQLite file
    assert report["index_cases"] == COUNT and not report["sqlite_index_on_shared_root"], report
