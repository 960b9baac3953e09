"""The durable half of the index: the case store every backend implements, and its embedded backend, SQLite.

:class:`CaseStore` is the interface the index uses; :class:`SqliteCaseStore` keeps the cases in one file on
this host, :class:`~cxr_node.neighbours.postgres.PgCaseStore` in a PostgreSQL database every host shares. Either
is the source of truth; the search structures in memory and the checkpoint files are caches of it.

SQLite in WAL mode with ``synchronous=FULL``: a write that returned is on disk and survives kill -9 or power
loss. ``secure_delete`` is on, so a purged case's rows are overwritten, not just unlinked. One row per image
(``cases``, keyed by SOP Instance UID; its id gives the case number) and one row per image and model version
(``embeddings``: the unit float32 vector, the partition it belongs to and its two exclusion keys). Embedding
ids only grow (AUTOINCREMENT), which is what lets a checkpoint name the rows it holds by a watermark.

Schema versions (SQLite's ``user_version``): 1, the first layout; 2, the same tables, cleaned once when a
version-1 file is first opened: cases whose identifiers no report can write (an invalid UID, which an
older node indexed) are deleted, and accession numbers or dates that cannot be written are cleared
(:func:`~cxr_node.neighbours.cases.indexable`). ``cxr-node index check`` / ``drop-invalid`` run the
same checks on demand.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, cast

import numpy as np

from cxr_node.errors import StorageError
from cxr_node.neighbours.cases import Case, Label, NewCase, Source, identifier_problems, indexable
from cxr_node.neighbours.engine import Floats, Int64s, Rows, empty_rows, key_of

SCHEMA_VERSION: Final = 2
FIRST_SCHEMA: Final = 1  # files of this version are cleaned of invalid cases when first opened
PAGE_SIZE: Final = 16384  # a 512-d float32 vector (2 KiB) wastes little of a page; set before the first table
BATCH_ROWS: Final = 1000  # rows written per executemany
CHUNK_ROWS: Final = 16384  # rows read per statement when streaming a partition (32 MiB at 512-d)
_IN_LIMIT: Final = 500  # ids bound per "IN (...)" statement (SQLite allows 32766; keeps statements small)
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    study_instance_uid TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_date TEXT NOT NULL,
    patient_hash TEXT NOT NULL,
    label TEXT CHECK (label IS NULL OR label IN ('covid', 'non-covid')),
    source TEXT NOT NULL CHECK (source IN ('store', 'library')),
    added_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_by_study ON cases (study_instance_uid);
CREATE TABLE IF NOT EXISTS versions (
    model_version TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version TEXT NOT NULL REFERENCES versions (model_version),
    case_id INTEGER NOT NULL REFERENCES cases (id),
    library INTEGER NOT NULL,
    patient_key INTEGER NOT NULL,
    study_key INTEGER NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (case_id, model_version)
);
CREATE INDEX IF NOT EXISTS embeddings_by_version ON embeddings (model_version, library, id);
"""
CASE_COLUMNS: Final = (
    "c.id, c.sop_instance_uid, c.study_instance_uid, c.accession_number, c.study_date, c.patient_hash,"
    " c.label, c.source"
)

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


Tx = TypeVar("Tx")
"""A backend's write transaction handle, passed back to the writes that run inside it."""


class CaseStore(Protocol[Tx]):
    """The case store as the index uses it: every backend of the neighbour cases implements this.

    Writes that change the search structures (``insert``, ``replace``, ``purge``) run inside the caller's
    :meth:`transaction` and return the :class:`Changes` the index applies to its in-memory partitions.
    """

    @property
    def shared(self) -> bool:
        """True when other hosts write the store: their purges cannot delete this host's checkpoint files, so
        the index deletes those itself when it finds rows purged (False: one host, one folder)."""
        ...

    def transaction(self) -> AbstractContextManager[Tx]:
        """Hold the write lock for the block; commit at its end, roll back on error."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Read in one consistent snapshot for the block."""
        ...

    def data_version(self) -> int:
        """A number that changes when another process or host commits (the index then catches up); cheap."""
        ...

    def truncate_wal(self) -> None:
        """Bound the store's write-ahead log after a large write."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...

    def version_info(self, version: str) -> tuple[int, int] | None:
        """``(dim, generation)`` of a model version, or None."""
        ...

    def count(self, version: str, library: bool | None = None) -> int:
        """How many embeddings a model version has (of one partition when ``library`` is given)."""
        ...

    def versions(self) -> list[str]:
        """The model versions the store knows, sorted."""
        ...

    def insert(self, tx: Tx, version: str, vectors: Floats, cases: Sequence[NewCase]) -> tuple[list[Case], Changes]:
        """Add one embedding per case inside ``tx``."""
        ...

    def replace(self, tx: Tx, version: str, dim: int, items: Iterable[tuple[NewCase, Floats]]) -> tuple[int, Changes]:
        """Replace every embedding of ``version`` inside ``tx``."""
        ...

    def set_label(self, study_uid: str, label: Label | None) -> int:
        """Set the label of every case of a study."""
        ...

    def purge(self, tx: Tx, study_uid: str) -> tuple[int, Changes]:
        """Delete a study's cases and embeddings inside ``tx``."""
        ...

    def ids(self, version: str, library: bool, upto: int | None = None) -> Int64s:
        """Embedding ids of one partition, ascending."""
        ...

    def max_id(self, version: str) -> int:
        """The highest embedding id of a version (0 when none)."""
        ...

    def stream(self, version: str, library: bool, dim: int, after: int, upto: int) -> Iterator[Rows]:
        """The rows of one partition with ids in ``(after, upto]``, in chunks."""
        ...

    def fetch(self, version: str, ids: Int64s, dim: int) -> Rows:
        """The rows with the given ids."""
        ...

    def cases(self, ids: Sequence[int]) -> dict[int, Case]:
        """The cases of the given embedding ids."""
        ...

    def invalid(self) -> list[tuple[Case, tuple[str, ...]]]:
        """Every stored case that fails today's identifier checks, with its problems."""
        ...

    def clean(self, tx: Tx) -> tuple[int, int, Changes]:
        """Inside ``tx``, delete the cases that cannot be named and clear identifiers that cannot be written;
        return (cases deleted, cases cleared, changes)."""
        ...


class SqliteCaseStore:
    """Cases and embeddings in one SQLite file; safe to share between threads and processes.

    Parameters
    ----------
    path : Path
        The database file; created with its schema when missing.
    fsync : bool
        ``synchronous=FULL`` when True (a returned commit survives power loss), ``NORMAL`` otherwise.

    Raises
    ------
    StorageError
        When the file cannot be opened or was written by a newer schema.
    """

    shared: Final = False
    """Every process that writes the file runs on this host and shares its checkpoint folder."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only takes effect on a new file
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
            self._db.execute("PRAGMA secure_delete = ON")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: cannot open the neighbour index database: {exc}") from exc

    def _migrate(self) -> None:
        found = self._schema()
        if found > SCHEMA_VERSION:
            raise StorageError(f"{self.path}: index schema {found} is newer than this cxr-node ({SCHEMA_VERSION})")
        if found < FIRST_SCHEMA:
            self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif found < SCHEMA_VERSION:
            self._upgrade()

    def _schema(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _upgrade(self) -> None:
        """Version 1 → 2, once, whichever process opens the file first: clean it of invalid cases.

        Checkpoints written before keep the deleted vectors' ids; loading one reconciles it with the
        database, so none is ever served.
        """
        with self.transaction() as db:
            if self._schema() < SCHEMA_VERSION:  # another process may have upgraded it meanwhile
                self.clean(db)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------------------------------ plumbing

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the write lock (``BEGIN IMMEDIATE``) for the block; commit at its end, roll back on error.

        Raises
        ------
        StorageError
            When SQLite fails (disk full, database locked past the busy timeout, I/O error).
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"{self.path}: neighbour index write failed: {exc}") from exc
                raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Read in one snapshot for the block (no-op inside a transaction, which is one already)."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN")
            try:
                yield
            finally:
                self._db.execute("COMMIT")

    def data_version(self) -> int:
        """Return SQLite's ``data_version``: it changes when another connection commits."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def truncate_wal(self) -> None:
        """Copy the WAL into the database and truncate it (bounds disk; drops purged pages from the WAL)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------ versions

    def version_info(self, version: str) -> tuple[int, int] | None:
        """Return ``(dim, generation)`` of a model version, or None when it has no embeddings yet."""
        with self._lock:
            row = self._db.execute(
                "SELECT dim, generation FROM versions WHERE model_version = ?", (version,)
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def count(self, version: str, library: bool | None = None) -> int:
        """Return how many embeddings a model version has (of one partition when ``library`` is given)."""
        where: str = "model_version = ?"
        args: tuple[object, ...] = (version,)
        if library is not None:
            where, args = f"{where} AND library = ?", (version, int(library))
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM embeddings WHERE {where}", args).fetchone()[0])

    def versions(self) -> list[str]:
        """Return the model versions the index knows, sorted."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT model_version FROM versions ORDER BY model_version")]

    # ------------------------------------------------------------------------------------------ writes

    def insert(
        self, db: sqlite3.Connection, version: str, vectors: Floats, cases: Sequence[NewCase]
    ) -> tuple[list[Case], Changes]:
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

    def replace(
        self, db: sqlite3.Connection, version: str, dim: int, items: Iterable[tuple[NewCase, Floats]]
    ) -> tuple[int, Changes]:
        """Replace every embedding of ``version`` by ``items`` inside the caller's transaction.

        The version's generation goes up by one (so checkpoints and other processes see a rebuild), and
        cases left without any embedding are deleted. Returns how many embeddings were written and the
        changes to *other* versions (library promotions); the rebuilt version itself is reloaded whole.
        """
        db.execute("DELETE FROM embeddings WHERE model_version = ?", (version,))
        db.execute(
            "INSERT INTO versions (model_version, dim, generation) VALUES (?, ?, 1) ON CONFLICT (model_version)"
            " DO UPDATE SET dim = excluded.dim, generation = generation + 1",
            (version, dim),
        )
        changes, count = Changes(), 0
        for batch in batched(items):
            cases = [case for case, _ in batch]
            vectors = np.stack([vector for _, vector in batch]).astype(np.float32, copy=False)
            count += len(self._write_batch(db, version, vectors, cases, changes, record=False))
        db.execute("DELETE FROM cases WHERE id NOT IN (SELECT case_id FROM embeddings)")
        return count, changes

    def set_label(self, study_uid: str, label: Label | None) -> int:
        """Set the label of every case of a study; return how many cases it changed or confirmed."""
        with self.transaction() as db:
            return db.execute("UPDATE cases SET label = ? WHERE study_instance_uid = ?", (label, study_uid)).rowcount

    def purge(self, db: sqlite3.Connection, study_uid: str) -> tuple[int, Changes]:
        """Delete a study's cases and all their embeddings inside the caller's transaction."""
        changes = Changes()
        rows = db.execute(
            "SELECT e.id, e.model_version FROM embeddings e JOIN cases c ON c.id = e.case_id"
            " WHERE c.study_instance_uid = ?",
            (study_uid,),
        ).fetchall()
        for row_id, version in rows:
            changes.remove(version, row_id)
        db.execute(
            "DELETE FROM embeddings WHERE case_id IN (SELECT id FROM cases WHERE study_instance_uid = ?)", (study_uid,)
        )
        return db.execute("DELETE FROM cases WHERE study_instance_uid = ?", (study_uid,)).rowcount, changes

    def clean(self, db: sqlite3.Connection) -> tuple[int, int, Changes]:
        """Inside the caller's transaction, delete the cases whose UIDs are unusable (with their embeddings)
        and clear accession numbers and dates that cannot be written; return (deleted, cleared, changes)."""
        changes, dropped, cleared = Changes(), [], 0
        for case, _ in self._invalid(db):
            kept, _problems = indexable(case)
            if kept is None:
                dropped.append(case.case_id)
                continue
            db.execute(
                "UPDATE cases SET accession_number = ?, study_date = ? WHERE id = ?",
                (kept.accession_number, kept.study_date, case.case_id),
            )
            cleared += 1
        for start in range(0, len(dropped), _IN_LIMIT):
            self._delete_cases(db, dropped[start : start + _IN_LIMIT], changes)
        return len(dropped), cleared, changes

    def _delete_cases(self, db: sqlite3.Connection, case_ids: Sequence[int], changes: Changes) -> None:
        """Delete some cases and their embeddings inside the caller's transaction, recording the changes."""
        marks = ", ".join("?" * len(case_ids))
        rows = db.execute(f"SELECT id, model_version FROM embeddings WHERE case_id IN ({marks})", case_ids)
        for row_id, version in rows.fetchall():
            changes.remove(version, row_id)
        db.execute(f"DELETE FROM embeddings WHERE case_id IN ({marks})", case_ids)
        db.execute(f"DELETE FROM cases WHERE id IN ({marks})", case_ids)

    def _write_batch(
        self,
        db: sqlite3.Connection,
        version: str,
        vectors: Floats,
        cases: Sequence[NewCase],
        changes: Changes,
        *,
        record: bool,
    ) -> list[Case]:
        """Upsert a batch's cases, insert their missing embeddings (``executemany``); return the cases."""
        known = self._find_cases(db, version, [c.sop_instance_uid for c in cases])
        fresh = self._insert_cases(db, version, cases, known)
        for new in cases:
            if new.sop_instance_uid not in fresh or new is not fresh[new.sop_instance_uid]:
                known[new.sop_instance_uid] = self._update_case(db, known[new.sop_instance_uid], new, changes)
        targets = [known[c.sop_instance_uid] for c in cases]
        self._insert_embeddings(db, version, vectors, targets, changes if record else None)
        return targets

    def _find_cases(self, db: sqlite3.Connection, version: str, sops: Sequence[str]) -> dict[str, Case]:
        """Return the stored cases among ``sops``, by SOP Instance UID, as cases of ``version``."""
        found: dict[str, Case] = {}
        unique = list(dict.fromkeys(sops))
        for start in range(0, len(unique), _IN_LIMIT):
            chunk = unique[start : start + _IN_LIMIT]
            marks = ", ".join("?" * len(chunk))
            rows = db.execute(f"SELECT {CASE_COLUMNS} FROM cases c WHERE c.sop_instance_uid IN ({marks})", chunk)
            found.update((row[1], case_from_row(row, version)) for row in rows)
        return found

    def _insert_cases(
        self, db: sqlite3.Connection, version: str, cases: Sequence[NewCase], known: dict[str, Case]
    ) -> dict[str, NewCase]:
        """Insert the cases not in ``known`` (first of duplicates wins), add them to ``known``; return them."""
        fresh: dict[str, NewCase] = {}
        for new in cases:
            if new.sop_instance_uid not in known:
                fresh.setdefault(new.sop_instance_uid, new)
        if not fresh:
            return fresh
        before = db.execute("SELECT COALESCE(MAX(id), 0) FROM cases").fetchone()[0]
        now = time.time()
        db.executemany(
            "INSERT INTO cases (sop_instance_uid, study_instance_uid, accession_number, study_date,"
            " patient_hash, label, source, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    n.sop_instance_uid,
                    n.study_instance_uid,
                    n.accession_number,
                    n.study_date,
                    n.patient_hash,
                    n.label,
                    n.source,
                    now,
                )
                for n in fresh.values()
            ],
        )
        rows = db.execute(f"SELECT {CASE_COLUMNS} FROM cases c WHERE c.id > ?", (before,))
        known.update((row[1], case_from_row(row, version)) for row in rows)
        return fresh

    def _update_case(self, db: sqlite3.Connection, case: Case, new: NewCase, changes: Changes) -> Case:
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

    def _promote(self, db: sqlite3.Connection, case_id: int, changes: Changes) -> None:
        """Move a case's embeddings into the library partitions (new ids, so every process sees the move)."""
        rows = db.execute(
            "SELECT id, model_version, patient_key, study_key, vector FROM embeddings WHERE case_id = ?", (case_id,)
        ).fetchall()
        for row_id, version, patient, study, blob in rows:
            db.execute("DELETE FROM embeddings WHERE id = ?", (row_id,))
            changes.remove(version, row_id)
            new_id = db.execute(
                "INSERT INTO embeddings (model_version, case_id, library, patient_key, study_key, vector)"
                " VALUES (?, ?, 1, ?, ?, ?) RETURNING id",
                (version, case_id, patient, study, blob),
            ).fetchone()[0]
            changes.add((version, True), new_id, np.frombuffer(blob, "<f4").astype(np.float32), patient, study)

    def _insert_embeddings(
        self, db: sqlite3.Connection, version: str, vectors: Floats, cases: Sequence[Case], changes: Changes | None
    ) -> None:
        """Insert the embeddings the cases lack for ``version`` (first of duplicates wins)."""
        have = self._embedded(db, version, [c.case_id for c in cases])
        rows, kept = [], {}
        for vector, case in zip(vectors, cases, strict=True):
            if case.case_id in have or case.case_id in kept:
                continue
            keys = (key_of(case.patient_hash), key_of(case.study_instance_uid))
            kept[case.case_id] = (vector, *keys)
            library = int(case.source == "library")
            rows.append((version, case.case_id, library, *keys, vector.astype("<f4").tobytes()))
        if not rows:
            return
        before = db.execute("SELECT COALESCE(MAX(id), 0) FROM embeddings").fetchone()[0]
        db.executemany(
            "INSERT INTO embeddings (model_version, case_id, library, patient_key, study_key, vector)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        if changes is not None:
            inserted = db.execute("SELECT id, case_id, library FROM embeddings WHERE id > ?", (before,))
            for row_id, case_id, library in inserted:
                vector, patient, study = kept[case_id]
                changes.add((version, bool(library)), row_id, vector, patient, study)

    def _embedded(self, db: sqlite3.Connection, version: str, case_ids: Sequence[int]) -> set[int]:
        """Return which of ``case_ids`` already have an embedding of ``version``."""
        found: set[int] = set()
        unique = list(dict.fromkeys(case_ids))
        for start in range(0, len(unique), _IN_LIMIT):
            chunk = unique[start : start + _IN_LIMIT]
            marks = ", ".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT case_id FROM embeddings WHERE case_id IN ({marks}) AND model_version = ?", (*chunk, version)
            )
            found.update(row[0] for row in rows)
        return found

    # ------------------------------------------------------------------------------------------ reads

    def ids(self, version: str, library: bool, upto: int | None = None) -> Int64s:
        """Return the sorted embedding ids of a partition (those ``<= upto`` when given)."""
        limit = -1 if upto is None else upto
        with self._lock:
            cursor = self._db.execute(
                "SELECT id FROM embeddings WHERE model_version = ? AND library = ? AND (? < 0 OR id <= ?) ORDER BY id",
                (version, int(library), limit, limit),
            )
            return np.fromiter((r[0] for r in cursor), np.int64)

    def max_id(self, version: str) -> int:
        """Return the largest embedding id of a version (0 when none)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(id) FROM embeddings WHERE model_version = ?", (version,)).fetchone()
        return int(row[0] or 0)

    def stream(self, version: str, library: bool, dim: int, after: int, upto: int) -> Iterator[Rows]:
        """Yield a partition's rows with ``after < id <= upto`` in id order, :data:`CHUNK_ROWS` at a time."""
        last = after
        while last < upto:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, patient_key, study_key, vector FROM embeddings"
                    " WHERE model_version = ? AND library = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                    (version, int(library), last, upto, CHUNK_ROWS),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows_from_tuples(rows, dim)

    def fetch(self, version: str, ids: Int64s, dim: int) -> Rows:
        """Return the rows of the given embedding ids that still exist, in id order."""
        parts = []
        for start in range(0, len(ids), _IN_LIMIT):
            chunk = ids[start : start + _IN_LIMIT].tolist()
            marks = ", ".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, patient_key, study_key, vector FROM embeddings WHERE model_version = ?"
                    f" AND id IN ({marks}) ORDER BY id",
                    (version, *chunk),
                ).fetchall()
            if rows:
                parts.append(rows_from_tuples(rows, dim))
        return Rows.concat(parts, dim) if parts else empty_rows(dim)

    def cases(self, ids: Sequence[int]) -> dict[int, Case]:
        """Return the cases of the given embedding ids (absent ids left out), with their model version."""
        found: dict[int, Case] = {}
        for start in range(0, len(ids), _IN_LIMIT):
            chunk = list(ids[start : start + _IN_LIMIT])
            marks = ", ".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT e.id, e.model_version, {CASE_COLUMNS} FROM embeddings e"
                    f" JOIN cases c ON c.id = e.case_id WHERE e.id IN ({marks})",
                    chunk,
                ).fetchall()
            found.update((row[0], case_from_row(row[2:], row[1])) for row in rows)
        return found

    def invalid(self) -> list[tuple[Case, tuple[str, ...]]]:
        """Return every stored case that fails today's identifier checks, with its problems, in id order."""
        with self._lock:
            return self._invalid(self._db)

    def _invalid(self, db: sqlite3.Connection) -> list[tuple[Case, tuple[str, ...]]]:
        found = []
        for row in db.execute(f"SELECT {CASE_COLUMNS} FROM cases c ORDER BY c.id"):
            case = case_from_row(row, "")
            problems = identifier_problems(case)
            if problems:
                found.append((case, problems))
        return found


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
