"""Synthetic chest phantoms: determinism, anatomy, lesions, DICOM encoding and the set writer."""

from __future__ import annotations

import csv
import subprocess
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_node.dicom.uids import NODE_MANUFACTURER
from cxr_node.training.phantoms import (
    CSV_COLUMNS,
    DISTRACTORS,
    LABELS_CSV,
    MANUFACTURER,
    Phantom,
    make_phantom,
    phantom_to_dataset,
    write_phantom_set,
)
from tests.conftest import require_tool

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def encode(ph: Phantom, **kwargs: object) -> pydicom.Dataset:
    """Encode ``ph`` with a fixed patient and the given options."""
    options: dict[str, object] = {"patient_id": "PH-TEST-1", "patient_name": "PHANTOM^TEST", **kwargs}
    return phantom_to_dataset(ph, **options)  # type: ignore[arg-type]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """Return the 4-connected components of a boolean mask, each as a boolean mask."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        part, queue = np.zeros_like(mask), deque([start])
        seen[start] = part[start] = True
        while queue:
            r, c = queue.popleft()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = part[nr, nc] = True
                    queue.append((nr, nc))
        found.append(part)
    return found


def lower_outer(mask: np.ndarray) -> np.ndarray:
    """Return the lower half and outer (lateral) third of each lung of a two-lung mask."""
    zone = np.zeros_like(mask)
    for lung in components(mask):
        rows, cols = np.nonzero(lung)
        lower = rows >= (rows.min() + rows.max()) / 2
        span = cols.max() - cols.min()
        on_left = cols.mean() < mask.shape[1] / 2
        outer = cols <= cols.min() + span / 3 if on_left else cols >= cols.max() - span / 3
        zone[rows[lower & outer], cols[lower & outer]] = True
    return zone


# ------------------------------------------------------------------------------------------- pixels


def test_same_seed_gives_identical_phantoms_and_uids() -> None:
    """Two draws with the same arguments give equal pixels, masks, extent and DICOM UIDs."""
    a, b = make_phantom(11, 1, 128), make_phantom(11, 1, 128)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.lung_mask, b.lung_mask)
    assert (a.extent, a.distractor) == (b.extent, b.distractor)
    ds_a, ds_b = encode(a), encode(b)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber", "StudyDate"):
        assert ds_a[keyword].value == ds_b[keyword].value


def test_different_seeds_give_different_phantoms_and_uids() -> None:
    """Different seeds change the pixels and every Study, Series and SOP Instance UID."""
    a, b = make_phantom(11, 0, 128), make_phantom(12, 0, 128)
    assert not np.array_equal(a.image, b.image)
    ds_a, ds_b = encode(a), encode(b)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert ds_a[keyword].value != ds_b[keyword].value


def test_image_and_mask_follow_the_contract() -> None:
    """The image is read-only float32 in [0, 1] and the mask a read-only bool array of the same shape."""
    ph = make_phantom(3, 0, 96)
    assert ph.image.dtype == np.float32 and ph.image.shape == (96, 96)
    assert ph.image.min() >= 0.0 and ph.image.max() <= 1.0
    assert ph.lung_mask.dtype == np.bool_ and ph.lung_mask.shape == ph.image.shape
    assert not ph.image.flags.writeable and not ph.lung_mask.flags.writeable
    assert 349.9 <= ph.pixel_spacing_mm * 96 <= 430.1


@pytest.mark.parametrize("seed", range(6))
def test_mask_is_two_plausible_lungs_inside_the_thorax(seed: int) -> None:
    """The mask has two lungs, one per side, each 5-35 % of the image, darker than the thorax around."""
    ph = make_phantom(seed, seed % 2, 128)
    lungs = components(ph.lung_mask)
    assert len(lungs) == 2
    sides = sorted(np.nonzero(lung)[1].mean() for lung in lungs)
    assert sides[0] < 64 < sides[1]
    for lung in lungs:
        assert 0.05 <= lung.mean() <= 0.35
        assert not (lung[0].any() or lung[-1].any() or lung[:, 0].any() or lung[:, -1].any())
    rows, cols = np.nonzero(ph.lung_mask)
    thorax = np.zeros_like(ph.lung_mask)
    thorax[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert ph.image[ph.lung_mask].mean() < ph.image[thorax & ~ph.lung_mask].mean() - 0.15


def test_anatomy_does_not_depend_on_size() -> None:
    """The same seed at two sizes draws the same lungs (mask overlap after downsampling)."""
    small, large = make_phantom(5, 0, 64).lung_mask, make_phantom(5, 0, 128).lung_mask
    shrunk = large.reshape(64, 2, 64, 2).mean(axis=(1, 3)) >= 0.5
    assert (small & shrunk).sum() / (small | shrunk).sum() > 0.9


def test_anatomy_seed_repeats_the_patient() -> None:
    """Two images drawn from one anatomy seed share lung shapes closely but not the exact pixels."""
    a = make_phantom(21, 0, 128, anatomy_seed=99, distractor=None)
    b = make_phantom(22, 0, 128, anatomy_seed=99, distractor=None)
    assert not np.array_equal(a.image, b.image)
    assert a.patient_sex == b.patient_sex and a.anatomy_seed == b.anatomy_seed == 99
    assert (a.lung_mask & b.lung_mask).sum() / (a.lung_mask | b.lung_mask).sum() > 0.75


# ------------------------------------------------------------------------------------------- lesions


@pytest.mark.parametrize("seed", range(4))
def test_positive_is_denser_in_the_lower_outer_lung_than_its_negative(seed: int) -> None:
    """Label 1 adds density mostly in the lower outer lungs of the very same radiograph as label 0."""
    neg = make_phantom(seed, 0, 256, distractor=None)
    pos = make_phantom(seed, 1, 256)
    assert np.array_equal(neg.lung_mask, pos.lung_mask)
    zone = lower_outer(pos.lung_mask)
    rest = pos.lung_mask & ~zone
    gain_zone = pos.image[zone].mean() - neg.image[zone].mean()
    gain_rest = pos.image[rest].mean() - neg.image[rest].mean()
    assert gain_zone > 0.02
    assert gain_zone > gain_rest


def test_opacities_are_bilateral() -> None:
    """Positives raise the density of both lungs."""
    neg, pos = make_phantom(8, 0, 128, distractor=None), make_phantom(8, 1, 128, extent=0.2)
    for lung in components(pos.lung_mask):
        assert pos.image[lung].mean() > neg.image[lung].mean() + 0.005


def test_extent_is_zero_for_negatives_and_near_the_target_for_positives() -> None:
    """A requested extent is met within a few percent; negatives report 0; drawn extents stay plausible."""
    assert make_phantom(4, 0, 128).extent == 0.0
    assert make_phantom(4, 1, 128, extent=0.3).extent == pytest.approx(0.3, abs=0.08)
    drawn = [make_phantom(s, 1, 64).extent for s in range(8)]
    assert all(0.02 < e < 0.6 for e in drawn)
    assert max(drawn) - min(drawn) > 0.1


@pytest.mark.parametrize("kind", DISTRACTORS)
def test_each_distractor_changes_the_negative_image(kind: str) -> None:
    """A requested distractor is recorded and visibly alters an otherwise identical negative."""
    clean, other = make_phantom(6, 0, 128, distractor=None), make_phantom(6, 0, 128, distractor=kind)
    assert other.distractor == kind and clean.distractor is None
    assert np.abs(other.image - clean.image).max() > 0.1


def test_random_distractors_only_on_negatives() -> None:
    """With the default, about 60 % of negatives carry a distractor and positives none."""
    negatives = Counter(make_phantom(s, 0, 64).distractor for s in range(40))
    assert negatives[None] < 30 and all(negatives[k] > 0 for k in DISTRACTORS)
    assert {make_phantom(s, 1, 64).distractor for s in range(10)} == {None}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"label": 2}, "label"),
        ({"size": 32}, "size"),
        ({"size": 4096}, "size"),
        ({"label": 0, "extent": 0.3}, "extent"),
        ({"extent": 0.95}, "extent"),
        ({"distractor": "pacemaker"}, "distractor"),
        ({"anatomy_seed": -5}, "anatomy_seed"),
    ],
)
def test_invalid_arguments_are_refused_by_name(kwargs: dict[str, object], argument: str) -> None:
    """An out-of-range argument raises ValueError naming it, what was expected and what was found."""
    call: dict[str, object] = {"seed": 1, "label": 1, "size": 64, **kwargs}
    with pytest.raises(ValueError, match=rf"^{argument}: expected .+, found "):
        make_phantom(**call)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize("modality", ["CR", "DX"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_dicom_round_trip(tmp_path: Path, modality: str, photometric: str, bits: int) -> None:
    """A written file reads back with its class, range for the bits stored and MONOCHROME1 inverted."""
    ph = make_phantom(2, 1, 96)
    path = tmp_path / "x.dcm"
    encode(ph, modality=modality, photometric=photometric, bits_stored=bits).save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    top = (1 << bits) - 1
    assert ds.SOPClassUID == (CR_STORAGE if modality == "CR" else DX_PRESENTATION_STORAGE)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, bits, bits - 1, 0)
    pixels = ds.pixel_array.astype(np.int64)
    assert pixels.min() >= 0 and pixels.max() <= top and pixels.max() - pixels.min() > top // 2
    attenuation = top - pixels if photometric == "MONOCHROME1" else pixels
    assert np.abs(attenuation - np.rint(ph.image.astype(np.float64) * top)).max() <= 1
    assert ds.Manufacturer == MANUFACTURER != NODE_MANUFACTURER


def test_dx_header_declares_presentation_and_polarity() -> None:
    """DX files are FOR PRESENTATION with the Presentation LUT Shape and sign matching the polarity."""
    ph = make_phantom(2, 0, 64)
    inverse = encode(ph, modality="DX", photometric="MONOCHROME1")
    identity = encode(ph, modality="DX", photometric="MONOCHROME2")
    assert inverse.PresentationIntentType == identity.PresentationIntentType == "FOR PRESENTATION"
    assert (inverse.PresentationLUTShape, inverse.PixelIntensityRelationshipSign) == ("INVERSE", 1)
    assert (identity.PresentationLUTShape, identity.PixelIntensityRelationshipSign) == ("IDENTITY", -1)


def test_label_is_not_written_into_the_dataset() -> None:
    """No attribute of a positive's data set mentions its label."""
    text = str(encode(make_phantom(2, 1, 64))).lower()
    assert "covid" not in text and "label" not in text


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"modality": "MR"}, "modality"),
        ({"photometric": "RGB"}, "photometric"),
        ({"bits_stored": 8}, "bits_stored"),
        ({"bits_stored": 17}, "bits_stored"),
        ({"patient_id": ""}, "patient_id"),
        ({"instance_number": 0}, "instance_number"),
    ],
)
def test_invalid_encoding_options_are_refused_by_name(kwargs: dict[str, object], argument: str) -> None:
    """An out-of-range encoding option raises ValueError naming it."""
    with pytest.raises(ValueError, match=rf"^{argument}: expected .+, found "):
        encode(make_phantom(1, 0, 64), **kwargs)


@pytest.mark.parametrize(("modality", "photometric"), [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2")])
def test_dciodvfy_finds_no_errors(tmp_path: Path, modality: str, photometric: str) -> None:
    """dciodvfy reports no errors for a CR and a DX phantom file."""
    tool = require_tool("dciodvfy")
    path = tmp_path / f"{modality}.dcm"
    ph = make_phantom(9, 1, 128)
    encode(ph, modality=modality, photometric=photometric, bits_stored=12).save_as(path, enforce_file_format=True)
    report = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


# ---------------------------------------------------------------------------------------------- sets


def read_rows(labels: Path) -> list[dict[str, str]]:
    """Return the rows of a ``labels.csv``."""
    with labels.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_set_writer_writes_files_and_labels(tmp_path: Path) -> None:
    """The set has n images and masks, the asked share of positives, mixed encodings and repeat patients."""
    labels = write_phantom_set(tmp_path, 22, seed=3, size=64, positive_fraction=0.5)
    assert labels == tmp_path / LABELS_CSV
    rows = read_rows(labels)
    assert len(rows) == 22 and tuple(rows[0]) == CSV_COLUMNS
    assert Counter(r["label"] for r in rows) == {"covid": 11, "non-covid": 11}
    assert {r["modality"] for r in rows} == {"CR", "DX"}
    assert {r["bits_stored"] for r in rows} == {"10", "12", "14", "16"}
    assert len({r["sop_instance_uid"] for r in rows}) == len({r["study_uid"] for r in rows}) == 22
    per_patient = Counter(r["patient_id"] for r in rows)
    assert sorted(per_patient.values()).count(2) == 2 and len(per_patient) == 20
    for row in rows:
        ds = pydicom.dcmread(tmp_path / row["path"])
        mask = np.asarray(Image.open(tmp_path / row["mask"])) > 127
        assert (ds.PatientID, ds.StudyInstanceUID, ds.AccessionNumber) == (
            row["patient_id"], row["study_uid"], row["accession_number"],
        )  # fmt: skip
        assert (ds.Modality, ds.PhotometricInterpretation, str(ds.BitsStored)) == (
            row["modality"], row["photometric"], row["bits_stored"],
        )  # fmt: skip
        assert mask.shape == ds.pixel_array.shape and 0.1 < mask.mean() < 0.6
        assert (float(row["extent"]) > 0) == (row["label"] == "covid")


def test_set_writer_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    """Writing the same set twice gives identical bytes in every file."""
    first = write_phantom_set(tmp_path / "a", 6, seed=1, size=64).parent
    second = write_phantom_set(tmp_path / "b", 6, seed=1, size=64).parent
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def test_repeat_patients_keep_identity_across_studies(tmp_path: Path) -> None:
    """A patient's two images share ID, name, birth date and sex, in two studies on different dates."""
    rows = read_rows(write_phantom_set(tmp_path, 11, seed=4, size=64))
    twice = [p for p, k in Counter(r["patient_id"] for r in rows).items() if k == 2]
    assert len(twice) == 1
    a, b = (pydicom.dcmread(tmp_path / r["path"]) for r in rows if r["patient_id"] == twice[0])
    keys = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
    assert [a[k].value for k in keys] == [b[k].value for k in keys]
    assert a.StudyInstanceUID != b.StudyInstanceUID and a.StudyDate < b.StudyDate


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"n": 0}, "n"), ({"size": 16}, "size"), ({"positive_fraction": 1.5}, "positive_fraction")],
)
def test_set_writer_refuses_invalid_arguments(tmp_path: Path, kwargs: dict[str, object], argument: str) -> None:
    """An out-of-range argument of the set writer raises ValueError naming it, before writing anything."""
    call: dict[str, object] = {"n": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{argument}: expected .+, found "):
        write_phantom_set(tmp_path / "set", **call)  # type: ignore[arg-type]
    assert not (tmp_path / "set").exists()


@pytest.mark.slow
def test_a_512_phantom_takes_well_under_a_fifth_of_a_second() -> None:
    """Drawing a 512 x 512 phantom takes under 0.2 s (median of five)."""
    make_phantom(0, 1, 512)
    times = []
    for seed in range(5):
        start = time.perf_counter()
        make_phantom(seed, seed % 2, 512)
        times.append(time.perf_counter() - start)
    assert float(np.median(times)) < 0.2
