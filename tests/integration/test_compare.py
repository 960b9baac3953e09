"""Model change control end to end: a candidate model runs beside the demo models on labelled phantoms sent over
DICOM, the PACS gets the live model's outputs only, ``cxr-node compare`` reports agreement, shifts and both models'
metrics, the candidate is calibrated on its own results and set live, and a failing candidate costs nothing."""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import structlog
import yaml

from cxr_node.app import Receiver, build_worker
from cxr_node.cli import main
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.infer.classify import RuntimeOptions
from cxr_node.infer.engine import Analysis, Engine
from cxr_node.infer.registry import load_manifest
from cxr_node.jobs.states import JobState
from cxr_node.training.compare import kappa
from cxr_node.training.datasets import read_image
from cxr_node.training.phantoms import write_phantom_set
from cxr_node.work.candidates import Candidate
from cxr_node.work.gate import DomainGate
from tests.integration.helpers import store_all
from tests.integration.pacs import Pacs
from tests.integration.test_calibrate import DEMO, settings_for
from tests.integration.test_delivery import destination, rounds_until

IMAGES = 24
CANDIDATE_KEY = "cxr-node-demo/2-candidate"


def candidate_manifest(folder: Path) -> Path:
    """The demo ensemble cut to its SqueezeNet member, as version ``2-candidate``: another model whose scores
    differ from the demo's on the same images (its weights are the demo's own files, linked)."""
    folder.mkdir(parents=True, exist_ok=True)
    document = yaml.safe_load(DEMO.read_text())
    document["version"] = "2-candidate"
    classifier = document["classifier"]
    classifier["members"] = [m for m in classifier["members"] if m["name"] == "squeezenet"]
    classifier["explain"] = {"member": "squeezenet"}
    document.pop("domain", None)  # the demo's description is of the three members' embeddings
    for name in ("unet.pt", "squeezenet.pt"):
        (folder / name).symlink_to(DEMO.parent / name)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@dataclass(frozen=True)
class Site:
    """A node that ran the demo models and the candidate on labelled phantoms and delivered to a PACS."""

    settings: Settings
    config: Path
    outcomes: Path
    phantoms: list[dict[str, str]]
    folder: Path
    candidate: Path
    received: list[str]


def analyse_all(node: Receiver) -> None:
    """Run the worker ``serve`` would build over every queued job."""
    worker = build_worker(node.settings, node.store)
    try:
        while jobs := worker.take_batch(threading.Event()):
            worker.process(jobs)
    finally:
        worker.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """Labelled phantoms sent over DICOM, analysed by the demo models with a candidate beside them, delivered."""
    folder = tmp_path_factory.mktemp("change")
    labels = write_phantom_set(folder / "phantoms", n=IMAGES, seed=17, size=320)
    with labels.open() as handle:
        phantoms = list(csv.DictReader(handle))
    candidate = candidate_manifest(folder / "candidate")
    pacs = Pacs(folder / "pacs").start()
    candidates = [{"manifest": str(candidate)}]
    settings = settings_for(folder / "state", **{"models.candidates": candidates,
                                                 "destinations": [destination("pacs", pacs)]})  # fmt: skip
    node = Receiver(settings).start()
    try:
        files = [labels.parent / row["path"] for row in phantoms]
        assert store_all(node.port, files) == [status.SUCCESS] * IMAGES
        analyse_all(node)
        rounds_until(node, lambda: node.store.jobs.counts()[JobState.DELIVERED] == IMAGES)
        received = [str(ds.SOPInstanceUID) for ds in pacs.received]
        assert not any(CANDIDATE_KEY.split("/")[1] in str(ds) for ds in pacs.received)
    finally:
        node.stop(grace_s=2)
        pacs.stop()
    outcomes = folder / "outcomes.csv"
    with outcomes.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["accession_number", "label"])
        writer.writerows([row["accession_number"], row["label"]] for row in phantoms)
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(folder / "state")},
                                      "models": {"manifest": str(DEMO), "candidates": candidates}}))  # fmt: skip
    return Site(settings, config, outcomes, phantoms, folder, candidate, received)


def test_the_pacs_gets_the_live_models_outputs_only(site: Site) -> None:
    """Every job is delivered with the live model's outputs; the candidate's results are recorded apart, one per
    image, and equal what its engine finds on the same phantom read from disk."""
    node = Receiver(site.settings)
    try:
        store = node.store
        jobs = store.jobs.query(JobState.DELIVERED)
        assert len(jobs) == IMAGES
        outputs = [o.sop_instance_uid for job in jobs for o in store.results.outputs(job.id)]
        assert sorted(site.received) == sorted(outputs)
        pairs = store.results.beside(CANDIDATE_KEY)
        assert len(pairs) == IMAGES
        assert all(live is not None and live.model_key == "cxr-node-demo/1" for _, _, live in pairs)
        by_accession = {job.accession_number: job.id for job in jobs}
        engine = Engine.from_manifest(load_manifest(site.candidate), RuntimeOptions())
        stored = {job_id: candidate for job_id, candidate, _ in pairs}
        for row in site.phantoms[:4]:
            direct = engine.analyse([read_image(site.outcomes.parent / "phantoms" / row["path"])])[0]
            found = stored[by_accession[row["accession_number"]]]
            assert found.analysed == direct.analysed
            if direct.probability is not None:
                assert found.probability == pytest.approx(direct.probability, abs=1e-4)
    finally:
        node.store.close()


def test_compare_reports_agreement_shifts_and_both_models_metrics(site: Site) -> None:
    """``cxr-node compare`` with the site's outcomes: its counts, agreement and kappa are those of the stored
    pairs, both models' metrics are measured on the same cases, and the report folder holds every file."""
    out = site.folder / "compare"
    argv = ["compare", "--config", str(site.config), "--labels", str(site.outcomes), "--out", str(out),
            "--resamples", "200"]  # fmt: skip
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.html", "compare.json", "scatter.png", "roc.png"}
    report = json.loads((out / "compare.json").read_text())
    assert (report["live"], report["candidate"], report["images"]) == ("cxr-node-demo/1", CANDIDATE_KEY, IMAGES)
    node = Receiver(site.settings)
    try:
        pairs = [(live, candidate) for _, candidate, live in node.store.results.beside(CANDIDATE_KEY)]
    finally:
        node.store.close()
    both = [(live, c) for live, c in pairs if live is not None and live.analysed and c.analysed]
    assert report["both"] == len(both) > IMAGES // 2
    live_d = np.array([bool(live.positive) for live, _ in both])
    cand_d = np.array([bool(c.positive) for _, c in both])
    assert report["agreement"]["value"] == pytest.approx(float(np.mean(live_d == cand_d)), abs=1e-6)
    if not np.isnan(kappa(live_d, cand_d)):
        assert report["kappa"]["value"] == pytest.approx(kappa(live_d, cand_d), abs=1e-6)
    shift = np.array([c.probability - live.probability for live, c in both])  # type: ignore[operator]
    assert report["shift"]["mean"] == pytest.approx(float(shift.mean()), abs=1e-5)
    labelled = report["labelled"]
    assert labelled["cases"] <= report["both"] and labelled["positives"] > 0
    for model in ("live", "candidate"):
        auc = labelled[model]["auc"]
        assert auc["low"] <= auc["value"] <= auc["high"]
    assert "Cohen's kappa" in (out / "compare.md").read_text()


def test_the_candidate_is_calibrated_on_its_own_results_then_set_live_and_promoted(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """``calibrate --manifest`` uses the candidate's recorded results; with that calibration in its
    ``models.candidates`` entry it may be set live before it is promoted; promoted, the mode it was set stays."""
    calibration = site.folder / "candidate-calibration.yaml"
    argv = ["calibrate", "--config", str(site.config), "--manifest", str(site.candidate), "--labels",
            str(site.outcomes), "--target", "sensitivity=0.90", "--out", str(calibration),
            "--resamples", "100"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "calibration of models.candidates[0]" in out
    document = yaml.safe_load(calibration.read_text())
    assert document["model"]["version"] == "2-candidate" and document["cases"] > IMAGES // 2
    refused = ["mode", "set", "live", "--model", CANDIDATE_KEY, "--by", "Dr B", "--config", str(site.config)]
    assert main(refused) == 1
    assert "models.candidates[0].calibration is not set" in capsys.readouterr().err
    config = site.folder / "calibrated.yaml"
    entry = {"manifest": str(site.candidate), "calibration": str(calibration)}
    config.write_text(yaml.safe_dump({"storage": {"root": str(site.settings.storage.root)},
                                      "models": {"manifest": str(DEMO), "candidates": [entry]}}))  # fmt: skip
    assert main([*refused[:-1], str(config)]) == 0
    promoted = site.folder / "promoted.yaml"
    promoted.write_text(yaml.safe_dump({"storage": {"root": str(site.settings.storage.root)},
                                        "models": {"manifest": str(site.candidate),
                                                   "calibration": str(calibration)}}))  # fmt: skip
    capsys.readouterr()
    assert main(["mode", "show", "--json", "--config", str(promoted)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["configured"]["model"], shown["configured"]["mode"]) == (CANDIDATE_KEY, "live")
    assert shown["candidates"] == []


class Failing:
    """A candidate whose inference fails on every batch (a CUDA fault, a bad weights file read late)."""

    model = ("broken", "9")

    def analyse(self, images: Sequence[np.ndarray]) -> list[Analysis]:
        raise RuntimeError("candidate inference failed")


def test_a_failing_candidate_costs_only_its_own_results(site: Site, tmp_path: Path) -> None:
    """The configured model's jobs are written and nothing is recorded for the failing candidate; the failure is
    logged as the candidate's."""
    phantoms = site.outcomes.parent / "phantoms"
    node = Receiver(settings_for(tmp_path / "state")).start()
    try:
        files = [phantoms / row["path"] for row in site.phantoms[:3]]
        assert store_all(node.port, files) == [status.SUCCESS] * 3
        worker = build_worker(node.settings, node.store, candidates=[Candidate(Failing(), DomainGate("off"))])
        try:
            with structlog.testing.capture_logs() as logs:
                while jobs := worker.take_batch(threading.Event()):
                    worker.process(jobs)
        finally:
            worker.close()
        assert node.store.jobs.counts()[JobState.WRITTEN] == 3
        assert node.store.results.beside("broken/9") == []
        assert any(e["event"] == "candidate.failed" and e["model"] == "broken/9" for e in logs)
    finally:
        node.stop(grace_s=2)
