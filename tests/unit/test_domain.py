"""The domain description: fitting, calibration of the bound, scores, the file and its place in the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cxr_node.dicom.pixels import decode
from cxr_node.errors import ModelError
from cxr_node.infer.domain import (
    STATISTICS,
    DomainDescription,
    DomainScore,
    _box,
    fit_description,
    image_statistics,
    load_description,
)
from cxr_node.infer.preprocess import normalise
from cxr_node.infer.registry import load_manifest, sha256_file
from tests import previous_numerics as previous

DIM = 64
DEMO = Path(__file__).resolve().parents[2] / "models" / "demo" / "manifest.yaml"


def features(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit-norm embeddings near one direction and image statistics near fixed values (``shift`` moves both)."""
    rng = np.random.default_rng(seed)
    base = np.zeros(DIM)
    base[0] = 1.0
    embeddings = base + 0.1 * rng.normal(size=(n, DIM)) + shift * rng.normal(size=(1, DIM))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    statistics = np.array([0.3, 0.4, 0.1, 0.2, 0.6, 0.6, 0.3, 0.02, 0.01]) * (1 + 0.05 * rng.normal(size=(n, 9)))
    return embeddings.astype(np.float32), statistics + shift


@pytest.fixture(scope="module")
def description() -> DomainDescription:
    """A description fitted on 300 in-domain images and calibrated on 100 others at 95%."""
    return fit_description(features(300, 1), features(100, 2), pass_rate=0.95)


def test_bound_lets_the_stated_share_of_validation_images_pass(description: DomainDescription) -> None:
    """At least the pass rate of the validation images scores at or under the bound, and the bound is a score."""
    scores = description.validation_scores
    assert np.mean(scores <= description.bound) >= 0.95
    assert np.mean(scores < description.bound) < 0.95
    assert description.bound_at(0.5) < description.bound <= description.bound_at(1.0) == scores.max()


def test_fresh_in_domain_images_mostly_pass(description: DomainDescription) -> None:
    """Images drawn like the training ones, never seen, pass at about the calibrated rate."""
    scores = description.scores(*features(400, 3))
    assert np.mean(scores <= description.bound) >= 0.9


def test_shifted_images_score_far_outside(description: DomainDescription) -> None:
    """Images whose embeddings and statistics are shifted score well above the bound."""
    scores = description.scores(*features(20, 4, shift=0.5))
    assert np.all(scores > 2 * description.bound)


def test_one_odd_statistic_is_enough(description: DomainDescription) -> None:
    """An image with an in-domain embedding but an inverted-looking lung (bright, dark outside) is outside."""
    embeddings, statistics = features(1, 5)
    statistics[0, STATISTICS.index("lung_mean")] = 0.9
    statistics[0, STATISTICS.index("outside_mean")] = 0.1
    assert not description.judge(embeddings[0], statistics[0]).inside


def test_score_says_inside_at_the_bound() -> None:
    """A score equal to the bound is inside; above it is outside."""
    assert DomainScore(2.0, 2.0).inside and not DomainScore(2.01, 2.0).inside


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.01])
def test_pass_rate_out_of_range_is_refused(description: DomainDescription, rate: float) -> None:
    """A pass rate outside (0, 1] is a ValueError naming it."""
    with pytest.raises(ValueError, match="pass_rate"):
        description.bound_at(rate)


def test_mismatched_features_are_refused(description: DomainDescription) -> None:
    """Embeddings of another length are a ValueError that says what was expected."""
    with pytest.raises(ValueError, match=f"\\(N, {DIM}\\)"):
        description.scores(np.zeros((1, DIM + 1)), np.zeros((1, len(STATISTICS))))


def test_too_few_training_images_are_refused() -> None:
    """Fitting on two training images is a ValueError."""
    with pytest.raises(ValueError, match="training images"):
        fit_description(features(2, 1), features(5, 2))


def test_file_round_trip(description: DomainDescription, tmp_path: Path) -> None:
    """A saved description loads back with the same scores and bound, its checksum verified."""
    path = description.save(tmp_path / "domain.npz")
    loaded = load_description(path, sha256_file(path))
    probe = features(10, 6)
    assert np.allclose(loaded.scores(*probe), description.scores(*probe), rtol=1e-4)
    assert loaded.bound == description.bound and loaded.pass_rate == 0.95
    assert path.stat().st_size < 100_000


def test_wrong_checksum_is_refused(description: DomainDescription, tmp_path: Path) -> None:
    """A description whose SHA-256 is not the manifest's refuses to load, naming both checksums."""
    path = description.save(tmp_path / "domain.npz")
    with pytest.raises(ModelError, match=r"refused: sha256 expected 0{64}, found"):
        load_description(path, "0" * 64)


def test_not_a_description_is_a_model_error(tmp_path: Path) -> None:
    """A file that is not a description is one ModelError line, not a traceback from numpy."""
    path = tmp_path / "domain.npz"
    path.write_bytes(b"not an npz")
    with pytest.raises(ModelError, match="cannot be read"):
        load_description(path)


def test_image_statistics_see_an_inverted_lung() -> None:
    """Inverting the image raises the lung's mean and lowers the outside's, and the area is the mask's."""
    rng = np.random.default_rng(0)
    image = np.full((200, 160), 0.7, np.float32) + 0.02 * rng.normal(size=(200, 160)).astype(np.float32)
    mask = np.zeros((200, 160), bool)
    mask[40:160, 20:70] = mask[40:160, 90:140] = True
    image[mask] = 0.25
    normal, inverted = image_statistics(image, mask), image_statistics(1 - image, mask)
    assert normal.shape == (len(STATISTICS),)
    assert normal[STATISTICS.index("lung_area")] == pytest.approx(mask.mean(), abs=0.02)
    assert inverted[STATISTICS.index("lung_mean")] > 0.7 > 0.3 > normal[STATISTICS.index("lung_mean")]


def test_demo_manifest_names_its_description() -> None:
    """The demo manifest names a domain description beside its weights, and its checksum matches."""
    manifest = load_manifest(DEMO)
    assert manifest.domain is not None
    path = manifest.resolve(manifest.domain.file)
    assert sha256_file(path) == manifest.domain.sha256
    assert load_description(path, manifest.domain.sha256).pass_rate == 0.95


def test_manifest_without_description_still_loads(tmp_path: Path) -> None:
    """A manifest written before the gate existed (no domain key) loads, with no description."""
    text = DEMO.read_text(encoding="utf-8")
    head, _, _ = text.partition("\ndomain:")
    old = tmp_path / "manifest.yaml"
    old.write_text(head + "\n", encoding="utf-8")
    for name in ("unet.pt", "mobilenet.pt", "shufflenet.pt", "squeezenet.pt"):
        (tmp_path / name).symlink_to(DEMO.parent / name)
    assert load_manifest(old).domain is None


def test_manifest_naming_a_missing_description_is_refused(tmp_path: Path) -> None:
    """A manifest whose domain file is absent is one ModelError line naming the key."""
    text = DEMO.read_text(encoding="utf-8")
    broken = tmp_path / "manifest.yaml"
    broken.write_text(text, encoding="utf-8")
    for name in ("unet.pt", "mobilenet.pt", "shufflenet.pt", "squeezenet.pt"):
        (tmp_path / name).symlink_to(DEMO.parent / name)
    with pytest.raises(ModelError, match=r"domain\.file: domain description .* not found"):
        load_manifest(broken)


def lung_pair(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two elliptic lungs on smooth noise: a normalised image (float32 in [0, 1]) and its bool mask."""
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    y, x = (rows + 0.5) / shape[0], (cols + 0.5) / shape[1]
    mask = ((y - 0.5) / 0.3) ** 2 + ((np.abs(x - 0.5) - 0.2) / 0.12) ** 2 <= 1.0
    image = (0.6 + 0.3 * np.sin(7 * y + 3 * x) - 0.3 * mask + 0.05 * rng.normal(size=shape)).astype(np.float32)
    return np.clip(image, 0.0, 1.0), mask


@pytest.mark.parametrize("shape", [(978, 921), (384, 384), (128, 128), (90, 300), (5, 7)])
@pytest.mark.parametrize("mask_kind", ["lungs", "empty", "full", "tiny"])
def test_image_statistics_give_the_earlier_bits(shape: tuple[int, int], mask_kind: str) -> None:
    """The statistics (box means built in place, the masked means counted once) equal the earlier code's bytes."""
    image, mask = lung_pair(shape, seed=shape[0])
    if mask_kind == "empty":
        mask = np.zeros(shape, bool)
    elif mask_kind == "full":
        mask = np.ones(shape, bool)
    elif mask_kind == "tiny":
        mask = np.zeros(shape, bool)
        mask[: max(1, shape[0] // 20), : max(1, shape[1] // 20)] = True
    assert previous.same(image_statistics(image, mask), previous.image_statistics(image, mask))


@pytest.mark.parametrize("radius", [1, 4, 200])
def test_box_mean_gives_the_earlier_bits(radius: int) -> None:
    """The in-place summed-area box mean equals the padded-copy one, also for a radius beyond the image."""
    values = np.random.default_rng(radius).random((128, 97))
    assert previous.same(_box(values, radius), previous._box(values, radius))


def test_image_statistics_of_the_real_cr_give_the_earlier_bits(chest_cr: Path) -> None:
    """On the real chest CR, normalised as the engine does, with elliptic lungs, the bytes are the earlier ones."""
    image = normalise(decode(dcmread(chest_cr), max_side=1024).pixels)
    _, mask = lung_pair(image.shape, seed=1)
    assert previous.same(image_statistics(image, mask), previous.image_statistics(image, mask))


def test_image_statistics_from_the_engines_reduced_grid_are_the_same_bits() -> None:
    """The engine hands over the image already reduced to the statistics' grid; nothing else changes."""
    from cxr_node.imaging.resample import resize
    from cxr_node.infer.domain import STATISTICS_GRID

    rng = np.random.default_rng(7)
    image = rng.random((978, 921), dtype=np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[100:700, 80:400] = mask[100:700, 500:850] = True
    reduced = resize(image, STATISTICS_GRID)
    assert np.array_equal(image_statistics(image, mask, reduced), image_statistics(image, mask))
    with pytest.raises(ValueError, match="reduced"):
        image_statistics(image, mask, reduced[:, :-1])
