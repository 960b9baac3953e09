"""Stage 2: arrays in, arrays out; torch inside, no DICOM libraries."""
