"""Site calibration end to end: phantoms analysed by the real worker with the demo models, outcomes joined by
accession number, ``cxr-node calibrate`` writing the file and the report, and the node applying it."""

from __future__ import annotations

import csv
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

from cxr_node.app import Receiver, build_worker, provenance
from cxr_node.cli import main
from cxr_node.config import Settings
from cxr_node.dicom import codes, status
from cxr_node.errors import ModelError
from cxr_node.infer.calibration import Target, load_calibration
from cxr_node.infer.classify import RuntimeOptions
from cxr_node.infer.engine import Engine
from cxr_node.infer.registry import load_manifest
from cxr_node.jobs.states import JobState
from cxr_node.results.findings import Findings
from cxr_node.results.sc import banner
from cxr_node.training.calibration import threshold_for
from cxr_node.training.datasets import read_image
from cxr_node.training.outcomes import parse_outcome
from cxr_node.training.phantoms import write_phantom_set
from tests.conftest import free_port
from tests.integration.helpers import store_all

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"
IMAGES = 32


@dataclass(frozen=True)
class Site:
    """A node whose store holds the demo models' results on labelled phantoms, and the phantoms' outcomes."""

    settings: Settings
    config: Path
    outcomes: Path
    phantoms: list[dict[str, str]]
    folder: Path
    engine: Engine


def settings_for(root: Path, **more: object) -> Settings:
    """Settings of a node on ``root`` with the demo models, no neighbours, no gate (every phantom is analysed)."""
    base = {"node.host": "127.0.0.1", "node.port": free_port(), "storage.root": str(root), "models.manifest": str(DEMO),
            "metrics.enabled": False, "logging.format": "console", "neighbours.k": 0, "worker.cpu_processes": 0,
            "domain.gate": "off", "worker.batch_wait_ms": 20}  # fmt: skip
    return Settings().with_overrides({**base, **more})


def analyse_all(node: Receiver, engine: Engine, settings: Settings | None = None) -> None:
    """Run the real worker over every queued job, as the worker process does."""
    worker = build_worker(settings or node.settings, node.store, engine)
    try:
        while jobs := worker.take_batch(threading.Event()):
            worker.process(jobs)
    finally:
        worker.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """Labelled phantoms sent to the node and analysed; their labels written as a site's outcomes CSV."""
    folder = tmp_path_factory.mktemp("site")
    labels = write_phantom_set(folder / "phantoms", n=IMAGES, seed=11, size=320)
    with labels.open() as handle:
        phantoms = list(csv.DictReader(handle))
    engine = Engine.from_manifest(load_manifest(DEMO), RuntimeOptions())
    node = Receiver(settings_for(folder / "state")).start()
    try:
        assert store_all(node.port, [labels.parent / row["path"] for row in phantoms]) == [status.SUCCESS] * IMAGES
        analyse_all(node, engine)
    finally:
        node.stop(grace_s=2)
    outcomes = folder / "outcomes.csv"
    with outcomes.open("w", newline="") as handle:  # as a RIS export might write it: other names, other words
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(["Accession No.", "PCR result", "Date"])
        writer.writerows([row["accession_number"], "POS" if row["label"] == "covid" else "neg", "2026-11-30"]
                         for row in phantoms)  # fmt: skip
        writer.writerow(["NOT-IN-THE-STORE", "positive", ""])
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(folder / "state")}, "models": {"manifest": str(DEMO)}}))
    return Site(node.settings, config, outcomes, phantoms, folder, engine)


@pytest.fixture(scope="module")
def calibrated(site: Site) -> Path:
    """The site calibration ``cxr-node calibrate`` writes for a sensitivity of 0.90."""
    out = site.folder / "site-calibration.yaml"
    argv = ["calibrate", "--config", str(site.config), "--labels", str(site.outcomes), "--target",
            "sensitivity=0.90", "--out", str(out), "--report", str(site.folder / "report"), "--resamples", "300",
            "--by", "tester"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_calibration_reproduces_the_threshold_within_its_interval(site: Site, calibrated: Path) -> None:
    """The threshold chosen from the node's stored results matches the one computed directly from the engine's
    probabilities of the same phantoms, within the calibration's bootstrap interval; the file says what it is."""
    found = load_calibration(calibrated)
    probabilities, labels = [], []
    for row in site.phantoms:
        analysis = site.engine.analyse([read_image(site.outcomes.parent / "phantoms" / row["path"])])[0]
        if analysis.analysed and analysis.probability is not None:
            probabilities.append(analysis.probability)
            labels.append(parse_outcome(row["label"]))
    direct = threshold_for(np.array(labels), np.array(probabilities), Target(metric="sensitivity", value=0.9))
    interval = found.metrics["threshold"]
    assert interval["low"] is not None and interval["high"] is not None
    assert interval["low"] <= direct <= interval["high"]
    assert interval["low"] <= found.threshold <= interval["high"]
    assert found.threshold == pytest.approx(direct, abs=1e-3)
    assert (found.cases, found.positives) == (len(labels), sum(labels))
    assert found.metrics["sensitivity"]["value"] is not None and found.metrics["sensitivity"]["value"] >= 0.9
    assert found.left_out["unmatched"] == 1
    assert (found.model.name, found.model.version, found.calibrated_by) == ("cxr-node-demo", "1", "tester")
    manifest = load_manifest(DEMO)
    assert found.model.weights_sha256["mobilenet"] == manifest.classifier.member("mobilenet").sha256
    assert len(found.labels["sha256"]) == 64
    report = site.folder / "report"
    assert {p.name for p in report.iterdir()} >= {"roc.png", "calibration.png", "report.md", "report.html"}
    assert "sensitivity 0.90" in (report / "report.md").read_text()


def test_the_node_applies_the_calibration_and_every_output_says_so(site: Site, calibrated: Path) -> None:
    """With models.calibration set, results are judged at its threshold and the SR and overlay name its source."""
    found = load_calibration(calibrated)
    settings = settings_for(site.folder / "state-applied", **{"models.calibration": str(calibrated)})
    node = Receiver(settings).start()
    try:
        files = [site.outcomes.parent / "phantoms" / row["path"] for row in site.phantoms[:2]]
        assert store_all(node.port, files) == [status.SUCCESS] * 2
        analyse_all(node, site.engine)
        job = node.store.jobs.query(JobState.WRITTEN)[0]
        stored = node.store.results.result(job.id)
        outputs = node.store.results.outputs(job.id)
    finally:
        node.stop(grace_s=2)
    assert stored is not None and stored.summary.threshold == found.threshold
    source = f"site calibration of {found.date} for sensitivity 0.90"
    sr = dcmread(settings.storage.root / next(o.path for o in outputs if o.kind == "sr"))
    texts = [item.get("TextValue", "") for item in _items(sr)]
    assert any(source in text and f"operating point {found.threshold:.2f}" in text for text in texts)
    points = [item for item in _items(sr) if _concept(item) == codes.OPERATING_POINT.value]
    assert points and float(points[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(found.threshold, abs=1e-4)
    shape = stored.summary.analysed_shape or (8, 8)
    image, mask = np.zeros(shape, np.float32), np.zeros(shape, bool)
    findings = Findings(provenance(settings, load_manifest(DEMO)), stored.summary, image=image, lung_mask=mask)
    assert source in banner(findings).lines[0]


def test_a_calibration_for_other_weights_or_another_version_is_refused(site: Site, calibrated: Path) -> None:
    """A calibration file whose model version or weights checksum differs from the manifest's refuses to load."""
    document = yaml.safe_load(calibrated.read_text())
    manifest = load_manifest(DEMO)
    checksums = {**document["model"]["weights_sha256"], "lungs": "0" * 64}
    for key, value in (("version", "2"), ("weights_sha256", checksums)):
        wrong = site.folder / f"wrong-{key}.yaml"
        wrong.write_text(yaml.safe_dump({**document, "model": {**document["model"], key: value}}))
        settings = settings_for(site.folder / "state-refused", **{"models.calibration": str(wrong)})
        with pytest.raises(ModelError, match=str(wrong)) as refused:
            provenance(settings, manifest)
        assert "\n" not in str(refused.value)
        assert ("cxr-node-demo 2" if key == "version" else "lungs") in str(refused.value)


def _items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in getattr(ds, "ContentSequence", ()):
        yield item
        yield from _items(item)


def _concept(item: Dataset) -> str:
    names = getattr(item, "ConceptNameCodeSequence", ())
    return str(names[0].CodeValue) if names else ""
