"""Labelled image sets from a CSV: reading, patient-level splits (saved and reused), decoding and caching.

A set is a CSV whose ``path`` column names DICOM or PNG files relative to the CSV, with a ``label``
(covid | non-covid, 1 | 0, positive | negative), a ``patient_id``, and optionally a ``split`` (train |
val | test) and a ``mask`` (a PNG lung mask, 0/255). Images are decoded as the node decodes them
(:func:`cxr_node.dicom.pixels.decode` with ``max_side=1024``), then normalised as the engine normalises
them (:func:`cxr_node.infer.preprocess.normalise`), and kept in memory so epochs do not decode again.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom.errors import InvalidDicomError

from cxr_node.dicom.pixels import decode
from cxr_node.errors import PixelDecodeError
from cxr_node.infer import preprocess

SPLITS: Final = ("train", "val", "test")
DEFAULT_FRACTIONS: Final = (0.70, 0.15, 0.15)
MAX_SIDE: Final = 1024
"""Decoding size limit, as in the node (``decode(ds, max_side=1024)``)."""
SPLIT_CSV: Final = "split.csv"
SPLIT_COLUMNS: Final = ("path", "patient_id", "split")
_POSITIVE: Final = frozenset({"covid", "1", "positive", "pos", "true"})
_NEGATIVE: Final = frozenset({"non-covid", "noncovid", "0", "negative", "neg", "false"})
_SPLIT_NAMES: Final = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PNG_SUFFIXES: Final = frozenset({".png"})


@dataclass(frozen=True)
class Row:
    """One labelled image of a set.

    Attributes
    ----------
    path : pathlib.Path
        The image file (absolute, or relative to the working directory).
    relpath : str
        ``path`` as the CSV wrote it: the key of :data:`SPLIT_CSV`.
    label : int
        1 positive (COVID-19), 0 negative.
    patient_id : str
        Splits never put one patient in two parts.
    uid : str
        SOP Instance UID when the CSV has one, else ``relpath``: what the split hash records.
    split : str or None
        ``train``, ``val`` or ``test`` once assigned.
    mask : pathlib.Path or None
        The ground-truth lung mask (PNG), if any.
    """

    path: Path
    relpath: str
    label: int
    patient_id: str
    uid: str
    split: str | None = None
    mask: Path | None = None


# --------------------------------------------------------------------------------------------- CSV


def parse_label(value: str) -> int:
    """Return 1 or 0 for a label written as covid/non-covid, 1/0 or positive/negative (any case)."""
    text = value.strip().lower()
    if text in _POSITIVE:
        return 1
    if text in _NEGATIVE:
        return 0
    raise ValueError(f"label: expected covid, non-covid, 1, 0, positive or negative; found {value!r}")


def read_rows(csv_path: Path) -> list[Row]:
    """Read a labelled set; paths in it are relative to the CSV's folder.

    Raises
    ------
    ValueError
        A required column is missing or a row is invalid (naming the file and the line).
    """
    base = csv_path.parent
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "patient_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        rows = []
        for line, record in enumerate(reader, start=2):
            try:
                rows.append(_row(base, record))
            except ValueError as exc:
                raise ValueError(f"{csv_path} line {line}: {exc}") from exc
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    return rows


def _row(base: Path, record: dict[str, str]) -> Row:
    """Build one :class:`Row` from a CSV record."""
    relpath = (record.get("path") or "").strip()
    patient = (record.get("patient_id") or "").strip()
    if not relpath or not patient:
        raise ValueError("path and patient_id must not be empty")
    split = (record.get("split") or "").strip().lower() or None
    if split is not None and split not in _SPLIT_NAMES:
        raise ValueError(f"split: expected train, val or test; found {split!r}")
    mask = (record.get("mask") or "").strip()
    return Row(
        path=base / relpath,
        relpath=relpath,
        label=parse_label(record.get("label") or ""),
        patient_id=patient,
        uid=(record.get("sop_instance_uid") or "").strip() or relpath,
        split=_SPLIT_NAMES[split] if split else None,
        mask=base / mask if mask else None,
    )


# ------------------------------------------------------------------------------------------- splits


def split_by_patient(rows: Sequence[Row], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> list[Row]:
    """Assign train/val/test by patient, stratified by label, deterministically.

    A patient is positive for stratification when any of their images is. Within each stratum the
    patients (sorted by ID, then shuffled with ``seed``) are dealt to the parts so each part's share of
    patients is as close to ``fractions`` as whole patients allow.

    Parameters
    ----------
    rows : sequence of Row
        The set; any ``split`` already on a row is ignored.
    fractions : sequence of float
        (train, val, test), non-negative, summing to 1.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    list of Row
        The rows, in their order, with ``split`` set; no patient is in two parts.
    """
    _check_fractions(fractions)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, label in sorted(_patient_labels(rows).items()):
        strata[label].append(patient)
    rng = np.random.default_rng(seed)
    assigned: dict[str, str] = {}
    for label in sorted(strata):
        patients = strata[label]
        order = rng.permutation(len(patients))
        counts = _counts(len(patients), fractions)
        parts = np.repeat(np.arange(len(SPLITS)), counts)
        assigned.update({patients[i]: SPLITS[part] for i, part in zip(order, parts, strict=True)})
    return [replace(row, split=assigned[row.patient_id]) for row in rows]


def _check_fractions(fractions: Sequence[float]) -> None:
    """Raise ValueError unless ``fractions`` are three non-negative numbers summing to 1."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions: expected three non-negative numbers summing to 1; found {tuple(fractions)}")


def _patient_labels(rows: Iterable[Row]) -> dict[str, int]:
    """Return each patient's stratum: 1 when any of their images is positive."""
    labels: dict[str, int] = {}
    for row in rows:
        labels[row.patient_id] = max(labels.get(row.patient_id, 0), row.label)
    return labels


def _counts(n: int, fractions: Sequence[float]) -> NDArray[np.int64]:
    """Return whole counts summing to ``n``, closest to ``n * fractions`` (largest remainders)."""
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    for index in np.argsort(-remainder, kind="stable")[: n - int(counts.sum())]:
        counts[index] += 1
    return counts


def split_hash(rows: Iterable[Row]) -> str:
    """Return the SHA-256 of the sorted ``split,uid`` lines: which image went where, for provenance."""
    lines = sorted(f"{row.split},{row.uid}" for row in rows)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def load_split(
    rows: Sequence[Row],
    split_csv: Path,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[Row]:
    """Return ``rows`` with their split: from the CSV's own column, else from ``split_csv``, else a new one.

    A new split (:func:`split_by_patient`) is written to ``split_csv`` so that the next run reuses it.

    Raises
    ------
    ValueError
        Only some rows carry a split, or ``split_csv`` misses rows of the set or puts a patient in two parts.
    """
    given = [row.split is not None for row in rows]
    if all(given):
        return list(rows)
    if any(given):
        raise ValueError("some rows have a split and some do not; give every row one, or none")
    if split_csv.is_file():
        return _apply_saved_split(rows, split_csv)
    split = split_by_patient(rows, fractions, seed)
    write_split(split, split_csv)
    return split


def write_split(rows: Sequence[Row], split_csv: Path) -> Path:
    """Write ``path, patient_id, split`` of every row to ``split_csv``."""
    split_csv.parent.mkdir(parents=True, exist_ok=True)
    with split_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows((row.relpath, row.patient_id, row.split) for row in rows)
    return split_csv


def _apply_saved_split(rows: Sequence[Row], split_csv: Path) -> list[Row]:
    """Return ``rows`` with the split recorded in ``split_csv``."""
    with split_csv.open(newline="", encoding="utf-8") as fh:
        saved = {record["path"]: _SPLIT_NAMES.get(record["split"], "") for record in csv.DictReader(fh)}
    absent = [row.relpath for row in rows if not saved.get(row.relpath)]
    if absent:
        raise ValueError(
            f"{split_csv} has no split for {len(absent)} image(s) of the set (first: {absent[0]}); "
            "delete it to split again"
        )
    out = [replace(row, split=saved[row.relpath]) for row in rows]
    check_no_leak(out)
    return out


def check_no_leak(rows: Iterable[Row]) -> None:
    """Raise ValueError if a patient has images in two parts."""
    parts: dict[str, set[str | None]] = defaultdict(set)
    for row in rows:
        parts[row.patient_id].add(row.split)
    leaked = sorted(patient for patient, seen in parts.items() if len(seen) > 1)
    if leaked:
        raise ValueError(f"{len(leaked)} patient(s) are in more than one split (first: {leaked[0]})")


def select(rows: Iterable[Row], split: str) -> list[Row]:
    """Return the rows of one part."""
    return [row for row in rows if row.split == split]


# ------------------------------------------------------------------------------------------- pixels


def read_image(path: Path, max_side: int = MAX_SIDE) -> NDArray[np.float32]:
    """Return the presentation image of a DICOM or PNG file, ``(H, W)`` float32 in [0, 1].

    Raises
    ------
    ValueError
        The file cannot be read or decoded (the message names it).
    """
    try:
        if path.suffix.lower() in _PNG_SUFFIXES:
            return _read_png(path, max_side)
        return decode(pydicom.dcmread(path), max_side=max_side).pixels
    except (OSError, PixelDecodeError, InvalidDicomError) as exc:
        raise ValueError(f"{path}: cannot be read as an image: {exc}") from exc


def _read_png(path: Path, max_side: int) -> NDArray[np.float32]:
    """Return a greyscale PNG as float32 in [0, 1], shrunk so its longer side is at most ``max_side``."""
    with Image.open(path) as img:
        grey = np.asarray(img.convert("I;16") if img.mode in ("I", "I;16") else img.convert("L"))
    top = 65535.0 if grey.dtype == np.uint16 else 255.0
    pixels = grey.astype(np.float32) / np.float32(top)
    if max(pixels.shape) > max_side:
        scale = max_side / max(pixels.shape)
        shape = (max(1, round(pixels.shape[0] * scale)), max(1, round(pixels.shape[1] * scale)))
        pixels = preprocess.resize(pixels, shape)
    return pixels


def read_mask(path: Path, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """Return a 0/255 PNG mask as bool, resampled (nearest) to ``shape`` when it differs."""
    with Image.open(path) as img:
        mask = np.asarray(img.convert("L")) > 127
    return mask if mask.shape == shape else preprocess.resize(mask, shape, order="nearest")


class LabelledSet:
    """Rows of a set with their normalised images (and ground-truth masks), decoded once and cached.

    Parameters
    ----------
    rows : sequence of Row
        The images.
    max_side : int
        Decoding size limit (the node's is :data:`MAX_SIDE`).
    cache : bool
        Keep decoded images in memory (for sets that fit; each image is ``H * W * 4`` bytes).
    """

    def __init__(self, rows: Sequence[Row], *, max_side: int = MAX_SIDE, cache: bool = True) -> None:
        if not rows:
            raise ValueError("a LabelledSet needs at least one row")
        self.rows = list(rows)
        self.max_side = max_side
        self.cache = cache
        self._images: dict[int, NDArray[np.float32]] = {}
        self._masks: dict[int, NDArray[np.bool_]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> NDArray[np.int64]:
        """``(N,)`` 0/1 labels."""
        return np.array([row.label for row in self.rows], dtype=np.int64)

    @property
    def patients(self) -> list[str]:
        """Patient ID of each image."""
        return [row.patient_id for row in self.rows]

    def image(self, index: int) -> NDArray[np.float32]:
        """Return image ``index`` decoded and normalised as the engine does, ``(H, W)`` float32 in [0, 1]."""
        if index in self._images:
            return self._images[index]
        image = preprocess.normalise(read_image(self.rows[index].path, self.max_side))
        if self.cache:
            self._images[index] = image
        return image

    def mask(self, index: int) -> NDArray[np.bool_]:
        """Return the ground-truth lung mask of image ``index`` on its grid (ValueError if the row has none)."""
        if index in self._masks:
            return self._masks[index]
        row = self.rows[index]
        if row.mask is None:
            raise ValueError(f"{row.relpath}: no ground-truth mask in the set (a 'mask' column is needed)")
        mask = read_mask(row.mask, self.image(index).shape)
        if self.cache:
            self._masks[index] = mask
        return mask

    def subset(self, indices: Iterable[int]) -> LabelledSet:
        """Return a set of some of these rows, sharing what is already decoded."""
        chosen = list(indices)
        part = LabelledSet([self.rows[i] for i in chosen], max_side=self.max_side, cache=self.cache)
        for new, old in enumerate(chosen):
            if old in self._images:
                part._images[new] = self._images[old]
            if old in self._masks:
                part._masks[new] = self._masks[old]
        return part

    @property
    def has_masks(self) -> bool:
        """Whether every row has a ground-truth mask."""
        return all(row.mask is not None for row in self.rows)
