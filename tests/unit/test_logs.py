"""Logging: events are structured, and patient identifiers never appear in clear."""

from __future__ import annotations

import io
import json

import structlog
from structlog.testing import capture_logs

from cxr_node import logs


def test_phi_keys_are_hashed_in_rendered_logs() -> None:
    """A patient ID or name bound to an event is written as a stable hash, never in clear."""
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        structlog.get_logger("t").info("store.accepted", patient_id="12345", patient_name="Doe^Jane", job_id=7)
    finally:
        logs.configure("info", "console")
    event = json.loads(stream.getvalue().splitlines()[-1])
    assert event["event"] == "store.accepted" and event["job_id"] == 7
    assert "12345" not in stream.getvalue() and "Doe" not in stream.getvalue()
    assert event["patient_id"] == logs.hash_identifier("12345")


def test_hash_is_stable_and_short() -> None:
    """The same identifier always hashes the same (so events can be correlated), in 16 hex digits."""
    assert logs.hash_identifier("12345") == logs.hash_identifier(" 12345 ")
    assert len(logs.hash_identifier("x")) == 16


def test_capture_store_events() -> None:
    """Events can be asserted on with structlog's capture_logs (used across the integration tests)."""
    with capture_logs() as captured:
        structlog.get_logger("t").warning("assoc.rejected", calling_aet="EVIL")
    assert captured == [{"event": "assoc.rejected", "calling_aet": "EVIL", "log_level": "warning"}]
