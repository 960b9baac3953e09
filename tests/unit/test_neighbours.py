"""The neighbour index on each case store: top-k against brute force, exclusions, library, versions, labels, purge,
rebuild, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cxr_node.neighbours import (
    CHECKPOINTS,
    EngineParams,
    NeighbourIndex,
    NewCase,
    ReplicaIndex,
    case_number,
)
from tests.index_backends import BACKENDS, IndexBackend, index_backend

VERSION = "demo-1.0"
DIM = 32
SMALL_IVF = EngineParams(exact_max=400, nprobe=8, scan_rows=1, train_per_list=16)  # approximate at test sizes


def unit(rng: np.random.Generator, count: int, dim: int = DIM) -> np.ndarray:
    """Return ``count`` random unit float32 rows."""
    rows = rng.standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, count: int, dim: int = DIM, components: int = 24) -> np.ndarray:
    """Return ``count`` unit rows of a Gaussian mixture (``components`` unit centres, noise norm 0.6)."""
    centres = unit(np.random.default_rng(123), components, dim)
    noise = rng.standard_normal((count, dim)).astype(np.float32) * np.float32(0.6 / np.sqrt(dim))
    rows = centres[rng.integers(0, components, count)] + noise
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def new_case(row: int, *, patient: str | None = None, study: str | None = None, **extra: str | None) -> NewCase:
    """Return the case of stored row ``row`` (its own patient and study unless given)."""
    return NewCase(
        sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{row}",
        study_instance_uid=study or f"1.2.826.0.1.3680043.10.2.{row}",
        accession_number=f"A{row}",
        study_date="20240102",
        patient_hash=patient or f"patient-{row}",
        **extra,  # type: ignore[arg-type]
    )


def row_of(neighbour_sop: str) -> int:
    """Return the stored row a test SOP Instance UID names."""
    return int(neighbour_sop.rsplit(".", 1)[1])


def brute_force(stored: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    """Return the rows of the exact top ``k`` (ties by row), among ``allowed`` rows when given."""
    scores = (stored @ (query / np.linalg.norm(query))).astype(np.float64)
    rows = np.arange(len(stored)) if allowed is None else np.flatnonzero(allowed)
    order = np.lexsort((rows, -scores[rows]))
    return rows[order][:k].tolist()


def fill(index: ReplicaIndex, stored: np.ndarray, **case_args: str | None) -> None:
    """Add every row of ``stored`` as its own case, in batches."""
    for start in range(0, len(stored), 500):
        rows = range(start, min(start + 500, len(stored)))
        index.add_many(VERSION, stored[rows.start : rows.stop], [new_case(r, **case_args) for r in rows])


def rows_found(index: ReplicaIndex, query: np.ndarray, k: int, **kwargs: object) -> list[int]:
    """Return the stored rows the index returns for ``query`` (no exclusion unless given)."""
    kwargs = {"patient_hash": None, "study_instance_uid": None, **kwargs}
    return [row_of(n.case.sop_instance_uid) for n in index.query(VERSION, query, k, **kwargs)]  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The index folder inside a temporary storage root."""
    return tmp_path / "index"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> IndexBackend:
    """Each case store: the SQLite file, a fresh PostgreSQL database."""
    return index_backend(request)


@pytest.fixture
def index(root: Path, backend: IndexBackend) -> Iterator[ReplicaIndex]:
    """A fresh index with the default (measured) settings on each case store."""
    with backend.open(root) as opened:
        yield opened


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("make", [unit, clustered], ids=["random", "clustered"])
def test_exact_engine_matches_brute_force(index: ReplicaIndex, make: object) -> None:
    """Below the exact threshold, top-k rows, order and similarities are those of brute force."""
    rng = np.random.default_rng(1)
    stored, queries = make(rng, 700), make(rng, 25)  # type: ignore[operator]
    fill(index, stored)
    assert index.load(VERSION).engines == {"store": "exact", "library": "exact"}
    for query in queries:
        found = index.query(VERSION, query, 7, patient_hash=None, study_instance_uid=None)
        expected = brute_force(stored, query, 7)
        assert [row_of(n.case.sop_instance_uid) for n in found] == expected
        assert [n.rank for n in found] == list(range(1, 8))
        np.testing.assert_allclose([n.similarity for n in found], stored[expected] @ query, atol=1e-6)


def test_ivf_engine_recall_on_clustered_embeddings(root: Path, backend: IndexBackend) -> None:
    """Above the threshold the IVF engine finds >= 95 % of the exact top-10, and all of it scanning every list."""
    rng = np.random.default_rng(2)
    stored, queries = clustered(rng, 5000), clustered(rng, 40)
    with backend.open(root, SMALL_IVF) as index:
        fill(index, stored)
        engine = index.load(VERSION).engines["store"]
        assert engine.startswith("ivf:")
        lists = int(engine.split(":")[1])
        hits = [len(set(rows_found(index, q, 10)) & set(brute_force(stored, q, 10))) for q in queries]
        assert sum(hits) / (10 * len(queries)) >= 0.95
        for query in queries[:10]:
            assert rows_found(index, query, 10, nprobe=lists) == brute_force(stored, query, 10)


def test_ivf_engine_on_random_embeddings_is_exact_when_scanning_every_list(root: Path, backend: IndexBackend) -> None:
    """On unstructured vectors the IVF engine's results are a subset of the stored rows and exact at full scan."""
    rng = np.random.default_rng(3)
    stored, queries = unit(rng, 3000), unit(rng, 10)
    with backend.open(root, SMALL_IVF) as index:
        fill(index, stored)
        lists = int(index.load(VERSION).engines["store"].split(":")[1])
        for query in queries:
            assert len(rows_found(index, query, 10)) == 10
            assert rows_found(index, query, 10, nprobe=lists) == brute_force(stored, query, 10)


# ---------------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize("params", [EngineParams(), SMALL_IVF], ids=["exact", "ivf"])
def test_same_patient_and_same_study_are_excluded(root: Path, backend: IndexBackend, params: EngineParams) -> None:
    """The query's patient and study never come back, and k results still do when enough others exist."""
    rng = np.random.default_rng(4)
    query = unit(rng, 1)[0]
    near = query + 0.05 * unit(rng, 600)  # the nearest rows all belong to the query's patient or study
    stored = np.vstack([near / np.linalg.norm(near, axis=1, keepdims=True), unit(rng, 2000)]).astype(np.float32)
    with backend.open(root, params) as index:
        index.add_many(VERSION, stored[:300], [new_case(r, patient="P") for r in range(300)])
        index.add_many(VERSION, stored[300:600], [new_case(r, study="1.2.9") for r in range(300, 600)])
        fill_rows = range(600, len(stored))
        index.add_many(VERSION, stored[600:], [new_case(r) for r in fill_rows])
        found = rows_found(index, query, 10, patient_hash="P", study_instance_uid="1.2.9")
        assert len(found) == 10
        assert all(r >= 600 for r in found)
        allowed = np.arange(len(stored)) >= 600
        lists = index.load(VERSION).engines["store"].split(":")[-1]
        nprobe = int(lists) if lists.isdigit() else None
        exact = rows_found(index, query, 10, patient_hash="P", study_instance_uid="1.2.9", nprobe=nprobe)
        assert exact == brute_force(stored, query, 10, allowed)
        assert set(rows_found(index, query, 10)) <= set(range(600))  # without exclusion: the near rows


def test_library_only_returns_only_library_cases(index: ReplicaIndex) -> None:
    """``library_only`` searches the labelled library alone; the default searches both sources."""
    rng = np.random.default_rng(5)
    stored = unit(rng, 300)
    index.add_many(VERSION, stored[:250], [new_case(r) for r in range(250)])
    library = [new_case(r, source="library", label="covid" if r % 2 else "non-covid") for r in range(250, 300)]
    index.add_many(VERSION, stored[250:], library)
    query = stored[3]
    found = index.query(VERSION, query, 5, patient_hash=None, study_instance_uid=None, library_only=True)
    assert len(found) == 5
    assert all(n.case.source == "library" and n.case.label in ("covid", "non-covid") for n in found)
    assert [row_of(n.case.sop_instance_uid) for n in found] == brute_force(stored, query, 5, np.arange(300) >= 250)
    assert rows_found(index, query, 5) == brute_force(stored, query, 5)


def test_model_versions_are_never_compared(index: ReplicaIndex) -> None:
    """Each model version has its own vectors and length; a query sees only its version's cases."""
    rng = np.random.default_rng(6)
    index.add_many("v1", unit(rng, 50), [new_case(r) for r in range(50)])
    index.add_many("v2", unit(rng, 40, dim=8), [new_case(r) for r in range(40)])
    assert (index.size("v1"), index.size("v2"), index.versions()) == (50, 40, ["v1", "v2"])
    found = index.query("v2", unit(rng, 1, dim=8)[0], 40, patient_hash=None, study_instance_uid=None)
    assert len(found) == 40
    assert {n.case.model_version for n in found} == {"v2"}
    assert index.query("v3", unit(rng, 1)[0], 5, patient_hash=None, study_instance_uid=None) == []
    with pytest.raises(ValueError, match="vector"):
        index.query("v1", unit(rng, 1, dim=8)[0], 5, patient_hash=None, study_instance_uid=None)


# ---------------------------------------------------------------------------------------------- cases


def test_returned_case_carries_metadata_and_case_number(index: ReplicaIndex) -> None:
    """``add`` returns the stored case with its de-identified number; a query returns the same record."""
    rng = np.random.default_rng(7)
    vector = unit(rng, 1)[0]
    added = index.add(VERSION, vector * 3.0, new_case(0, label="covid"))
    assert (added.case_id, added.case_number, added.model_version) == (1, "C0000001", VERSION)
    (found,) = index.query(VERSION, vector, 1, patient_hash=None, study_instance_uid=None)
    assert found.case == added
    assert found.similarity == pytest.approx(1.0, abs=1e-6)
    assert case_number(12_345_678) == "C12345678"


def test_adding_an_image_twice_keeps_one_case(index: ReplicaIndex) -> None:
    """A retried add (same SOP Instance UID and version) stores nothing new and returns the same case."""
    rng = np.random.default_rng(8)
    vector = unit(rng, 1)[0]
    first = index.add(VERSION, vector, new_case(0))
    again = index.add(VERSION, vector, new_case(0))
    both = index.add_many(VERSION, np.vstack([vector, vector]), [new_case(0), new_case(0)])
    assert first == again == both[0] == both[1]
    assert index.size(VERSION) == 1


def test_library_import_promotes_a_stored_case(index: ReplicaIndex) -> None:
    """Adding a stored image again as ``library`` moves it into the library (same case number)."""
    rng = np.random.default_rng(9)
    vector = unit(rng, 1)[0]
    stored = index.add(VERSION, vector, new_case(0))
    promoted = index.add(VERSION, vector, new_case(0, source="library", label="covid"))
    assert (promoted.case_number, promoted.source, promoted.label) == (stored.case_number, "library", "covid")
    (found,) = index.query(VERSION, vector, 1, patient_hash=None, study_instance_uid=None, library_only=True)
    assert found.case == promoted
    assert index.size(VERSION) == 1


def test_label_sets_every_case_of_a_study(index: ReplicaIndex) -> None:
    """``label`` updates each case of the study and returns the count; None clears it."""
    rng = np.random.default_rng(10)
    stored = unit(rng, 4)
    index.add_many(VERSION, stored, [new_case(r, study="1.2.7" if r < 3 else None) for r in range(4)])
    assert index.label("1.2.7", "covid") == 3
    labels = {
        row_of(n.case.sop_instance_uid): n.case.label
        for n in index.query(VERSION, stored[0], 4, patient_hash=None, study_instance_uid=None)
    }
    assert labels == {0: "covid", 1: "covid", 2: "covid", 3: None}
    assert index.label("1.2.7", None) == 3
    assert index.label("9.9.9", "non-covid") == 0
    with pytest.raises(ValueError, match="label"):
        index.label("1.2.7", "pneumonia")  # type: ignore[arg-type]


def test_purge_study_removes_it_from_memory_database_and_checkpoint(root: Path, backend: IndexBackend) -> None:
    """A purged study is never returned again, its vectors leave the database and checkpoint files."""
    rng = np.random.default_rng(11)
    stored = unit(rng, 60)
    with backend.open(root) as index:
        index.add_many(VERSION, stored, [new_case(r, study="1.2.5" if r < 2 else None) for r in range(60)])
        index.add_many("v0", stored[:2], [new_case(r) for r in range(2)])
        index.checkpoint(VERSION)
        assert index.purge_study("1.2.5") == 2
        assert (index.size(VERSION), index.size("v0")) == (58, 0)
        assert not set(rows_found(index, stored[0], 60)) & {0, 1}
        assert index.purge_study("1.2.5") == 0
    secret = stored[0].astype("<f4").tobytes()
    assert not backend.holds_bytes(root, secret)
    for path in (root / CHECKPOINTS).iterdir():
        assert secret not in path.read_bytes(), path
    with backend.open(root) as index:
        assert index.load(VERSION).origin == "checkpoint"
        assert not set(rows_found(index, stored[0], 60)) & {0, 1}


# ---------------------------------------------------------------------------------------------- rebuild


def test_rebuild_from_the_same_items_gives_identical_results(root: Path, backend: IndexBackend) -> None:
    """Rebuilding an exact index from the items it was filled with changes no result and no case number."""
    rng = np.random.default_rng(12)
    stored, queries = unit(rng, 300), unit(rng, 15)
    items = [(new_case(r), stored[r]) for r in range(300)]
    with backend.open(root) as index:
        for case, vector in items:
            index.add(VERSION, vector, case)
        before = [index.query(VERSION, q, 8, patient_hash="x", study_instance_uid="y") for q in queries]
        assert index.rebuild(VERSION, items) == 300
        after = [index.query(VERSION, q, 8, patient_hash="x", study_instance_uid="y") for q in queries]
    assert after == before


def test_ivf_rebuild_is_deterministic_and_survives_restarts(root: Path, backend: IndexBackend) -> None:
    """Rebuilding twice from the same items, and reopening from checkpoint or database, gives identical results."""
    rng = np.random.default_rng(13)
    stored, queries = clustered(rng, 3000), clustered(rng, 20)
    items = [(new_case(r), stored[r]) for r in range(len(stored))]

    def results(index: ReplicaIndex) -> list[list[tuple[str, float]]]:
        found = [index.query(VERSION, q, 10, patient_hash=None, study_instance_uid=None) for q in queries]
        return [[(n.case.sop_instance_uid, n.similarity) for n in one] for one in found]

    with backend.open(root, SMALL_IVF) as index:
        index.rebuild(VERSION, items)
        first = results(index)
        assert index.load(VERSION).engines["store"].startswith("ivf:")
        index.rebuild(VERSION, iter(items))
        assert results(index) == first
    with backend.open(root, SMALL_IVF) as index:
        assert index.load(VERSION).origin == "checkpoint"
        assert results(index) == first
    for path in (root / CHECKPOINTS).iterdir():
        path.unlink()
    with backend.open(root, SMALL_IVF) as index:
        assert index.load(VERSION).origin == "database"
        assert results(index) == first


def test_rebuild_replaces_every_vector_of_the_version(index: ReplicaIndex) -> None:
    """After a rebuild only its items remain; kept images keep their case numbers, other versions are untouched."""
    rng = np.random.default_rng(14)
    stored = unit(rng, 100)
    cases = index.add_many(VERSION, stored, [new_case(r) for r in range(100)])
    index.add_many("other", stored[:10], [new_case(r) for r in range(10)])
    fresh = unit(rng, 50)
    assert index.rebuild(VERSION, [(new_case(r), fresh[r]) for r in range(50)]) == 50
    assert (index.size(VERSION), index.size("other")) == (50, 10)
    (found,) = index.query(VERSION, fresh[7], 1, patient_hash=None, study_instance_uid=None)
    assert found.case.case_number == cases[7].case_number
    assert found.similarity == pytest.approx(1.0, abs=1e-6)
    assert index.rebuild("never-seen", []) == 0


# ---------------------------------------------------------------------------------------------- bad input


BAD_INPUTS = (
    "wrong length",
    "NaN vector",
    "zero vector",
    "NaN query",
    "short query",
    "2-D query",
    "k zero",
    "empty version",
    "count mismatch",
    "not a case",
    "not a case alone",
    "bad item",
    "unknown label",
    "empty study",
    "bad nprobe",
    "case label",
    "case source",
    "case date",
    "case patient",
)


def _calls(index: ReplicaIndex) -> dict[str, tuple[object, str]]:
    """Return, per bad input, a call that makes it and the argument its error must name."""
    rng = np.random.default_rng(15)
    good = unit(rng, 1)[0]
    index.add(VERSION, good, new_case(0))
    nan = good.copy()
    nan[3] = np.nan
    return {
        "wrong length": (lambda: index.add(VERSION, good[:10], new_case(1)), "vector"),
        "NaN vector": (lambda: index.add(VERSION, nan, new_case(1)), "vector"),
        "zero vector": (lambda: index.add(VERSION, np.zeros(DIM), new_case(1)), "vector"),
        "NaN query": (lambda: index.query(VERSION, nan, 3, patient_hash=None, study_instance_uid=None), "vector"),
        "short query": (
            lambda: index.query(VERSION, good[:5], 3, patient_hash=None, study_instance_uid=None),
            "vector",
        ),
        "2-D query": (
            lambda: index.query(VERSION, good[None], 3, patient_hash=None, study_instance_uid=None),
            "vector",
        ),
        "k zero": (lambda: index.query(VERSION, good, 0, patient_hash=None, study_instance_uid=None), "k"),
        "empty version": (lambda: index.add("", good, new_case(1)), "version"),
        "count mismatch": (lambda: index.add_many(VERSION, np.vstack([good, good]), [new_case(1)]), "cases"),
        "not a case": (lambda: index.add_many(VERSION, good[None], ["1.2.3"]), "cases"),
        "not a case alone": (lambda: index.add(VERSION, good, "1.2.3"), "case"),
        "bad item": (lambda: index.rebuild(VERSION, [(new_case(1), nan)]), "items"),
        "unknown label": (lambda: index.label("1.2.3", "flu"), "label"),
        "empty study": (lambda: index.purge_study(""), "study_uid"),
        "bad nprobe": (
            lambda: index.query(VERSION, good, 3, patient_hash=None, study_instance_uid=None, nprobe=0),
            "nprobe",
        ),
        "case label": (lambda: new_case(1, label="flu"), "label"),
        "case source": (lambda: new_case(1, source="pacs"), "source"),
        "case date": (lambda: NewCase("1.2", "1.3", "A", "2024-01-02", "p"), "study_date"),
        "case patient": (lambda: NewCase("1.2", "1.3", "A", "", ""), "patient_hash"),
    }


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(index: ReplicaIndex, name: str) -> None:
    """Wrong lengths, NaN or zero vectors, unknown labels and other bad values raise ValueError naming the argument."""
    call, argument = _calls(index)[name]  # type: ignore[misc]
    with pytest.raises(ValueError, match=rf"^{argument} "):
        call()
    assert index.size(VERSION) == 1  # nothing half-written


def test_index_satisfies_the_protocol(index: ReplicaIndex) -> None:
    """The index on either store is a NeighbourIndex (callers type against the Protocol)."""
    typed: NeighbourIndex = index
    assert typed.size(VERSION) == 0
