"""Patient identifiers are kept as hashes keyed with the site's secret; metric labels come from bounded sets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cxr_node.errors import StorageError
from cxr_node.metrics import SKIP_CATEGORIES, by_category, skip_category
from cxr_node.privacy import PatientHasher, load_key


def test_the_key_is_created_once_owner_only_and_reused(tmp_path: Path) -> None:
    """The first use creates a random key readable by its owner only; later uses read the same key."""
    path = tmp_path / "state" / "identifier.key"
    key = load_key(path)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path) == key


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    """A key file group or others may read is refused with the chmod to run."""
    path = tmp_path / "identifier.key"
    load_key(path)
    path.chmod(0o644)
    with pytest.raises(StorageError, match="chmod 600"):
        load_key(path)


def test_hashes_are_keyed_stable_and_never_show_the_key() -> None:
    """The same ID hashes the same under one key and differently under another; the key never prints."""
    one, other = PatientHasher(b"a" * 32), PatientHasher(b"b" * 32)
    assert one("PAT-1") == one(" PAT-1 ") != other("PAT-1")
    assert len(one("x")) == 16 and "aaaa" not in repr(one)


def test_skip_reasons_become_a_bounded_set_of_labels() -> None:
    """Skip reasons, whatever values they quote, map to the rule that skipped them, or 'other'."""
    reasons = {
        "view position LL is not frontal (triage.view_positions)": 2,
        "view position X" * 50: 1,
        "modality MR not in triage.modalities": 3,
        "something new": 1,
    }
    assert by_category(reasons) == {"view_position": 3, "modality": 3, "other": 1}
    labels = {label for _, label in SKIP_CATEGORIES} | {"other"}
    assert {skip_category(reason) for reason in reasons} <= labels
