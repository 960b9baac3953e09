"""Staged go-live: the model modes in the store (both backends), withheld deliveries, the go-live check, marking."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cxr_node.cli.mode import (
    OVERRIDE_NOTE,
    calibration_refusal,
    configured_model_key,
    mode_lines,
    mode_report,
    running_mode,
    set_mode,
)
from cxr_node.cli.node import golive_line
from cxr_node.config import Settings
from cxr_node.errors import CxrNodeError, InvalidTransition
from cxr_node.jobs import spool
from cxr_node.jobs.records import Output
from cxr_node.jobs.sqlite import SqliteStore
from cxr_node.jobs.states import WITHHELD_ERROR, DeliveryState, JobState
from cxr_node.results.findings import MODE_NOTICES, Provenance
from cxr_node.results.sc import banner
from cxr_node.results.sr import impression
from cxr_node.work.write import INITIAL_SETTER, GoLive
from tests.dicom.test_results import source_and_findings
from tests.stores import BACKENDS, AnyStore, Backend, backend
from tests.unit.test_jobs import new_job
from tests.unit.test_store_states import HOLDER, NOT_ANALYSED

MODEL = "cxr-demo/1"


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[AnyStore, Backend]]:
    """A fresh store on each backend, with the backend to open it again (a restart)."""
    found = backend(request, tmp_path)
    store = found.open()
    yield store, found
    store.close()


def shadow_output(kind: str, order: int) -> Output:
    """An output written in shadow mode."""
    return Output(kind, "1.2.840.10008.5.1.4.1.1.88.33", f"2.25.9{order}", f"outbox/{kind}.dcm", 10, order, "shadow")


def written_in_shadow(store: AnyStore, uid: str) -> int:
    """A job whose two outputs were written in shadow mode: withheld from ``pacs``, pending for ``qa``."""
    job, _ = store.jobs.record(new_job(uid), JobState.QUEUED)
    store.jobs.claim(1, HOLDER, 60)
    store.results.save_result(job.id, NOT_ANALYSED, None)
    outputs = [shadow_output("sr", 0), shadow_output("sc", 1)]
    store.results.save_outputs(job.id, outputs, ["pacs", "qa"], None, withheld=["pacs"])
    return job.id


# --- the store, on both backends ------------------------------------------------------------------------------


def test_a_first_record_comes_from_the_initial_mode_and_is_then_kept(database: tuple[AnyStore, Backend]) -> None:
    """ensure() records the initial mode once; a later ensure() with another mode (a changed config, a restart)
    returns the recorded mode and writes nothing."""
    store, _ = database
    assert store.modes.current(MODEL) is None
    first = store.modes.ensure(MODEL, "supervised", INITIAL_SETTER)
    assert (first.mode, first.set_by) == ("supervised", INITIAL_SETTER)
    again = store.modes.ensure(MODEL, "shadow", INITIAL_SETTER)
    assert again == first
    assert [h.mode for h in store.modes.history(MODEL)] == ["supervised"]


def test_a_setting_is_recorded_with_who_when_why_and_survives_a_restart(database: tuple[AnyStore, Backend]) -> None:
    """set() records the mode, the operator, the time and the reason, in the current mode and the history; a new
    store on the same database (a restart) reads the same."""
    store, found = database
    store.modes.ensure(MODEL, "shadow", INITIAL_SETTER)
    record = store.modes.set(MODEL, "live", "Dr A", "validated on 200 studies")
    assert (record.mode, record.set_by, record.reason) == ("live", "Dr A", "validated on 200 studies")
    reopened = found.open()
    try:
        assert reopened.modes.current(MODEL) == record
        assert [(h.mode, h.set_by) for h in reopened.modes.history(MODEL)] == [
            ("shadow", INITIAL_SETTER),
            ("live", "Dr A"),
        ]
        assert reopened.modes.ensure(MODEL, "supervised", INITIAL_SETTER).mode == "live"  # a restart keeps it
    finally:
        reopened.close()


def test_a_new_model_version_starts_afresh_and_the_old_keeps_its_mode(database: tuple[AnyStore, Backend]) -> None:
    """An upgrade (a new name/version) gets the initial mode; the old version's live record is unchanged."""
    store, _ = database
    store.modes.set(MODEL, "live", "Dr A")
    upgraded = GoLive(store.modes, "supervised").mode_of("cxr-demo/2")
    assert upgraded == "supervised"
    assert {r.model_key: r.mode for r in store.modes.all()} == {MODEL: "live", "cxr-demo/2": "supervised"}


def test_an_unknown_mode_or_no_operator_is_refused(database: tuple[AnyStore, Backend]) -> None:
    """set() refuses a mode outside shadow/supervised/live and an empty operator name, and records nothing."""
    store, _ = database
    with pytest.raises(ValueError, match="mode must be one of"):
        store.modes.set(MODEL, "on", "Dr A")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="set_by"):
        store.modes.set(MODEL, "live", " ")
    assert store.modes.history() == []


def test_shadow_outputs_are_withheld_from_clinical_destinations(database: tuple[AnyStore, Backend]) -> None:
    """Outputs recorded in shadow mode keep their mode; the clinical destination's deliveries are withheld (never
    due), the QA destination's are due."""
    store, _ = database
    job_id = written_in_shadow(store, "7.1")
    assert {o.mode for o in store.results.outputs(job_id)} == {"shadow"}
    assert store.deliveries.due("pacs", now=1e12, max_jobs=10) == []
    assert [(d.kind, d.mode) for d in store.deliveries.due("qa", now=1e12, max_jobs=10)] == [
        ("sr", "shadow"),
        ("sc", "shadow"),
    ]
    assert store.deliveries.counts() == {("pacs", "withheld"): 2, ("qa", "pending"): 2}


def test_a_job_with_everything_withheld_ends_delivered_with_the_reason(database: tuple[AnyStore, Backend]) -> None:
    """A shadow job whose QA deliveries are done ends delivered (retention purges it as any other), its reason
    saying that outputs were withheld."""
    store, _ = database
    job_id = written_in_shadow(store, "7.2")
    for kind in ("sr", "sc"):
        store.deliveries.record(job_id, "qa", kind, DeliveryState.DELIVERED, 0, None)
    job = store.jobs.get(job_id)
    assert job is not None and (job.state, job.reason) == (JobState.DELIVERED, WITHHELD_ERROR)


def test_withheld_deliveries_are_never_resent(database: tuple[AnyStore, Backend]) -> None:
    """``resend`` of a job re-queues its finished deliveries but never a withheld one; a withheld delivery cannot
    be moved by hand either."""
    store, _ = database
    job_id = written_in_shadow(store, "7.3")
    store.deliveries.resend(job_id=job_id)
    assert store.deliveries.counts()[("pacs", "withheld")] == 2
    with pytest.raises(InvalidTransition):
        store.deliveries.record(job_id, "pacs", "sr", DeliveryState.DELIVERED, 0, None)


def downgrade_to_version_6(found: Backend) -> None:
    """Make ``found``'s database what schema 6 was: no go-live tables, outputs without a mode."""
    drop = (
        "DROP TABLE outcomes; DROP TABLE candidate_results; DROP TABLE model_modes; DROP TABLE model_mode_events;"
        " ALTER TABLE outputs DROP COLUMN mode;"
    )
    if found.name == "sqlite":
        with sqlite3.connect(found.path) as db:
            db.executescript(f"{drop} PRAGMA user_version = 6;")
        return
    with psycopg.connect(found.url, password=found.password, autocommit=True) as conn:
        for statement in (*drop.split(";")[:-1], "UPDATE schema_version SET version = 6"):
            conn.execute(statement)


def test_a_version_6_database_gains_the_modes_and_keeps_its_outputs_live(database: tuple[AnyStore, Backend]) -> None:
    """A schema-6 database (no go-live tables, outputs without a mode) opens at version 7 on either backend: its
    outputs read as written live, and each model version that wrote outputs is recorded live, as it was (an
    upgrade of the node never changes what a model's outputs say)."""
    store, found = database
    job_id = written_in_shadow(store, "7.4")
    store.close()
    downgrade_to_version_6(found)
    reopened = found.open()
    try:
        assert reopened.migrated_from == 6
        assert {o.mode for o in reopened.results.outputs(job_id)} == {"live"}
        (record,) = reopened.modes.all()
        assert (record.model_key, record.mode, record.set_by) == (
            NOT_ANALYSED.provenance.model_key,
            "live",
            "schema upgrade",
        )
        assert [r.mode for r in reopened.modes.history(record.model_key)] == ["live"]
    finally:
        reopened.close()


# --- going live ------------------------------------------------------------------------------------------------


def write_calibration(manifest_path: Path, path: Path, version: str | None = None) -> Path:
    """Write a site calibration for the model of ``manifest_path`` (or for another ``version`` of it)."""
    from cxr_node.infer.calibration import CalibratedModel, SiteCalibration, Target, save_calibration, weights_checksums
    from cxr_node.infer.registry import load_manifest

    manifest = load_manifest(manifest_path)
    model = CalibratedModel(
        name=manifest.name, version=version or manifest.version, weights_sha256=weights_checksums(manifest)
    )
    target = Target(metric="sensitivity", value=0.9)
    calibration = SiteCalibration(model=model, threshold=0.4, target=target, date="2026-12-01", cases=100, positives=30)
    return save_calibration(calibration, path)


def settings_with(tmp_path: Path, tiny_manifest: Path, calibration: Path | None = None) -> Settings:
    """Settings on a temporary root with the tiny model and, optionally, a site calibration."""
    overrides: dict[str, object] = {"storage.root": str(tmp_path / "state"), "models.manifest": str(tiny_manifest)}
    if calibration is not None:
        overrides["models.calibration"] = str(calibration)
    return Settings().with_overrides(overrides)


def test_going_live_without_calibration_is_refused_in_one_line(tmp_path: Path, tiny_manifest: Path) -> None:
    """Without models.calibration, set live is refused with one line naming the model and the override; nothing
    is recorded."""
    found = settings_with(tmp_path, tiny_manifest)
    key = configured_model_key(found)
    store = SqliteStore(tmp_path / spool.DB_NAME)
    try:
        with pytest.raises(CxrNodeError, match="--override-uncalibrated") as refused:
            set_mode(store, found, key, "live", "Dr A")
        assert key in str(refused.value) and "\n" not in str(refused.value)
        assert store.modes.history() == []
        assert set_mode(store, found, key, "shadow", "Dr A").mode == "shadow"  # stepping back needs nothing
    finally:
        store.close()


def test_a_calibration_that_cannot_be_read_is_no_calibration(tmp_path: Path, tiny_manifest: Path) -> None:
    """A models.calibration that is missing or not a site calibration refuses going live, saying why in one line."""
    missing = settings_with(tmp_path, tiny_manifest, tmp_path / "absent.yaml")
    assert "not found" in str(calibration_refusal(missing, configured_model_key(missing)))
    (tmp_path / "other.yaml").write_text("operating_point: 0.4\n")
    wrong = settings_with(tmp_path, tiny_manifest, tmp_path / "other.yaml")
    assert "model" in str(calibration_refusal(wrong, configured_model_key(wrong)))


def test_going_live_with_a_calibration_or_an_override_is_recorded(tmp_path: Path, tiny_manifest: Path) -> None:
    """With a calibration file the model goes live as set; without one, the override is accepted and the history
    says so, with the operator's reason."""
    calibration = write_calibration(tiny_manifest, tmp_path / "calibration.yaml")
    found = settings_with(tmp_path, tiny_manifest, calibration)
    key = configured_model_key(found)
    assert calibration_refusal(found, key) is None
    assert "made for tiny-test/0.0.1" in str(calibration_refusal(found, "tiny-test/0.0.2"))  # another version's
    store = SqliteStore(tmp_path / spool.DB_NAME)
    try:
        live = set_mode(store, found, key, "live", "Dr A", "QA review passed")
        assert (live.mode, live.set_by, live.reason) == ("live", "Dr A", "QA review passed")
        uncalibrated = settings_with(tmp_path, tiny_manifest)
        forced = set_mode(store, uncalibrated, key, "live", "Dr B", "urgent", override_uncalibrated=True)
        assert forced.reason is not None and forced.reason.startswith(OVERRIDE_NOTE) and "urgent" in forced.reason
        report = mode_report(store, found)
        assert report["configured"]["mode"] == "live" and report["configured"]["set_by"] == "Dr B"
        assert [h["set_by"] for h in report["history"]] == ["Dr A", "Dr B"]
        lines = mode_lines(report)
        assert lines[0].startswith(f"configured model  {key}: live (set by Dr B, ")
        assert golive_line(running_mode(store, found)).startswith(f"{key}: live (set by Dr B, ")
    finally:
        store.close()


# --- what the outputs say --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shadow", "supervised"])
def test_shadow_and_supervised_outputs_carry_the_notice(mode: str) -> None:
    """In shadow and supervised mode the banner's first line and the impression carry the mode's notice."""
    _, findings = source_and_findings()
    marked = dataclasses.replace(findings, provenance=dataclasses.replace(findings.provenance, mode=mode))
    notice = MODE_NOTICES[marked.provenance.mode]
    assert "NOT FOR DIAGNOSIS" in notice and mode.upper() in notice
    assert banner(marked).lines[0] == notice
    assert impression(marked).startswith(f"{notice}: ")


def test_live_outputs_read_as_before() -> None:
    """In live mode neither the banner nor the impression carries a notice."""
    _, findings = source_and_findings()
    assert findings.provenance.mode == "live"
    assert not any("MODE" in line for line in banner(findings).lines)
    assert "MODE" not in impression(findings)


def test_provenance_refuses_an_unknown_mode() -> None:
    """A Provenance with a mode outside shadow/supervised/live cannot be built."""
    with pytest.raises(ValueError, match="mode must be one of"):
        Provenance("m", "1", "use", (), "0.1", "2.25.1", mode="on")  # type: ignore[arg-type]
