"""Stage 4: pure builders of the node's DICOM outputs (findings in, pydicom datasets out; no I/O, no network)."""
