"""Stage 1: the DICOM door. Receives instances, stores them durably, triages them; never imports torch."""
