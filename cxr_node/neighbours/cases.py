"""What a stored embedding points at: the case records that cross stages, and their checks on construction.

A :class:`NewCase` describes any image the worker analysed (it is also the key of a query), so its
construction checks only that its texts are bounded and printable. What may *enter* the index is stricter:
identifiers a report can write (:func:`identifier_problems`, :func:`indexable`): a case without usable UIDs
is never indexed, and an accession number or date that cannot be written is left empty, never truncated.
"""

from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass, replace
from typing import Final, Literal, get_args

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cxr_node.dicom.uids import uid_problem

Label = Literal["covid", "non-covid"]
"""A confirmed finding; ``None`` where nobody has confirmed one."""
Source = Literal["store", "library"]
"""``store``: an image the node processed; ``library``: the labelled reference library."""

LABELS: Final[tuple[str, ...]] = get_args(Label)
SOURCES: Final[tuple[str, ...]] = get_args(Source)
CASE_NUMBER_PREFIX: Final = "C"
CASE_NUMBER_DIGITS: Final = 7
_STUDY_DATE: Final = re.compile(r"\d{8}")
_MAX_TEXT: Final = 256  # UIDs are at most 64 characters; generous, yet bounds a row
ACCESSION_MAX: Final = 16  # SH (PS3.5 §6.2)
UID_FIELDS: Final = ("sop_instance_uid", "study_instance_uid")


@dataclass(frozen=True)
class NewCase:
    """What the caller knows about an image when it adds its embedding. No patient identifier in clear.

    Parameters
    ----------
    sop_instance_uid, study_instance_uid : str
        The image and its study (non-empty).
    accession_number : str
        The study's accession number ("" when the source had none).
    study_date : str
        ``YYYYMMDD`` or "".
    patient_hash : str
        A hash of the patient ID, made by the caller (non-empty); the index never sees the ID itself.
    label : {None, "covid", "non-covid"}
        The confirmed finding, when known.
    source : {"store", "library"}
        Whether the node processed the image or it belongs to the reference library.

    Raises
    ------
    ValueError
        Naming the field, when a value is empty, too long, of the wrong form, or not one of the choices.

    Notes
    -----
    Only a case without :func:`identifier_problems` enters the index; :func:`indexable` says what becomes
    of one that has some.
    """

    sop_instance_uid: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    patient_hash: str
    label: Label | None = None
    source: Source = "store"

    def __post_init__(self) -> None:
        for name in ("sop_instance_uid", "study_instance_uid", "patient_hash"):
            check_text(name, getattr(self, name), required=True)
        check_text("accession_number", self.accession_number, required=False)
        check_study_date(self.study_date)
        check_label(self.label)
        check_source(self.source)


@dataclass(frozen=True, kw_only=True)
class Case(NewCase):
    """A stored case as retrieval returns it: the image's metadata, its model version and its case number.

    The index builds cases from its own rows, which passed NewCase's checks on the way in (and the database's
    CHECK constraints), so construction checks only what a Case adds: re-checking every text on each read
    would cost more than the search.

    Parameters
    ----------
    case_id : int
        The internal id (stable while the image stays in the index, never reused).
    model_version : str
        The model version whose embedding matched.
    """

    case_id: int
    model_version: str

    def __post_init__(self) -> None:
        if isinstance(self.case_id, bool) or not isinstance(self.case_id, int) or self.case_id < 1:
            raise ValueError(f"case_id must be a positive integer, found {self.case_id!r}")

    @property
    def case_number(self) -> str:
        """The de-identified name derived from ``case_id`` (e.g. ``C0000123``), for sites that forbid showing
        other patients' identifiers."""
        return case_number(self.case_id)


@dataclass(frozen=True)
class Neighbour:
    """One retrieved case: the case, its cosine similarity to the query (-1..1) and its rank (1 = nearest)."""

    case: Case
    similarity: float
    rank: int


def case_number(case_id: int) -> str:
    """Return the de-identified case number of internal id ``case_id`` (``C`` + at least 7 digits)."""
    if case_id < 1:
        raise ValueError(f"case_id must be a positive integer, found {case_id!r}")
    return f"{CASE_NUMBER_PREFIX}{case_id:0{CASE_NUMBER_DIGITS}d}"


def check_text(name: str, value: object, *, required: bool) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a str of printable characters, bounded in length."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, found {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > _MAX_TEXT or not value.isprintable():
        raise ValueError(f"{name} must be at most {_MAX_TEXT} printable characters, found {value[:80]!r}")


def check_study_date(value: object) -> None:
    """Raise ValueError naming ``study_date`` unless it is ``YYYYMMDD`` or ""."""
    if not isinstance(value, str) or (value and not _STUDY_DATE.fullmatch(value)):
        raise ValueError(f"study_date must be YYYYMMDD or '', found {value!r}")


def accession_problem(value: str) -> str:
    """Return why ``value`` cannot be written as an Accession Number (SH), or ""; never repeats the value."""
    if len(value) > ACCESSION_MAX:
        return f"over {ACCESSION_MAX} characters"
    if "\\" in value or not value.isprintable():
        return "holds a backslash or a control character"
    return ""


def date_problem(value: str) -> str:
    """Return why ``value`` is neither "" nor a calendar date ``YYYYMMDD``, or ""."""
    if not value:
        return ""
    if not _STUDY_DATE.fullmatch(value):
        return "not YYYYMMDD"
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return "not a calendar date"
    return ""


def identifier_problems(case: NewCase) -> tuple[str, ...]:
    """Why ``case``'s identifiers cannot be written into a report: one ``"field: reason"`` each, no values.

    Today's checks: both UIDs valid (PS3.5 §9.1: at most 64 characters, digits and dots, no leading zeros),
    an accession number of at most 16 characters without a backslash or control character, a study date
    that is "" or a calendar date ``YYYYMMDD``.
    """
    found = [f"{name}: {problem}" for name in UID_FIELDS if (problem := uid_problem(getattr(case, name)))]
    if problem := accession_problem(case.accession_number):
        found.append(f"accession_number: {problem}")
    if problem := date_problem(case.study_date):
        found.append(f"study_date: {problem}")
    return tuple(found)


def indexable(case: NewCase) -> tuple[NewCase | None, tuple[str, ...]]:
    """Return ``case`` as it may enter the index, and its :func:`identifier_problems`.

    None when a UID is unusable (the case could never be named in a report); otherwise the case, with an
    accession number or study date that cannot be written left empty (never truncated: a cut accession
    number can name another study).
    """
    problems = identifier_problems(case)
    if any(problem.split(":")[0] in UID_FIELDS for problem in problems):
        return None, problems
    if not problems:
        return case, problems
    accession = "" if accession_problem(case.accession_number) else case.accession_number
    date = "" if date_problem(case.study_date) else case.study_date
    return replace(case, accession_number=accession, study_date=date), problems


def check_label(value: object) -> None:
    """Raise ValueError naming ``label`` unless it is None or one of :data:`LABELS`."""
    if value is not None and value not in LABELS:
        raise ValueError(f"label must be None or one of {LABELS}, found {value!r}")


def check_source(value: object) -> None:
    """Raise ValueError naming ``source`` unless it is one of :data:`SOURCES`."""
    if value not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, found {value!r}")


def check_version(value: object) -> str:
    """Return ``value`` if it is a usable model version, else raise ValueError naming ``version``."""
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_TEXT or not value.isprintable():
        raise ValueError(
            f"version must be a non-empty printable str of at most {_MAX_TEXT} characters, found {value!r}"
        )
    return value


def unit_vectors(name: str, values: ArrayLike, dim: int | None) -> NDArray[np.float32]:
    """Return ``values`` as an ``(N, D)`` C-contiguous float32 array of unit rows (a 1-D input is one row).

    Parameters
    ----------
    name : str
        The argument's name, for the error message.
    values : array_like
        Finite, non-zero embeddings.
    dim : int or None
        The expected D (the model version's), or None to accept any D >= 1.

    Raises
    ------
    ValueError
        Naming ``name``: wrong shape or D, a NaN or infinite value, or a zero vector.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numbers, found {type(values).__name__}") from exc
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    if rows.ndim != 2 or rows.shape[1] < 1:
        raise ValueError(f"{name} must be 1-D (one vector) or 2-D (N, D), found shape {array.shape}")
    if dim is not None and rows.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} values per vector (the model version's), found {rows.shape[1]}")
    if not np.isfinite(rows).all():
        raise ValueError(f"{name} must be finite, found NaN or infinity")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise ValueError(f"{name} must not contain a zero vector (cosine similarity is undefined for it)")
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


def check_k(k: object) -> int:
    """Return ``k`` if it is an int in 1..10000, else raise ValueError naming ``k``."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= 10_000:
        raise ValueError(f"k must be an integer from 1 to 10000, found {k!r}")
    return int(k)


def finite_similarity(value: float) -> float:
    """Return a similarity clipped into [-1, 1] (float32 rounding can step just outside)."""
    return float(min(1.0, max(-1.0, value))) if math.isfinite(value) else -1.0
