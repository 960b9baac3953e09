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
        logging.getLogger("py.warnings").warning("x.py:3: UserWarning: Unknown encoding 'X'\n  warn(encoding)\n")
    finally:
        logs.configure("info", "console")
    text = stream.getvalue()
    assert "Invalid value for VR DA" in text and "1970-13-45x" not in text
    assert "Doe" not in text and logs.WITHHELD in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line one JSON object, the warning's too
    assert {line["logger"] for line in lines} >= {"py.warnings", "pydicom"}
    assert all(line["level"] == "warning" and line["timestamp"].endswith("Z") for line in lines)


def test_capture_store_events() -> None:
    """Events can be asserted on with structlog's capture_logs (used across the integration tests)."""
    with capture_logs() as captured:
        structlog.get_logger("t").warning("assoc.rejected", calling_aet="EVIL")
    assert captured == [{"event": "assoc.rejected", "calling_aet": "EVIL", "log_level": "warning"}]


def test_a_skipped_scheduler_run_is_not_reported() -> None:
    """apscheduler's warning that a run was skipped (the previous one still runs: one at a time by design) is
    dropped; its other warnings are kept."""
    from cxr_node.scheduler import SkippedRuns

    record = logging.LogRecord("apscheduler.scheduler", logging.WARNING, "", 0, "x", (), None)
    record.msg = 'Execution of job "deliver" skipped: maximum number of running instances reached (1)'
    assert not SkippedRuns().filter(record)
    record.msg = 'Run time of job "deliver" was missed by 0:00:05'
    assert SkippedRuns().filter(record)


def test_a_traceback_logged_by_a_library_is_redacted_and_one_json_line() -> None:
    """pynetdicom logs a traceback whose exception quotes what a peer sent (an AE title with a newline and a fake
    JSON event in it): the quoted value is withheld in the traceback too, and the record stays one JSON line."""
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    try:
        sent = 'X\n{"event":"FAKE'  # what the peer sent; the traceback's source line shows the code, not this
        try:
            raise ValueError(f"Invalid 'Called AE Title' value '{sent}'")
        except ValueError:
            logging.getLogger("pynetdicom.dul").exception("Exception in DUL.run(), aborting association")
    finally:
        logs.configure("info", "console")
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert "FAKE" not in line and logs.WITHHELD in event["exception"]
    assert event["event"] == "Exception in DUL.run(), aborting association" and "Traceback" in event["exception"]
