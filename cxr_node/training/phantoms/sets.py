"""Writing labelled phantom sets: DICOM files, lung masks as PNG and ``labels.csv`` (:func:`write_phantom_set`)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from cxr_node.training.phantoms.anatomy import MAX_SIZE, MIN_SIZE, _check_int, make_phantom
from cxr_node.training.phantoms.dicom import _PHOTOMETRICS, _hash_int, phantom_to_dataset

LABELS_CSV: Final = "labels.csv"
CSV_COLUMNS: Final = (
    "path", "label", "patient_id", "study_uid", "sop_instance_uid", "accession_number",
    "modality", "photometric", "bits_stored", "distractor", "extent", "mask",
)  # fmt: skip
"""Columns of ``labels.csv``; paths are relative to the set's folder, label is covid | non-covid."""

_SET_STYLES: Final = (("CR", "DX"), _PHOTOMETRICS, (10, 12, 14, 16))


@dataclass(frozen=True)
class _Planned:
    """One image of a set: who, which visit, which label and how it is encoded."""

    index: int
    patient: int
    visit: int
    label: int
    modality: str
    photometric: str
    bits: int


def write_phantom_set(out: Path, n: int, seed: int = 0, size: int = 512, positive_fraction: float = 0.5) -> Path:
    """Write ``n`` phantom radiographs as DICOM, their lung masks as PNG and ``labels.csv``.

    About one patient in ten has two images, in two studies a few months apart (same anatomy, own
    pose and label), so that splits by patient can be tested. Modality, photometric interpretation and
    bits stored are balanced across the set. Nothing depends on the clock: the same arguments write
    byte-identical files.

    Parameters
    ----------
    out : pathlib.Path
        Folder to write into (created); holds ``images/NNNNN.dcm``, ``masks/NNNNN.png``, ``labels.csv``.
    n : int
        Number of images, 1 to 100000.
    seed : int
        Non-negative seed of the whole set.
    size : int
        Rows and columns of each image, 64 to 2048.
    positive_fraction : float
        Fraction of images labelled covid (rounded to a count), in [0, 1].

    Returns
    -------
    pathlib.Path
        The path of ``labels.csv``, with the columns :data:`CSV_COLUMNS`.

    Raises
    ------
    ValueError
        If an argument is out of range, naming the argument, what was expected and what was found.
    """
    _check_int("n", n, 1, 100_000)
    _check_int("seed", seed, 0, None)
    _check_int("size", size, MIN_SIZE, MAX_SIZE)
    if not isinstance(positive_fraction, float | int) or not 0 <= positive_fraction <= 1:
        raise ValueError(f"positive_fraction: expected a number in [0, 1], found {positive_fraction!r}")
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = [_write_one(out, seed, size, item) for item in _plan_set(n, seed, float(positive_fraction))]
    labels = out / LABELS_CSV
    with labels.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return labels


def _derive(seed: int, stream: int, index: int) -> int:
    """Return a well-mixed 32-bit seed for item ``index`` of ``stream`` in a set seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def _plan_set(n: int, seed: int, positive_fraction: float) -> list[_Planned]:
    """Assign each image its patient, visit, label and encoding."""
    rng = np.random.default_rng([seed, 7])
    positives = round(n * positive_fraction)
    labels = rng.permutation(np.r_[np.ones(positives, int), np.zeros(n - positives, int)])
    repeats = round(n / 11)
    twice = set(rng.choice(n - repeats, repeats, replace=False).tolist())
    visits = [(p, k) for p in range(n - repeats) for k in range(2 if p in twice else 1)]
    modality, photometric, bits = (rng.permutation(n) % len(options) for options in _SET_STYLES)
    modalities, photometrics, depths = _SET_STYLES
    return [
        _Planned(i, p, k, int(labels[i]), modalities[modality[i]], photometrics[photometric[i]], depths[bits[i]])
        for i, (p, k) in enumerate(visits)
    ]


def _write_one(out: Path, seed: int, size: int, item: _Planned) -> dict[str, str]:
    """Draw, encode and write one planned image and its mask; return its ``labels.csv`` row."""
    ph = make_phantom(_derive(seed, 1, item.index), item.label, size, anatomy_seed=_derive(seed, 2, item.patient))
    patient_id = f"PH{seed}-{item.patient:05d}"
    first = datetime(2020, 3, 2, 8, 0) + timedelta(minutes=_hash_int("first", patient_id) % (500 * 24 * 60))
    when = first + timedelta(days=item.visit * (60 + _hash_int("gap", patient_id) % 300))
    ds = phantom_to_dataset(
        ph, modality=item.modality, photometric=item.photometric, bits_stored=item.bits,
        patient_id=patient_id, patient_name=f"PHANTOM^P{item.patient:05d}", study_datetime=when,
    )  # fmt: skip
    image, mask = f"images/{item.index:05d}.dcm", f"masks/{item.index:05d}.png"
    ds.save_as(out / image, enforce_file_format=True)
    Image.fromarray(ph.lung_mask.astype(np.uint8) * 255).save(out / mask)
    return {
        "path": image, "label": "covid" if ph.label else "non-covid", "patient_id": patient_id,
        "study_uid": ds.StudyInstanceUID, "sop_instance_uid": ds.SOPInstanceUID,
        "accession_number": ds.AccessionNumber, "modality": item.modality, "photometric": item.photometric,
        "bits_stored": str(item.bits), "distractor": ph.distractor or "none", "extent": f"{ph.extent:.4f}",
        "mask": mask,
    }  # fmt: skip
