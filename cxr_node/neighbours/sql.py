"""The neighbour case store written once in SQL: the writes and reads both backends share.

:class:`SqlCaseStore` implements :class:`~cxr_node.neighbours.store.CaseStore` over a backend's connection with
``?`` placeholders: the embedded SQLite file (:class:`~cxr_node.neighbours.store.SqliteCaseStore`) or one
PostgreSQL database every host shares (:class:`~cxr_node.neighbours.postgres.PgCaseStore`). A backend brings its
connections, transactions, snapshots and schema, runs the reads, and writes the three things its engine does its
own way: bulk inserts of cases and of embeddings, and deletes that report what they removed. The SQL fragments
that differ otherwise are its :class:`Dialect`. Here too: :class:`Changes` (what a write did to the embeddings),
the columns of a case and the batch sizes.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar, cast

import numpy as np

from cxr_node.errors import StorageError
from cxr_node.neighbours.cases import Case, Label, NewCase, Source, identifier_problems, indexable
from cxr_node.neighbours.engine import Floats, Int64s, Rows, empty_rows, key_of

BATCH_ROWS: Final = 1000  # cases written per batch (one executemany, or one array insert, per table)
CHUNK_ROWS: Final = 16384  # rows read per statement when streaming a partition (32 MiB at 512-d)
CASE_COLUMNS: Final = (
    "c.id, c.sop_instance_uid, c.study_instance_uid, c.accession_number, c.study_date, c.patient_hash,"
    " c.label, c.source"
)
NEW_CASE_COLUMNS: Final = (
    "sop_instance_uid",
    "study_instance_uid",
    "accession_number",
    "study_date",
    "patient_hash",
    "label",
    "source",
)
"""The columns of a new ``cases`` row, as :class:`NewCase` names them (``added_at`` is the time of the write)."""

PartKey = tuple[str, bool]
"""A partition of the index: (model version, library?)."""


@dataclass
class _Added:
    """Rows inserted into one partition, gathered as Python lists until the write commits."""

    ids: list[int] = field(default_factory=list)
    patients: list[int] = field(default_factory=list)
    studies: list[int] = field(default_factory=list)
    vectors: list[Floats] = field(default_factory=list)

    def rows(self, dim: int) -> Rows:
        """Return the gathered rows as one batch."""
        vectors = (
            np.stack(self.vectors).astype(np.float32, copy=False) if self.vectors else np.empty((0, dim), np.float32)
        )
        return Rows(vectors, *(np.array(v, np.int64) for v in (self.ids, self.patients, self.studies)))


@dataclass
class Changes:
    """What one write did to the embeddings, for the in-memory partitions to follow once it commits."""

    added: dict[PartKey, _Added] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    max_id: dict[str, int] = field(default_factory=dict)

    def add(self, part: PartKey, row_id: int, vector: Floats, patient: int, study: int) -> None:
        """Record one inserted embedding."""
        added = self.added.setdefault(part, _Added())
        added.ids.append(row_id)
        added.patients.append(patient)
        added.studies.append(study)
        added.vectors.append(vector)
        self.max_id[part[0]] = max(self.max_id.get(part[0], 0), row_id)

    def remove(self, version: str, row_id: int) -> None:
        """Record one deleted embedding."""
        self.removed.setdefault(version, []).append(row_id)

    def versions(self) -> set[str]:
        """Return the model versions this write touched."""
        return {part[0] for part in self.added} | set(self.removed)


class Result(Protocol):
    """A statement's outcome as the shared SQL reads it (a DB-API cursor of either driver)."""

    @property
    def rowcount(self) -> int:
        """How many rows an UPDATE or DELETE touched."""
        ...

    def fetchall(self) -> list[Any]:
        """The rows the statement returned."""
        ...


class Cursor(Protocol):
    """A backend's connection inside its write transaction, taking ``?`` placeholders."""

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> Result:
        """Run one statement."""
        ...


Db = TypeVar("Db", bound=Cursor)
"""A backend's write transaction handle: its connection inside the transaction."""


@dataclass(frozen=True)
class Dialect:
    """What the engines write differently in the shared statements.

    Parameters
    ----------
    arrays : bool
        True: a list of values is bound as one array (``column = ANY(?::type[])``); False: one ``?`` per value.
    list_limit : int
        Values bound per statement that matches a column against a list.
    next_generation : str
        The generation a rebuild's upsert gives a version already in ``versions``.
    delete_orphans : str
        The statement that deletes the cases left without any embedding.
    count : str
        The ``SELECT ... FROM`` that counts embeddings, before ``WHERE model_version = ? [AND library = ?]``.
    text_order : str
        Appended to an ORDER BY on text, so that both engines sort by code point.
    """

    arrays: bool
    list_limit: int
    next_generation: str
    delete_orphans: str
    count: str
    text_order: str = ""

    def member(self, column: str, values: Sequence[Any], kind: str) -> tuple[str, list[Any]]:
        """SQL that matches ``column`` against ``values`` (of SQL type ``kind``), and the arguments it binds."""
        if not self.arrays:
            return f"{column} IN ({', '.join('?' * len(values))})", list(values)
        array = [int(v) for v in values] if kind == "bigint" else list(values)  # psycopg binds ints, not numpy's
        return f"{column} = ANY(?::{kind}[])", [array]


class SqlCaseStore(ABC, Generic[Db]):
    """The case store's logic, once for both backends, over their connection with ``?`` placeholders.

    A backend sets :attr:`dialect` and implements :meth:`transaction`, the reads (:meth:`_read`) and the writes
    its engine does its own way (:meth:`_add_cases`, :meth:`_add_embeddings`, :meth:`_delete_embeddings`), and
    the rest of :class:`~cxr_node.neighbours.store.CaseStore`, which differs too: snapshots, the change counter,
    the write-ahead log, closing, ``ids`` and ``max_id``.
    """

    dialect: ClassVar[Dialect]
    """The engine's SQL differences."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Db]:
        """Hold the write lock for the block; commit at its end, roll back on error."""

    @abstractmethod
    def _read(self, sql: str, args: Sequence[Any] = (), *, binary: bool = False) -> list[Any]:
        """Run one read (inside this thread's transaction or snapshot when there is one); return its rows.

        ``binary`` asks for the driver's binary format where it has one (psycopg's: vectors without hex encoding).
        """

    @abstractmethod
    def _add_cases(self, db: Db, rows: list[tuple[Any, ...]], now: float) -> list[Any]:
        """Insert new cases (values of :data:`NEW_CASE_COLUMNS`) added at ``now``; return their rows, with the
        columns of :data:`CASE_COLUMNS`."""

    @abstractmethod
    def _add_embeddings(
        self, db: Db, version: str, rows: list[tuple[int, bool, int, int, bytes]], returning: bool
    ) -> list[Any]:
        """Insert embeddings of ``version``, each ``(case_id, library, patient_key, study_key, vector)``; return
        ``(id, case_id, library)`` of each new row (needed only when ``returning``)."""

    @abstractmethod
    def _delete_embeddings(self, db: Db, where: str, args: Sequence[Any], columns: str) -> list[Any]:
        """Delete the embeddings that ``where`` (with ``args``) selects; return ``columns`` of each deleted row."""

    # ------------------------------------------------------------------------------------------ versions

    def version_info(self, version: str) -> tuple[int, int] | None:
        """Return ``(dim, generation)`` of a model version, or None when it has no embeddings yet."""
        rows = self._read("SELECT dim, generation FROM versions WHERE model_version = ?", (version,))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def count(self, version: str, library: bool | None = None) -> int:
        """Return how many embeddings a model version has (of one partition when ``library`` is given)."""
        where: str = "model_version = ?"
        args: tuple[object, ...] = (version,)
        if library is not None:
            where, args = f"{where} AND library = ?", (version, library)
        return int(self._read(f"{self.dialect.count} WHERE {where}", args)[0][0])

    def versions(self) -> list[str]:
        """Return the model versions the index knows, sorted by code point."""
        order = f"model_version{self.dialect.text_order}"
        return [row[0] for row in self._read(f"SELECT model_version FROM versions ORDER BY {order}")]

    # ------------------------------------------------------------------------------------------ writes

    def insert(self, db: Db, version: str, vectors: Floats, cases: Sequence[NewCase]) -> tuple[list[Case], Changes]:
        """Add one embedding per case inside the caller's transaction; return the stored cases and the changes.

        A case already stored (same SOP Instance UID) keeps its metadata and case number; a non-None
        ``label`` replaces its label, and ``source="library"`` promotes a ``store`` case to the library
        (its embeddings of every version move partition: deleted and inserted again under new ids). An
        embedding already stored for the case and version is kept as it is (adding twice is harmless).
        """
        db.execute(
            "INSERT INTO versions (model_version, dim, generation) VALUES (?, ?, 1) ON CONFLICT DO NOTHING",
            (version, vectors.shape[1]),
        )
        changes = Changes()
        stored: list[Case] = []
        for start in range(0, len(cases), BATCH_ROWS):
            end = start + BATCH_ROWS
            stored += self._write_batch(db, version, vectors[start:end], cases[start:end], changes, record=True)
        return stored, changes

    def replace(self, db: Db, version: str, dim: int, items: Iterable[tuple[NewCase, Floats]]) -> tuple[int, Changes]:
        """Replace every embedding of ``version`` by ``items`` inside the caller's transaction.

        The version's generation goes up by one (so checkpoints and other processes see a rebuild), and
        cases left without any embedding are deleted. Returns how many embeddings were written and the
        changes to *other* versions (library promotions); the rebuilt version itself is reloaded whole.
        """
        db.execute("DELETE FROM embeddings WHERE model_version = ?", (version,))
        db.execute(
            "INSERT INTO versions (model_version, dim, generation) VALUES (?, ?, 1) ON CONFLICT (model_version)"
            f" DO UPDATE SET dim = excluded.dim, generation = {self.dialect.next_generation}",
            (version, dim),
        )
        changes, count = Changes(), 0
        for batch in batched(items):
            cases = [case for case, _ in batch]
            vectors = np.stack([vector for _, vector in batch]).astype(np.float32, copy=False)
            count += len(self._write_batch(db, version, vectors, cases, changes, record=False))
        db.execute(self.dialect.delete_orphans)
        return count, changes

    def set_label(self, study_uid: str, label: Label | None) -> int:
        """Set the label of every case of a study; return how many cases it changed or confirmed."""
        with self.transaction() as db:
            return db.execute("UPDATE cases SET label = ? WHERE study_instance_uid = ?", (label, study_uid)).rowcount

    def purge(self, db: Db, study_uid: str) -> tuple[int, Changes]:
        """Delete a study's cases and all their embeddings inside the caller's transaction."""
        changes = Changes()
        study = "case_id IN (SELECT id FROM cases WHERE study_instance_uid = ?)"
        for row_id, version in self._delete_embeddings(db, study, (study_uid,), "id, model_version"):
            changes.remove(version, row_id)
        return db.execute("DELETE FROM cases WHERE study_instance_uid = ?", (study_uid,)).rowcount, changes

    def clean(self, db: Db) -> tuple[int, int, Changes]:
        """Inside the caller's transaction, delete the cases whose UIDs are unusable (with their embeddings)
        and clear accession numbers and dates that cannot be written; return (deleted, cleared, changes)."""
        changes, dropped, cleared = Changes(), [], 0
        for case, _ in _failing(db.execute(f"SELECT {CASE_COLUMNS} FROM cases c ORDER BY c.id").fetchall()):
            kept, _problems = indexable(case)
            if kept is None:
                dropped.append(case.case_id)
                continue
            db.execute(
                "UPDATE cases SET accession_number = ?, study_date = ? WHERE id = ?",
                (kept.accession_number, kept.study_date, case.case_id),
            )
            cleared += 1
        for chunk in _chunks(dropped, self.dialect.list_limit):
            where, args = self.dialect.member("case_id", chunk, "bigint")
            for row_id, version in self._delete_embeddings(db, where, args, "id, model_version"):
                changes.remove(version, row_id)
            where, args = self.dialect.member("id", chunk, "bigint")
            db.execute(f"DELETE FROM cases WHERE {where}", args)
        return len(dropped), cleared, changes

    def _write_batch(
        self, db: Db, version: str, vectors: Floats, cases: Sequence[NewCase], changes: Changes, *, record: bool
    ) -> list[Case]:
        """Upsert a batch's cases, insert their missing embeddings; return the cases."""
        known = self._find_cases(db, version, [c.sop_instance_uid for c in cases])
        fresh = self._insert_cases(db, version, cases, known)
        for new in cases:
            if new.sop_instance_uid not in fresh or new is not fresh[new.sop_instance_uid]:
                known[new.sop_instance_uid] = self._update_case(db, known[new.sop_instance_uid], new, changes)
        targets = [known[c.sop_instance_uid] for c in cases]
        self._insert_embeddings(db, version, vectors, targets, changes if record else None)
        return targets

    def _find_cases(self, db: Db, version: str, sops: Sequence[str]) -> dict[str, Case]:
        """Return the stored cases among ``sops``, by SOP Instance UID, as cases of ``version``."""
        found: dict[str, Case] = {}
        for chunk in _chunks(list(dict.fromkeys(sops)), self.dialect.list_limit):
            where, args = self.dialect.member("c.sop_instance_uid", chunk, "text")
            rows = db.execute(f"SELECT {CASE_COLUMNS} FROM cases c WHERE {where}", args).fetchall()
            found.update((row[1], case_from_row(row, version)) for row in rows)
        return found

    def _insert_cases(
        self, db: Db, version: str, cases: Sequence[NewCase], known: dict[str, Case]
    ) -> dict[str, NewCase]:
        """Insert the cases not in ``known`` (first of duplicates wins), add them to ``known``; return them."""
        fresh: dict[str, NewCase] = {}
        for new in cases:
            if new.sop_instance_uid not in known:
                fresh.setdefault(new.sop_instance_uid, new)
        if not fresh:
            return fresh
        values = [tuple(getattr(new, name) for name in NEW_CASE_COLUMNS) for new in fresh.values()]
        rows = self._add_cases(db, values, time.time())
        known.update((row[1], case_from_row(row, version)) for row in rows)
        return fresh

    def _update_case(self, db: Db, case: Case, new: NewCase, changes: Changes) -> Case:
        """Apply what adding ``new`` again may change on a stored case: its label, its promotion."""
        label, source = case.label, case.source
        if new.label is not None and new.label != case.label:
            db.execute("UPDATE cases SET label = ? WHERE id = ?", (new.label, case.case_id))
            label = new.label
        if new.source == "library" and case.source == "store":
            db.execute("UPDATE cases SET source = 'library' WHERE id = ?", (case.case_id,))
            self._promote(db, case.case_id, changes)
            source = "library"
        return case if (label, source) == (case.label, case.source) else replace(case, label=label, source=source)

    def _promote(self, db: Db, case_id: int, changes: Changes) -> None:
        """Move a case's embeddings into the library partitions (new ids, so every process and host sees it)."""
        columns = "id, model_version, patient_key, study_key, vector"
        for row_id, version, patient, study, blob in self._delete_embeddings(db, "case_id = ?", (case_id,), columns):
            changes.remove(version, row_id)
            new_id = _one(
                db.execute(
                    "INSERT INTO embeddings (model_version, case_id, library, patient_key, study_key, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (version, case_id, True, patient, study, blob),
                )
            )
            changes.add((version, True), new_id, np.frombuffer(blob, "<f4").astype(np.float32), patient, study)

    def _insert_embeddings(
        self, db: Db, version: str, vectors: Floats, cases: Sequence[Case], changes: Changes | None
    ) -> None:
        """Insert the embeddings the cases lack for ``version`` (first of duplicates wins)."""
        have = self._embedded(db, version, [c.case_id for c in cases])
        kept: dict[int, tuple[Floats, int, int]] = {}
        rows: list[tuple[int, bool, int, int, bytes]] = []
        for vector, case in zip(vectors, cases, strict=True):
            if case.case_id in have or case.case_id in kept:
                continue
            keys = (key_of(case.patient_hash), key_of(case.study_instance_uid))
            kept[case.case_id] = (vector, *keys)
            rows.append((case.case_id, case.source == "library", *keys, vector.astype("<f4").tobytes()))
        if not rows:
            return
        inserted = self._add_embeddings(db, version, rows, returning=changes is not None)
        if changes is not None:
            for row_id, case_id, library in inserted:
                vector, patient, study = kept[case_id]
                changes.add((version, bool(library)), row_id, vector, patient, study)

    def _embedded(self, db: Db, version: str, case_ids: Sequence[int]) -> set[int]:
        """Return which of ``case_ids`` already have an embedding of ``version``."""
        found: set[int] = set()
        for chunk in _chunks(list(dict.fromkeys(case_ids)), self.dialect.list_limit):
            where, args = self.dialect.member("case_id", chunk, "bigint")
            rows = db.execute(f"SELECT case_id FROM embeddings WHERE {where} AND model_version = ?", (*args, version))
            found.update(row[0] for row in rows.fetchall())
        return found

    # ------------------------------------------------------------------------------------------ reads

    def stream(self, version: str, library: bool, dim: int, after: int, upto: int) -> Iterator[Rows]:
        """Yield a partition's rows with ``after < id <= upto`` in id order, :data:`CHUNK_ROWS` at a time."""
        last = after
        while last < upto:
            rows = self._read(
                "SELECT id, patient_key, study_key, vector FROM embeddings"
                " WHERE model_version = ? AND library = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (version, library, last, upto, CHUNK_ROWS),
                binary=True,
            )
            if not rows:
                return
            last = rows[-1][0]
            yield rows_from_tuples(rows, dim)

    def fetch(self, version: str, ids: Int64s, dim: int) -> Rows:
        """Return the rows of the given embedding ids that still exist, in id order."""
        parts = []
        for chunk in _chunks(ids.tolist(), self.dialect.list_limit):
            where, args = self.dialect.member("id", chunk, "bigint")
            rows = self._read(
                f"SELECT id, patient_key, study_key, vector FROM embeddings WHERE model_version = ? AND {where}"
                " ORDER BY id",
                (version, *args),
                binary=True,
            )
            if rows:
                parts.append(rows_from_tuples(rows, dim))
        return Rows.concat(parts, dim) if parts else empty_rows(dim)

    def cases(self, ids: Sequence[int]) -> dict[int, Case]:
        """Return the cases of the given embedding ids (absent ids left out), with their model version."""
        found: dict[int, Case] = {}
        for chunk in _chunks(ids, self.dialect.list_limit):
            where, args = self.dialect.member("e.id", chunk, "bigint")
            rows = self._read(
                f"SELECT e.id, e.model_version, {CASE_COLUMNS} FROM embeddings e"
                f" JOIN cases c ON c.id = e.case_id WHERE {where}",
                args,
            )
            found.update((row[0], case_from_row(row[2:], row[1])) for row in rows)
        return found

    def invalid(self) -> list[tuple[Case, tuple[str, ...]]]:
        """Return every stored case that fails today's identifier checks, with its problems, in id order."""
        return _failing(self._read(f"SELECT {CASE_COLUMNS} FROM cases c ORDER BY c.id"))


T = TypeVar("T")


def _chunks(values: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Yield ``values`` in slices of ``size`` (the values one statement binds)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _failing(rows: Iterable[Sequence[Any]]) -> list[tuple[Case, tuple[str, ...]]]:
    """The cases of ``cases`` rows that fail today's identifier checks, with their problems, in the rows' order."""
    found = []
    for row in rows:
        case = case_from_row(row, "")
        problems = identifier_problems(case)
        if problems:
            found.append((case, problems))
    return found


def _one(result: Result) -> Any:
    """The first column of the one row a statement returns."""
    rows = result.fetchall()
    if not rows:
        raise StorageError("the database returned no row where one was expected")
    return rows[0][0]


def rows_from_tuples(rows: list[tuple[int, int, int, bytes]], dim: int) -> Rows:
    """Turn ``(id, patient_key, study_key, vector)`` tuples into a :class:`Rows` batch."""
    vectors = np.frombuffer(b"".join(r[3] for r in rows), dtype="<f4").reshape(len(rows), dim)
    return Rows(
        vectors.astype(np.float32),
        np.fromiter((r[0] for r in rows), np.int64, len(rows)),
        np.fromiter((r[1] for r in rows), np.int64, len(rows)),
        np.fromiter((r[2] for r in rows), np.int64, len(rows)),
    )


def case_from_row(row: Sequence[Any], version: str) -> Case:
    """Return the Case of a ``cases`` row (the columns of :data:`CASE_COLUMNS`), as matched under ``version``."""
    case_id, sop, study, accession, date, patient, label, source = row
    return Case(
        sop_instance_uid=sop,
        study_instance_uid=study,
        accession_number=accession,
        study_date=date,
        patient_hash=patient,
        label=cast("Label | None", label),
        source=cast("Source", source),
        case_id=case_id,
        model_version=version,
    )


def batched(items: Iterable[tuple[NewCase, Floats]]) -> Iterator[tuple[tuple[NewCase, Floats], ...]]:
    """Yield ``items`` in tuples of :data:`BATCH_ROWS` (``itertools.batched`` before Python 3.12)."""
    iterator = iter(items)
    while batch := tuple(itertools.islice(iterator, BATCH_ROWS)):
        yield batch
