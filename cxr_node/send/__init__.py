"""Stage 5: C-STORE and C-ECHO to DICOM peers."""
