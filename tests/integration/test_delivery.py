"""Delivery to real Storage SCPs on loopback: success, retries with backoff, dead letters and resend, refused
SOP classes, a destination down then back (the backlog in order), several destinations."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cxr_node.app import Receiver, build_dispatcher, build_worker
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.jobs.states import JobState
from cxr_node.send.deliver import Dispatcher
from tests.integration.helpers import small_cr, store_all
from tests.integration.pacs import Pacs

FAST = {"delivery.backoff_initial_s": 0.05, "delivery.backoff_max_s": 0.2, "delivery.max_attempts": 3}


def destination(name: str, pacs: Pacs) -> dict[str, object]:
    """A destinations entry for ``pacs``."""
    return {"name": name, "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    """A PACS accepting every output kind."""
    server = Pacs(tmp_path / "pacs").start()
    yield server
    server.stop()


def written_node(
    make_settings: Callable[..., Settings], chest_cr: Path, tiny_manifest: Path, count: int, **overrides: object
) -> Receiver:
    """A receiver holding ``count`` images analysed and written (tiny models: outputs SR + SC)."""
    node = Receiver(make_settings(**FAST, **overrides)).start()
    assert store_all(node.port, [small_cr(chest_cr, f"d{i}", size=256) for i in range(count)]) == [0] * count
    worker = build_worker(node.settings, node.store)
    while jobs := worker.take_batch(threading.Event()):
        worker.process(jobs)
    worker.close()
    assert node.store.jobs.counts()[JobState.WRITTEN] == count
    return node


def dispatcher(node: Receiver) -> Dispatcher:
    """The node's dispatcher for its configured destinations."""
    return build_dispatcher(node.settings, node.store)


def rounds_until(node: Receiver, done: Callable[[], bool], limit: int = 60) -> None:
    """Run delivery rounds (bounded in count and time) until ``done()``."""
    d = dispatcher(node)
    deadline = time.monotonic() + 30
    for _ in range(limit):
        d.round()
        if done() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def test_every_output_is_delivered_once_in_order(make_settings, chest_cr, tiny_manifest, pacs) -> None:
    """Three written jobs end delivered; the PACS got each output once, oldest job first."""
    node = written_node(make_settings, chest_cr, tiny_manifest, 3, destinations=[destination("pacs", pacs)])
    try:
        rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 3)
        assert node.store.jobs.counts()[JobState.DELIVERED] == 3
        expected = [o.sop_instance_uid for job in node.store.jobs.query() for o in node.store.results.outputs(job.id)]
        assert pacs.uids() == expected
        assert node.store.deliveries.counts() == {("pacs", "delivered"): len(expected)}
    finally:
        node.stop(grace_s=5)


def test_failure_statuses_are_retried_then_dead_then_resent(make_settings, chest_cr, tiny_manifest, tmp_path) -> None:
    """A PACS answering 0xA700 gets retries with backoff; after max_attempts the job is dead with the status;
    ``resend`` puts it back and it is delivered once the PACS accepts."""
    refusing = {"on": True}
    pacs = Pacs(tmp_path / "p", answer=lambda ds: status.OUT_OF_RESOURCES if refusing["on"] else 0).start()
    node = written_node(make_settings, chest_cr, tiny_manifest, 1, destinations=[destination("pacs", pacs)])
    try:
        with capture_logs() as logs:
            rounds_until(node, lambda: node.store.jobs.counts()[JobState.DEAD] == 1)
        job = node.store.jobs.query(JobState.DEAD)[0]
        assert "0xA700" in job.reason and "pacs/" in job.reason
        assert [e for e in logs if e["event"] == "send.retry_scheduled"]
        refusing["on"] = False
        assert node.store.deliveries.resend(dead=True) == [job.id]
        rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 1)
        assert node.store.jobs.get(job.id).state is JobState.DELIVERED
    finally:
        node.stop(grace_s=5)
        pacs.stop()


def test_a_pacs_refusing_sr_gets_the_overlay_and_an_alarm(make_settings, chest_cr, tiny_manifest, tmp_path) -> None:
    """A destination that does not accept Comprehensive SR gets the SC; the SR is recorded refused and the
    node raises destination.unmet."""
    pacs = Pacs(tmp_path / "p", accept=("sc",)).start()
    node = written_node(make_settings, chest_cr, tiny_manifest, 1, destinations=[destination("pacs", pacs)])
    try:
        with capture_logs() as logs:
            rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 1)
        assert node.store.deliveries.destinations()["pacs"].refused == ["sr"]
        assert any(e["event"] == "destination.unmet" for e in logs)
        assert node.store.deliveries.counts() == {("pacs", "delivered"): 1, ("pacs", "refused"): 1}
    finally:
        node.stop(grace_s=5)
        pacs.stop()


def test_a_destination_down_gets_the_backlog_in_order(make_settings, chest_cr, tiny_manifest, tmp_path) -> None:
    """While the PACS is down nothing is lost or counted as an attempt; when it comes back it receives the
    backlog oldest first; a second destination gets everything too."""
    down = Pacs(tmp_path / "down")
    other = Pacs(tmp_path / "other").start()
    node = written_node(
        make_settings,
        chest_cr,
        tiny_manifest,
        3,
        destinations=[destination("pacs", down), destination("archive", other)],
    )
    try:
        d = dispatcher(node)
        with capture_logs() as logs:
            d.round()
        assert any(e["event"] == "destination.down" for e in logs)
        state = node.store.deliveries.destinations()["pacs"]
        assert not state.reachable and state.retry_at > state.probed_at and state.failures == 1
        assert len(other.uids()) == 6
        down.start()
        rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 3)
        expected = [o.sop_instance_uid for job in node.store.jobs.query() for o in node.store.results.outputs(job.id)]
        assert down.uids() == expected and other.uids() == expected
    finally:
        node.stop(grace_s=5)
        down.stop()
        other.stop()
