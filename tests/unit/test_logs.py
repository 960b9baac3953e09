"""Logging: events are structured, and patient identifiers never appear in clear."""

from __future__ import annotations

import io
import json
import logging
import warnings

import structlog
from structlog.testing import capture_logs

from cxr_node import logs


def test_phi_keys_are_withheld_in_rendered_logs() -> None:
    """A patient ID or name bound to an event is withheld, never written in clear."""
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        structlog.get_logger("t").info("store.accepted", patient_id="12345", patient_name="Doe^Jane", job_id=7)
    finally:
        logs.configure("info", "console")
    event = json.loads(stream.getvalue().splitlines()[-1])
    assert event["event"] == "store.accepted" and event["job_id"] == 7
    assert "12345" not in stream.getvalue() and "Doe" not in stream.getvalue()
    assert event["patient_id"] == event["patient_name"] == logs.WITHHELD


def test_library_warnings_reach_the_log_without_their_values() -> None:
    """pydicom's validation warning about a bad birth date is logged, the date itself withheld."""
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        from pydicom.dataset import Dataset

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            Dataset().PatientBirthDate = "1970-13-45x"
        logging.getLogger("pydicom").warning("Invalid value for VR PN: 'Doe^Jane'")
    finally:
        logs.configure("info", "console")
    text = stream.getvalue()
    assert "Invalid value for VR DA" in text and "1970-13-45x" not in text
    assert "Doe" not in text and logs.WITHHELD in text


def test_capture_store_events() -> None:
    """Events can be asserted on with structlog's capture_logs (used across the integration tests)."""
    with capture_logs() as captured:
        structlog.get_logger("t").warning("assoc.rejected", calling_aet="EVIL")
    assert captured == [{"event": "assoc.rejected", "calling_aet": "EVIL", "log_level": "warning"}]
