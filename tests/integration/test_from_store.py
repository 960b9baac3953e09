"""A labelled training set built from what the node stored, joined to labels by accession number."""

from __future__ import annotations

import csv
from pathlib import Path

from cxr_node.app import Receiver
from cxr_node.dicom import status
from cxr_node.training.datasets import read_rows
from cxr_node.training.from_store import build_from_store
from cxr_node.training.phantoms import write_phantom_set
from tests.integration.helpers import store_all


def test_stored_images_become_a_labelled_set(receiver: Receiver, tmp_path: Path) -> None:
    """Stored phantoms with labelled accessions become rows; unlabelled ones are counted, not guessed."""
    labels_csv = write_phantom_set(tmp_path / "ph", n=10, seed=7, size=96)
    with labels_csv.open() as handle:
        phantoms = list(csv.DictReader(handle))
    files = [labels_csv.parent / row["path"] for row in phantoms]
    assert store_all(receiver.port, files) == [status.SUCCESS] * 10
    site_labels = tmp_path / "accessions.csv"
    with site_labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["accession_number", "label"])
        writer.writerows([row["accession_number"], row["label"]] for row in phantoms[:8])
        writer.writerow(["NOT-STORED-1", "covid"])
    report = build_from_store(receiver.settings.storage.root, site_labels, tmp_path / "set.csv")
    assert (report.rows, report.unlabelled, report.labels_without_image) == (8, 2, 1)
    rows = read_rows(report.csv)
    truth = {row["sop_instance_uid"]: row["label"] for row in phantoms}
    assert all(("covid" if row.label else "non-covid") == truth[row.uid] for row in rows)
    assert all(row.path.is_file() and row.path.is_relative_to(receiver.settings.storage.root) for row in rows)
    assert all(len(row.patient_id) == 16 for row in rows)  # the node's hash, never the Patient ID in clear
