"""Deterministic synthetic chest radiographs with lung masks, their CR/DX DICOM files and labelled sets."""

from cxr_node.training.phantoms.anatomy import DISTRACTORS, MAX_SIZE, MIN_SIZE, PHANTOM_VERSION, Phantom, make_phantom
from cxr_node.training.phantoms.dicom import (
    CR_IMAGE_STORAGE,
    DX_PRESENTATION_STORAGE,
    MANUFACTURER,
    phantom_to_dataset,
)
from cxr_node.training.phantoms.sets import CSV_COLUMNS, LABELS_CSV, write_phantom_set

__all__ = [
    "CR_IMAGE_STORAGE",
    "CSV_COLUMNS",
    "DISTRACTORS",
    "DX_PRESENTATION_STORAGE",
    "LABELS_CSV",
    "MANUFACTURER",
    "MAX_SIZE",
    "MIN_SIZE",
    "PHANTOM_VERSION",
    "Phantom",
    "make_phantom",
    "phantom_to_dataset",
    "write_phantom_set",
]
