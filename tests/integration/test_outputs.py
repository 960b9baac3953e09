"""The outputs end to end: stored images analysed by the demo models, SR + SC + SEG + GSPS written to the outbox,
valid for dciodvfy, rendered by DCMTK, and accepted by a real Orthanc in the source study."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from cxr_node.app import Receiver, build_worker
from cxr_node.config import Settings
from cxr_node.dicom import status
from cxr_node.infer.classify import RuntimeOptions
from cxr_node.infer.engine import Engine
from cxr_node.infer.registry import load_manifest
from cxr_node.jobs.states import JobState
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset
from tests.conftest import require_tool
from tests.integration.helpers import store_all
from tests.integration.test_worker import store_broken
from tests.orthanc import netns_available, run_in_netns

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"
PATIENT = "Müller^Jürgen"


@pytest.fixture(scope="module")
def demo_engine() -> Engine:
    """The demo models, loaded once."""
    return Engine.from_manifest(load_manifest(DEMO), RuntimeOptions())


@pytest.fixture
def node(make_settings: Callable[..., Settings]) -> Iterator[Receiver]:
    """A receiver whose settings turn every output kind on, with the demo models."""
    settings = make_settings(
        **{
            "models.manifest": str(DEMO),
            "domain.gate": "off",  # the real CR is outside the demo models' domain: these tests check every output
            "results.segmentation": True,
            "results.presentation_state": True,
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        }
    )
    receiver = Receiver(settings).start()
    try:
        yield receiver
    finally:
        receiver.stop(grace_s=5)


def run_worker_once(node: Receiver, engine: Engine) -> None:
    """Analyse every queued job and write its outputs, as the worker process does."""
    worker = build_worker(node.settings, node.store, engine)
    while jobs := worker.take_batch(threading.Event()):
        worker.process(jobs)
    worker.close()


def chest_images(chest_cr: Path) -> list:
    """A real CR chest (MONOCHROME1, 15 bits) and phantoms of both photometric interpretations, one with a
    non-ASCII patient name in ISO 8859-1."""
    phantom = make_phantom(91_001, label=1, size=512)
    mono1 = phantom_to_dataset(
        phantom, photometric="MONOCHROME1", patient_id="P1", patient_name=PATIENT, modality="CR", bits_stored=10
    )
    mono2 = phantom_to_dataset(
        make_phantom(91_002, label=0, size=512),
        photometric="MONOCHROME2",
        patient_id="P2",
        patient_name="Doe^Jane",
        bits_stored=16,
    )
    return [dcmread(chest_cr), mono1, mono2]


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error -`` lines dciodvfy prints for a file (its exit code does not reflect errors)."""
    done = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error -")]


@pytest.fixture
def written(node: Receiver, demo_engine: Engine, chest_cr: Path, wg04: Path) -> dict[str, dict[str, Path]]:
    """Send the images (and one with undecodable pixels), run the worker; return each source's outputs by kind."""
    images = chest_images(chest_cr)
    assert store_all(node.port, images) == [status.SUCCESS] * 3
    store_broken(node, wg04)
    run_worker_once(node, demo_engine)
    root = node.settings.storage.root
    found: dict[str, dict[str, Path]] = {}
    for job in node.store.jobs.query():
        assert job.state is JobState.WRITTEN, (job.state, job.reason)
        found[job.sop_instance_uid] = {out.kind: root / out.path for out in node.store.results.outputs(job.id)}
    return found


def test_every_output_passes_dciodvfy_and_renders(written: dict[str, dict[str, Path]]) -> None:
    """Each analysed image gets SR, SC, SEG and GSPS with zero dciodvfy errors; SR renders in dsr2html and
    the SC in dcm2pnm; the undecodable image gets a not-analysed SR only."""
    kinds = sorted(tuple(sorted(outputs)) for outputs in written.values())
    assert kinds == [("pr", "sc", "seg", "sr")] * 3 + [("sr",)]
    for outputs in written.values():
        for path in outputs.values():
            assert dciodvfy_errors(path) == [], path
        html = subprocess.run(
            [require_tool("dsr2html"), str(outputs["sr"])], capture_output=True, text=True, errors="replace", check=True
        ).stdout
        assert "Imaging Measurement Report" in html and "not for clinical use" in html
        if "sc" in outputs:
            png = outputs["sc"].with_suffix(".png")
            subprocess.run([require_tool("dcm2pnm"), "+on", "-il", str(outputs["sc"]), str(png)], check=True)
            assert png.stat().st_size > 10_000


def test_outputs_belong_to_the_source_study_and_say_what_they_are(
    written: dict[str, dict[str, Path]], node: Receiver
) -> None:
    """Outputs share the source's patient and study, sit in new AI series, and the non-ASCII name survives."""
    root = node.settings.storage.root
    for job in node.store.jobs.query():
        source = dcmread(root / job.path, stop_before_pixels=True)
        for kind, path in written[job.sop_instance_uid].items():
            out = dcmread(path)
            assert out.StudyInstanceUID == source.StudyInstanceUID
            assert out.PatientID == source.PatientID and str(out.PatientName) == str(source.PatientName)
            assert out.SeriesInstanceUID != source.SeriesInstanceUID
            assert out.SeriesDescription.startswith("AI CXR analysis")
            assert out.Manufacturer == "cxr-node"
            assert "cxr-node" in {item.Manufacturer for item in out.ContributingEquipmentSequence}
            if kind == "sc":
                assert out.BurnedInAnnotation == "YES" and "PixelSpacing" not in out
    names = {str(dcmread(path).PatientName) for outputs in written.values() for path in outputs.values()}
    assert PATIENT in names


def test_not_analysed_report_says_why(written: dict[str, dict[str, Path]]) -> None:
    """The undecodable image's SR says it was not analysed and why, in words a radiologist reads."""
    only_sr = [outputs["sr"] for outputs in written.values() if list(outputs) == ["sr"]]
    html = subprocess.run(
        [require_tool("dsr2html"), str(only_sr[0])], capture_output=True, text=True, errors="replace", check=True
    ).stdout
    assert "No algorithms succeeded" in html
    assert "pixels cannot be decoded" in html


def test_orthanc_stores_every_output(written: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    """A real Orthanc accepts every output with Success and keeps it in the source study."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    files = [str(path) for outputs in written.values() for path in outputs.values()]
    report = run_in_netns("store", str(tmp_path / "orthanc"), *files)
    assert report["statuses"] == [status.SUCCESS] * len(files)
    stored = {item["SOPInstanceUID"] for item in report["stored"]}
    assert stored == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert PATIENT in {item["PatientName"] for item in report["stored"]}


def test_a_colour_chest_image_gets_a_not_analysed_report(node: Receiver, demo_engine: Engine) -> None:
    """A chest CR stored in RGB is acknowledged, queued and answered with an SR saying why it was not analysed."""
    import numpy as np

    ds = phantom_to_dataset(
        make_phantom(91_003, label=0, size=256), patient_id="P3", patient_name="Rgb^Test", bits_stored=10
    )
    grey = (ds.pixel_array >> 2).astype(np.uint8)
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    assert store_all(node.port, [ds]) == [status.SUCCESS]
    run_worker_once(node, demo_engine)
    [job] = node.store.jobs.query()
    assert job.state is JobState.WRITTEN
    [sr] = node.store.results.outputs(job.id)
    html = subprocess.run(
        [require_tool("dsr2html"), str(node.settings.storage.root / sr.path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "not greyscale" in html and "No algorithms succeeded" in html
