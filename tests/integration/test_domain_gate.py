"""The out-of-domain gate with the demo models: held-out phantoms pass; real radiographs, an extremity and corrupted
phantoms do not; refuse, flag and off end to end through the worker, its outputs and its neighbour index."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from structlog.testing import capture_logs

from cxr_node.app import Receiver, build_worker, open_index
from cxr_node.config import Settings
from cxr_node.dicom import codes, status
from cxr_node.dicom.pixels import decode
from cxr_node.infer.classify import RuntimeOptions
from cxr_node.infer.engine import Analysis, Engine
from cxr_node.infer.registry import load_manifest, save_manifest, sha256_file
from cxr_node.jobs.states import JobState
from cxr_node.results.findings import Summary
from cxr_node.training.phantoms import make_phantom, phantom_to_dataset, write_phantom_set
from tests.integration.helpers import store_all

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The demo models with their domain description, loaded once."""
    found = Engine.from_manifest(load_manifest(DEMO), RuntimeOptions())
    assert found.domain is not None
    return found


def phantom_image(seed: int, label: int = 0, size: int = 384) -> np.ndarray:
    """A held-out phantom's presentation image (seeds far from the training seeds)."""
    return make_phantom(seed, label=label, size=size).image.copy()


def refused(result: Analysis) -> bool:
    """Whether the node would not report this image: its mask is implausible, or the gate scores it outside."""
    return not result.analysed or (result.domain is not None and not result.domain.inside)


def test_held_out_phantoms_pass(engine: Engine) -> None:
    """Sixteen held-out phantoms of both labels, at a size never trained on, are scored inside the domain."""
    results = engine.analyse([phantom_image(90_000 + i, label=i % 2) for i in range(16)])
    assert all(r.analysed and r.domain is not None for r in results)
    assert sum(r.domain.inside for r in results if r.domain is not None) >= 15


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_the_real_chest_cr_is_outside(engine: Engine, wg04: Path, name: str) -> None:
    """The real chest CR of WG04 gets a plausible lung mask but scores well outside the phantoms' domain."""
    [result] = engine.analyse([decode(dcmread(wg04 / name), max_side=1024).pixels])
    assert result.analysed and result.domain is not None
    assert result.domain.score > 1.5 * result.domain.bound


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "MR2_UNCR.dcm", "693_UNCR.dcm", "JPEG2000_UNC.dcm"])
def test_other_radiographs_are_refused(engine: Engine, wg04: Path, name: str) -> None:
    """A tibia CR that slipped past triage, an MR, a CT slice and a bone scan are never reported."""
    [result] = engine.analyse([decode(dcmread(wg04 / name), max_side=1024).pixels])
    assert refused(result)


def corrupted(kind: str, seed: int) -> np.ndarray:
    """A held-out phantom, heavily corrupted."""
    image = phantom_image(seed)
    if kind == "noise":
        return np.clip(image + np.random.default_rng(seed).normal(0, 0.35, image.shape), 0, 1).astype(np.float32)
    if kind == "inverted":
        return (1.0 - image).astype(np.float32)
    rows, cols = image.shape
    return np.ascontiguousarray(image[rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4])


@pytest.mark.parametrize("kind", ["noise", "inverted", "cropped"])
def test_corrupted_phantoms_are_refused(engine: Engine, kind: str) -> None:
    """Phantoms drowned in noise, inverted or cropped to their centre are never reported."""
    results = engine.analyse([corrupted(kind, 90_100 + i) for i in range(4)])
    assert all(refused(r) for r in results)


@pytest.fixture
def demo_node(make_settings: Callable[..., Settings]) -> Iterator[Callable[[str], Receiver]]:
    """Start a receiver with the demo models and the gate set as asked."""
    started: list[Receiver] = []

    def start(gate: str) -> Receiver:
        settings = make_settings(**{"models.manifest": str(DEMO), "domain.gate": gate})
        started.append(Receiver(settings).start())
        return started[-1]

    yield start
    for receiver in started:
        receiver.stop(grace_s=5)


def run_worker(node: Receiver, engine: Engine) -> None:
    """Analyse every queued job and write its outputs, as the worker process does."""
    worker = build_worker(node.settings, node.store, engine)
    while jobs := worker.take_batch(threading.Event()):
        worker.process(jobs)
    worker.close()


def texts(ds: Dataset) -> dict[str, str]:
    """Every TEXT item of an SR content tree, by its concept's meaning."""
    found: dict[str, str] = {}
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found[item.ConceptNameCodeSequence[0].CodeMeaning] = item.TextValue
        found.update(texts(item))
    return found


def analyse_cr_and_phantom(
    node: Receiver, engine: Engine, chest_cr: Path
) -> dict[str, tuple[Summary, dict[str, Path]]]:
    """Store the real chest CR and a phantom, run the worker; return each one's summary and outputs by kind."""
    phantom = phantom_to_dataset(make_phantom(91_010, label=0, size=384), patient_id="P9", patient_name="Ph^Antom")
    assert store_all(node.port, [dcmread(chest_cr), phantom]) == [status.SUCCESS] * 2
    run_worker(node, engine)
    found = {}
    for job in node.store.jobs.query():
        assert job.state is JobState.WRITTEN, (job.state, job.reason)
        stored = node.store.results.result(job.id)
        assert stored is not None
        outputs = {out.kind: node.settings.storage.root / out.path for out in node.store.results.outputs(job.id)}
        found["phantom" if job.sop_instance_uid == phantom.SOPInstanceUID else "cr"] = (stored.summary, outputs)
    return found


def indexed(node: Receiver, engine: Engine) -> int:
    """How many cases the neighbour index holds for the demo model."""
    index = open_index(node.settings)
    try:
        return index.size(engine.model[1])
    finally:
        index.close()


def test_refuse_reports_the_real_cr_as_not_analysed(
    demo_node: Callable[[str], Receiver], engine: Engine, chest_cr: Path
) -> None:
    """refuse: the real CR gets a not-analysed SR naming score and bound; the phantom is analysed; the index learns
    the phantom only."""
    node = demo_node("refuse")
    found = analyse_cr_and_phantom(node, engine, chest_cr)
    cr, outputs = found["cr"]
    assert not cr.analysed and cr.probability is None and cr.outside_domain
    assert cr.reason.startswith("outside the model's validated domain (score ")
    assert set(outputs) == {"sr", "sc"}  # the overlay says NOT ANALYSED with the same reason
    said = texts(dcmread(outputs["sr"]))
    assert said[codes.REASON_NOT_ANALYSED.meaning] == cr.reason
    phantom, outputs = found["phantom"]
    assert phantom.analysed and not phantom.outside_domain and phantom.domain_score is not None
    assert "sc" in outputs
    assert indexed(node, engine) == 1


def test_flag_analyses_the_real_cr_and_says_it_is_outside(
    demo_node: Callable[[str], Receiver], engine: Engine, chest_cr: Path
) -> None:
    """flag: the real CR is analysed, and its SR impression and its own TEXT item say it is outside the validated
    domain with the score; the index still learns only the phantom."""
    node = demo_node("flag")
    cr, outputs = analyse_cr_and_phantom(node, engine, chest_cr)["cr"]
    assert cr.analysed and cr.probability is not None and cr.outside_domain
    assert {"sr", "sc"} <= set(outputs)
    said = texts(dcmread(outputs["sr"]))
    assert said[codes.OUTSIDE_DOMAIN.meaning] == cr.domain_text
    assert said[codes.IMPRESSION.meaning].endswith(cr.domain_text)
    assert indexed(node, engine) == 1


def test_off_analyses_everything_as_before(
    demo_node: Callable[[str], Receiver], engine: Engine, chest_cr: Path
) -> None:
    """off: both images are analysed, no score is kept, no domain words appear, and both are indexed."""
    node = demo_node("off")
    found = analyse_cr_and_phantom(node, engine, chest_cr)
    for summary, outputs in found.values():
        assert summary.analysed and summary.domain_score is None
        assert codes.OUTSIDE_DOMAIN.meaning not in texts(dcmread(outputs["sr"]))
    assert indexed(node, engine) == 2


def test_a_model_without_description_warns_at_start(receiver: Receiver, tiny_manifest: Path) -> None:
    """A manifest with no domain description runs with the gate off, and the worker says so when it starts."""
    tiny = Engine.from_manifest(load_manifest(tiny_manifest), RuntimeOptions())
    worker = build_worker(receiver.settings, receiver.store, tiny)
    stop = threading.Event()
    stop.set()
    with capture_logs() as logged:
        worker.run(stop)
    worker.close()
    assert worker.gate.mode == "off"
    [warning] = [event for event in logged if event["event"] == "domain.no_description"]
    assert warning["log_level"] == "warning"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m cxr_node ARGS` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "cxr_node", *args], capture_output=True, text=True, timeout=300, check=False
    )


def demo_copy(folder: Path) -> Path:
    """The demo manifest without its description and split provenance, beside links to the demo weights."""
    manifest = load_manifest(DEMO)
    provenance = {key: value for key, value in manifest.provenance.items() if key != "split"}
    for name in ("unet.pt", "mobilenet.pt", "shufflenet.pt", "squeezenet.pt"):
        (folder / name).symlink_to(DEMO.parent / name)
    copy = manifest.model_copy(update={"domain": None, "provenance": provenance})
    return save_manifest(copy, folder / "manifest.yaml")


def test_domain_fit_and_score_commands(tmp_path: Path, chest_cr: Path) -> None:
    """`cxr-node domain fit` writes the description and names it in the manifest with its checksum; `domain score`
    then scores files and a labelled set against it."""
    manifest = demo_copy(tmp_path)
    data = write_phantom_set(tmp_path / "set", n=40, seed=31, size=256)
    done = cli("domain", "fit", "--manifest", str(manifest), "--data", str(data), "--pass-rate", "0.9")
    assert done.returncode == 0, done.stderr
    assert "analysed" in done.stdout and "lets 90% of" in done.stdout
    spec = load_manifest(manifest).domain
    assert spec is not None and spec.file == "domain.npz"
    assert sha256_file(tmp_path / "domain.npz") == spec.sha256
    scored = cli("domain", "score", "--manifest", str(manifest), str(chest_cr))
    assert scored.returncode == 0, scored.stderr
    assert "OUTSIDE" in scored.stdout
    part = cli("domain", "score", "--manifest", str(manifest), "--data", str(data), "--split", "val")
    assert part.returncode == 0 and "inside" in part.stdout.splitlines()[-1]


def test_domain_commands_fail_in_one_line(tmp_path: Path, tiny_manifest: Path) -> None:
    """A set that is not the model's training set, a model without a description, and a model whose masks are all
    implausible are each one line on stderr and a non-zero exit, never a traceback."""
    data = write_phantom_set(tmp_path / "set", n=12, seed=32, size=128)
    wrong_split = cli("domain", "fit", "--manifest", str(DEMO), "--data", str(data))
    no_description = cli("domain", "score", "--manifest", str(tiny_manifest), str(data.parent / "images" / "00000.dcm"))
    nothing_classified = cli("domain", "fit", "--manifest", str(tiny_manifest), "--data", str(data))
    for done, words in (
        (wrong_split, "is not the one cxr-node-demo was trained on"),
        (no_description, "no domain description"),
        (nothing_classified, "could be classified"),
    ):
        assert done.returncode != 0
        assert words in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
