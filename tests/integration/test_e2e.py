"""End to end with a real PACS: DCMTK storescu → cxr-node serve → SR + SC in a real Orthanc, across kill -9
of the whole service and an outage of the PACS; counts are exact (one SR and one SC per source image)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.orthanc import netns_available, run_in_netns


def check(report: dict, count: int) -> None:
    """Every source study holds exactly one SR and one SC; every job ended delivered (``count`` phantoms and
    the real WG04 CR chest)."""
    count += 1
    assert report["sources"] == count
    assert report["jobs"]["delivered"] == count, report
    assert len(report["per_study"]) == count, report
    assert all(kinds == {"SR": 1, "OT": 1} for kinds in report["per_study"].values()), report["per_study"]


@pytest.mark.parametrize(("count", "kills"), [(8, 2)])
def test_results_reach_orthanc_exactly_once_across_kills_and_an_outage(tmp_path: Path, count: int, kills: int) -> None:
    """Eight phantoms and a real CR, two SIGKILLs of the service while it works, Orthanc down then up: one SR
    and one SC each."""
    require_tool("storescu")
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    check(run_in_netns("e2e", str(tmp_path), str(count), str(kills), timeout=500), count)


@pytest.mark.slow
def test_a_burst_of_100_with_three_kills(tmp_path: Path) -> None:
    """The long variant: 100 images, three SIGKILLs, the outage; counts still exact."""
    require_tool("storescu")
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    check(run_in_netns("e2e", str(tmp_path), "100", "3", timeout=580), 100)
