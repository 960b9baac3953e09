"""Stage 3, nearest-neighbour retrieval: past cases similar to a new image, by embedding (numpy + stdlib only;
the PostgreSQL case store, :mod:`cxr_node.neighbours.postgres`, is imported only where a site uses one)."""

from cxr_node.neighbours.cases import LABELS, SOURCES, Case, Label, Neighbour, NewCase, Source, case_number
from cxr_node.neighbours.engine import EngineParams
from cxr_node.neighbours.index import (
    CHECKPOINTS,
    DB_NAME,
    IndexStats,
    NeighbourIndex,
    ReplicaIndex,
    SqliteNeighbourIndex,
)

__all__ = [
    "CHECKPOINTS",
    "DB_NAME",
    "LABELS",
    "SOURCES",
    "Case",
    "EngineParams",
    "IndexStats",
    "Label",
    "Neighbour",
    "NeighbourIndex",
    "NewCase",
    "ReplicaIndex",
    "Source",
    "SqliteNeighbourIndex",
    "case_number",
]
