"""Retrieval quality through the node's own index: precision@k of labelled neighbours on held-out phantoms.

A reference library of labelled phantoms is embedded by the demo models (as ``cxr-node index import`` does);
each held-out phantom (other seeds, other patients) queries the index, and precision@k is the share of its k
neighbours whose label equals its own. Chance level is the library's share of the query's class.

    .venv/bin/python bench/retrieval.py [--library 200] [--queries 100] [-k 5]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

from cxr_node.app import load_model, patient_hasher
from cxr_node.config import Settings
from cxr_node.neighbours import SqliteNeighbourIndex
from cxr_node.training.phantoms import write_phantom_set
from cxr_node.work.library import Embedder


def labelled(folder: Path, n: int, seed: int) -> list[tuple[Path, None, str]]:
    """Write ``n`` phantoms; return (file, None, label) triples for :meth:`Embedder.embed`."""
    labels = write_phantom_set(folder, n=n, seed=seed, size=512)
    with labels.open(newline="") as handle:
        return [(labels.parent / row["path"], None, row["label"]) for row in csv.DictReader(handle)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=int, default=200)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        settings = Settings().with_overrides({"storage.root": str(base / "state")})
        manifest, engine = load_model(settings)
        embedder = Embedder(engine, patient_hasher(settings), 1024)
        version = manifest.version
        index = SqliteNeighbourIndex(base / "index", fsync=False)
        library = list(embedder.embed(labelled(base / "library", args.library, 2021_11), source="library"))
        for item in library:
            if item.embedding is not None:
                index.add(version, item.embedding, item.case)
        precisions, labels = [], []
        for item in embedder.embed(labelled(base / "queries", args.queries, 2021_12)):
            if item.embedding is None:
                continue
            found = index.query(
                version,
                item.embedding,
                args.k,
                patient_hash=item.case.patient_hash,
                study_instance_uid=item.case.study_instance_uid,
                library_only=True,
            )
            precisions.append(np.mean([n.case.label == item.case.label for n in found]))
            labels.append(item.case.label)
        index.close()
    stored = [item.case.label for item in library if item.embedding is not None]
    chance = np.mean([stored.count(label) / len(stored) for label in labels])
    by_class = {c: np.mean([p for p, lab in zip(precisions, labels, strict=True) if lab == c]) for c in set(labels)}
    print(f"library {len(stored)} phantoms, {len(precisions)} held-out queries, k={args.k}")
    print(
        f"precision@{args.k} {np.mean(precisions):.3f} (chance {chance:.3f}); by class: "
        + ", ".join(f"{c} {v:.3f}" for c, v in sorted(by_class.items()))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
