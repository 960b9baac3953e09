"""DICOM knowledge with no policy: status codes, SOP classes, UIDs, pixel decoding."""
