"""The one codec of a result: Summary as JSON (this version's and the previous one's), arrays as npz, Findings back."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from cxr_node.imaging.resample import resize, scaled_shape
from cxr_node.jobs import codec
from cxr_node.jobs.records import StoredResult
from cxr_node.results.findings import Findings, MaskVerdict, Provenance, SimilarCase, Summary
from tests import previous_numerics as previous

PROVENANCE = Provenance("cxr-demo", "1", "demo only", ("a", "b"), "0.1.0", "2.25.1")
ANALYSED = Summary(
    model_name="cxr-demo",
    model_version="1",
    analysed=True,
    source_shape=(1955, 1841),
    probability=0.8125,
    threshold=0.4,
    members=(("a", 0.7), ("b", 0.9)),
    lung_mask=MaskVerdict(plausible=True, verdict="plausible", area_fraction=0.3012, components=2),
    analysed_shape=(978, 921),
    pixel_spacing_mm=(0.171, 0.171),
    photometric="MONOCHROME1",
    similar=(
        SimilarCase(1, 0.91, "C0000003", "covid", "1.2", "1.2.3", "A1", "20200301"),
        SimilarCase(2, -0.25, "C0000007"),
    ),
    timings_ms=(("classify", 40.25), ("segment", 12.5)),
)
NOT_ANALYSED = Summary("cxr-demo", "1", False, (64, 64), reason="pixels cannot be decoded", photometric="RGB")
OLD_WORKER_JSON = (
    '{"status": "analysed", "reason": "", "model": {"name": "cxr-demo", "version": "1"}, "probability": 0.8125,'
    ' "positive": true, "threshold": 0.4, "members": {"b": 0.9, "a": 0.7}, "lung_mask": {"plausible": true,'
    ' "verdict": "plausible", "area_fraction": 0.3012, "components": 2}, "image": {"original_shape": [1955, 1841],'
    ' "analysed_shape": [978, 921], "pixel_spacing_mm": null, "photometric": "MONOCHROME1"}, "similar": [{"rank": 1,'
    ' "similarity": 0.91, "case_number": "C0000003", "label": "covid", "study_instance_uid": "1.2",'
    ' "sop_instance_uid": "1.2.3", "accession_number": "A1", "study_date": "20200301"}],'
    ' "timings_ms": {"segment": 12.5}}'
)


def smooth_heatmap(shape: tuple[int, int]) -> np.ndarray:
    """Return a float32 Gaussian blob in [0, 1] of ``shape``, smooth at every scale the codec uses."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    centre, spread = (shape[0] * 0.4, shape[1] * 0.6), max(shape) * 0.3
    return np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * spread**2)).astype(np.float32)


def random_mask(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Return a random bool mask of ``shape`` (no structure for the bit packing to lean on)."""
    return np.random.default_rng(seed).random(shape) > 0.5


@pytest.mark.parametrize("summary", [ANALYSED, NOT_ANALYSED], ids=["analysed", "not-analysed"])
def test_summary_round_trip(summary: Summary) -> None:
    """decode_summary(encode_summary(s)) equals s, analysed or not."""
    assert codec.decode_summary(codec.encode_summary(summary)) == summary


def test_timings_keep_the_engine_step_order() -> None:
    """Timings in the engine's step order (segment, then classify) come back in that order."""
    summary = replace(ANALYSED, timings_ms=(("segment", 12.5), ("classify", 40.25)))
    assert codec.decode_summary(codec.encode_summary(summary)) == summary


def test_not_analysed_summary_has_no_threshold_nor_mask() -> None:
    """A not-analysed summary is written with status not_analysed, no threshold and no mask verdict."""
    document = json.loads(codec.encode_summary(NOT_ANALYSED))
    assert (document["status"], document["threshold"], document["lung_mask"]) == ("not_analysed", None, None)
    decoded = codec.decode_summary(codec.encode_summary(NOT_ANALYSED))
    assert (decoded.threshold, decoded.lung_mask, decoded.positive) == (None, None, None)


def test_previous_worker_json_decodes() -> None:
    """A summary written by the previous worker decodes, its members sorted by name."""
    summary = codec.decode_summary(OLD_WORKER_JSON)
    assert (summary.model_name, summary.model_version, summary.analysed) == ("cxr-demo", "1", True)
    assert (summary.probability, summary.threshold, summary.positive) == (0.8125, 0.4, True)
    assert summary.members == (("a", 0.7), ("b", 0.9))
    assert summary.lung_mask == MaskVerdict(True, "plausible", 0.3012, 2)
    assert (summary.source_shape, summary.analysed_shape) == ((1955, 1841), (978, 921))
    assert (summary.pixel_spacing_mm, summary.photometric, summary.reason) == (None, "MONOCHROME1", "")
    assert summary.similar == (SimilarCase(1, 0.91, "C0000003", "covid", "1.2", "1.2.3", "A1", "20200301"),)
    assert summary.timings_ms == (("segment", 12.5),)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("not json {", "JSONDecodeError"),
        (OLD_WORKER_JSON.replace('"model"', '"modell"'), "KeyError: 'model'"),
        (OLD_WORKER_JSON.replace('"original_shape"', '"source"'), "KeyError: 'original_shape'"),
    ],
    ids=["garbage", "no-model", "no-original-shape"],
)
def test_unreadable_summary_raises_value_error(text: str, names: str) -> None:
    """Garbage or a missing key is a ValueError naming the problem."""
    with pytest.raises(ValueError, match=f"stored result cannot be read: {names}"):
        codec.decode_summary(text)


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (64, 64), (255, 17)])
def test_mask_comes_back_exactly(shape: tuple[int, int]) -> None:
    """The lung mask survives bit packing exactly, whatever its shape."""
    mask = random_mask(shape)
    back, heatmap = codec.unpack_arrays(codec.pack_arrays(mask, None))
    assert back.dtype == np.bool_ and back.shape == shape
    assert np.array_equal(back, mask)
    assert heatmap is None


@pytest.mark.parametrize(("shape", "tolerance"), [((37, 53), 0.5 / 255 + 1e-6), ((1024, 980), 1 / 255 + 0.01)])
def test_heatmap_comes_back_on_the_stored_grid(shape: tuple[int, int], tolerance: float) -> None:
    """A smooth heatmap comes back float32 on the grid it is stored on (at most 256 a side) and, resampled to the
    mask's shape as the Secondary Capture draws it, within uint8 rounding and resampling error."""
    heatmap = smooth_heatmap(shape)
    mask, back = codec.unpack_arrays(codec.pack_arrays(random_mask(shape), heatmap))
    assert back is not None and back.dtype == np.float32 and mask.shape == shape
    assert back.shape == scaled_shape(shape, codec.HEATMAP_STORED_SIDE)
    assert float(np.abs(resize(back, shape) - heatmap).max()) <= tolerance


def test_large_heatmap_is_stored_small() -> None:
    """A 1024x980 mask's heatmap is kept as uint8 at most 256 pixels a side, the mask at full size."""
    data = codec.pack_arrays(random_mask((1024, 980)), smooth_heatmap((1024, 980)))
    with np.load(io.BytesIO(data)) as arrays:
        stored = arrays["heatmap"]
        assert stored.dtype == np.uint8
        assert max(stored.shape) <= codec.HEATMAP_STORED_SIDE
        assert stored.shape == (256, 245)
        assert tuple(arrays["mask_shape"]) == (1024, 980)


def lungs_and_heat(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two elliptic lungs and a Grad-CAM-like heatmap: a blob clipped to [0, 1], zero outside a box, with a spot."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    y, x = (rows + 0.5) / shape[0], (cols + 0.5) / shape[1]
    mask = ((y - 0.5) / 0.3) ** 2 + ((np.abs(x - 0.5) - 0.2) / 0.12) ** 2 <= 1.0
    heat = np.clip(1.3 * smooth_heatmap(shape) - 0.1, 0.0, 1.0)
    heat[: shape[0] // 10] = 0.0
    heat[:, : shape[1] // 12] = 0.0
    heat[shape[0] // 2, shape[1] // 2] = 1.0
    return mask, heat


ARRAY_SHAPES = [(978, 921), (1024, 980), (256, 256), (37, 53), (300, 7), (1, 1)]


@pytest.mark.parametrize("shape", ARRAY_SHAPES)
@pytest.mark.parametrize("with_heatmap", [True, False])
def test_a_blob_of_the_earlier_codec_unpacks_to_the_earlier_arrays(shape: tuple[int, int], with_heatmap: bool) -> None:
    """A result stored by the earlier node (npz at zlib's default level) unpacks to the bytes it unpacked to then."""
    mask, heat = lungs_and_heat(shape)
    old_blob = previous.pack_arrays(mask, heat if with_heatmap else None)
    found, expected = codec.unpack_arrays(old_blob), previous.unpack_arrays(old_blob)
    assert previous.same(found[0], expected[0]) and previous.same(on_mask_grid(*found), expected[1])


def on_mask_grid(mask: np.ndarray, heatmap: np.ndarray | None) -> np.ndarray | None:
    """The heatmap resampled to the mask's grid, as the Secondary Capture does where it draws it (the earlier
    codec did it on unpacking)."""
    return None if heatmap is None else resize(heatmap, mask.shape)


@pytest.mark.parametrize("shape", ARRAY_SHAPES)
@pytest.mark.parametrize("mask_kind", ["lungs", "random"])
def test_packing_at_a_lower_level_unpacks_to_the_earlier_arrays(shape: tuple[int, int], mask_kind: str) -> None:
    """What this node stores unpacks (here and in the earlier node) to the bytes the earlier codec's round trip gave."""
    mask, heat = lungs_and_heat(shape)
    if mask_kind == "random":
        mask = random_mask(shape)
    for heatmap in (heat, None, heat.astype(np.float64)):
        expected = previous.unpack_arrays(previous.pack_arrays(mask, heatmap))
        blob = codec.pack_arrays(mask, heatmap)
        found = codec.unpack_arrays(blob)
        assert previous.same(found[0], expected[0]) and previous.same(on_mask_grid(*found), expected[1])
        earlier = previous.unpack_arrays(blob)
        assert previous.same(earlier[0], expected[0]) and previous.same(earlier[1], expected[1])


def test_the_archive_holds_the_earlier_entries_deflated() -> None:
    """The archive holds the earlier entries, deflated, byte for byte the same once inflated."""
    mask, heat = lungs_and_heat((978, 921))
    new, old = codec.pack_arrays(mask, heat), previous.pack_arrays(mask, heat)
    with zipfile.ZipFile(io.BytesIO(new)) as archive, zipfile.ZipFile(io.BytesIO(old)) as earlier:
        assert archive.namelist() == earlier.namelist() == ["mask_shape.npy", "mask.npy", "heatmap.npy"]
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
        assert all(archive.read(name) == earlier.read(name) for name in archive.namelist())


def stored(summary: Summary, arrays: bytes | None) -> StoredResult:
    """Return a StoredResult of job 1 with ``summary`` and ``arrays``."""
    return StoredResult(job_id=1, created_at=0.0, summary=summary, embedding=None, arrays=arrays)


def test_findings_rebuilds_an_analysed_result() -> None:
    """A stored analysed result with its arrays and the matching image gives the writers' Findings."""
    image, mask = np.zeros((37, 53), np.float32), random_mask((37, 53))
    found = codec.findings(stored(ANALYSED, codec.pack_arrays(mask, None)), image, PROVENANCE)
    assert isinstance(found, Findings) and found.summary == ANALYSED and found.heatmap is None
    assert found.lung_mask is not None and np.array_equal(found.lung_mask, mask)


def test_findings_refuses_an_analysed_result_without_arrays() -> None:
    """An analysed result whose arrays are gone cannot be rebuilt."""
    with pytest.raises(ValueError, match="no lung mask"):
        codec.findings(stored(ANALYSED, None), np.zeros((37, 53), np.float32), PROVENANCE)


def test_findings_refuses_a_mask_of_another_shape() -> None:
    """A stored mask whose shape differs from the decoded image is refused."""
    arrays = codec.pack_arrays(random_mask((37, 53)), None)
    with pytest.raises(ValueError, match="does not match the decoded image"):
        codec.findings(stored(ANALYSED, arrays), np.zeros((53, 37), np.float32), PROVENANCE)


def test_findings_refuses_another_models_provenance() -> None:
    """A result made by one model cannot be written under another model's provenance."""
    other = Provenance("cxr-demo", "2", "demo only", ("a",), "0.1.0", "2.25.1")
    arrays = codec.pack_arrays(random_mask((37, 53)), None)
    with pytest.raises(ValueError, match="not by the provenance's model cxr-demo 2"):
        codec.findings(stored(ANALYSED, arrays), np.zeros((37, 53), np.float32), other)
