"""Training: patient-level splits, metrics and their CIs, thresholds, augmentation, resume, manifests."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cxr_node.cli import main
from cxr_node.infer.engine import Engine
from cxr_node.infer.registry import load_manifest, sha256_file
from cxr_node.training import metrics
from cxr_node.training.augment import NO_AUGMENTATION, AugmentConfig, augment, preview
from cxr_node.training.datasets import (
    LabelledSet,
    Row,
    load_split,
    read_rows,
    split_by_patient,
    split_hash,
)
from cxr_node.training.evaluate import evaluate, markdown_table
from cxr_node.training.inputs import classifier_input
from cxr_node.training.loop import FitOptions
from cxr_node.training.phantoms import write_phantom_set
from cxr_node.training.publish import verify
from cxr_node.training.recipe import DEMO_INTENDED_USE, make_recipe
from cxr_node.training.train import pick_threshold, train_ensemble, train_segmentation


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread (tiny tensors; two spinning threads on a shared runner are slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(patients: int = 120, seed: int = 0) -> list[Row]:
    """Return rows of ``patients`` patients, a third of them with two images, labels mixed."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        for k in range(2 if p % 3 == 0 else 1):
            name = f"images/{p:04d}-{k}.dcm"
            rows.append(Row(Path(name), name, int(rng.random() < 0.4), f"P{p:04d}", f"1.2.{p}.{k}"))
    return rows


# --- splits -------------------------------------------------------------------------------------


def test_split_by_patient_has_no_leak_and_keeps_fractions() -> None:
    """Every patient lands in one part, the parts hold about 70/15/15 % and each has both labels."""
    rows = split_by_patient(_rows(), seed=3)
    parts = {row.patient_id: set() for row in rows}
    for row in rows:
        parts[row.patient_id].add(row.split)
    assert all(len(seen) == 1 for seen in parts.values())
    for name, share in zip(("train", "val", "test"), (0.70, 0.15, 0.15), strict=True):
        chosen = [row for row in rows if row.split == name]
        assert abs(len(chosen) / len(rows) - share) < 0.05
        assert {row.label for row in chosen} == {0, 1}


def test_split_by_patient_is_deterministic() -> None:
    """The same seed gives the same split; another seed gives another."""
    assert split_by_patient(_rows(), seed=5) == split_by_patient(_rows(), seed=5)
    assert split_hash(split_by_patient(_rows(), seed=5)) != split_hash(split_by_patient(_rows(), seed=6))


def test_split_is_saved_and_reused(tmp_path: Path) -> None:
    """A new split is written to split.csv, and the next call reuses it whatever its seed."""
    saved = tmp_path / "split.csv"
    first = load_split(_rows(), saved, seed=1)
    assert saved.is_file()
    again = load_split(_rows(), saved, seed=99)
    assert [row.split for row in again] == [row.split for row in first]
    assert split_hash(again) == split_hash(first)


def test_read_rows_accepts_label_spellings(tmp_path: Path) -> None:
    """Labels covid/non-covid, 1/0 and positive/negative are read; an unknown one names the line."""
    path = tmp_path / "set.csv"
    path.write_text("path,label,patient_id\na.png,covid,1\nb.png,0,2\nc.png,Positive,3\nd.png,negative,4\n")
    assert [row.label for row in read_rows(path)] == [1, 0, 1, 0]
    path.write_text("path,label,patient_id\na.png,maybe,1\n")
    with pytest.raises(ValueError, match="line 2: label"):
        read_rows(path)


# --- metrics ------------------------------------------------------------------------------------


def test_auc_with_ties_matches_pairwise_count() -> None:
    """The rank AUC equals the brute-force share of (positive, negative) pairs ordered right, ties half."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 6, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert metrics.roc_auc(y, s) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_bootstrap_of_a_perfect_separation_is_one() -> None:
    """A perfectly separating score has AUC 1 with CI [1, 1]."""
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    found = metrics.bootstrap_ci(metrics.roc_auc, y, y + 0.1 * np.arange(60) / 60, n_resamples=200, seed=1)
    assert (found.value, found.low, found.high) == (1.0, 1.0, 1.0)


def test_bootstrap_accuracy_ci_covers_the_truth() -> None:
    """Accuracy on a Bernoulli(0.8) sample of correct answers has a seeded CI that covers 0.8."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    correct = rng.random(400) < 0.8
    scores = np.where(correct, y, 1 - y).astype(float)
    found = metrics.bootstrap_ci(metrics.metric_function("accuracy", 0.5), y, scores, seed=3)
    assert found.low < 0.8 < found.high
    assert found.high - found.low < 0.1
    assert found == metrics.bootstrap_ci(metrics.metric_function("accuracy", 0.5), y, scores, seed=3)


def test_threshold_metrics_on_a_known_confusion() -> None:
    """Sensitivity, specificity, PPV, NPV and F1 follow from TP=3, FP=1, TN=4, FN=2."""
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.6, 0.3, 0.2, 0.1, 0.0])
    found = metrics.binary_metrics(y, s, 0.5)
    assert metrics.confusion(y, s, 0.5) == metrics.Confusion(tp=3, fp=1, tn=4, fn=2)
    assert found["sensitivity"] == pytest.approx(3 / 5)
    assert found["specificity"] == pytest.approx(4 / 5)
    assert (found["ppv"], found["npv"], found["f1"]) == pytest.approx((3 / 4, 4 / 6, 6 / 9))


def test_pick_threshold_youden() -> None:
    """Youden's J picks the highest of the tied best cuts, placed midway to the next score."""
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
    assert pick_threshold(y, s) == pytest.approx(0.65)


def test_pick_threshold_meets_target_sensitivity() -> None:
    """The sensitivity method meets the target, and the next higher cut would not."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = y * 0.3 + rng.random(200)
    t = pick_threshold(y, s, method="sensitivity", target=0.9)
    assert metrics.sensitivity(metrics.confusion(y, s, t)) >= 0.9
    next_cut = s[s >= t].min() + 1e-9
    assert metrics.sensitivity(metrics.confusion(y, s, next_cut)) < 0.9


def test_precision_at_k_excludes_self_and_same_patient() -> None:
    """Neighbours come from other patients: patient a's near-identical second image does not count."""
    x = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.15], [0.0, 1.0], [0.1, 0.99], [0.999, 0.01]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = np.array(["a", "b", "c", "d", "e", "a"])
    assert metrics.precision_at_k(x, labels, k=1) == pytest.approx(4 / 6)
    assert metrics.precision_at_k(x, labels, groups, k=1) == pytest.approx(5 / 6)
    assert metrics.precision_at_k(x[:5], labels[:5], k=2) == pytest.approx(0.8)


# --- augmentation -------------------------------------------------------------------------------


def _blob(size: int = 48) -> torch.Tensor:
    """Return a (1, 1, S, S) mask: a block in the upper left quadrant."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., 6:20, 8:22] = 1.0
    return mask


def test_augment_moves_image_and_mask_together() -> None:
    """With intensity jitter off, an image equal to its mask stays equal to it after augmentation."""
    geometric = AugmentConfig(gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, blur_sigma=0.0, noise_std=0.0)
    mask = _blob().repeat(8, 1, 1, 1)
    image, moved = augment(mask.clone(), mask, torch.Generator().manual_seed(0), geometric)
    assert moved is not None
    assert torch.allclose(image, moved, atol=1e-6)
    assert not torch.allclose(moved, mask)


def test_augment_never_flips_vertically_and_not_sideways_by_default() -> None:
    """Over many draws the upper-left block stays upper; it stays left unless hflip is asked for."""
    mask = _blob().repeat(64, 1, 1, 1)
    for config, may_flip in ((AugmentConfig(), False), (AugmentConfig(hflip=True), True)):
        _, moved = augment(mask.clone(), mask, torch.Generator().manual_seed(1), config)
        assert moved is not None
        top, bottom = moved[..., :24, :].sum(dim=(1, 2, 3)), moved[..., 24:, :].sum(dim=(1, 2, 3))
        left, right = moved[..., :24].sum(dim=(1, 2, 3)), moved[..., 24:].sum(dim=(1, 2, 3))
        assert bool((top > bottom).all())
        assert bool((left > right).all()) != may_flip


def test_augment_is_deterministic_and_keeps_padding_black() -> None:
    """The same seed gives the same batch; pixels outside the content stay 0; no augmentation is the identity."""
    image = torch.rand(4, 1, 32, 32) * 0.8 + 0.1
    image[..., :, :6] = 0.0
    one, _ = augment(image, None, torch.Generator().manual_seed(4))
    two, _ = augment(image, None, torch.Generator().manual_seed(4))
    assert torch.equal(one, two)
    assert float(one[..., 8:24, :3].abs().max()) == 0.0
    same, _ = augment(image, None, torch.Generator().manual_seed(4), NO_AUGMENTATION)
    assert torch.allclose(same, image, atol=1e-5)


# --- a tiny end-to-end training -----------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 phantoms at 64 px with masks and labels.csv."""
    return write_phantom_set(tmp_path_factory.mktemp("phantoms"), 24, seed=11, size=64)


def _tiny_recipe(data: Path, out: Path) -> dict[str, object]:
    return {
        "data": str(data), "out": str(out), "seed": 3, "checkpoints": str(out / "ckpt"),
        "segmentation": {"input_size": 32, "base_channels": 4, "depth": 3, "epochs": 1, "batch_size": 8},
        "classifier": {"input_size": 32, "epochs": 1, "batch_size": 8, "masks": "truth",
                       "members": [{"name": "squeeze", "architecture": "squeezenet1_1"}]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def tiny_manifest(phantom_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole tiny ensemble trained on the phantoms."""
    out = tmp_path_factory.mktemp("model")
    return train_ensemble(make_recipe(_tiny_recipe(phantom_csv, out), command="pytest tiny"))


def test_manifest_loads_and_its_checksums_verify(tiny_manifest: Path) -> None:
    """The manifest written loads, every weights file matches its sha256, and provenance is recorded."""
    manifest = verify(tiny_manifest)
    assert load_manifest(tiny_manifest) == manifest
    assert manifest.intended_use == DEMO_INTENDED_USE
    weights = manifest.resolve(manifest.segmentation.weights)
    assert sha256_file(weights) == manifest.segmentation.sha256
    provenance = manifest.provenance
    assert provenance["command"] == "pytest tiny"
    assert provenance["seed"] == 3
    assert provenance["training_data"]["sha256"] == sha256_file(Path(provenance["training_data"]["csv"]))
    assert len(provenance["split"]["hash"]) == 64
    assert {"torch", "torchvision", "python"} <= set(provenance["software"])
    assert "auc" in manifest.classifier.members[0].metrics["validation"]


def test_same_seed_gives_the_same_weights(phantom_csv: Path, tiny_manifest: Path, tmp_path: Path) -> None:
    """Training the same recipe again (through the CLI) writes byte-identical weights and the same split."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in _tiny_recipe(phantom_csv, tmp_path).items() if k != "out"}))
    out = str(tmp_path / "m")
    assert main(["train", "ensemble", "--data", str(phantom_csv), "--out", out, "--recipe", str(recipe)]) == 0
    again, first = load_manifest(tmp_path / "m" / "manifest.yaml"), load_manifest(tiny_manifest)
    assert again.segmentation.sha256 == first.segmentation.sha256
    assert [m.sha256 for m in again.classifier.members] == [m.sha256 for m in first.classifier.members]
    assert again.provenance["split"]["hash"] == first.provenance["split"]["hash"]
    assert again.provenance["command"].startswith("cxr-node train ensemble --data ")


def test_training_inputs_are_the_engines(phantom_csv: Path, tiny_manifest: Path) -> None:
    """The classifier canvas built for training equals the one the engine builds for the same image and mask."""
    engine = Engine.from_manifest(load_manifest(tiny_manifest))
    data = LabelledSet(read_rows(phantom_csv)[:2])
    spec = engine.manifest.classifier
    for i in range(2):
        canvas, _ = engine._region(data.image(i), data.mask(i))
        assert np.array_equal(classifier_input(data.image(i), data.mask(i), spec.region, spec.input_size), canvas)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """Stopping after epoch 1 and resuming from the checkpoint ends with the uninterrupted run's weights."""
    rng = np.random.default_rng(0)
    images = rng.random((12, 32, 32), dtype=np.float32)
    masks = (images > 0.5).astype(np.float32)
    pairs = ((images[:8], masks[:8]), (images[8:], masks[8:]))

    def run(epochs: int, checkpoint: Path, resume: bool = False) -> dict[str, torch.Tensor]:
        options = FitOptions(epochs=epochs, batch_size=4, seed=2, checkpoint=checkpoint, resume=resume, patience=5)
        return train_segmentation(*pairs, base_channels=2, depth=2, options=options).fit.last_state

    whole = run(2, tmp_path / "a.ckpt")
    run(1, tmp_path / "b.ckpt")
    resumed = run(2, tmp_path / "b.ckpt", resume=True)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_evaluate_writes_a_report(phantom_csv: Path, tiny_manifest: Path, tmp_path: Path) -> None:
    """Evaluation accounts for every image, writes report.md/json and both plots, and prints a table row per model."""
    found = evaluate(tiny_manifest, phantom_csv, tmp_path, split="all", n_resamples=20)
    assert found.analysed + sum(found.not_analysed.values()) == found.images == 24
    for name in ("report.md", "report.json", "roc.png", "calibration.png"):
        assert (tmp_path / name).is_file()
    table = markdown_table(found)
    assert table.count("\n") == 1 + 1 + len(load_manifest(tiny_manifest).classifier.members)
    assert "| ensemble |" in table


def test_preview_writes_a_grid(phantom_csv: Path, tmp_path: Path) -> None:
    """The preview is a PNG grid of 16 tiles with red mask outlines."""
    out = preview(LabelledSet(read_rows(phantom_csv)), tmp_path / "preview.png", n=16, size=32)
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    assert bool(((pixels[..., 0] == 255) & (pixels[..., 1] == 0)).any())


def test_cli_evaluate_missing_manifest_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing manifest is one error line and the model-error exit code."""
    data = tmp_path / "set.csv"
    with data.open("w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "patient_id"], ["a.png", "1", "p"]])
    code = main(["evaluate", "--manifest", str(tmp_path / "none.yaml"), "--data", str(data)])
    assert code == 4
    assert capsys.readouterr().err.count("\n") == 1
