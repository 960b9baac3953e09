"""Stage 5: results to the destinations: C-STORE (and C-ECHO) to DICOM peers, STOW-RS to DICOMweb servers."""
