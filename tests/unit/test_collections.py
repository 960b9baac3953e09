"""A started worker takes what it holds for life out of the garbage collector's walks; garbage made later is
still collected."""

from __future__ import annotations

import gc
import weakref

from cxr_node.app import keep_out_of_collections


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_startup_objects_are_frozen_and_later_cycles_still_collected() -> None:
    """After the call everything alive is in the permanent generation (full collections skip it); a reference
    cycle made afterwards is found and freed by the next collection."""
    try:
        keep_out_of_collections()
        assert gc.get_freeze_count() > 0
        assert len(gc.get_objects(generation=2)) < gc.get_freeze_count()
        first, second = _Node(), _Node()
        first.other, second.other = second, first
        gone = weakref.ref(first)
        del first, second
        assert gone() is not None  # only a cycle holds it now
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
