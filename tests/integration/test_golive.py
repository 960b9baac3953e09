"""Staged go-live with a real node and real Storage SCPs on loopback: shadow sends only to the QA destination,
supervised outputs say so in the SR and the overlay, ``cxr-node mode set live`` is checked and recorded, and
neither a restart nor a model upgrade changes a model version's mode."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from cxr_node.app import Receiver, build_dispatcher, build_worker
from cxr_node.cli import main
from cxr_node.config import Settings
from cxr_node.dicom import codes
from cxr_node.jobs.states import JobState
from cxr_node.results.findings import MODE_NOTICES
from tests.integration.helpers import small_cr, store_all, write_config
from tests.integration.pacs import Pacs
from tests.integration.test_delivery import FAST, destination, rounds_until, written_node
from tests.unit.test_golive import write_calibration


def texts(ds: Dataset) -> dict[str, str]:
    """Every TEXT item of an SR content tree, by its concept's meaning."""
    found: dict[str, str] = {}
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found[item.ConceptNameCodeSequence[0].CodeMeaning] = item.TextValue
        found.update(texts(item))
    return found


def write_one(node: Receiver, chest_cr: Path, uid: str) -> int:
    """Store one image at ``node``, analyse it and write its outputs with a worker built as ``serve`` builds it;
    return the job id."""
    assert store_all(node.port, [small_cr(chest_cr, uid, size=256)]) == [0]
    worker = build_worker(node.settings, node.store)
    try:
        while jobs := worker.take_batch(threading.Event()):
            worker.process(jobs)
    finally:
        worker.close()
    return max(job.id for job in node.store.jobs.query(JobState.WRITTEN))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``cxr-node args`` in this process; return its exit code, stdout and stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_shadow_sends_nothing_to_the_clinical_pacs_and_everything_to_qa(
    make_settings: Callable[..., Settings], chest_cr: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """With golive.initial_mode shadow the clinical PACS receives nothing and the QA destination every output;
    the clinical deliveries are recorded withheld and the jobs end delivered."""
    clinical, qa = Pacs(tmp_path / "clinical").start(), Pacs(tmp_path / "qa", ae_title="QA").start()
    destinations = [destination("pacs", clinical), {**destination("qa", qa), "qa": True}]
    overrides = {"golive.initial_mode": "shadow", "destinations": destinations}
    node = written_node(make_settings, chest_cr, tiny_manifest, 2, **overrides)
    try:
        rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 2)
        outputs = [o for job in node.store.jobs.query() for o in node.store.results.outputs(job.id)]
        assert {o.mode for o in outputs} == {"shadow"}
        assert clinical.uids() == []
        assert qa.uids() == [o.sop_instance_uid for o in outputs]
        assert node.store.deliveries.counts() == {("pacs", "withheld"): len(outputs), ("qa", "delivered"): len(outputs)}
        assert all(MODE_NOTICES["shadow"] in str(ds.get("DerivationDescription", "")) for ds in qa.received
                   if ds.Modality != "SR")  # fmt: skip
    finally:
        node.stop(grace_s=5)
        clinical.stop()
        qa.stop()


def test_supervised_outputs_are_delivered_and_marked_for_qa_review(
    make_settings: Callable[..., Settings], chest_cr: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """By default a new model version is supervised: the PACS gets the SR and the overlay, the SR's impression and
    its deployment-mode TEXT item carry the notice and stay preliminary and unverified, the overlay says it."""
    pacs = Pacs(tmp_path / "pacs").start()
    node = written_node(make_settings, chest_cr, tiny_manifest, 1, destinations=[destination("pacs", pacs)])
    notice = MODE_NOTICES["supervised"]
    try:
        rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == 1)
        by_modality = {str(ds.Modality): ds for ds in pacs.received}
        sr, sc = by_modality["SR"], by_modality["OT"]
        said = texts(sr)
        assert said[codes.DEPLOYMENT_MODE.meaning] == f"supervised: {notice}"
        assert said[codes.IMPRESSION.meaning].startswith(f"{notice}: ")
        assert (sr.PreliminaryFlag, sr.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
        assert notice in sc.DerivationDescription
    finally:
        node.stop(grace_s=5)
        pacs.stop()


def test_going_live_is_an_operator_step_kept_across_restart_and_upgrade(
    make_settings: Callable[..., Settings],
    chest_cr: Path,
    tiny_manifest: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``mode set live`` is refused without a site calibration, accepted with one and recorded (who, when); a
    restarted node writes live; an upgraded model version starts supervised while the old one stays live."""
    config = write_config(make_settings(**FAST), tmp_path / "node.yaml")
    code, _, err = cli(capsys, "mode", "set", "live", "--by", "Dr A", "--config", str(config))
    assert code == 1 and "--override-uncalibrated" in err and len(err.strip().splitlines()) == 1
    calibration = write_calibration(tiny_manifest, tmp_path / "calibration.yaml")
    calibrated = {"models.calibration": str(calibration)}
    config = write_config(make_settings(**FAST, **calibrated), tmp_path / "node.yaml")
    code, out, _ = cli(capsys, "mode", "set", "live", "--by", "Dr A", "--reason", "QA passed", "--config", str(config))
    assert code == 0 and "tiny-test/0.0.1: live (set by Dr A" in out

    node = Receiver(make_settings(**FAST, **calibrated)).start()  # a (re)start after the operator's step
    try:
        job_id = write_one(node, chest_cr, "g1")
        assert {o.mode for o in node.store.results.outputs(job_id)} == {"live"}
    finally:
        node.stop(grace_s=5)
    upgraded = tmp_path / "upgraded.yaml"  # the same weights under a new version: a model upgrade
    upgraded.write_text(tiny_manifest.read_text().replace('version: "0.0.1"', 'version: "0.0.2"', 1))
    (tmp_path / "unet.pt").symlink_to(tiny_manifest.parent / "unet.pt")
    (tmp_path / "squeeze.pt").symlink_to(tiny_manifest.parent / "squeeze.pt")
    node = Receiver(make_settings(**FAST, **{"models.manifest": str(upgraded)})).start()
    try:
        job_id = write_one(node, chest_cr, "g2")
        assert {o.mode for o in node.store.results.outputs(job_id)} == {"supervised"}
    finally:
        node.stop(grace_s=5)

    code, out, _ = cli(capsys, "mode", "show", "--json", "--config", str(config))
    report = json.loads(out)
    assert {m["model"]: m["mode"] for m in report["models"]} == {
        "tiny-test/0.0.1": "live",
        "tiny-test/0.0.2": "supervised",
    }
    assert [(h["model"], h["mode"], h["set_by"]) for h in report["history"]] == [
        ("tiny-test/0.0.1", "live", "Dr A"),  # set before any worker ran it: no initial record
        ("tiny-test/0.0.2", "supervised", "golive.initial_mode"),  # recorded when its first worker started
    ]
    code, out, _ = cli(capsys, "status", "--json", "--config", str(config))
    golive = json.loads(out)["golive"]
    assert (golive["model"], golive["mode"], golive["set_by"]) == ("tiny-test/0.0.1", "live", "Dr A")


def test_the_sender_withholds_shadow_outputs_from_a_destination_no_longer_qa(
    make_settings: Callable[..., Settings], chest_cr: Path, tiny_manifest: Path, tmp_path: Path
) -> None:
    """Outputs written in shadow for a QA destination are withheld, not sent, by a sender whose configuration no
    longer marks that destination QA (the mode recorded with the output decides, not the sender's config)."""
    qa = Pacs(tmp_path / "qa", ae_title="QA").start()
    marked = {**destination("qa", qa), "qa": True}
    node = written_node(
        make_settings, chest_cr, tiny_manifest, 1, destinations=[marked], **{"golive.initial_mode": "shadow"}
    )
    try:
        unmarked = node.settings.with_overrides({"destinations": [destination("qa", qa)]})
        build_dispatcher(unmarked, node.store).round()
        assert qa.uids() == []
        outputs = node.store.results.outputs(node.store.jobs.query()[0].id)
        assert node.store.deliveries.counts() == {("qa", "withheld"): len(outputs)}
        assert node.store.jobs.counts()[JobState.DELIVERED] == 1
    finally:
        node.stop(grace_s=5)
        qa.stop()
